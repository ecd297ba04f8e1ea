"""Long Range Arena, Long ListOps (paper Table 6): generator, data, encoders, LightningModule, benchmark.

``build_task(cfg)`` is the entry point named by ``configs/task/lra_listops.yaml`` (``task.builder``).

Modules: ``listops_gen`` (LRA's generator, seeded, multi-process), ``tokenizer`` (fixed vocabulary),
``data`` (TSV -> cached tensors -> ListOpsDataModule), ``attention`` (BigBird block-sparse and Reformer
LSH attention, self and onto the GRC cache), ``models`` (LRA encoders, optionally cached), ``module``
(ListOpsClassifier, LRA's lr schedule), ``benchmark`` (speed / memory versus length). See docs/lra.md.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["build_task"]


def build_task(cfg: Any, stage: str = "fit") -> tuple[Any, Any]:
    """The LightningModule and data module for a resolved run config.

    The data is located (and generated, for configs with ``data.generate``) and loaded first, so a
    wrong ``data.root`` or a malformed file fails with one clear message before the model is built.
    """
    from omegaconf import OmegaConf

    from .data import ListOpsDataModule
    from .module import ListOpsClassifier

    data: dict[str, Any] = OmegaConf.to_container(cfg.data, resolve=True)  # type: ignore[assignment]
    datamodule = ListOpsDataModule(seed=int(cfg.seed), **{k: v for k, v in data.items() if k != "seed"})
    datamodule.check(stage)
    log.info("ListOps %s: %s; test majority-class rate %.2f%%", datamodule.data_dir,
             ", ".join(f"{k} {len(v)}" for k, v in datamodule.datasets.items()), datamodule.majority_rate("test"))
    module = ListOpsClassifier(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    return module, datamodule
