"""Read finished runs: find run directories, their config and their logged metrics.

The run-directory contract (docs/architecture.md) is::

    <run_dir>/.hydra/config.yaml     the job's config (``task.name``, ``model.name``, ``seed``, ``paper:``)
    <run_dir>/csv/metrics.csv        Lightning's CSVLogger (step, epoch, one column per metric, sparse)
    <run_dir>/wandb/offline-run-*/   wandb offline runs (read by :mod:`tasks.paper.wandb_offline`)

Anything that cannot be read becomes a :class:`BrokenRun` carrying the path and the reason, never an
exception: one bad directory must not hide the results of a hundred good ones.
"""
from __future__ import annotations

import csv
import glob
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from omegaconf import OmegaConf

from .wandb_offline import WandbFileError, read_wandb_history, wandb_run_dirs

CONFIG = Path(".hydra") / "config.yaml"
CSV = Path("csv") / "metrics.csv"
# logging bookkeeping columns, not metrics
_NOT_METRICS = {"step", "epoch", "_step", "_runtime", "_timestamp", "trainer/global_step", "created_at"}


@dataclass
class BrokenRun:
    """A directory that looks like a run but cannot be used, and why."""

    path: Path
    reason: str


@dataclass
class Run:
    """One finished (or interrupted) run: its config and every logged value of every metric."""

    path: Path
    config: dict[str, Any]
    history: dict[str, list[float]] = field(default_factory=dict)  # metric -> values in logging order
    sources: tuple[str, ...] = ()  # "csv", "wandb"

    def get(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted key (``"model.name"``), or ``default``."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def paper(self) -> dict[str, Any] | None:
        p = self.config.get("paper")
        return p if isinstance(p, dict) and p.get("table") is not None else None

    @property
    def seed(self) -> Any:
        return self.get("seed")

    @property
    def task(self) -> str:
        task = self.config.get("task")
        return str(task.get("name", "?")) if isinstance(task, dict) else str(task if task is not None else "?")

    @property
    def model(self) -> str:
        m = self.get("model.name")
        if m is None:
            m = self.get("model.model_name", self.get("model.arch", "?"))
        return str(m)

    def final(self, metric: str, reduce: str = "last", higher_is_better: bool = True) -> float | None:
        """The run's result for ``metric``: the last logged value, or the best (``reduce="best"``)."""
        values = self.history.get(metric)
        if not values:
            return None
        if reduce == "last":
            return values[-1]
        if reduce == "best":
            return max(values) if higher_is_better else min(values)
        raise ValueError(f"reduce must be 'last' or 'best', got {reduce!r}")


def is_run_dir(path: Path) -> bool:
    """A run directory has a Hydra config, a CSV log or a wandb folder."""
    return (path / CONFIG).is_file() or (path / CSV).is_file() or bool(wandb_run_dirs(path))


def find_run_dirs(patterns: Iterable[str]) -> tuple[list[Path], list[BrokenRun]]:
    """Expand run directories, globs and parent folders (sweep dirs, ``outputs/``) into run directories.

    A parent folder is searched recursively; the search stops at the first run directory on each
    branch and skips hidden folders (``.submitit``, ``.hydra``). Patterns matching nothing are
    reported as broken.
    """
    found: list[Path] = []
    missing: list[BrokenRun] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True)) or (
            [pattern] if Path(pattern).exists() else [])
        if not matches:
            missing.append(BrokenRun(Path(pattern), "no such file or directory"))
            continue
        for m in matches:
            p = Path(m)
            if p.is_file():  # e.g. a glob over .../metrics.csv: take the run it belongs to
                p = p.parent.parent if p.parent.name in {"csv", ".hydra"} else p.parent
            if is_run_dir(p):
                found.append(p)
                continue
            before = len(found)
            for root, dirs, _ in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in {"wandb", "checkpoints", "csv"})
                r = Path(root)
                if r != p and is_run_dir(r):
                    found.append(r)
                    dirs[:] = []
            if len(found) == before and p.is_dir():
                missing.append(BrokenRun(p, "no run directories inside (no .hydra/config.yaml, csv/metrics.csv or wandb/)"))
    unique = list(dict.fromkeys(q.resolve() for q in found))
    return unique, missing


