"""Callbacks shared by the tasks: the ``last.ckpt`` owner (periodic, end-of-epoch, on signals) and GRC logging.

Who owns what when a job is stopped:

* Under SLURM (``SLURMEnvironment`` detected and ``slurm.auto_requeue=true``) Lightning's
  ``SLURMEnvironment`` is the one component that requeues: on the requeue signal (SIGUSR1 by default,
  ask SLURM for it with ``--signal=USR1@120``) it writes ``<run_dir>/hpc_ckpt_<n>.ckpt`` and calls
  ``scontrol requeue``; the restarted job resumes from that file. :class:`LastCheckpoint` then leaves
  SIGUSR1 alone and never requeues.
* Everywhere else :class:`LastCheckpoint` handles SIGTERM and SIGUSR1: at the end of the current
  training step it writes ``last.ckpt`` and stops the trainer; ``train.py`` exits with status
  128 + signal number and says how to resume (``ckpt_path=last``).

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
from lightning.pytorch.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


def slurm_requeue_active(trainer: pl.Trainer) -> bool:
    """True when Lightning's SLURMEnvironment with auto-requeue owns the requeue signal."""
    env = trainer._accelerator_connector.cluster_environment
    return isinstance(env, SLURMEnvironment) and bool(env.auto_requeue)


class LastCheckpoint(Checkpoint):
    """Owns ``<dirpath>/last.ckpt``: every N training steps, at the last step, at each epoch end and on
    SIGTERM/SIGUSR1 (outside SLURM requeue).

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
        if threading.current_thread() is not threading.main_thread():
            return
        signals = [signal.SIGTERM]
        if not slurm_requeue_active(trainer):
            signals.append(signal.SIGUSR1)
        for sig in signals:
            current = signal.getsignal(sig)
            self._previous_handlers[sig] = current if current not in (signal.SIG_DFL, signal.SIG_IGN, None) else None
            signal.signal(sig, self._on_signal)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
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
        if self._last_saved_step != trainer.global_step and not trainer.sanity_checking:
            try:
                self.save(trainer)
            except Exception:  # never hide the original exception
                log.exception("Could not save %s after %s", self.path, type(exception).__name__)
        self.teardown(trainer, pl_module, "fit")

    def _signal_everywhere(self, trainer: pl.Trainer) -> bool:
        flag = self.received_signal is not None
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce_boolean_decision(flag, all=False)
        return bool(flag)

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
        stop = self._signal_everywhere(trainer) if self.handle_signals else False
        step = trainer.global_step
        periodic = self.every_n_train_steps and step % self.every_n_train_steps == 0
        at_end = trainer.max_steps is not None and trainer.max_steps > 0 and step >= trainer.max_steps
        if (stop or periodic or at_end) and step != self._last_saved_step:
            self.save(trainer)
        if stop:
            if self.received_signal is None:  # another rank got the signal
                self.received_signal = int(signal.SIGTERM)
            trainer.should_stop = True

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
