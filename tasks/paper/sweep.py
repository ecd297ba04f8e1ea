"""Build the one Hydra multirun command that runs every row of a paper table, baseline and cached.

Experiment files live in ``configs/experiment/paper/table<N>_<row>_<variant>.yaml`` and carry
``paper: {table, row, variant, metrics}``; the block is read from the file (the name is the fallback).
The command is::

    python train.py -m experiment=paper/table1_pvt_tiny_baseline,paper/table1_pvt_tiny_cached,... \\
        seed=0,1,2 sweep_name=table1 ckpt_path=last hydra/launcher=slurm_8gpu \\
        trainer.devices=8 trainer.num_nodes=1 [extra overrides]

* ``sweep_name=table<N>``: every job lands in ``multirun/table<N>/<job overrides>/`` (no timestamps);
  ``python scripts/compare.py multirun/table<N>`` reads them all.
* ``ckpt_path=last``: a requeued (or re-launched) job resumes from its newest checkpoint and a new one
  starts from scratch (the framework treats a missing checkpoint as a fresh start).
* Two-stage tables (Table 8: ImageNet-22k pre-training, then ImageNet-1k fine-tuning): a fine-tuning file's
  ``paper.pretrain: {experiment, checkpoint_key}`` names its pre-training experiment and the key that takes
  that run's checkpoint. ``stage="pretrain"`` sweeps the pre-training experiments (``sweep_name=table<N>_pretrain``,
  seed 0 by default); the default stage sweeps the fine-tuning rows and needs every ``checkpoint_key=PATH``.
* ``trainer.devices`` / ``trainer.num_nodes``: taken from the launcher's ``gpus_per_node`` / ``nodes``
  (or your ``hydra.launcher.*`` overrides), because Lightning requires devices == --ntasks-per-node
  and num_nodes == --nodes under SLURM. Not added for local launchers or when you pass them; for
  CPU jobs (``slurm_cpu``, no GPUs) the launcher's tasks per node follow your ``trainer.devices``.
"""
from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from .tables import get_table, load_tables, norm

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"
# the launcher each paper table is meant for (ImageNet: 8 GPUs x total batch 1024 in the paper's recipe)
DEFAULT_LAUNCHER = {1: "slurm_8gpu", 2: "slurm_8gpu", 8: "slurm_8gpu", 10: "slurm_8gpu", 3: "slurm_8gpu",
                    4: "slurm_8gpu", 5: "slurm_8gpu", 7: "slurm_1gpu"}
LOCAL_LAUNCHERS = {"local", "basic", "submitit_local", "none"}
_NAME = re.compile(r"^table(\d+)_(.+)_([a-z0-9]+)$")


class SweepError(ValueError):
    """A user-fixable problem with a sweep request (unknown table, row, launcher...)."""


@dataclass(frozen=True)
class Experiment:
    """One experiment file of a paper table."""

    name: str          # the Hydra choice, e.g. "paper/table1_pvt_tiny_cached"
    table: int
    row: str
    variant: str
    path: Path
    pretrain: str | None = None         # the pre-training experiment this row fine-tunes (paper.pretrain.experiment)
    checkpoint_key: str | None = None   # the key that takes that run's checkpoint (paper.pretrain.checkpoint_key)


def _experiment_from_file(path: Path, group_dir: Path) -> Experiment | None:
    name = path.relative_to(group_dir).with_suffix("").as_posix()
    m = _NAME.match(path.stem)
    table = row = variant = None
    if m:
        table, row, variant = int(m.group(1)), m.group(2), m.group(3)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        data = {}
    paper = data.get("paper") if isinstance(data, dict) else None
    if isinstance(paper, dict) and paper.get("table") is not None:
        try:
            table = int(str(paper["table"]).lower().removeprefix("table"))
        except ValueError:
            pass
        row = str(paper.get("row", row))
        variant = str(paper.get("variant", variant))
    if table is None or row is None or variant is None:
        return None
    pretrain = paper.get("pretrain") if isinstance(paper, dict) else None
    pretrain = pretrain if isinstance(pretrain, dict) else {}
    return Experiment(name=name, table=table, row=row, variant=variant, path=path,
                      pretrain=pretrain.get("experiment"), checkpoint_key=pretrain.get("checkpoint_key"))


