#!/usr/bin/env python
"""Compare finished runs with the paper's tables.

    python scripts/compare.py multirun/table1                      # a sweep folder (searched recursively)
    python scripts/compare.py 'outputs/imagenet/*' --tolerance 0.5 --out docs/comparison.md \
        --png docs/figures/comparison.png
    python scripts/compare.py multirun/table1 --reduce best        # best instead of last logged value

Reads <run_dir>/.hydra/config.yaml and <run_dir>/csv/metrics.csv (or wandb offline runs), groups seeds
by the experiment's `paper:` block and prints one markdown table per paper table (paper baseline,
cached and gain next to ours as mean ± std over seeds). Runs without a `paper:` block are listed as
"other runs"; unreadable run directories are listed with the reason. Exit status: 0, or 1 when no
usable run was found.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.paper.compare import compare_paths, plot_comparison, to_markdown  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories, globs or folders holding runs")
    p.add_argument("--tolerance", type=float, default=0.5,
                   help="a value reproduces when within ± this of the paper (metric units; default 0.5)")
    p.add_argument("--reduce", choices=["last", "best"], default="last",
                   help="a run's result: last logged value (default) or best (max; min for lower-is-better)")
    p.add_argument("--metrics", default=None, help="comma-separated metrics to show (default: the paper's)")
    p.add_argument("--out", default=None, help="also write the markdown here")
    p.add_argument("--png", default=None, help="write a bar chart (PNG) here")
    p.add_argument("--title", default=None, help="title of the chart")
    args = p.parse_args(argv)
    comparison = compare_paths(args.runs, tolerance=args.tolerance, reduce=args.reduce,
                               metrics=args.metrics.split(",") if args.metrics else None)
    text = to_markdown(comparison)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.png:
        plot_comparison(comparison, args.png, title=args.title)
        print(f"wrote {args.png}", file=sys.stderr)
    return 0 if (comparison.tables or comparison.other) else 1


if __name__ == "__main__":
    sys.exit(main())