def _load_config(path: Path) -> dict[str, Any]:
    cfg = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - e.g. ${hydra:...} outside a Hydra app: keep what resolves
        raw = OmegaConf.to_container(cfg, resolve=False)

        def fix(node: Any, prefix: str) -> Any:
            if isinstance(node, dict):
                return {k: fix(v, f"{prefix}{k}.") for k, v in node.items()}
            if isinstance(node, str) and "${" in node:
                try:
                    return OmegaConf.select(cfg, prefix[:-1], throw_on_resolution_failure=True)
                except Exception:  # noqa: BLE001
                    return node
            return node
        return fix(raw, "")


def _read_csv(path: Path) -> dict[str, list[float]]:
    """Metric -> values in logging order from a CSVLogger file; raises ValueError when corrupt.

    CSVLogger writes every row with every column (empty cells where a metric was not logged at that
    step), so a row with another field count, or a cell that is not a number, means a damaged file.
    """
    try:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"corrupt metrics.csv ({type(err).__name__}: {err})") from None
    rows = [r for r in rows if r]
    if not rows:
        raise ValueError("empty metrics.csv")
    header = rows[0]
    columns: dict[str, list[float]] = {h: [] for h in header}
    for lineno, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"corrupt metrics.csv (line {lineno} has {len(row)} fields, the header {len(header)})")
        for name, cell in zip(header, row):
            cell = cell.strip()
            if not cell:
                continue
            try:
                value = float(cell)
            except ValueError:
                raise ValueError(f"corrupt metrics.csv (line {lineno}, column {name!r}: {cell[:30]!r} "
                                 "is not a number)") from None
            columns[name].append(value)
    return {k: v for k, v in columns.items() if v and k not in _NOT_METRICS and k}


def _wandb_history(run_dir: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for row in read_wandb_history(run_dir):
        for k, v in row.items():
            if k in _NOT_METRICS or k.startswith("_") or isinstance(v, bool):
                continue
            if isinstance(v, (int, float)) and not math.isnan(float(v)):
                out.setdefault(k, []).append(float(v))
    return out


def read_run(path: str | Path) -> Run | BrokenRun:
    """Read one run directory. CSV metrics come first; wandb fills metrics the CSV lacks."""
    path = Path(path)
    cfg_file = path / CONFIG
    if not cfg_file.is_file():
        return BrokenRun(path, f"missing config {CONFIG}")
    try:
        config = _load_config(cfg_file)
        if not isinstance(config, dict):
            raise ValueError("not a mapping")
    except Exception as err:  # noqa: BLE001
        return BrokenRun(path, f"unreadable config {CONFIG} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")

    history: dict[str, list[float]] = {}
    sources: list[str] = []
    problems: list[str] = []
    if (path / CSV).is_file():
        try:
            history = _read_csv(path / CSV)
            sources.append("csv")
        except ValueError as err:
            problems.append(str(err))
    if wandb_run_dirs(path):
        try:
            for k, v in _wandb_history(path).items():
                history.setdefault(k, v)
            sources.append("wandb")
        except (WandbFileError, OSError, ValueError) as err:
            problems.append(f"unreadable wandb log ({err})")
    if not sources:
        reason = "; ".join(problems) or f"no metrics logged (neither {CSV} nor wandb/offline-run-*)"
        return BrokenRun(path, reason)
    return Run(path=path, config=config, history=history, sources=tuple(sources))


def read_runs(patterns: Iterable[str]) -> tuple[list[Run], list[BrokenRun]]:
    """Find and read every run under ``patterns``; unusable ones come back as :class:`BrokenRun`."""
    dirs, broken = find_run_dirs(patterns)
    runs: list[Run] = []
    for d in dirs:
        r = read_run(d)
        (runs if isinstance(r, Run) else broken).append(r)  # type: ignore[arg-type]
    return runs, broken
