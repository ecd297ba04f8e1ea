"""What ``train.py`` and ``eval.py`` do, as functions of the composed config (testable in-process).

Run directory contract (docs/architecture.md): ``outputs/<task.name>/<run dir name>/`` (``rundir``) holds
``.hydra/config.yaml`` (the resolved config, rewritten here), ``csv/metrics.csv`` and
``checkpoints/{last,best}.ckpt``. No timestamps: rerunning the same command with ``ckpt_path=last``
resumes. Multirun jobs use ``multirun/<sweep_name>/<override_dirname or job number>/``.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import get_method, instantiate
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from . import requeue
from .callbacks import LastCheckpoint
from .errors import ConfigError, UserError
from .fingerprint import check_resume, load_checkpoint_meta, recipe_record
from .loggers import ResumableCSVLogger
from .rundir import archive_previous_run

log = logging.getLogger(__name__)

RUN_DIR_ENV = "CT_RUN_DIR"      # handed to DDP child processes started by Lightning
CKPT_ENV = "CT_RESUME_CKPT"


class StoppedBySignal(Exception):
    """Training stopped on SIGTERM/SIGUSR1 after writing a resumable checkpoint."""

    def __init__(self, signum: int, ckpt: Path | None):
        self.signum, self.ckpt = signum, ckpt
        where = (f"resumable checkpoint {ckpt}; rerun the same command with ckpt_path=last to continue."
                 if ckpt is not None else "no checkpoint callback was configured, so nothing was saved.")
        super().__init__(f"Stopped by {signal.Signals(signum).name}; {where}")

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def single_log_stream() -> None:
    """One console format: when Hydra configured the root logger, drop Lightning's own console handlers
    (Lightning adds them when it is imported before logging is configured) so lines are not printed twice."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "torchmetrics"):
        lg = logging.getLogger(name)
        for handler in list(lg.handlers):
            if type(handler) is logging.StreamHandler:
                lg.removeHandler(handler)
        lg.propagate = True


# ---------------------------------------------------------------------- run directory and config
def _is_ddp_child() -> bool:
    return os.environ.get(RUN_DIR_ENV) is not None and os.environ.get("LOCAL_RANK", "0") not in ("", "0")


def resolve_run_dir(cfg: DictConfig) -> Path:
    """The run directory: ``paths.run_dir`` (Hydra's output dir), or ``<output_dir>/<task>/<run_name>``."""
    if _is_ddp_child():
        return Path(os.environ[RUN_DIR_ENV])
    try:
        value = cfg.paths.run_dir
    except Exception:  # ${hydra:...} outside a Hydra app
        value = None
    if not value:
        prefix = str(cfg.paths.get("run_prefix") or "")
        value = Path(str(cfg.paths.output_dir)) / f"{prefix}{cfg.task.name}" / str(cfg.run_name)
    return Path(str(value)).expanduser().resolve()


def finalize_config(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """Pin ``paths.run_dir`` to the absolute run directory and resolve every interpolation."""
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.paths.run_dir = str(run_dir)
    for key in ("output_dir", "multirun_dir", "data_dir"):
        if cfg.paths.get(key):
            cfg.paths[key] = str(Path(str(cfg.paths[key])).expanduser().resolve())
    if cfg.get("data") is not None and cfg.data.get("root"):
        cfg.data.root = str(Path(str(cfg.data.root)).expanduser().resolve())
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:
        raise ConfigError(f"The config could not be resolved ({exc}).") from exc
    return OmegaConf.create(container)


@rank_zero_only
def write_resolved_config(cfg: DictConfig, run_dir: Path) -> None:
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")


# ---------------------------------------------------------------------- checkpoints
def _hpc_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("hpc_ckpt_*.ckpt"))


