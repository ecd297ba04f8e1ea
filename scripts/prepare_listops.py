#!/usr/bin/env python
"""Generate Long ListOps (LRA's algorithm) into ``<out>/basic_{train,val,test}.tsv``.

    python scripts/prepare_listops.py --out data/listops            # LRA's sizes: 96k/2k/2k, 500 < L < 2000
    python scripts/prepare_listops.py --out data/listops_demo --num-train 4000 --num-val 500 \\
        --num-test 500 --min-length 10 --max-length 60 --max-depth 4 --max-args 5

Seeded and reproducible: the same arguments give byte-identical files whatever ``--workers`` is.
The generator itself lives in ``tasks/lra/listops_gen.py``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.lra.listops_gen import ListOpsSpec, prepare  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    d = ListOpsSpec()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num-train", type=int, default=d.num_train)
    p.add_argument("--num-val", type=int, default=d.num_val)
    p.add_argument("--num-test", type=int, default=d.num_test)
    p.add_argument("--min-length", type=int, default=d.min_length, help="keep trees with length > this")
    p.add_argument("--max-length", type=int, default=d.max_length, help="keep trees with length < this")
    p.add_argument("--max-depth", type=int, default=d.max_depth)
    p.add_argument("--max-args", type=int, default=d.max_args)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        spec = ListOpsSpec(num_train=a.num_train, num_val=a.num_val, num_test=a.num_test,
                           min_length=a.min_length, max_length=a.max_length, max_depth=a.max_depth,
                           max_args=a.max_args, seed=a.seed)
    except ValueError as e:
        p.error(str(e))
    prepare(a.out, spec, workers=a.workers, show_progress=not a.quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
