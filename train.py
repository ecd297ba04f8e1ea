#!/usr/bin/env python
"""Train a model: ``python train.py task=imagenet model=pvt_grc [group=choice ...] [key=value ...]``.

Run directory: ``outputs/<task.name>/<run_name>/`` (config, csv/metrics.csv, checkpoints/). Resume with
the same command plus ``ckpt_path=last``. See docs/training.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import tasks.common  # noqa: F401  (registers the ct_or resolver used by the Hydra config)
from tasks.common.cli import check_group_overrides, exit_on_user_error

CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    from tasks.common.runner import StoppedBySignal, train

    try:
        result = exit_on_user_error(lambda: train(cfg))
    except StoppedBySignal as stop:
        print(str(stop), file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        metrics = result["metrics"]
        shown = ", ".join(f"{k}={metrics[k]:.4g}" for k in sorted(metrics) if k.startswith("val/"))
        print(f"Finished {result['run_dir']} at step {result['global_step']} ({result['wall_s']:.0f} s): {shown}",
              flush=True)


if __name__ == "__main__":
    exit_on_user_error(lambda: check_group_overrides(sys.argv[1:], CONFIG_DIR))
    main()
