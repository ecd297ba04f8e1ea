"""Stop-and-requeue under SLURM: the one component that runs ``scontrol requeue``.

SLURM sends the requeue signal (``slurm.requeue_signal``, SIGUSR1; the launcher presets ask for it
with ``--signal=USR1@<signal_delay_s>``) to every task of the job shortly before the time limit.
The path, safe for any number of ranks:

1. The signal handler only sets a flag (installed by the SLURM launcher before the job loads
   anything, and by :func:`catch_early` at the start of ``train()``, so a signal during start-up is
   not lost; :class:`~tasks.common.callbacks.LastCheckpoint` takes it
   over once training runs). No checkpoint, no collective, no subprocess inside a handler.
2. At the next optimizer-step boundary every rank takes part in one all-reduce of the flag
   (``LastCheckpoint``): if any rank got the signal, all ranks write one consistent ``last.ckpt``
   (atomically) and stop the trainer together.
3. After ``trainer.fit`` has returned (Lightning has put its signal handlers back), all ranks meet in
   a barrier and rank 0 runs ``scontrol requeue <job>`` (:func:`requeue_after_stop`); every rank then
   exits. SLURM puts the job back in the queue; the restarted job runs the same Hydra job with
   ``ckpt_path=last`` and resumes from that ``last.ckpt``, exactly where it stopped.

Lightning's own SLURM requeue (``SLURMEnvironment(auto_requeue=True)``) is not used: it saves
``hpc_ckpt_<n>.ckpt`` inside the signal handler, i.e. in the middle of a step, and with DDP waits in a
barrier while the other ranks wait in the gradient all-reduce. No ``hpc_ckpt_*.ckpt`` is written
any more; ``last.ckpt`` is replaced in place, so requeues leave one checkpoint, not one per requeue.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from typing import Any

log = logging.getLogger(__name__)

_pending: int | None = None       # the first signal caught before LastCheckpoint took over
_installed: dict[int, Any] = {}


def slurm_job_id(env: dict[str, str] | None = None) -> str | None:
    """``<array job>_<task>`` for an array task, else ``SLURM_JOB_ID``; None outside a SLURM job."""
    env = os.environ if env is None else env
    array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return env.get("SLURM_JOB_ID") or None


def restarted(env: dict[str, str] | None = None) -> bool:
    """True in a SLURM job that was requeued (``SLURM_RESTART_COUNT`` > 0): resume, never start over."""
    env = os.environ if env is None else env
    try:
        return int(env.get("SLURM_RESTART_COUNT") or 0) > 0
    except ValueError:
        return False


def requeue_signal(cfg: Any) -> int | None:
    """The signal that asks for a requeue in this run, or None (outside SLURM, or auto_requeue off)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    slurm = (cfg.get("slurm") if cfg is not None else None) or {}
    if not SLURMEnvironment.detect() or not bool(slurm.get("auto_requeue", True)):
        return None
    name = str(slurm.get("requeue_signal", "SIGUSR1"))
    try:
        return int(getattr(signal, name if name.startswith("SIG") else f"SIG{name}"))
    except AttributeError:
        from .errors import ConfigError

        raise ConfigError(f"slurm.requeue_signal={name!r} is not a signal name; use e.g. SIGUSR1.") from None


def _remember(signum: int, frame: Any) -> None:
    global _pending
    if _pending is None:
        _pending = signum
        log.warning("Received %s during start-up: the run stops at its first training step to be requeued.",
                    signal.Signals(signum).name)


def catch_early(cfg: Any) -> None:
    """Under SLURM with auto-requeue, remember the requeue signal until training starts (the default
    action of SIGUSR1 would end the process)."""
    sig = requeue_signal(cfg)
    if sig is not None:
        catch_signal(sig)


def catch_signal(sig: int) -> None:
    """Remember ``sig`` (instead of its default action) until :func:`take_pending` (idempotent)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(sig) is _remember:
        return
    _installed[sig] = signal.signal(sig, _remember)


def installed_signals() -> list[int]:
    """The signals :func:`catch_early` listens to in this process."""
    return list(_installed)


def is_early_handler(handler: Any) -> bool:
    return handler is _remember


def take_pending() -> int | None:
    """The signal caught before training started (cleared), for LastCheckpoint to act on."""
    global _pending
    sig, _pending = _pending, None
    return sig


def requeue_after_stop(cfg: Any, signum: int, trainer: Any) -> str | None:
    """After a signal stop: if ``signum`` is the requeue signal of a SLURM job, rank 0 requeues it.

    Every rank calls this (after ``trainer.fit`` returned); returns the requeued job id on rank 0,
    None elsewhere or when no requeue was asked for.
    """
    if signum != requeue_signal(cfg):
        return None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()  # every rank has left fit (checkpoint written) before SLURM sends SIGTERM
    if not trainer.is_global_zero:
        return None
    job = slurm_job_id()
    if job is None or not re.fullmatch(r"[0-9_]+", job):
        log.warning("Requeue signal received but no SLURM job id in the environment; not requeued.")
        return None
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("`scontrol requeue %s` failed (%s); resubmit the job to continue from last.ckpt.", job, exc)
        return None
    if proc.returncode != 0:
        log.error("`scontrol requeue %s` failed: %s; resubmit the job to continue from last.ckpt.", job,
                  (proc.stderr or proc.stdout).strip())
        return None
    log.warning("Requeued SLURM job %s; it resumes from last.ckpt when it starts again.", job)
    return job


def restore_handlers() -> None:
    """Undo :func:`catch_early` (tests and in-process reuse)."""
    for sig, handler in _installed.items():
        if signal.getsignal(sig) is _remember:
            signal.signal(sig, handler)
    _installed.clear()