def paper_experiments(config_dir: str | Path = CONFIG_DIR) -> dict[int, list[Experiment]]:
    """Every ``configs/experiment/paper/table*.yaml`` by table number, in the paper's row order."""
    group_dir = Path(config_dir) / "experiment"
    out: dict[int, list[Experiment]] = {}
    for path in sorted((group_dir / "paper").glob("table*.yaml")):
        exp = _experiment_from_file(path, group_dir)
        if exp is not None:
            out.setdefault(exp.table, []).append(exp)
    tables = load_tables()
    for tid, exps in out.items():
        table = tables.get(tid)
        if table is None:
            continue
        rows = [norm(r.key) for r in table.rows]

        def order(e: Experiment) -> tuple[int, int, str]:
            row = table.row(e.row)
            r = rows.index(norm(row.key)) if row is not None else len(rows)
            v = table.variant(e.variant)
            return r, table.variants.index(v) if v in table.variants else 99, e.name
        exps.sort(key=order)
    return out


def _parse_table(table: str | int) -> int:
    try:
        return int(str(table).lower().strip().removeprefix("table"))
    except ValueError:
        raise SweepError(f"--table must be a number such as 1 or 6, got {table!r}.") from None


def override_value(overrides: Sequence[str], key: str) -> str | None:
    """The value the last ``key=value`` (or ``+key=value``) override gives ``key``, or None."""
    for o in reversed(overrides):
        k, sep, v = o.lstrip("+").partition("=")
        if sep and k == key:
            return v
    return None


def _launcher_chain(launcher: str, config_dir: str | Path) -> dict:
    """The launcher file merged with its ``defaults`` chain within the group (plugin defaults last)."""
    group = Path(config_dir) / "hydra" / "launcher"
    chain: list[dict] = []
    name: str | None = launcher
    while name:
        path = group / f"{name}.yaml"
        if not path.is_file():
            if name == "submitit_slurm":  # the plugin's own defaults
                chain.append({"gpus_per_node": None, "nodes": 1, "tasks_per_node": 1})
                break
            known = sorted(p.stem for p in group.glob("*.yaml")) + ["submitit_local", "submitit_slurm"]
            raise SweepError(f"Unknown launcher {name!r}; choose one of {', '.join(known)}.")
        data = yaml.safe_load(path.read_text()) or {}
        chain.append(data)
        parents = [d for d in data.get("defaults", []) if isinstance(d, str) and d != "_self_"]
        name = parents[0] if parents else None
    values: dict = {}
    for data in reversed(chain):
        values.update({k: v for k, v in data.items() if k != "defaults"})
    return values


def _as_count(value: object, what: str, launcher: str) -> int:
    if value in (None, "", "null", "None"):
        return 0
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SweepError(f"Launcher {launcher!r} has {what}={value!r}: pass a number.") from None


def launcher_resources(launcher: str, overrides: Sequence[str] = (), config_dir: str | Path = CONFIG_DIR
                       ) -> tuple[int, int] | None:
    """(gpus_per_node, nodes) a SLURM launcher config asks for (after ``hydra.launcher.*`` overrides);
    0 GPUs for CPU jobs (``gpus_per_node`` null or 0). None for local launchers."""
    if launcher in LOCAL_LAUNCHERS:
        return None
    values = _launcher_chain(launcher, config_dir)
    gpus = override_value(overrides, "hydra.launcher.gpus_per_node")
    gpus = values.get("gpus_per_node") if gpus is None else gpus
    nodes = override_value(overrides, "hydra.launcher.nodes") or values.get("nodes") or 1
    return _as_count(gpus, "gpus_per_node", launcher), max(_as_count(nodes, "nodes", launcher), 1)


