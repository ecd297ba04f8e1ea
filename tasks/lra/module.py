"""The ListOps LightningModule: LRA classifier, LRA's lr schedule, accuracy metrics, test with the best weights.

Metrics (percent): ``train/loss``, ``train/lr``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``.
``test/acc`` is computed in the training run itself, at the end of fit, with the weights of the best
``val/acc`` checkpoint (``task.test_with_best``; LRA's released ~17% came from reloading the wrong
checkpoint). ``trainer.test(...)`` also works on this module.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from tasks.common.errors import ConfigError
from tasks.common.models import load_pretrained
from tasks.common.module import TaskModule

from .models import GRC_DEFAULTS, LRAClassifier
from .tokenizer import NUM_CLASSES

log = logging.getLogger(__name__)

_MODEL_KEYS = {"attention", "emb_dim", "mlp_dim", "num_heads", "num_layers", "dropout", "attn_dropout",
               "head_dim", "memory", "bigbird", "reformer"}


def rsqrt_schedule(optimizer: torch.optim.Optimizer, *, total_steps: int | None = None,
                   steps_per_epoch: int | None = None, warmup_steps: int = 1000) -> torch.optim.lr_scheduler.LambdaLR:
    """LRA's ``constant * linear_warmup * rsqrt_decay``: lr(s) = lr * min(s / W, 1) / sqrt(max(s, W)).

    s is the 0-based optimizer step (lr 0 at the first step, as in LRA); with lr 0.05 and W = 1000
    the peak at s = W is 0.05 / sqrt(1000) = 1.58e-3. ``total_steps``/``steps_per_epoch`` are accepted
    for the framework's scheduler signature and not used.
    """
    w = max(int(warmup_steps), 1)

    def factor(step: int) -> float:
        return min(step / w, 1.0) / math.sqrt(max(step, w))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_model(model_cfg: Mapping[str, Any], grc_cfg: Mapping[str, Any] | None, max_length: int) -> LRAClassifier:
    """An :class:`LRAClassifier` from the ``model`` section; ``grc`` is used only by ``*_grc`` models.

    The GRC settings are ``GRC_DEFAULTS`` (reference preset, padding="valid", pos_encoding="none",
    r = 0.5) overridden by the ``grc`` group; ``grc=off`` (enabled: false) builds the baseline.
    ``model.pretrained`` (a ListOps checkpoint or state_dict) is loaded with
    :func:`tasks.common.models.load_pretrained`.
    """
    cfg = dict(model_cfg)
    name = str(cfg.pop("name", ""))
    pretrained = cfg.pop("pretrained", None)  # model.pretrained: weights to start from
    unknown = sorted(set(cfg) - _MODEL_KEYS)
    if unknown:
        raise ConfigError(f"Unknown LRA model option(s) {unknown} in model '{name}'; valid: {sorted(_MODEL_KEYS)}.")
    grc = None
    if name.endswith("_grc"):
        grc = dict(GRC_DEFAULTS)
        grc.update({k: v for k, v in dict(grc_cfg or {}).items() if v is not None})
    for key in ("bigbird", "reformer"):
        if cfg.get(key) is not None:
            cfg[key] = dict(cfg[key])
    model = LRAClassifier(max_length=int(max_length), grc=grc, num_classes=NUM_CLASSES, **cfg)
    load_pretrained(model, pretrained)
    return model


class ListOpsClassifier(TaskModule):
    """``cfg``: the resolved run config (``model``, ``grc``, ``data``, ``task`` sections)."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg)
        self.model = build_model(cfg["model"], cfg.get("grc"), int(cfg["data"]["max_length"]))
        self.val_acc = MulticlassAccuracy(NUM_CLASSES, average="micro")
        self.val_loss = MeanMetric()
        self.test_acc = MulticlassAccuracy(NUM_CLASSES, average="micro")
        self.test_loss = MeanMetric()
        self.test_result: dict[str, float] = {}

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: B x L (0 = pad), padding_mask: B x L (True = pad) -> logits B x 10."""
        return self.model(tokens, padding_mask)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["tokens"], batch["padding_mask"]).float()
        loss = F.cross_entropy(logits, batch["label"])
        self.check_finite(loss)
        n = batch["label"].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        self.log("train/lr", self.current_lr(), on_step=True, on_epoch=False, batch_size=n)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["tokens"], batch["padding_mask"]).float()
        self.val_loss.update(F.cross_entropy(logits, batch["label"], reduction="none"))
        self.val_acc.update(logits, batch["label"])

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.log("val/acc", self.val_acc.compute() * 100.0, prog_bar=True)
        self.val_loss.reset()
        self.val_acc.reset()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["tokens"], batch["padding_mask"]).float()
        self.test_loss.update(F.cross_entropy(logits, batch["label"], reduction="none"))
        self.test_acc.update(logits, batch["label"])

    def on_test_epoch_end(self) -> None:
        self.log("test/loss", self.test_loss.compute())
        self.log("test/acc", self.test_acc.compute() * 100.0)
        self.test_loss.reset()
        self.test_acc.reset()

    # ------------------------------------------------------------------ test with the best weights
    @torch.no_grad()
    def evaluate_split(self, model: torch.nn.Module, loader: Any) -> tuple[float, float, int]:
        """(accuracy %, mean loss, samples) of ``model`` on ``loader``, summed over processes."""
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)
        model.eval()
        with self.trainer.precision_plugin.forward_context():
            for batch in loader:
                tokens = batch["tokens"].to(self.device)
                mask = batch["padding_mask"].to(self.device)
                label = batch["label"].to(self.device)
                logits = model(tokens, mask).float()
                stats[0] += (logits.argmax(-1) == label).sum()
                stats[1] += F.cross_entropy(logits, label, reduction="sum")
                stats[2] += label.numel()
        if self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        n = max(float(stats[2]), 1.0)
        return 100.0 * float(stats[0]) / n, float(stats[1]) / n, int(stats[2])

    def on_train_end(self) -> None:
        if not self.task_cfg.get("test_with_best", True) or self.trainer.datamodule is None:
            return
        if self.stopped_by_signal:
            log.info("Stopped by a signal: test/acc is computed when the resumed run finishes.")
            return
        model, path, score = self.best_weights("val/acc")
        acc, loss, n = self.evaluate_split(model, self.trainer.datamodule.test_dataloader())
        del model
        self.test_result = {"test/acc": acc, "test/loss": loss}
        self.trainer.callback_metrics["test/acc"] = torch.tensor(acc)
        self.trainer.callback_metrics["test/loss"] = torch.tensor(loss)
        self._report(acc, loss, n, path, score)

    @rank_zero_only
    def _report(self, acc: float, loss: float, n: int, path: str | None, score: float | None) -> None:
        metrics = {"test/acc": acc, "test/loss": loss}
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.trainer.global_step)
            logger.save()
        dm = self.trainer.datamodule
        majority = dm.majority_rate("test") if hasattr(dm, "majority_rate") else float("nan")
        where = f"best checkpoint {path} (val/acc {score:.2f})" if path else "final weights"
        msg = (f"test/acc = {acc:.2f}% on {n} test samples with the {where}; "
               f"majority-class rate {majority:.2f}%")
        log.info(msg)
        print(msg, flush=True)