def resolve_ckpt_path(value: Any, run_dir: Path) -> str | None:
    """``null`` (fresh; in a requeued SLURM job the same as ``last``), ``last``, ``best`` or a path.

    ``last`` picks the newest of ``checkpoints/last.ckpt`` and SLURM's ``hpc_ckpt_*.ckpt``; when the
    run has none yet, training starts from scratch (so ``ckpt_path=last`` can always be passed).
    """
    if _is_ddp_child() and os.environ.get(CKPT_ENV) is not None:
        return os.environ[CKPT_ENV] or None
    if value in (None, "", "null", "none"):
        if SLURMEnvironment.detect() and (_hpc_checkpoints(run_dir) or requeue.restarted()):
            value = "last"
        else:
            return None
    value = str(value)
    if value == "last":
        candidates = [p for p in [run_dir / "checkpoints" / "last.ckpt", *_hpc_checkpoints(run_dir)] if p.is_file()]
        if not candidates:
            log.warning("ckpt_path=last: no checkpoint in %s yet; starting from scratch.", run_dir)
            return None
        return str(max(candidates, key=lambda p: p.stat().st_mtime))
    if value == "best":
        path = run_dir / "checkpoints" / "best.ckpt"
        if not path.is_file():
            raise UserError(f"ckpt_path=best: {path} does not exist; train first or pass ckpt_path=/path/to/file.ckpt.")
        return str(path)
    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"Checkpoint {path} does not exist; pass ckpt_path=last, best or an existing .ckpt file.")
    return str(path)


def checkpoint_step(path: str) -> int:
    """``global_step`` of a checkpoint (memory-mapped, so large files are not read)."""
    return int(load_checkpoint_meta(path).get("global_step", 0))


def prepare_resume(cfg: DictConfig, ckpt: str | None, run_dir: Path) -> int | None:
    """The step training resumes at (None: fresh). A checkpoint of another recipe is refused
    (``resume_mismatch``); a fresh start moves an earlier run's files in ``run_dir`` aside."""
    if _is_ddp_child():
        return checkpoint_step(ckpt) if ckpt else None
    if ckpt is None:
        if rank_zero_only.rank == 0:
            archive_previous_run(run_dir)
        return None
    meta = load_checkpoint_meta(ckpt)
    diffs = check_resume(ckpt, meta, cfg, cfg.get("resume_mismatch"))
    if diffs:
        log.warning("Resuming %s although its recipe differs (resume_mismatch=allow): %s", ckpt, "; ".join(diffs))
    return int(meta.get("global_step", 0))


# ---------------------------------------------------------------------- loggers, callbacks, trainer
def wandb_run_id(cfg: DictConfig) -> str:
    """A deterministic wandb id from the run directory, so a resumed run continues the same wandb run
    and runs in different directories (different recipes) never share one."""
    import hashlib

    run_dir = str(cfg.paths.get("run_dir") or cfg.run_name)
    digest = hashlib.sha256(run_dir.encode()).hexdigest()[:8]
    raw = f"{cfg.task.name}-{Path(run_dir).name}"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in raw)[:110] + "-" + digest


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """Instantiate ``cfg.logger.*``; a logger that fails to start is dropped with a warning.

    wandb runs offline unless ``WANDB_MODE`` says otherwise, and is initialised here (rank 0) so a
    failure falls back to CSV instead of crashing the run. The CSV logger of the run-dir contract
    (``<run_dir>/csv/metrics.csv``) is always present.
    """
    loggers: list[Logger] = []
    for name, lcfg in (cfg.get("logger") or {}).items():
        if not lcfg or "_target_" not in lcfg:
            continue
        target = str(lcfg["_target_"])
        try:
            if target.endswith("WandbLogger"):
                os.environ.setdefault("WANDB_MODE", "offline")
                os.environ.setdefault("WANDB_INIT_TIMEOUT", "60")
                kwargs = {} if lcfg.get("id") else {"id": wandb_run_id(cfg)}
                logger = instantiate(lcfg, **kwargs)
                if rank_zero_only.rank == 0:
                    _ = logger.experiment  # start wandb now so a failure falls back to CSV
            else:
                logger = instantiate(lcfg)
        except Exception as exc:  # any logger problem must not stop training
            warnings.warn(f"Logger '{name}' ({target}) could not start ({type(exc).__name__}: {exc}); "
                          f"continuing with the CSV logger.", stacklevel=2)
            continue
        loggers.append(logger)
    if not any(isinstance(lg, CSVLogger) for lg in loggers):
        loggers.insert(0, ResumableCSVLogger(save_dir=str(run_dir), name="csv", version=""))
    return loggers


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]