RESOURCE_KEYS = ("partition", "account", "qos", "nodes", "tasks_per_node", "cpus_per_task", "mem_gb",
                 "gpus_per_node", "timeout_min")


def launcher_settings(launcher: str, overrides: Sequence[str] = (), config_dir: str | Path = CONFIG_DIR
                      ) -> dict[str, object] | None:
    """What each SLURM job of the sweep asks for: partition, account, qos, nodes, tasks per node, CPUs
    per task, memory (GB per node), GPUs per node, time limit (min); None for local launchers.

    Resolved like the launcher will (``hydra.launcher.*`` overrides, ``$SBATCH_PARTITION`` ...).
    """
    if launcher in LOCAL_LAUNCHERS:
        return None
    from omegaconf import OmegaConf

    import tasks.common  # noqa: F401  (the ct_tasks_per_node resolver)

    values = _launcher_chain(launcher, config_dir)
    for key in RESOURCE_KEYS:
        v = override_value(overrides, f"hydra.launcher.{key}")
        if v is not None:
            values[key] = yaml.safe_load(v)
    devices = override_value(overrides, "trainer.devices")
    root = OmegaConf.create({"hydra": {"launcher": {k: values.get(k) for k in RESOURCE_KEYS}},
                             "trainer": {"devices": yaml.safe_load(devices) if devices is not None else 1}})
    out: dict[str, object] = {}
    for key in RESOURCE_KEYS:
        try:
            out[key] = OmegaConf.select(root, f"hydra.launcher.{key}", throw_on_resolution_failure=True)
        except Exception:
            out[key] = values.get(key)
    return out


def format_resources(settings: dict[str, object]) -> str:
    """One line: what a job asks SLURM for (``default`` where the cluster's default applies)."""
    def show(key: str, unit: str = "") -> str:
        v = settings.get(key)
        return "default" if v in (None, "") else f"{v}{unit}"
    return (f"SLURM per job: partition={show('partition')} account={show('account')} nodes={show('nodes')} "
            f"tasks/node={show('tasks_per_node')} CPUs/task={show('cpus_per_task')} "
            f"memory={show('mem_gb', ' GB')}/node GPUs/node={settings.get('gpus_per_node') or 0} "
            f"time={show('timeout_min', ' min')}")


