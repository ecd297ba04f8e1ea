"""Throughput, time per step, ETA and GPU memory, logged every N optimizer steps.

:class:`PerfMonitor` logs to every logger (rank 0):

* ``perf/samples_per_s``: training samples per second over all processes (batch x world size / time);
* ``perf/step_s``: seconds per optimizer step;
* ``perf/gpu_mem_gb``: peak GPU memory allocated by this process since the previous line (only on GPUs);

measured over the steps since its previous line, with validation time left out. When the trainer has
no progress bar (``train.py`` switches it off when stdout is not a terminal, e.g. a SLURM log file) it
also writes one plain console line per interval::

    epoch 3 | step 1200/375000 (0.3%) | train/loss 2.310 | 812.4 samples/s | 0.315 s/step | ETA 1d 08:12:40 | GPU 21.3 GB

Lightning's own ``ThroughputMonitor`` synchronises the device after every batch and has no ETA or
console lines, hence this small callback.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def format_eta(seconds: float) -> str:
    """``"1d 08:12:40"``, ``"0:05:03"``; ``"?"`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{days}d {h:02d}:{m:02d}:{s:02d}" if days else f"{h}:{m:02d}:{s:02d}"


def _batch_size(batch: Any) -> int:
    from lightning.pytorch.utilities.data import extract_batch_size

    try:
        return int(extract_batch_size(batch))
    except Exception:  # noqa: BLE001 - an unusual batch type only loses the samples/s number
        return 0


class PerfMonitor(Callback):
    """Log ``perf/*`` every ``every_n_steps`` optimizer steps; console lines when there is no progress bar.

    Args:
        every_n_steps: logging interval in optimizer steps (``trainer.log_every_n_steps`` by default).
        console: ``True``/``False`` forces the console lines on/off; ``None`` prints them exactly when
            the trainer has no progress bar.
    """

    def __init__(self, every_n_steps: int = 50, console: bool | None = None):
        self.every_n_steps = max(int(every_n_steps), 1)
        self.console = console
        self._start: float | None = None
        self._start_step = 0
        self._samples = 0
        self._val_start: float | None = None
        self.last: dict[str, float] = {}

    # ------------------------------------------------------------------ window
    def _open(self, trainer: pl.Trainer) -> None:
        self._start, self._start_step, self._samples = time.perf_counter(), trainer.global_step, 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = None  # the first step (start-up, compilation) opens the first window

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and self._start is not None:
            self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_start is not None and self._start is not None:
            self._start += time.perf_counter() - self._val_start  # leave validation out of the step time
        self._val_start = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self._start is None:
            self._open(trainer)
            return
        self._samples += _batch_size(batch)
        step = trainer.global_step
        if step == self._start_step or step % self.every_n_steps:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        steps = step - self._start_step
        metrics = {"perf/samples_per_s": self._samples * trainer.world_size / elapsed, "perf/step_s": elapsed / steps}
        if pl_module.device.type == "cuda":
            metrics["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 1e9
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self.last = metrics
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            console = self.console if self.console is not None else trainer.progress_bar_callback is None
            if console:
                log.info(self.line(trainer, metrics))
        self._open(trainer)

    # ------------------------------------------------------------------ console
    @staticmethod
    def total_steps(trainer: pl.Trainer) -> float:
        try:
            total = float(trainer.estimated_stepping_batches)
        except Exception:  # noqa: BLE001 - e.g. an iterable loader without a length
            total = float("inf")
        if trainer.max_steps is not None and trainer.max_steps > 0:
            total = min(total, float(trainer.max_steps))
        return total

    def line(self, trainer: pl.Trainer, metrics: dict[str, float]) -> str:
        step = trainer.global_step
        total = self.total_steps(trainer)
        parts = [f"epoch {trainer.current_epoch}"]
        if math.isfinite(total):
            parts.append(f"step {step}/{int(total)} ({100.0 * step / max(total, 1):.1f}%)")
        else:
            parts.append(f"step {step}")
        for key in ("train/loss_step", "train/loss"):
            value = trainer.callback_metrics.get(key)
            if value is not None:
                parts.append(f"train/loss {float(value):.3f}")
                break
        parts.append(f"{metrics['perf/samples_per_s']:.1f} samples/s")
        parts.append(f"{metrics['perf/step_s']:.3f} s/step")
        parts.append(f"ETA {format_eta((total - step) * metrics['perf/step_s'])}")
        if "perf/gpu_mem_gb" in metrics:
            parts.append(f"GPU {metrics['perf/gpu_mem_gb']:.1f} GB")
        return " | ".join(parts)
