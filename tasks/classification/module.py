"""The ImageNet classifier: a timm model (cached or baseline) trained with the DeiT/PVT recipe.

Loss: soft-target cross entropy on Mixup/CutMix targets with label smoothing (timm ``Mixup``);
without Mixup, label-smoothing cross entropy. Validation: plain cross entropy and top-1/top-5 accuracy
in percent (``val/loss``, ``val/acc1``, ``val/acc5``; with EMA also ``val/ema_acc1``/``val/ema_acc5``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from tasks.common.models import create_model
from tasks.common.module import TaskModule


class ImageClassifier(TaskModule):
    """``cfg``: the resolved run config (``model``, ``grc``, ``data``, ``task`` sections)."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg)
        mcfg, data = dict(cfg["model"]), cfg["data"]
        self.num_classes = int(data["num_classes"])
        name = mcfg.pop("name")
        kwargs = dict(mcfg.pop("kwargs", None) or {})
        kwargs.update({k: v for k, v in mcfg.items() if v is not None})
        self.model = create_model(name, num_classes=self.num_classes, img_size=int(data["img_size"]),
                                  grc=cfg.get("grc"), **kwargs)

        task = self.task_cfg
        mix = dict(task.get("mixup") or {})
        self.label_smoothing = float(task.get("label_smoothing", 0.0))
        self.mixup = None
        if mix.pop("enabled", True) and (mix.get("mixup_alpha", 0) > 0 or mix.get("cutmix_alpha", 0) > 0
                                         or mix.get("cutmix_minmax") is not None):
            from timm.data import Mixup
            self.mixup = Mixup(**mix, label_smoothing=self.label_smoothing, num_classes=self.num_classes)

        k5 = min(5, self.num_classes)
        self.val_acc1 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(self.num_classes, top_k=k5, average="micro")
        self.val_loss = MeanMetric()
        self.ema_acc1 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro")
        self.ema_acc5 = MulticlassAccuracy(self.num_classes, top_k=k5, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x 3 x S x S -> logits B x num_classes."""
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.mixup is not None:
            if x.shape[0] % 2:
                x, y = x[:-1], y[:-1]
            x, soft = self.mixup(x, y)
            loss = torch.sum(-soft * F.log_softmax(self(x).float(), dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(self(x).float(), y, label_smoothing=self.label_smoothing)
        self.check_finite(loss)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        self.log("train/lr", self.current_lr(), on_step=True, on_epoch=False, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch is None:  # every image of this batch was skipped as corrupt
            return
        x, y = batch
        logits = self(x).float()
        self.val_loss.update(F.cross_entropy(logits, y, reduction="none"))
        self.val_acc1.update(logits, y)
        self.val_acc5.update(logits, y)
        ema = self.ema
        if ema is not None and (self.task_cfg.get("ema") or {}).get("validate", True):
            ema_logits = ema.module(x).float()
            self.ema_acc1.update(ema_logits, y)
            self.ema_acc5.update(ema_logits, y)

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.log("val/acc1", self.val_acc1.compute() * 100.0, prog_bar=True)
        self.log("val/acc5", self.val_acc5.compute() * 100.0)
        for m in (self.val_loss, self.val_acc1, self.val_acc5):
            m.reset()
        if self.ema is not None and self.ema_acc1.update_count:
            self.log("val/ema_acc1", self.ema_acc1.compute() * 100.0)
            self.log("val/ema_acc5", self.ema_acc5.compute() * 100.0)
            self.ema_acc1.reset()
            self.ema_acc5.reset()
