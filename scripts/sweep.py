#!/usr/bin/env python
"""Launch every row of a paper table, baseline and cached, as ONE Hydra multirun sweep.

    python scripts/sweep.py --table 1 --seeds 0,1,2                       # SLURM, 8 GPUs per job
    python scripts/sweep.py --table 6 --launcher slurm_1gpu --dry-run    # print the command only
    python scripts/sweep.py --table 1 --rows pvt_tiny --launcher local trainer=cpu data=standin
    python scripts/sweep.py --table 8 --stage pretrain data.root=/data/imagenet22k    # then fine-tune:
    python scripts/sweep.py --table 8 in22k_checkpoints.baseline=B.ckpt in22k_checkpoints.cached=C.ckpt

Everything after the options is passed to train.py as Hydra overrides. The exact command is printed
before it runs; jobs write to multirun/table<N>/..., compare them with
``python scripts/compare.py multirun/table<N>``. See docs/reproduce.md.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.paper.sweep import REPO_ROOT, SweepError, build_sweep_command, format_command  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", required=True, help="paper table number (1, 2, 6, ...)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; 0 with --stage pretrain)")
    p.add_argument("--stage", default="main", choices=("main", "pretrain"),
                   help="pretrain: the pre-training runs of a two-stage table (Table 8) instead of its rows")
    p.add_argument("--launcher", default=None,
                   help="hydra/launcher choice: slurm_1gpu, slurm_8gpu, slurm_multinode, submitit_local, local "
                        "(default: slurm_8gpu for ImageNet/COCO tables, slurm_1gpu otherwise)")
    p.add_argument("--rows", default=None, help="comma-separated rows to run (default: all rows)")
    p.add_argument("--variants", default=None, help="comma-separated variants (default: all, e.g. baseline,cached)")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job (key=value)")
    args = p.parse_args(argv)
    try:
        cmd = build_sweep_command(
            args.table, seeds=args.seeds, launcher=args.launcher, overrides=args.overrides,
            rows=args.rows.split(",") if args.rows else None,
            variants=args.variants.split(",") if args.variants else None, stage=args.stage)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_command(cmd), flush=True)
    if args.dry_run:
        return 0
    return subprocess.call(cmd, cwd=REPO_ROOT)


if __name__ == "__main__":
    sys.exit(main())
