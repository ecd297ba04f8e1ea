"""Long ListOps generator (LRA's algorithm, seeded, reproducible, multi-process).

The algorithm follows the description of LRA's ``listops.py`` (benchmarks.md section 3):

* A node at depth ``d < max_depth`` is a leaf with probability ``1 - OPERATOR_P = 0.75``; at
  ``max_depth`` it is always a leaf. The root has depth 1.
* A leaf is a digit 0-9. An inner node is one of ``[MIN [MAX [MED [SM`` with 2..``max_args``
  children, closed by ``]``. ``MED`` is the median truncated to an int, ``SM`` the sum modulo 10.
* ``length`` counts values, operator tokens and closing brackets (not parentheses); a tree is kept
  when ``min_length < length < max_length`` (strict bounds).
* Trees are de-duplicated; train / val / test are disjoint.

Text form: LRA wrote the binary tree ``(((op, v1), v2), ..., END)`` with parentheses, so an operator
with n children is ``"( " * (n + 1) + op + " " + v1 + " ) " + v2 + " ) " ... + vn + " ) ] )"``, e.g.
``( ( ( ( [MAX 2 ) 9 ) 4 ) ] )``.

Reproducibility: the candidate stream is cut into *shards*. Shard ``k`` draws from its own
``random.Random("listops:<seed>:<k>")`` until it holds ``shard_size`` accepted trees. Shards are merged
in shard order (de-duplicating as they come), so the result depends only on the arguments, never on
the number of worker processes or their scheduling. Candidates that grow past ``max_length`` are
abandoned early: they would be rejected anyway, and stopping early does not change the distribution
of the kept trees (each candidate is still an independent draw).
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

OPERATORS: tuple[str, ...] = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
OPERATOR_P = 0.25  # probability that a node below max depth is an operator (LRA's VALUE_P)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ListOpsSpec:
    """Every bound of the generator (defaults = LRA's release)."""

    num_train: int = 96_000
    num_val: int = 2_000
    num_test: int = 2_000
    min_length: int = 500
    max_length: int = 2_000
    max_depth: int = 10
    max_args: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_args < 2:
            raise ValueError(f"max_args must be >= 2, got {self.max_args}.")
        if self.max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {self.max_depth}.")
        if self.max_length - self.min_length < 2:
            raise ValueError(f"no length fits strictly between min_length={self.min_length} "
                             f"and max_length={self.max_length}.")
        if min(self.num_train, self.num_val, self.num_test) < 0:
            raise ValueError("split sizes must be non-negative.")

    @property
    def total(self) -> int:
        return self.num_train + self.num_val + self.num_test


class _TooLong(Exception):
    pass


def _apply(op: str, args: Sequence[int]) -> int:
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[SM":
        return sum(args) % 10
    s = sorted(args)  # [MED: median, truncated to int (numpy's median, then int())
    n = len(s)
    return s[n // 2] if n % 2 else int((s[n // 2 - 1] + s[n // 2]) / 2)


def sample_tree(rng: random.Random, max_depth: int, max_args: int,
                max_length: int | None = None) -> tuple[str, int, int] | None:
    """Draw one tree. Returns (LRA text, value, length) or None once it reaches ``max_length``.

    ``length`` counts values, operators and closing brackets. With ``max_length=None`` no tree is
    abandoned.
    """
    length = 0
    limit = max_length if max_length is not None else math.inf

    def grow(depth: int) -> tuple[str, int]:
        nonlocal length
        if depth < max_depth and rng.random() < OPERATOR_P:
            n = rng.randint(2, max_args)
            length += 2
            children = [grow(depth + 1) for _ in range(n)]
            op = rng.choice(OPERATORS)
            text = "( " * (n + 1) + op + " " + " ) ".join(c[0] for c in children) + " ) ] )"
            return text, _apply(op, [c[1] for c in children])
        length += 1
        if length >= limit:
            raise _TooLong
        value = rng.randrange(10)
        return str(value), value

    try:
        text, value = grow(1)
    except _TooLong:
        return None
    if length >= limit:
        return None
    return text, value, length


def generate_shard(spec: ListOpsSpec, shard: int, shard_size: int) -> list[tuple[str, int]]:
    """Accepted (text, label) pairs of shard ``shard``: a pure function of (spec, shard, shard_size)."""
    rng = random.Random(f"listops:{spec.seed}:{shard}")
    out: list[tuple[str, int]] = []
    while len(out) < shard_size:
        tree = sample_tree(rng, spec.max_depth, spec.max_args, spec.max_length)
        if tree is not None and tree[2] > spec.min_length:
            out.append((tree[0], tree[1]))
    return out


def _shard_job(args: tuple[ListOpsSpec, int, int]) -> tuple[int, list[tuple[str, int]]]:
    spec, shard, size = args
    return shard, generate_shard(spec, shard, size)


def default_shard_size(total: int) -> int:
    """Small enough to spread over the cores and show progress, large enough to amortise overhead."""
    return max(1, min(2_000, math.ceil(total / 16)))


def generate(spec: ListOpsSpec, workers: int | None = None, shard_size: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict[str, list[tuple[str, int]]]:
    """Generate the three splits. Returns {"train"|"val"|"test": [(text, label), ...]}.

    ``workers`` processes (default: all cores; 0 or 1 = in this process). ``progress(done, total)``
    is called as unique trees arrive. The result does not depend on ``workers``.
    """
    total = spec.total
    shard_size = shard_size or default_shard_size(total)
    workers = os.cpu_count() or 1 if workers is None else workers
    seen: set[str] = set()
    rows: list[tuple[str, int]] = []
    next_shard = 0
    pool = mp.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers) if workers > 1 else None
    try:
        while len(rows) < total:
            # enough shards for what is missing (plus one per worker to keep them busy), merged in order
            missing = total - len(rows)
            count = math.ceil(missing / shard_size) + (workers if workers > 1 else 0)
            jobs = [(spec, k, shard_size) for k in range(next_shard, next_shard + count)]
            next_shard += count
            results = pool.imap(_shard_job, jobs) if pool is not None else map(_shard_job, jobs)
            for _, shard_rows in results:  # imap keeps shard order
                for text, label in shard_rows:
                    if len(rows) < total and text not in seen:
                        seen.add(text)
                        rows.append((text, label))
                if progress is not None:
                    progress(len(rows), total)
                if len(rows) >= total:
                    break
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    a, b = spec.num_train, spec.num_train + spec.num_val
    return {"train": rows[:a], "val": rows[a:b], "test": rows[b:]}


def write_tsv(path: str | Path, rows: Iterable[tuple[str, int]]) -> None:
    """Write LRA's TSV: header ``Source<TAB>Target``, one ``text<TAB>label`` row per tree."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("Source\tTarget\n")
        for text, label in rows:
            f.write(f"{text}\t{label}\n")
    os.replace(tmp, path)


def prepare(out: str | Path, spec: ListOpsSpec, workers: int | None = None, show_progress: bool = True,
            shard_size: int | None = None) -> dict[str, Path]:
    """Generate ``spec`` and write ``<out>/basic_{train,val,test}.tsv``. Returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bar = None
    if show_progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=spec.total, desc="ListOps trees", unit="tree", smoothing=0.1)
        except ImportError:  # pragma: no cover
            bar = None

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.update(done - bar.n)
        elif show_progress:
            print(f"\rListOps trees {done}/{total}", end="", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    splits = generate(spec, workers=workers, shard_size=shard_size, progress=progress)
    if bar is not None:
        bar.close()
    paths = {}
    for name in SPLITS:
        paths[name] = out / f"basic_{name}.tsv"
        write_tsv(paths[name], splits[name])
    if show_progress:
        print(f"wrote {', '.join(f'{k}={len(v)}' for k, v in splits.items())} to {out} "
              f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return paths
