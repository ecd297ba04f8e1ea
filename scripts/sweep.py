#!/usr/bin/env python
"""Launch every row of a paper table, baseline and cached, as ONE Hydra multirun sweep.

    python scripts/sweep.py --table 1 --seeds 0,1,2                       # SLURM, 8 GPUs per job
    python scripts/sweep.py --table 6 --launcher slurm_1gpu --dry-run    # print the command only
    python scripts/sweep.py --table 1 --rows pvt_tiny --launcher local trainer=cpu data=standin
    python scripts/sweep.py --table 8 --stage pretrain data.root=/data/imagenet22k    # then fine-tune:
    python scripts/sweep.py --table 8 in22k_checkpoints.baseline=B.ckpt in22k_checkpoints.cached=C.ckpt
    python scripts/sweep.py --table 1 --detach                # submit and return; the jobs run on
    python scripts/sweep.py --status multirun/table1          # job states (sacct, else squeue)

Everything after the options is passed to train.py as Hydra overrides. The exact command is printed
before it runs, with what each SLURM job asks for; jobs write to multirun/table<N>/..., compare them
with ``python scripts/compare.py multirun/table<N>``. Without --detach this process waits until every
job has ended (requeues included). See docs/reproduce.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.paper.sweep import (REPO_ROOT, SweepError, build_sweep_command, format_command,  # noqa: E402
                               format_resources, launcher_settings, override_value)
from tasks.paper.sweep_status import StatusError, format_status, query_states, read_jobs  # noqa: E402

DETACH_ENV = "CT_SLURM_DETACH"  # read by hydra_plugins/ct_slurm_launcher


def status(sweep_dir: str) -> int:
    try:
        jobs = read_jobs(sweep_dir)
        source = query_states(jobs)
    except StatusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_status(sweep_dir, jobs, source))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", help="paper table number (1, 2, 6, ...)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; 0 with --stage pretrain)")
    p.add_argument("--stage", default="main", choices=("main", "pretrain"),
                   help="pretrain: the pre-training runs of a two-stage table (Table 8) instead of its rows")
    p.add_argument("--launcher", default=None,
                   help="hydra/launcher choice: slurm_1gpu, slurm_8gpu, slurm_multinode, submitit_local, local "
                        "(default: slurm_8gpu for ImageNet/COCO tables, slurm_1gpu otherwise)")
    p.add_argument("--rows", default=None, help="comma-separated rows to run (default: all rows)")
    p.add_argument("--variants", default=None, help="comma-separated variants (default: all, e.g. baseline,cached)")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.add_argument("--detach", action="store_true",
                   help="SLURM launchers: return once the jobs are submitted (they run on); check them with "
                        "--status, collect them with scripts/compare.py")
    p.add_argument("--status", metavar="SWEEP_DIR", help="print the SLURM state of every job of a submitted sweep")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job (key=value)")
    args = p.parse_args(argv)
    if args.status:
        return status(args.status)
    if not args.table:
        p.error("--table is required (or --status SWEEP_DIR)")
    try:
        cmd = build_sweep_command(
            args.table, seeds=args.seeds, launcher=args.launcher, overrides=args.overrides,
            rows=args.rows.split(",") if args.rows else None,
            variants=args.variants.split(",") if args.variants else None, stage=args.stage)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    launcher = override_value(cmd, "hydra/launcher") or "local"
    try:
        settings = launcher_settings(launcher, cmd)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_command(cmd), flush=True)
    if settings is not None:
        print(format_resources(settings), flush=True)
    elif args.detach:
        print("error: --detach needs a SLURM launcher (slurm_cpu, slurm_1gpu, slurm_8gpu, slurm_multinode).",
              file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    env = dict(os.environ, **({DETACH_ENV: "1"} if args.detach else {}))
    rc = subprocess.call(cmd, cwd=REPO_ROOT, env=env)
    if args.detach and rc == 0:
        root = override_value(cmd, "paths.multirun_dir") or "multirun"
        sweep_dir = Path(root) / (override_value(cmd, "sweep_name") or "")
        print(f"Submitted; the jobs run on. State: python scripts/sweep.py --status {sweep_dir}\n"
              f"Results (any time, finished jobs only): python scripts/compare.py {sweep_dir}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
