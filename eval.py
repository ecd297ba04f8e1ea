#!/usr/bin/env python
"""Evaluate a checkpoint on every split its task defines.

    python eval.py ckpt_path=... [data.root=...] [trainer.devices=N]

The task, model, GRC and data settings come from the checkpoint's stored config. Validation metrics
(``val/*``) and, for tasks with a test split (ListOps), test metrics (``test/*``) go to
``<run_dir>/eval/<ckpt name>/csv/metrics.csv`` and ``results.json`` and are printed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import tasks.common  # noqa: F401  (registers the ct_or resolver used by the Hydra config)
from tasks.common.cli import check_group_overrides, exit_on_user_error

CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from tasks.common.runner import evaluate

    overrides = list(HydraConfig.get().overrides.task)
    result = exit_on_user_error(lambda: evaluate(cfg, overrides))
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result["metrics"].items()))
    print(f"{result['ckpt_path']}{' (EMA)' if result['ema'] else ''}: {shown} -> {result['eval_dir']}", flush=True)


if __name__ == "__main__":
    exit_on_user_error(lambda: check_group_overrides(sys.argv[1:], CONFIG_DIR))
    main()
