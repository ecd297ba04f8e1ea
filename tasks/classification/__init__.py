"""ImageNet-1k classification (paper Table 1): data module, stand-in data, LightningModule.

``build_task(cfg)`` is the entry point named by ``configs/task/imagenet.yaml`` (``task.builder``).
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from .data import ImageNetDataModule
from .module import ImageClassifier

__all__ = ["ImageClassifier", "ImageNetDataModule", "build_task"]


def build_task(cfg: DictConfig, stage: str = "fit") -> tuple[ImageClassifier, ImageNetDataModule]:
    """The LightningModule and data module for a resolved run config.

    The data folder is checked first (``stage="fit"``: both splits, ``"validate"``: val/ only), so a
    wrong ``data.root`` fails before the model is built.
    """
    data: dict[str, Any] = OmegaConf.to_container(cfg.data, resolve=True)  # type: ignore[assignment]
    datamodule = ImageNetDataModule(seed=int(cfg.seed), **{k: v for k, v in data.items() if k != "seed"})
    datamodule.check(stage)
    module = ImageClassifier(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    return module, datamodule
