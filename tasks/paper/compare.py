"""Compare logged results with the paper's tables.

Runs of a paper experiment carry ``paper: {table, row, variant, metrics}`` in their config. They are
grouped by (table, row, variant); the seeds of one group give mean +- std (sample std, n-1). Each
paper table becomes one markdown table with the paper's baseline, cached and gain next to ours, and a
verdict: a row reproduces when every variant we ran is within ``tolerance`` (absolute, in the
metric's unit, e.g. percentage points) of the paper's number.

The result of one run for one metric is the **last logged value** (``reduce="last"``): it is what
training ends with, uses no test-set selection, and matches the paper's ImageNet protocol (the
final checkpoint is evaluated). ``reduce="best"`` takes the maximum (minimum for lower-is-better
metrics) instead, as DeiT/PVT's "max accuracy" logs do; it is optimistic by the epoch-to-epoch noise.
ListOps logs ``test/acc`` once, from the best-validation weights, so both give the same number.

Runs without a ``paper:`` block are grouped by (task, model) into an "other runs" table. Broken runs
(unreadable config or CSV, missing metrics) are listed by path with the reason.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .runs import BrokenRun, Run, read_runs
from .tables import Column, PaperTable, get_table, norm

HEADLINE_METRICS = ("val/acc1", "val/acc5", "val/acc", "test/acc", "test/acc1", "test/bleu", "val/loss")
# config keys that legitimately differ between the seeds of one group (names, paths, loggers)
_IGNORED_TOP_KEYS = {"seed", "run_name", "name", "paths", "logger", "hydra", "ckpt_path", "sweep_name",
                     "resume_mismatch", "print_config"}
_IGNORED_SUFFIXES = ("dir", "dirpath", "_path", "root", "save_dir")


@dataclass
class Stat:
    """Mean +- sample std over the seeds of one group for one metric."""

    values: list[float]
    seeds: list[Any]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else 0.0

    def fmt(self, digits: int = 2) -> str:
        if self.n == 1:
            return f"{self.mean:.{digits}f} (n=1)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} (n={self.n})"


@dataclass
class ComparisonRow:
    """One (paper row, metric) line of a paper table."""

    row: str
    label: str
    metric: str
    column: str
    paper: dict[str, float | None]
    ours: dict[str, Stat | None]
    paper_gain: float | None
    ours_gain: float | None
    diffs: dict[str, float]           # variant -> ours mean - paper
    verdict: str                      # "yes", "no (cached -1.20)", "-"


@dataclass
class TableComparison:
    table: PaperTable
    rows: list[ComparisonRow]


@dataclass
class OtherGroup:
    task: str
    model: str
    stats: dict[str, Stat]
    seeds: list[Any]
    paths: list[Path]


@dataclass
class Comparison:
    tables: list[TableComparison]
    other: list[OtherGroup]
    other_metrics: list[str]
    broken: list[BrokenRun]
    warnings: list[str]
    tolerance: float
    reduce: str
    n_runs: int = 0
    paper_groups: int = 0


@dataclass
class _Group:
    runs: list[Run] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # metric -> the experiment file's paper value


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = str(k)
        if (not prefix and key in _IGNORED_TOP_KEYS) or key.endswith(_IGNORED_SUFFIXES):
            continue
        out.update(_flatten(v, f"{prefix}{key}."))
    return out


def _config_differences(runs: Sequence[Run]) -> list[str]:
    """Config keys (other than seed, names and paths) whose values differ between ``runs``."""
    flats = [_flatten(r.config) for r in runs]
    keys = set().union(*flats)
    return sorted(k for k in keys if len({repr(f.get(k)) for f in flats}) > 1)


def _resolve_metric(table: PaperTable, key: str) -> tuple[str, Column | None]:
    """(logged metric name, table column) for a ``paper.metrics`` key (logged name or column key)."""
    col = table.column_for_metric(key)
    if col is not None and col.logged:
        return col.logged, col
    return key, col


def _stat(runs: Sequence[Run], metric: str, reduce: str, higher: bool) -> Stat | None:
    values, seeds = [], []
    for r in runs:
        v = r.final(metric, reduce, higher)
        if v is not None and not math.isnan(v):
            values.append(v)
            seeds.append(r.seed)
    return Stat(values, seeds) if values else None


def compare_runs(runs: Sequence[Run], broken: Sequence[BrokenRun] = (), tolerance: float = 0.5,
                 reduce: str = "last", metrics: Sequence[str] | None = None) -> Comparison:
    """Group ``runs`` and compare them with the paper (see the module docstring for the rules)."""
    if reduce not in ("last", "best"):
        raise ValueError(f"reduce must be 'last' or 'best', got {reduce!r}")
    broken = list(broken)
    warnings: list[str] = []
    groups: dict[tuple[int, str, str], _Group] = {}
    others: dict[tuple[str, str], list[Run]] = {}

    for run in runs:
        paper = run.paper
        if paper is None:
            others.setdefault((run.task, run.model), []).append(run)
            continue
        try:
            table = get_table(paper["table"])
        except KeyError as err:
            warnings.append(f"{run.path}: {err.args[0]} Shown under other runs.")
            others.setdefault((run.task, run.model), []).append(run)
            continue
        row = table.row(str(paper.get("row", "")))
        variant = table.variant(str(paper.get("variant", "")))
        if variant is None:
            warnings.append(f"{run.path}: variant {paper.get('variant')!r} is not one of table {table.id}'s "
                            f"{table.variants}. Shown under other runs.")
            others.setdefault((run.task, run.model), []).append(run)
            continue
        row_key = row.key if row is not None else str(paper.get("row"))
        if row is None:
            warnings.append(f"{run.path}: row {paper.get('row')!r} is not in paper table {table.id} "
                            f"(rows: {[r.key for r in table.rows]}); shown without paper numbers.")
        wanted = dict(paper.get("metrics") or {}) or {c.logged: None for c in table.logged_columns()}
        resolved = {_resolve_metric(table, k)[0]: v for k, v in wanted.items()}
        missing = [m for m in resolved if not run.history.get(m)]
        if missing:
            logged = sorted(run.history) or ["nothing"]
            reason = (f"missing metric {', '.join(missing)} (logged: {', '.join(logged)})")
            if len(missing) == len(resolved):
                broken.append(BrokenRun(run.path, reason))
                continue
            broken.append(BrokenRun(run.path, reason + "; its other metrics are used"))
        g = groups.setdefault((table.id, row_key, variant), _Group())
        g.runs.append(run)
        for m, v in resolved.items():
            if v is not None:
                g.metrics.setdefault(m, float(v))

    tables: list[TableComparison] = []
    for tid in sorted({k[0] for k in groups}):
        table = get_table(tid)
        keys = [k for k in groups if k[0] == tid]
        metric_order = [c.logged for c in table.columns if c.logged]
        used = {m for k in keys for m in groups[k].metrics} | {
            m for k in keys for r in groups[k].runs for m in
            ([_resolve_metric(table, x)[0] for x in (r.paper or {}).get("metrics") or {}] or metric_order)}
        if metrics:
            used &= set(metrics)
        ordered = [m for m in metric_order if m in used] + sorted(used - set(metric_order))
        row_order = [r.key for r in table.rows]
        row_keys = sorted({k[1] for k in keys}, key=lambda r: (row_order.index(r) if r in row_order else 99, r))
        lines: list[ComparisonRow] = []
        for row_key in row_keys:
            row = table.row(row_key)
            for metric in ordered:
                col = table.column_for_metric(metric)
                higher = col.higher_is_better if col else True
                paper_vals: dict[str, float | None] = {}
                ours: dict[str, Stat | None] = {}
                for v in table.variants:
                    g = groups.get((tid, row_key, v))
                    pv = table.value(row_key, v, metric) if row is not None else None
                    if g is not None:
                        file_v = g.metrics.get(metric)
                        if pv is None and file_v is not None:
                            pv = file_v
                        elif pv is not None and file_v is not None and abs(pv - file_v) > 1e-6:
                            warnings.append(f"table {tid} {row_key}/{v} {metric}: the experiment file says "
                                            f"{file_v}, tasks/paper/tables.yaml says {pv} (the table is used).")
                        diff = _config_differences(g.runs)
                        if diff and metric == ordered[0]:
                            warnings.append(f"table {tid} {row_key}/{v}: runs grouped as seeds differ in "
                                            f"{', '.join(diff[:8])}{' ...' if len(diff) > 8 else ''}.")
                        seeds = [r.seed for r in g.runs]
                        dup = sorted({str(s) for s in seeds if seeds.count(s) > 1})
                        if dup and metric == ordered[0]:
                            warnings.append(f"table {tid} {row_key}/{v}: seed(s) {', '.join(dup)} appear more than "
                                            f"once: {', '.join(str(r.path) for r in g.runs if str(r.seed) in dup)}.")
                    paper_vals[v] = pv
                    ours[v] = _stat(g.runs, metric, reduce, higher) if g is not None else None
                ref_row = row_key
                if "baseline" not in ours or ours.get("baseline") is None:
                    if table.reference_row and groups.get((tid, table.reference_row, "baseline")):
                        ref_row = table.reference_row
                ref_stat = None
                if groups.get((tid, ref_row, "baseline")):
                    ref_stat = _stat(groups[(tid, ref_row, "baseline")].runs, metric, reduce, higher)
                paper_ref = table.reference(row_key, metric) if row is not None else None
                p_cached = paper_vals.get("cached")
                paper_gain = p_cached - paper_ref if p_cached is not None and paper_ref is not None else None
                o_cached = ours.get("cached")
                ours_gain = (o_cached.mean - ref_stat.mean) if o_cached is not None and ref_stat is not None else None
                diffs = {v: ours[v].mean - paper_vals[v] for v in table.variants   # type: ignore[union-attr,operator]
                         if ours.get(v) is not None and paper_vals.get(v) is not None}
                misses = [f"{v} {d:+.2f}" for v, d in diffs.items() if abs(d) > tolerance]
                verdict = "-" if not diffs else ("yes" if not misses else f"no ({', '.join(misses)})")
                lines.append(ComparisonRow(
                    row=row_key, label=row.label if row is not None else row_key, metric=metric,
                    column=col.label if col else metric, paper=paper_vals, ours=ours, paper_gain=paper_gain,
                    ours_gain=ours_gain, diffs=diffs, verdict=verdict))
        tables.append(TableComparison(table, lines))

    other_groups: list[OtherGroup] = []
    present = {m for rs in others.values() for r in rs for m in r.history}
    other_metrics = [m for m in (metrics or HEADLINE_METRICS) if m in present]
    for (task, model), rs in sorted(others.items()):
        stats = {m: s for m in other_metrics if (s := _stat(rs, m, reduce, "loss" not in m)) is not None}
        other_groups.append(OtherGroup(task, model, stats, [r.seed for r in rs], [r.path for r in rs]))

    return Comparison(tables=tables, other=other_groups, other_metrics=other_metrics, broken=broken,
                      warnings=warnings, tolerance=tolerance, reduce=reduce, n_runs=len(runs),
                      paper_groups=len(groups))


def _fmt(x: float | None, digits: int = 2, sign: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def to_markdown(c: Comparison) -> str:
    """The comparison as markdown: one table per paper table, other runs, broken runs, warnings."""
    how = "last logged value" if c.reduce == "last" else "best logged value (max; min for lower-is-better)"
    out = [f"Compared {c.n_runs} run(s): {c.paper_groups} paper group(s), {len(c.other)} other group(s), "
           f"{len(c.broken)} broken. Result of a run = {how}; ours = mean ± std over seeds (n runs); "
           f"a row reproduces when every variant is within ±{c.tolerance:g} of the paper.", ""]
    for tc in c.tables:
        t = tc.table
        out.append(f"### Table {t.id}: {t.title}")
        out.append("")
        head = ["row", "metric"]
        for v in t.variants:
            head += [f"{v} (paper)", f"{v} (ours)"]
        has_gain = "cached" in t.variants
        if has_gain:
            head += ["gain (paper)", "gain (ours)"]
        head.append(f"within ±{c.tolerance:g}")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in tc.rows:
            cells = [r.label, r.metric]
            for v in t.variants:
                stat = r.ours.get(v)
                cells += [_fmt(r.paper.get(v)), stat.fmt() if stat is not None else "-"]
            if has_gain:
                cells += [_fmt(r.paper_gain, sign=True), _fmt(r.ours_gain, sign=True)]
            cells.append(r.verdict)
            out.append("| " + " | ".join(cells) + " |")
        for note in t.notes:
            out.append(f"\n_Note:_ {note}")
        out.append("")
    if c.other:
        out.append("### Other runs (no `paper:` block)")
        out.append("")
        head = ["task", "model", "runs", "seeds"] + c.other_metrics
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for g in c.other:
            cells = [g.task, g.model, str(len(g.paths)), ",".join(str(s) for s in g.seeds)]
            cells += [g.stats[m].fmt() if m in g.stats else "-" for m in c.other_metrics]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    if c.broken:
        out.append("### Broken runs")
        out.append("")
        out += [f"- `{b.path}`: {b.reason}" for b in c.broken]
        out.append("")
    if c.warnings:
        out.append("### Warnings")
        out.append("")
        out += [f"- {w}" for w in c.warnings]
        out.append("")
    if not c.tables and not c.other:
        out.append("No usable runs found.")
    return "\n".join(out).rstrip() + "\n"


def plot_comparison(c: Comparison, path: str | Path, title: str | None = None) -> Path:
    """Bar charts: per (paper table, metric) the paper's and our values per row and variant
    (ours with std error bars), plus the headline metric of the other runs. Returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels: list[tuple[str, list[str], dict[str, list[float | None]], dict[str, list[float]]]] = []
    for tc in c.tables:
        for metric in dict.fromkeys(r.metric for r in tc.rows):
            rows = [r for r in tc.rows if r.metric == metric]
            series: dict[str, list[float | None]] = {}
            errs: dict[str, list[float]] = {}
            for v in tc.table.variants:
                if any(r.paper.get(v) is not None for r in rows):
                    series[f"{v} (paper)"] = [r.paper.get(v) for r in rows]
                    errs[f"{v} (paper)"] = [0.0] * len(rows)
                if any(r.ours.get(v) is not None for r in rows):
                    series[f"{v} (ours)"] = [r.ours[v].mean if r.ours.get(v) else None for r in rows]  # type: ignore[union-attr]
                    errs[f"{v} (ours)"] = [r.ours[v].std if r.ours.get(v) else 0.0 for r in rows]  # type: ignore[union-attr]
            panels.append((f"Table {tc.table.id}: {metric}", [r.label for r in rows], series, errs))
    if c.other and c.other_metrics:
        m = c.other_metrics[0]
        labels = [f"{g.task}\n{g.model}" for g in c.other]
        panels.append((f"Other runs: {m}", labels,
                       {"ours": [g.stats[m].mean if m in g.stats else None for g in c.other]},
                       {"ours": [g.stats[m].std if m in g.stats else 0.0 for g in c.other]}))
    n = max(1, len(panels))
    fig, axes = plt.subplots(n, 1, figsize=(max(6.0, 1.6 + 1.2 * max((len(p[1]) for p in panels), default=1)),
                                            3.6 * n), squeeze=False)
    colors = {"baseline": "#4C72B0", "cached": "#DD8452", "xl_cache": "#55A868"}
    for ax, (name, labels, series, errs) in zip(axes[:, 0], panels):
        x = np.arange(len(labels))
        width = 0.8 / max(1, len(series))
        for i, (sname, vals) in enumerate(series.items()):
            variant = sname.split(" ")[0]
            paper = sname.endswith("(paper)")
            heights = [v if v is not None else np.nan for v in vals]
            ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, yerr=None if paper else errs[sname],
                   label=sname, color=colors.get(variant, "#8172B2"), alpha=0.45 if paper else 0.95,
                   hatch="//" if paper else None, edgecolor="black", linewidth=0.5, capsize=3)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title(f"{name} (hatched: paper; solid: ours, mean ± std over seeds)", fontsize=9)
        finite = [v for vals in series.values() for v in vals if v is not None]
        if finite and name.startswith("Other"):
            ax.set_ylim(0, max(finite) * 1.15 + 1e-9)
        elif finite:
            lo, hi = min(finite), max(finite)
            pad = max(1.0, 0.15 * (hi - lo))
            ax.set_ylim(max(0.0, lo - pad) if lo >= 0 else lo - pad, hi + pad)
        ax.legend(fontsize=7, ncol=min(4, max(1, len(series))), loc="upper center", bbox_to_anchor=(0.5, -0.12),
                  frameon=False)
        ax.grid(axis="y", alpha=0.3)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no usable runs", ha="center", va="center")
        axes[0, 0].axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare_paths(patterns: Iterable[str], tolerance: float = 0.5, reduce: str = "last",
                  metrics: Sequence[str] | None = None) -> Comparison:
    """Read every run under ``patterns`` (run dirs, globs, sweep folders) and compare."""
    runs, broken = read_runs(patterns)
    return compare_runs(runs, broken, tolerance=tolerance, reduce=reduce, metrics=metrics)


__all__ = ["Comparison", "ComparisonRow", "Stat", "compare_paths", "compare_runs", "norm", "plot_comparison",
           "to_markdown"]
