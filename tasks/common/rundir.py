"""Run directory names that identify the recipe, and keeping a previous run's files when a run starts over.

Name (``hydra.run.dir`` = ``<paths.output_dir>/<paths.run_prefix><task.name>/<name>``): ``run_name``
(default ``<model.name>-seed<seed>``; experiment files set their own), followed by the command-line
overrides that change the recipe, sorted by key, each as ``+key-value``:

    python train.py model=pvt_grc                          -> pvt_tiny_grc-seed0
    python train.py model=pvt_grc grc=paper grc.ratio=0.25 -> pvt_tiny_grc-seed0+grc-paper+grc.ratio-0.25
    python train.py model=pvt_grc grc.ratio=0.25 ckpt_path=last data.root=/x   -> pvt_tiny_grc-seed0+grc.ratio-0.25

No ``=`` or ``,`` (Hydra would read ``ckpt_path=<dir>/checkpoints/last.ckpt`` as a sweep), no ``/``: any
other character outside ``A-Z a-z 0-9 . _ + - @`` becomes ``_``.

Left out: overrides of non-recipe keys (:data:`tasks.common.fingerprint.NON_RECIPE`: ``ckpt_path``,
``paths.*``, ``data.root``, ``data.num_workers``, ``logger``, ``callbacks``, ``trainer.devices``, ...),
``task``/``experiment`` (the task is the parent folder; an experiment sets ``run_name``), and
``model``/``seed`` when ``run_name`` already shows them. ``run_name=...`` on the command line names the
directory exactly. A suffix longer than :data:`MAX_SUFFIX` characters becomes ``+h<10 hex digits>`` of
its text. Same command, same directory: rerunning with ``ckpt_path=last`` resumes.

A directory name identifies the command, not the resolved config (an edited YAML file keeps the name):
checkpoints carry the recipe fingerprint (:mod:`tasks.common.fingerprint`) for that.

When a run starts from scratch in a directory that holds an earlier run, :func:`archive_previous_run`
moves that run's files aside instead of overwriting them: ``csv/metrics.csv`` -> ``csv/metrics.<n>.csv``,
``checkpoints/*.ckpt``, ``hpc_ckpt_*.ckpt`` and ``results.json`` -> ``previous/<n>/`` (n = 1, 2, ...).
"""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any, Iterable

from .fingerprint import is_recipe_key

log = logging.getLogger(__name__)

MAX_SUFFIX = 120
# config groups whose choice never changes the recipe (hydra/launcher: where jobs run)
NON_RECIPE_GROUPS = ("logger", "callbacks", "paths", "hydra", "hydra/launcher")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+\-@]")


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def recipe_overrides(overrides: Iterable[str], run_name: str, model_name: str = "", seed: Any = None) -> list[str]:
    """The overrides that go into the directory name, sorted by key (see the module docstring)."""
    kept = []
    for item in overrides:
        key, value = _split(str(item))
        if key in ("task", "experiment", "run_name") or key in NON_RECIPE_GROUPS or not is_recipe_key(key):
            continue
        if key == "model" and model_name and model_name in run_name:
            continue
        if key == "seed" and f"seed{value}" in run_name:
            continue
        kept.append((key, value))
    return [f"{k}={v}" for k, v in sorted(kept, key=lambda kv: kv[0])]


def run_dir_name(run_name: str, model_name: str = "", seed: Any = None, overrides: Iterable[str] = ()) -> str:
    """The run directory name for ``run_name`` and the command-line ``overrides``."""
    overrides = [str(o) for o in overrides]
    if any(_split(o)[0] == "run_name" for o in overrides):
        return _UNSAFE.sub("_", str(run_name))
    kept = recipe_overrides(overrides, str(run_name), str(model_name or ""), seed)
    suffix = "+".join(_UNSAFE.sub("_", "-".join(_split(item))) for item in kept)
    if len(suffix) > MAX_SUFFIX:
        suffix = "h" + hashlib.sha256(",".join(kept).encode()).hexdigest()[:10]
    name = _UNSAFE.sub("_", str(run_name))
    return f"{name}+{suffix}" if suffix else name


def _resolver(run_name: Any, model_name: Any, seed: Any, overrides: Any) -> str:
    return run_dir_name(str(run_name), str(model_name or ""), seed, list(overrides or []))


def register_resolver() -> None:
    """``${ct_run_dir:${run_name},${model.name},${seed},${hydra:overrides.task}}`` (used by configs/hydra)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("ct_run_dir"):
        OmegaConf.register_new_resolver("ct_run_dir", _resolver)


# ---------------------------------------------------------------------- keeping a previous run
def previous_run_files(run_dir: Path) -> list[Path]:
    """Files of an earlier run that a fresh start would overwrite."""
    files = [run_dir / "csv" / "metrics.csv", run_dir / "results.json"]
    files += sorted((run_dir / "checkpoints").glob("*.ckpt")) + sorted(run_dir.glob("hpc_ckpt_*.ckpt"))
    return [p for p in files if p.is_file()]


def _free_number(run_dir: Path) -> int:
    n = 1
    while (run_dir / "previous" / str(n)).exists() or (run_dir / "csv" / f"metrics.{n}.csv").exists():
        n += 1
    return n


def archive_previous_run(run_dir: Path) -> int | None:
    """Move an earlier run's logs, checkpoints and results aside; returns its number (None: nothing there)."""
    files = previous_run_files(run_dir)
    if not files:
        return None
    n = _free_number(run_dir)
    target = run_dir / "previous" / str(n)
    for path in files:
        if path.parent.name == "csv":
            dest = path.with_name(f"metrics.{n}.csv")
        else:
            dest = target / path.relative_to(run_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        path.rename(dest)
    log.warning("%s held an earlier run; starting from scratch, its metrics are now csv/metrics.%d.csv and its "
                "checkpoints and results previous/%d/ (resume a run with ckpt_path=last instead).", run_dir, n, n)
    return n
