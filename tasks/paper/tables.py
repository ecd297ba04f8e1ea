"""The paper's tables as data: load ``tables.yaml`` and look values up by table, row, variant, metric.

Rows and variants are matched loosely (case and punctuation are ignored, aliases are listed in the
YAML), so an experiment file's ``paper: {table: 1, row: pvt_tiny, variant: cached}`` and a user's
``PVT-Tiny`` both find the same row.

>>> t = load_tables()[1]
>>> t.value("pvt_tiny", "cached", "top1")
78.4
>>> t.column_for_metric("val/acc1").key
'top1'
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TABLES_FILE = Path(__file__).with_name("tables.yaml")


def norm(name: Any) -> str:
    """Lower-case ``name`` and drop everything but letters and digits (``PVT-Tiny`` -> ``pvttiny``)."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


@dataclass(frozen=True)
class Column:
    """One reported quantity: ``logged`` is the metric name a run logs for it (None: not logged)."""

    key: str
    label: str
    logged: str | None
    higher_is_better: bool = True


@dataclass
class Row:
    key: str
    label: str
    aliases: tuple[str, ...]
    values: dict[str, dict[str, float]]  # variant -> column key -> paper value
    extra: dict[str, dict[str, float]] = field(default_factory=dict)  # e.g. LRA leaderboard

    def names(self) -> set[str]:
        return {norm(self.key), norm(self.label), *(norm(a) for a in self.aliases)}


@dataclass
class PaperTable:
    """One table of the paper. ``variants`` are ordered as in the paper (baseline first)."""

    id: int
    title: str
    source: str
    task: str
    variants: list[str]
    columns: list[Column]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    reference_row: str | None = None
    variant_aliases: dict[str, str] = field(default_factory=dict)  # normalised alias -> variant

    def row(self, name: str) -> Row | None:
        """The row called ``name`` (key, label or alias; loose match) or None."""
        n = norm(name)
        for row in self.rows:
            if n in row.names():
                return row
        return None

    def variant(self, name: str) -> str | None:
        """The canonical variant name for ``name`` (``grc`` -> ``cached``) or None."""
        n = norm(name)
        canonical = self.variant_aliases.get(n, n)
        return canonical if canonical in self.variants else None

    def column(self, key: str) -> Column | None:
        for c in self.columns:
            if c.key == key:
                return c
        return None

    def column_for_metric(self, logged: str) -> Column | None:
        """The column whose logged metric name is ``logged`` (or whose key is ``logged``)."""
        for c in self.columns:
            if c.logged == logged or c.key == logged:
                return c
        return None

    def value(self, row: str, variant: str, column: str) -> float | None:
        """The paper's number, or None when the paper does not report it."""
        r, v = self.row(row), self.variant(variant)
        if r is None or v is None:
            return None
        c = self.column_for_metric(column) or self.column(column)
        if c is None:
            return None
        return r.values.get(v, {}).get(c.key)

    def reference(self, row: str, column: str) -> float | None:
        """The value gains are measured against: the row's baseline, else ``reference_row``'s."""
        base = self.value(row, "baseline", column)
        if base is None and self.reference_row is not None:
            base = self.value(self.reference_row, "baseline", column)
        return base

    def logged_columns(self) -> list[Column]:
        return [c for c in self.columns if c.logged]


@functools.lru_cache(maxsize=None)
def _load(path: str) -> dict[int, PaperTable]:
    data = yaml.safe_load(Path(path).read_text())
    aliases = {norm(a): variant for variant, names in data.get("variant_aliases", {}).items()
               for a in [variant, *names]}
    tables: dict[int, PaperTable] = {}
    for t in data["tables"]:
        variants = list(t["variants"])
        rows = []
        for r in t["rows"]:
            values = {v: dict(r[v]) for v in variants if v in r}
            extra = {k: dict(v) for k, v in r.items()
                     if k not in {"key", "label", "aliases", *variants} and isinstance(v, dict)}
            rows.append(Row(key=r["key"], label=r.get("label", r["key"]), aliases=tuple(r.get("aliases", ())),
                            values=values, extra=extra))
        tables[int(t["id"])] = PaperTable(
            id=int(t["id"]), title=t["title"], source=t.get("source", ""), task=t.get("task", ""),
            variants=variants, columns=[Column(**c) for c in t["columns"]], rows=rows,
            notes=list(t.get("notes", [])), reference_row=t.get("reference_row"), variant_aliases=aliases)
    return tables


def load_tables(path: str | Path = TABLES_FILE) -> dict[int, PaperTable]:
    """Every paper table by its number (1..10). Cached; do not mutate the result."""
    return _load(str(path))


def load_figures(path: str | Path = TABLES_FILE) -> dict[str, dict[str, str]]:
    """What the paper's analysis figures show (``lambda``: Fig. 5, ``branches``: Fig. 4)."""
    return dict(yaml.safe_load(Path(path).read_text()).get("figures", {}))


def get_table(table: int | str) -> PaperTable:
    """One table by number (``1``, ``"1"`` or ``"table1"``); a clear error lists the known ones."""
    tables = load_tables()
    key = re.sub(r"^table", "", str(table).lower().strip())
    try:
        return tables[int(key)]
    except (ValueError, KeyError):
        raise KeyError(f"Unknown paper table {table!r}; the paper tables are {sorted(tables)}.") from None