def _num_devices(accelerator: str, devices: Any) -> int:
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return torch.cuda.device_count() if gpu else 1


def build_strategy(tcfg: dict[str, Any]) -> Strategy | str:
    """DDP without buffer broadcast whenever more than one process trains.

    DDP's default ``broadcast_buffers=True`` would overwrite every rank's GRC cache with rank 0's
    before each forward; the caches are averaged once per optimisation step instead
    (``tasks.common.grc_sync.GRCCacheSync`` calling ``cached_transformers.sync_caches``, per ``grc.sync``).
    """
    strategy = tcfg.pop("strategy", "auto")
    if isinstance(strategy, dict):
        obj = instantiate(strategy)
    elif strategy in (None, "auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"):
        n = _num_devices(str(tcfg.get("accelerator", "auto")), tcfg.get("devices", 1)) * int(tcfg.get("num_nodes", 1))
        if strategy in (None, "auto") and n <= 1:
            return "auto"
        start = {"ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}.get(str(strategy), "popen")
        obj = DDPStrategy(broadcast_buffers=False, start_method=start)
    else:
        return strategy
    if isinstance(obj, DDPStrategy) and obj._ddp_kwargs.get("broadcast_buffers", True):
        raise ConfigError("trainer.strategy is DDP with broadcast_buffers=true, which overwrites every rank's GRC "
                          "cache with rank 0's; set trainer.strategy.broadcast_buffers=false.")
    return obj


def resolve_precision(precision: Any, accelerator: str) -> Any:
    """``auto``: bf16-mixed on GPUs with bf16, 16-mixed on other GPUs, 32-true on CPU."""
    if precision not in (None, "auto"):
        return precision
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def _stdout_is_terminal() -> bool:
    import sys

    return bool(getattr(sys.stdout, "isatty", lambda: False)())


def build_trainer(cfg: DictConfig, run_dir: Path, loggers: list[Logger] | bool,
                  callbacks: list[pl.Callback], **overrides: Any) -> pl.Trainer:
    tcfg: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    tcfg.update(overrides)
    strategy = build_strategy(tcfg)
    tcfg["precision"] = resolve_precision(tcfg.get("precision", "auto"), str(tcfg.get("accelerator", "auto")))
    if tcfg.get("enable_progress_bar", True) and not _stdout_is_terminal():
        tcfg["enable_progress_bar"] = False  # SLURM log files: PerfMonitor prints plain periodic lines instead
    plugins = list(tcfg.pop("plugins", None) or [])
    if SLURMEnvironment.detect():  # ranks from SLURM; requeue is tasks.common.requeue's (not Lightning's)
        plugins.append(SLURMEnvironment(auto_requeue=False))
    from lightning.pytorch.callbacks import Checkpoint

    # no hidden default ModelCheckpoint: checkpoints are exactly the configured callbacks
    tcfg["enable_checkpointing"] = any(isinstance(cb, Checkpoint) for cb in callbacks)
    return pl.Trainer(**tcfg, strategy=strategy, logger=loggers, callbacks=callbacks, plugins=plugins or None,
                      default_root_dir=str(run_dir), use_distributed_sampler=False)


def _final_metrics(trainer: pl.Trainer) -> dict[str, float]:
    out = {}
    for k, v in trainer.callback_metrics.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            pass
    return out


# ---------------------------------------------------------------------- train / evaluate
def train(cfg: DictConfig) -> dict[str, Any]:
    """Build the task, fit, and return ``{"metrics": {...}, "run_dir": ..., "wall_s": ...}``."""
    start = time.time()
    single_log_stream()
    requeue.catch_early(cfg)
    run_dir = resolve_run_dir(cfg)
    cfg = finalize_config(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(cfg, run_dir)
    if cfg.get("print_config", True) and rank_zero_only.rank == 0 and not _is_ddp_child():
        log.info("Resolved config (saved to %s):\n%s", run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    torch.set_float32_matmul_precision(str(cfg.get("matmul_precision") or "high"))

    ckpt = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
    resume_step = prepare_resume(cfg, ckpt, run_dir)  # before the (slow) data scan: a refusal comes at once
    builder = get_method(str(cfg.task.builder))
    recipe = recipe_record(cfg)  # as composed: the builder may fill in values derived from the data
    module, datamodule = builder(cfg)
    module.recipe = recipe
    loggers = build_loggers(cfg, run_dir)
    for logger in loggers:
        if isinstance(logger, ResumableCSVLogger):
            logger.resume_step = resume_step
    callbacks = build_callbacks(cfg)
    trainer = build_trainer(cfg, run_dir, loggers, callbacks)
    if ckpt:
        log.info("Resuming from %s", ckpt)

    os.environ[RUN_DIR_ENV], os.environ[CKPT_ENV] = str(run_dir), ckpt or ""
    sigterm = False
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    except SIGTERMException:  # Lightning's way out after SIGTERM; LastCheckpoint has saved by now
        sigterm = True
    finally:
        if not _is_ddp_child():
            os.environ.pop(RUN_DIR_ENV, None)
            os.environ.pop(CKPT_ENV, None)

    last = [cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)]
    for cb in last:
        if cb.received_signal is not None:
            requeue.requeue_after_stop(cfg, cb.received_signal, trainer)
            raise StoppedBySignal(cb.received_signal, cb.path)
    if sigterm:
        raise StoppedBySignal(int(signal.SIGTERM), None)
    if (getattr(module, "last_val_step", trainer.global_step) != trainer.global_step and trainer.limit_val_batches
            and not trainer.fast_dev_run and trainer.state.finished):
        # stopped by max_steps in the middle of an epoch: validate the final weights once
        trainer.validate(module, datamodule=datamodule, verbose=False)
    result = {"metrics": _final_metrics(trainer), "run_dir": str(run_dir), "wall_s": time.time() - start,
              "global_step": trainer.global_step, "resumed_from": ckpt}
    if trainer.is_global_zero:
        (run_dir / "results.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    return result


def _eval_dir(cfg: DictConfig, ckpt: Path) -> Path:
    if cfg.get("eval_dir"):
        return Path(str(cfg.eval_dir)).expanduser().resolve()
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent / "eval" / ckpt.stem
    if (ckpt.parent / ".hydra").is_dir():  # hpc_ckpt_<n>.ckpt in the run directory
        return ckpt.parent / "eval" / ckpt.stem
    return Path(str(cfg.paths.output_dir)).resolve() / "eval" / ckpt.stem


RESTORED_SECTIONS = ("task", "model", "grc", "data")


def restore_run_config(cfg: DictConfig, stored: dict[str, Any] | None, overrides: list[str]) -> DictConfig:
    """``cfg`` with the sections :data:`RESTORED_SECTIONS` taken from the checkpoint's stored config.

    A section chosen on the command line as a group (``task=...``, ``model=...``; ``experiment=...``
    chooses them all) stays as composed; otherwise the stored section is used and the command line's
    keys inside it (``data.root=...``, ``data.batch_size=...``) are applied on top.
    """
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    if not stored:
        return cfg
    composed = cfg.copy()
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    groups = {k for k in keys if "." not in k}
    if "experiment" in groups:
        return cfg
    for section in RESTORED_SECTIONS:
        if section in groups or stored.get(section) is None:
            continue
        cfg[section] = stored[section]
        for key in keys:
            if key.startswith(section + "."):
                OmegaConf.update(cfg, key, OmegaConf.select(composed, key), force_add=True)
    return cfg


def has_test_split(module: pl.LightningModule, datamodule: pl.LightningDataModule) -> bool:
    """The task defines a test split: its data module overrides ``test_dataloader`` and its module ``test_step``."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    return (is_overridden("test_dataloader", datamodule, pl.LightningDataModule)
            and is_overridden("test_step", module, pl.LightningModule))


def evaluate(cfg: DictConfig, cli_overrides: list[str] | None = None) -> dict[str, Any]:
    """Evaluate ``ckpt_path`` on every split the task defines: ``trainer.validate`` (``val/*``), then
    ``trainer.test`` (``test/*``) when the task has a test split; logs to ``<eval_dir>/csv/metrics.csv``.

    The task, model, GRC settings and data settings come from the config stored in the checkpoint
    (:func:`restore_run_config`), so ``eval.py ckpt_path=...`` needs no other argument when the data is
    where training found it. ``trainer.devices=N`` evaluates with N processes: each evaluates its own
    unpadded shard (the tasks' loaders, :class:`tasks.common.data.ShardSampler`) and the metrics are
    reduced over processes, so every sample counts exactly once.
    """
    single_log_stream()
    if not cfg.get("ckpt_path"):
        raise UserError("eval.py needs ckpt_path=/path/to/file.ckpt (e.g. outputs/imagenet/<run>/checkpoints/best.ckpt).")
    ckpt_file = Path(str(cfg.ckpt_path)).expanduser().resolve()
    if not ckpt_file.is_file():
        raise UserError(f"Checkpoint {ckpt_file} does not exist; pass ckpt_path=/path/to/file.ckpt.")
    checkpoint = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    if "state_dict" not in checkpoint:
        raise UserError(f"{ckpt_file} is not a Lightning checkpoint of this project (it has no state_dict).")
    stored = (checkpoint.get("hyper_parameters") or {}).get("cfg")
    cfg = restore_run_config(cfg, stored, list(cli_overrides or []))

    if cfg.get("model") is not None and cfg.model.get("pretrained") is not None:
        cfg.model.pretrained = None  # the evaluated checkpoint's weights replace the run's start weights
    eval_dir = _eval_dir(cfg, ckpt_file)
    cfg = finalize_config(cfg, eval_dir)
    builder = get_method(str(cfg.task.builder))
    module, datamodule = builder(cfg, stage="validate")
    state = checkpoint["state_dict"]
    use_ema = bool(cfg.get("use_ema")) and checkpoint.get("ema_state_dict") is not None
    if use_ema:
        state = {f"model.{k}": v for k, v in checkpoint["ema_state_dict"].items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise UserError(f"{ckpt_file} does not match model '{cfg.model.name}' with this config "
                        f"({' '.join(s.strip() for s in first)}); pass the model it was trained with, e.g. model=...") from exc
    del checkpoint, state

    rank0 = rank_zero_only.rank == 0 and not _is_ddp_child()
    if rank0:
        eval_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, eval_dir / "config.yaml")
    # an earlier evaluation's file becomes metrics.<n>.csv
    loggers = [ResumableCSVLogger(save_dir=str(eval_dir), name="csv", version="")]
    trainer = build_trainer(cfg, eval_dir, loggers, [])
    trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = _final_metrics(trainer)
    splits = ["val"]
    if has_test_split(module, datamodule):
        trainer.test(module, datamodule=datamodule, verbose=False)
        metrics.update(_final_metrics(trainer))
        splits.append("test")
    metrics = {k: v for k, v in metrics.items() if k.split("/")[0] in splits}
    result = {"metrics": metrics, "ckpt_path": str(ckpt_file), "eval_dir": str(eval_dir), "ema": use_ema,
              "splits": splits, "world_size": trainer.world_size}
    if trainer.is_global_zero:
        (eval_dir / "results.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    return result
