"""The detection LightningModule: Mask R-CNN / RetinaNet with a PVT(-GRC) backbone, PVT's 1x schedule, COCO AP.

Training logs ``train/loss`` (the sum of the detector's losses), each loss as ``train/<name>`` and
``train/lr``. Validation runs the detector on every val image (sharded over ranks), RLE-encodes masks
per batch, gathers the COCO results on every rank with each image once and evaluates once on rank 0
(pycocotools); the metrics are broadcast so every rank logs the same numbers: ``val/bbox_mAP``,
``val/bbox_mAP_50``, ``val/bbox_mAP_75``, ``val/bbox_mAP_s|m|l`` and, for Mask R-CNN, ``val/segm_*``
(percent), and ``val/num_images`` (images evaluated). ``task.results_json=PATH`` also writes the COCO results file (rank 0) after each validation.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_only

from tasks.common.module import TaskModule

from .evaluation import CocoResults, coco_metrics, detections_to_coco, write_results
from .models import build_detector

log = logging.getLogger(__name__)


def warmup_multistep_schedule(optimizer: torch.optim.Optimizer, *, total_steps: int, steps_per_epoch: int,
                              warmup_steps: int = 500, warmup_ratio: float = 0.001,
                              milestones: Sequence[int] = (8, 11), gamma: float = 0.1
                              ) -> torch.optim.lr_scheduler.LambdaLR:
    """mmdetection's ``step`` policy with linear warm-up, stepped per iteration.

    Step s (0-based) in epoch e = s // steps_per_epoch gets lr * gamma^(#milestones <= e), times
    ``1 - (1 - s / W) * (1 - warmup_ratio)`` for s < W (warm-up from ``warmup_ratio`` x lr).
    ``total_steps`` is accepted for the framework's scheduler signature and not used.
    """
    w, spe, ms = int(warmup_steps), max(int(steps_per_epoch), 1), sorted(int(m) for m in milestones)

    def factor(step: int) -> float:
        epoch = step // spe
        f = gamma ** sum(epoch >= m for m in ms)
        if step < w:
            f *= 1.0 - (1.0 - step / w) * (1.0 - warmup_ratio)
        return f

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class DetectionModule(TaskModule):
    """``cfg``: the resolved run config; ``task.detector.type`` is ``maskrcnn`` or ``retinanet``.

    Labels inside the task are 1..C (COCO category ids sorted); RetinaNet, which has no background
    class, sees 0..C-1 and its outputs are shifted back. ``label_to_cat`` maps labels to COCO ids.
    """

    def __init__(self, cfg: dict[str, Any], label_to_cat: dict[int, int] | None = None):
        super().__init__(cfg)
        det = dict(self.task_cfg["detector"])
        self.detector_type = str(det.pop("type"))
        data = cfg["data"]
        if label_to_cat is None:
            label_to_cat = {int(k): int(v) for k, v in (self.task_cfg.get("label_to_cat") or {}).items()}
        self.label_to_cat = {int(k): int(v) for k, v in label_to_cat.items()}
        num_classes = len(self.label_to_cat)
        self.model = build_detector(self.detector_type, num_classes, cfg["model"], cfg.get("grc"), det,
                                    min_size=int(data["min_size"]), max_size=int(data["max_size"]))
        self.label_offset = 1 if self.detector_type == "retinanet" else 0
        self.iou_types = ("bbox", "segm") if self.detector_type == "maskrcnn" else ("bbox",)
        self.results = CocoResults()
        self.gt = None  # pycocotools COCO of the evaluated split (set from the data module)

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> Any:
        """The framework's optimizer and schedule; with ``task.decay_all_params`` (PVT's mmdetection
        recipe) weight decay applies to every parameter, norms and biases included."""
        out = super().configure_optimizers()
        if self.task_cfg.get("decay_all_params", True):
            opt = out["optimizer"] if isinstance(out, dict) else out
            wd = float(self.task_cfg["optimizer"].get("weight_decay", 0.0))
            for group in opt.param_groups:
                group["weight_decay"] = wd
        return out

    # ------------------------------------------------------------------ helpers
    def _prepare(self, batch: Any) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        images, targets = batch
        images = [img.float().div_(255.0) if img.dtype == torch.uint8 else img for img in images]
        targets = [dict(t) for t in targets]
        if self.label_offset:
            for t in targets:
                t["labels"] = t["labels"] - self.label_offset
        return images, targets

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        """Training (with targets): dict of losses; evaluation: list of detections (labels 1..C)."""
        out = self.model(images, targets)
        if not self.training and self.label_offset:
            for o in out:
                o["labels"] = o["labels"] + self.label_offset
        return out

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, targets = self._prepare(batch)
        losses = self.model(images, targets)
        loss = sum(losses.values())
        self.check_finite(loss)
        n = len(images)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        for k, v in losses.items():
            self.log(f"train/{k}", v, on_step=True, on_epoch=False, batch_size=n)
        self.log("train/lr", self.current_lr(), on_step=True, on_epoch=False, batch_size=n)
        return loss

    def _eval_step(self, batch: Any) -> None:
        images, targets = self._prepare(batch)
        outputs = self(images)
        for t, o in zip(targets, outputs):
            image_id = int(t["image_id"])
            self.results.add(image_id, detections_to_coco(image_id, o, self.label_to_cat))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_start(self) -> None:
        self.results.reset()

    on_test_epoch_start = on_validation_epoch_start

    def _gt(self) -> Any:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "val_split"):
            return dm.val_split.coco
        if self.gt is None:
            raise RuntimeError("The detection module needs the data module's annotation file to evaluate.")
        return self.gt

    def _evaluate(self, prefix: str) -> None:
        world = self.trainer.world_size
        gather = None
        if world > 1:
            import torch.distributed as dist

            def gather(obj: Any) -> list[Any]:
                out: list[Any] = [None] * world
                dist.all_gather_object(out, obj)
                return out
        ids, results = self.results.gather(gather)
        metrics: dict[str, float] = {}
        if self.trainer.is_global_zero:
            metrics = coco_metrics(self._gt(), results, ids, self.iou_types)
            metrics["num_images"] = float(len(ids))
            self._write_results(results)
        if world > 1:
            metrics = self.trainer.strategy.broadcast(metrics, src=0)
        self.results.reset()
        self.eval_images = int(metrics.get("num_images", 0))
        for k, v in metrics.items():
            self.log(f"{prefix}/{k}", v if math.isfinite(v) else float("nan"), prog_bar=k == "bbox_mAP")

    @rank_zero_only
    def _write_results(self, results: list[dict[str, Any]]) -> None:
        path = self.task_cfg.get("results_json")
        if path and not self.trainer.sanity_checking:
            log.info("COCO results (%d detections) -> %s", len(results), write_results(Path(path), results))

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")
