"""COCO detection and instance segmentation (paper Tables 3 and 4): data, detectors, evaluation, module.

``build_task(cfg)`` is the entry point named by ``configs/task/coco_{maskrcnn,retinanet}.yaml``.
Modules: ``coco`` (annotation files, dataset), ``sampler`` (aspect-grouped DDP batches), ``data`` (the
data module), ``shapes`` (generated COCO-layout data for tests and the demo), ``models`` (PVT-FPN
Mask R-CNN / RetinaNet), ``evaluation`` (pycocotools), ``module`` (LightningModule, 1x schedule),
``demo``. See docs/detection.md.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["build_task"]


def build_task(cfg: Any, stage: str = "fit") -> tuple[Any, Any]:
    """The LightningModule and data module for a resolved run config.

    The annotation files are loaded and checked first (fit: train and val; otherwise val), so a wrong
    ``data.root`` or a malformed file fails with one clear message before the model is built. The
    label -> COCO category map comes from the val annotation file and is stored in the checkpoint's config.
    """
    from omegaconf import OmegaConf

    from .data import CocoDataModule
    from .module import DetectionModule

    data: dict[str, Any] = OmegaConf.to_container(cfg.data, resolve=True)  # type: ignore[assignment]
    det_type = str(cfg.task.detector.type)
    datamodule = CocoDataModule(seed=int(cfg.seed), with_masks=det_type == "maskrcnn",
                                **{k: v for k, v in data.items() if k not in ("seed", "with_masks")})
    datamodule.check(stage)
    split = datamodule.val_split
    log.info("COCO %s: %d categories; %s val images%s", datamodule.root, split.num_classes, len(split.coco.imgs),
             f", {len(datamodule.train_ids())} train images after the filter" if "train" in datamodule.splits else "")
    run_cfg: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    stored = {int(k): int(v) for k, v in (run_cfg["task"].get("label_to_cat") or {}).items()}
    if stored and stored != split.label_to_cat:
        from tasks.common.errors import DataError

        raise DataError(f"{datamodule.paths['val'][0]} has categories {sorted(split.label_to_cat.values())} but the "
                        f"model was trained on {sorted(stored.values())}; evaluate on the data set it was trained for.")
    run_cfg["task"]["label_to_cat"] = {int(k): int(v) for k, v in split.label_to_cat.items()}
    module = DetectionModule(run_cfg, split.label_to_cat)
    return module, datamodule
