"""ImageNet-1k classification (paper Table 1): data module, stand-in data, LightningModule.

``build_task(cfg)`` is the entry point named by ``configs/task/imagenet.yaml`` (``task.builder``).
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from tasks.common.errors import ConfigError

from .data import ImageNetDataModule
from .module import ImageClassifier

__all__ = ["ImageClassifier", "ImageNetDataModule", "build_task"]


def build_task(cfg: DictConfig, stage: str = "fit", datamodule_cls: type[ImageNetDataModule] = ImageNetDataModule
               ) -> tuple[ImageClassifier, ImageNetDataModule]:
    """The LightningModule and data module for a resolved run config.

    The data folder is checked first (``stage="fit"``: both splits, ``"validate"``: val/ only), so a
    wrong ``data.root`` fails before the model is built. ``data.num_classes: null`` (ImageNet-22k) takes
    the class count the data module found.
    """
    check_pretrained_is_set(cfg)
    data: dict[str, Any] = OmegaConf.to_container(cfg.data, resolve=True)  # type: ignore[assignment]
    datamodule = datamodule_cls(seed=int(cfg.seed), **{k: v for k, v in data.items() if k != "seed"})
    datamodule.check(stage)
    config: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    if config["data"].get("num_classes") is None:
        config["data"]["num_classes"] = datamodule.num_classes
    module = ImageClassifier(config)
    return module, datamodule


def check_pretrained_is_set(cfg: DictConfig) -> None:
    """A fine-tuning experiment (one whose ``paper.pretrain`` block names its pre-training run) must be given
    the checkpoint to start from; ``model.pretrained: ???`` asks for one in any config.

    Raises :class:`ConfigError` naming the key to set and the pre-training run that produces the checkpoint.
    """
    pretrain = OmegaConf.select(cfg, "paper.pretrain", default=None) or {}
    try:
        value = OmegaConf.select(cfg, "model.pretrained", default=None, throw_on_missing=True)
    except (MissingMandatoryValue, InterpolationToMissingValueError):
        value = None
    else:
        if value or not pretrain:
            return
    key = pretrain.get("checkpoint_key") or "model.pretrained"
    source = (f", the checkpoints/last.ckpt of the run `python train.py experiment={pretrain['experiment']}`"
              if pretrain.get("experiment") else "")
    raise ConfigError(f"This experiment fine-tunes a pre-trained model but {key} is not set: pass {key}=PATH{source} "
                      f"(or model.pretrained=PATH).")
