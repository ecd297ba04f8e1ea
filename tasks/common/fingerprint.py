"""The recipe of a run, its fingerprint in every checkpoint, and the refusal to resume across recipes.

The *recipe* is the resolved run config without the keys that say where or how a run executes but
not what it computes (:data:`NON_RECIPE`: paths, data location and loader workers, loggers, callbacks,
device count, progress display, the paper's reference numbers, ...). Two runs with the same recipe
train the same model on the same data with the same schedule; two checkpoints with different recipes
must not continue each other silently.

Every checkpoint written through :class:`tasks.common.module.TaskModule` holds
``checkpoint["recipe"] = {"fingerprint": <12 hex>, "values": {dotted key: value}}``. Before training
resumes, :func:`check_resume` compares the checkpoint's recipe (or, for checkpoints written before
fingerprints existed, the recipe of its stored config ``hyper_parameters.cfg``) with this run's and
raises a :class:`ConfigError` naming the differing keys unless ``resume_mismatch=allow``.

``trainer.devices``/``num_nodes`` are not recipe keys: a run may resume on another number of GPUs
(the learning rate follows the total batch, ``task.lr_scaling``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError, UserError

# Dotted keys (and everything below them) that do not change what a run computes.
NON_RECIPE: tuple[str, ...] = (
    "paths", "hydra", "run_name", "sweep_name", "ckpt_path", "resume_mismatch", "logger", "callbacks", "slurm",
    "paper", "matmul_precision", "compile", "print_config", "eval_dir", "use_ema",
    "data.root", "data.num_workers", "data.pin_memory", "data.persistent_workers", "data.prefetch_factor",
    "data.cache", "data.val_batch_size", "data.eval_batch_size",
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy", "trainer.plugins",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
    "trainer.num_sanity_val_steps", "trainer.deterministic", "trainer.benchmark", "trainer.profiler",
    "trainer.detect_anomaly", "trainer.default_root_dir",
)
RECIPE_KEY = "recipe"
ALLOW = "allow"


def is_recipe_key(key: str) -> bool:
    """False for a dotted key at or below one of :data:`NON_RECIPE`."""
    return not any(key == k or key.startswith(k + ".") for k in NON_RECIPE)


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, Mapping) and node:
        for k, v in node.items():
            _flatten(v, f"{prefix}{k}.", out)
    else:
        out[prefix[:-1]] = list(node) if isinstance(node, (list, tuple)) else node


def recipe_values(cfg: Any) -> dict[str, Any]:
    """``{dotted key: value}`` of the recipe keys of a resolved config (DictConfig or plain dict)."""
    if not isinstance(cfg, dict):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    flat: dict[str, Any] = {}
    _flatten(cfg, "", flat)
    return {k: _plain(v) for k, v in sorted(flat.items()) if is_recipe_key(k)}


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def fingerprint(values: Mapping[str, Any]) -> str:
    """12 hex digits of the SHA-256 of the recipe values."""
    return hashlib.sha256(json.dumps(dict(values), sort_keys=True, default=str).encode()).hexdigest()[:12]


def recipe_record(cfg: Any) -> dict[str, Any]:
    """What a checkpoint stores under ``checkpoint["recipe"]``."""
    values = recipe_values(cfg)
    return {"fingerprint": fingerprint(values), "values": values}


def checkpoint_recipe(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The recipe record of a loaded checkpoint; derived from ``hyper_parameters.cfg`` for older files."""
    record = checkpoint.get(RECIPE_KEY)
    if isinstance(record, Mapping) and "values" in record:
        return dict(record)
    cfg = (checkpoint.get("hyper_parameters") or {}).get("cfg")
    return recipe_record(cfg) if cfg else None


def _show(value: Any) -> str:
    text = "unset" if value is _MISSING else json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


_MISSING = object()


def recipe_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``["grc.ratio: 0.5 -> 0.25", ...]`` for every key whose value differs (sorted)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a != b:
            out.append(f"{key}: {_show(a)} -> {_show(b)}")
    return out


def check_resume(ckpt_path: str | Path, checkpoint: Mapping[str, Any], cfg: Any, mismatch: Any = "refuse") -> list[str]:
    """Refuse to resume ``checkpoint`` (loaded from ``ckpt_path``) with a different recipe than ``cfg``'s.

    Returns the differences (empty when the recipes agree or the checkpoint has no stored config);
    raises :class:`ConfigError` when they differ and ``mismatch`` is not ``"allow"``.
    """
    mode = str(mismatch or "refuse").lower()
    if mode not in ("refuse", ALLOW):
        raise ConfigError(f"resume_mismatch={mismatch} is not a choice; use resume_mismatch=refuse or allow.")
    stored = checkpoint_recipe(checkpoint)
    if stored is None:
        return []
    current = recipe_values(cfg)
    if stored.get("fingerprint") == fingerprint(current):
        return []
    diffs = recipe_differences(stored["values"], current)
    if diffs and mode != ALLOW:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise ConfigError(f"Checkpoint {ckpt_path} was written by a different recipe ({shown}); rerun with the "
                          f"checkpoint's settings, or pass resume_mismatch=allow to resume it with this recipe anyway.")
    return diffs


def load_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint memory-mapped (large files are not read): for ``global_step`` and the recipe."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:
        raise UserError(f"Checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); pass another ckpt_path "
                        f"or delete it to start from scratch.") from exc
