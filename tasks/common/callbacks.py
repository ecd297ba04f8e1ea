"""Callbacks shared by the tasks: the ``last.ckpt`` owner (periodic, end-of-epoch, on signals) and GRC logging.

What happens when a job is stopped (one path for one process or many):

* :class:`LastCheckpoint` handles SIGTERM and SIGUSR1 (and the SLURM requeue signal): the handler
  only sets a flag; at the next optimizer-step boundary all ranks agree on it (one all-reduce), write
  one consistent ``last.ckpt`` and stop the trainer together. ``train.py`` exits with status
  128 + signal number and says how to resume (``ckpt_path=last``).
* Under SLURM, when the signal is the requeue signal (``slurm.requeue_signal``, SIGUSR1),
  :mod:`tasks.common.requeue` then runs ``scontrol requeue`` from rank 0 after ``fit`` returned; the
  restarted job resumes from that ``last.ckpt``. Lightning's own SLURM requeue is off.

``last.ckpt`` is written atomically (temporary file, then rename), so a kill during the write leaves
the previous one intact.
"""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint

from . import requeue

log = logging.getLogger(__name__)


class LastCheckpoint(Checkpoint):
    """Owns ``<dirpath>/last.ckpt``: every N training steps, at the last step, at each epoch end and on
    SIGTERM/SIGUSR1 (also under SLURM, where the requeue follows the save: :mod:`tasks.common.requeue`).

    A ``Checkpoint`` callback, so Lightning runs it after the other callbacks of each hook.

    Args:
        dirpath: checkpoint folder (``<run_dir>/checkpoints``).
        every_n_train_steps: also save every N optimizer steps (``None``/0: only epoch ends and the end).
        handle_signals: install the SIGTERM/SIGUSR1 handlers.
    """

    FILENAME = "last.ckpt"

    def __init__(self, dirpath: str, every_n_train_steps: int | None = None, handle_signals: bool = True):
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = int(every_n_train_steps or 0)
        self.handle_signals = handle_signals
        self.received_signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._last_saved_step = -1
        self._stopped = False  # a signal stopped training (not only arrived)
        self._save_after_validation = False  # stopping at a step whose validation is due: save after it

    @property
    def path(self) -> Path:
        return self.dirpath / self.FILENAME

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received_signal is None:
            log.warning("Received %s: saving %s at the end of this step and stopping.",
                        signal.Signals(signum).name, self.path)
        self.received_signal = signum
        previous = self._previous_handlers.get(signum)
        if callable(previous):
            previous(signum, frame)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # installed after Lightning's own signal connector (which restores everything at teardown)
        if not self.handle_signals:
            return
        import threading
        if threading.current_thread() is threading.main_thread():
            self._install_handlers()
        agreed = self._signal_everywhere(trainer)
        if agreed is not None:  # signalled during start-up: stop before the first step (nothing new to save)
            self.received_signal = agreed
            self._stop(trainer)

    def _stop(self, trainer: pl.Trainer) -> None:
        """End fit after this step without the validation Lightning runs on ``should_stop``: the time
        before SLURM's kill is for the checkpoint and the requeue (a full validation may not fit)."""
        self._stopped = True
        trainer.should_stop = True
        trainer.limit_val_batches = 0

    def _install_handlers(self) -> None:
        early = requeue.take_pending()  # a requeue signal that arrived during start-up
        if early is not None and self.received_signal is None:
            self.received_signal = early
        for sig in sorted({int(signal.SIGTERM), int(signal.SIGUSR1), *requeue.installed_signals()}):
            current = signal.getsignal(sig)
            if current in (signal.SIG_DFL, signal.SIG_IGN, None):
                current = None  # (the start-up handler stays: a signal after fit must not kill the run)
            self._previous_handlers[sig] = current
            signal.signal(sig, self._on_signal)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.received_signal is not None and not self._stopped:  # fit ran to its end after the signal
            log.warning("%s arrived after the last training step: the run has finished, nothing to stop.",
                        signal.Signals(self.received_signal).name)
            self.received_signal = None
        for sig, handler in self._previous_handlers.items():
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Lightning stops a SIGTERM'd run with ``SIGTERMException`` (e.g. during validation): save first."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException) and self.received_signal is None:
            return
        if self.received_signal is None:
            self.received_signal = int(signal.SIGTERM)
        self._stopped = True
        if self._last_saved_step != trainer.global_step and not trainer.sanity_checking:
            try:
                self.save(trainer)
            except Exception:  # never hide the original exception
                log.exception("Could not save %s after %s", self.path, type(exception).__name__)
        self.teardown(trainer, pl_module, "fit")

    def _signal_everywhere(self, trainer: pl.Trainer) -> int | None:
        """The signal any rank received (the highest number when they differ), agreed by all ranks."""
        signum = self.received_signal or 0
        if trainer.world_size > 1:
            flag = torch.tensor(signum, dtype=torch.int32, device=trainer.strategy.root_device)
            signum = int(trainer.strategy.reduce(flag, reduce_op="max"))
        return signum or None

    # ------------------------------------------------------------------ saving
    def save(self, trainer: pl.Trainer) -> None:
        """Write ``last.ckpt`` atomically (all ranks must call it: the strategy gathers state)."""
        tmp = self.dirpath / f".{self.FILENAME}.tmp"
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier("last_checkpoint")
        self._last_saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        agreed = self._signal_everywhere(trainer) if self.handle_signals else None
        # mid gradient accumulation: stop after the optimizer step (the flag stays set until then)
        stop = agreed is not None and self._at_optimizer_step(trainer, batch_idx)
        if stop and self._validation_due(trainer, batch_idx):
            # the validation of this step runs as in an uninterrupted run and the checkpoint is written
            # after it (on_validation_end): a checkpoint taken before it would resume past it, and the
            # resumed run would never log it
            self.received_signal = agreed
            self._stopped = self._save_after_validation = True
            trainer.should_stop = True
            return
        step = trainer.global_step
        periodic = self.every_n_train_steps and step % self.every_n_train_steps == 0
        at_end = trainer.max_steps is not None and trainer.max_steps > 0 and step >= trainer.max_steps
        if (stop or periodic or at_end) and step != self._last_saved_step:
            self.save(trainer)
        if stop:
            self.received_signal = agreed  # the same on every rank (another rank may have got it)
            self._stop(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._save_after_validation and not trainer.sanity_checking:
            self._save_after_validation = False
            self.save(trainer)

    @staticmethod
    def _validation_due(trainer: pl.Trainer, batch_idx: int) -> bool:
        """Whether Lightning validates after this training batch in an uninterrupted run (the rule of
        its epoch loop: every ``check_val_every_n_epoch`` epochs, at every ``val_check_batch``-th batch)."""
        if not trainer.enable_validation:
            return False
        every = trainer.check_val_every_n_epoch
        if every is not None and (trainer.current_epoch + 1) % every != 0:
            return False
        loop = trainer.fit_loop.epoch_loop
        if trainer.val_check_batch == float("inf"):
            return bool(loop.batch_progress.is_last_batch)
        index = loop.total_batch_idx if every is None else batch_idx
        return (index + 1) % int(trainer.val_check_batch) == 0

    @staticmethod
    def _at_optimizer_step(trainer: pl.Trainer, batch_idx: int) -> bool:
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        if accumulate <= 1:
            return True
        loop = trainer.fit_loop.epoch_loop
        return bool((batch_idx + 1) % accumulate == 0 or getattr(loop.batch_progress, "is_last_batch", False))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning also ends the epoch when max_steps stops it midway; the state saved at that last
        # batch is the one that resumes correctly (in the middle of the epoch), so keep it.
        if trainer.sanity_checking or self.received_signal is not None or trainer.fast_dev_run:
            return
        if self._last_saved_step != trainer.global_step:
            self.save(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"every_n_train_steps": self.every_n_train_steps}


class GRCMixingLogger(Callback):
    """Log sigma(lambda) of every GRC layer every N optimizer steps (paper Fig. 5).

    Metrics: ``grc/<layer>/sigmoid_lambda_mean`` and, with ``per_head``, ``grc/<layer>/sigmoid_lambda_h<i>``.
    Written straight to the loggers from rank 0 (the values are equal on every rank).
    """

    def __init__(self, every_n_steps: int = 50, per_head: bool = True):
        self.every_n_steps = max(int(every_n_steps), 1)
        self.per_head = per_head
        self._last_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step % self.every_n_steps or not trainer.loggers or step == self._last_step:
            return  # (gradient accumulation calls this hook several times per optimizer step)
        self._last_step = step
        metrics = grc_metrics(getattr(pl_module, "model", pl_module), self.per_head)
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)


def grc_metrics(model: torch.nn.Module, per_head: bool = True) -> dict[str, float]:
    """``{grc/<layer>/sigmoid_lambda_mean: value, ...}`` for every GRC layer of ``model`` (empty if none)."""
    from cached_transformers import mixing_weights

    out: dict[str, float] = {}
    for name, alpha in mixing_weights(model).items():
        out[f"grc/{name}/sigmoid_lambda_mean"] = float(alpha.mean())
        if per_head:
            for h, a in enumerate(alpha.tolist()):
                out[f"grc/{name}/sigmoid_lambda_h{h}"] = float(a)
    return out