def build_sweep_command(table: str | int, seeds: Sequence[int] | str | None = None, launcher: str | None = None,
                        overrides: Sequence[str] = (), rows: Sequence[str] | None = None,
                        variants: Sequence[str] | None = None, python: str = sys.executable,
                        config_dir: str | Path = CONFIG_DIR, train_script: str = "train.py",
                        stage: str = "main") -> list[str]:
    """The ``train.py -m`` command (argv list) that runs a paper table as one sweep.

    ``stage="pretrain"`` runs the pre-training experiments of the chosen rows instead (seeds default to 0;
    otherwise 0, 1, 2). Raises :class:`SweepError` for a table without experiment files (listing those that
    have them), unknown rows/variants, an unknown launcher, or fine-tuning rows without their checkpoints.
    """
    if stage not in ("main", "pretrain"):
        raise SweepError(f"--stage must be 'main' or 'pretrain', got {stage!r}.")
    tid = _parse_table(table)
    experiments = paper_experiments(config_dir)
    if tid not in experiments:
        have = ", ".join(str(t) for t in sorted(experiments)) or "none"
        known = "" if tid in load_tables() else f" (the paper's tables are {sorted(load_tables())})"
        raise SweepError(f"No experiment files for table {tid}{known} in {Path(config_dir) / 'experiment' / 'paper'}. "
                         f"Tables with experiment files: {have}.")
    chosen = experiments[tid]
    paper_table = load_tables().get(tid)
    if rows:
        want = {norm(r) for r in rows}
        if paper_table is not None:
            want |= {norm(paper_table.row(r).key) for r in rows if paper_table.row(r) is not None}
        chosen = [e for e in chosen if norm(e.row) in want or
                  (paper_table is not None and paper_table.row(e.row) is not None
                   and norm(paper_table.row(e.row).key) in want)]
        if not chosen:
            have = sorted({_row_key(paper_table, e.row) for e in experiments[tid]})
            raise SweepError(f"No experiment of table {tid} matches rows {list(rows)}; rows: {', '.join(have)}.")
    if variants:
        want_v = {norm((paper_table.variant(v) if paper_table is not None else None) or v) for v in variants}
        chosen = [e for e in chosen if norm(e.variant) in want_v or
                  (paper_table is not None and norm(paper_table.variant(e.variant) or "") in want_v)]
        if not chosen:
            have = sorted({e.variant for e in experiments[tid]})
            raise SweepError(f"No experiment of table {tid} has variants {list(variants)}; variants: {', '.join(have)}.")
    if seeds is None:
        seeds = (0,) if stage == "pretrain" else (0, 1, 2)
    if isinstance(seeds, str):
        try:
            seeds = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise SweepError(f"--seeds must be comma-separated integers, got {seeds!r}.") from None
    if not seeds:
        raise SweepError("Give at least one seed.")
    launcher = launcher or DEFAULT_LAUNCHER.get(tid, "slurm_1gpu")
    overrides = list(overrides)
    names = _stage_experiments(tid, chosen, stage, overrides)
    cmd = [python, train_script, "-m", "experiment=" + ",".join(names),
           "seed=" + ",".join(str(s) for s in seeds)]
    if override_value(overrides, "sweep_name") is None:
        cmd.append(f"sweep_name=table{tid}" + ("_pretrain" if stage == "pretrain" else ""))
    if override_value(overrides, "ckpt_path") is None:
        cmd.append("ckpt_path=last")
    if launcher != "none":
        cmd.append(f"hydra/launcher={launcher}")
    resources = launcher_resources(launcher, overrides, config_dir)
    if resources is not None:
        gpus, nodes = resources
        if gpus and override_value(overrides, "trainer.devices") is None:
            cmd.append(f"trainer.devices={gpus}")
        if override_value(overrides, "trainer.num_nodes") is None:
            cmd.append(f"trainer.num_nodes={nodes}")
    return cmd + overrides


def _stage_experiments(tid: int, chosen: list[Experiment], stage: str, overrides: Sequence[str]) -> list[str]:
    """The experiment names of ``stage``; fine-tuning rows must be given their pre-training checkpoints."""
    if stage == "pretrain":
        if not all(e.pretrain for e in chosen):
            raise SweepError(f"Table {tid} has no pre-training stage (its experiment files name no paper.pretrain); "
                             f"drop --stage pretrain.")
        return list(dict.fromkeys(e.pretrain for e in chosen))  # type: ignore[misc]
    missing = [e.checkpoint_key for e in chosen if e.checkpoint_key and override_value(overrides, e.checkpoint_key)
               is None and not (len(chosen) == 1 and override_value(overrides, "model.pretrained"))]
    if missing:
        given = " ".join(f"{k}=PATH" for k in missing)
        raise SweepError(f"Table {tid} fine-tunes pre-trained checkpoints: pass {given} (each the "
                         f"checkpoints/last.ckpt of its pre-training run, from "
                         f"`python scripts/sweep.py --table {tid} --stage pretrain`).")
    return [e.name for e in chosen]


def _row_key(table, row: str) -> str:
    r = table.row(row) if table is not None else None
    return r.key if r is not None else row


def format_command(cmd: Sequence[str]) -> str:
    """The command as one shell line (``python`` shown as the interpreter path that runs it)."""
    return shlex.join(list(cmd))


def get_paper_table_title(table: int) -> str:
    try:
        return get_table(table).title
    except KeyError:
        return f"table {table}"
