"""eval.py restores the whole task from the checkpoint, evaluates every split the task defines and
runs on several processes without counting a sample twice (issue 9, item 5)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, compose_config
from test_lra_train import listops_root, lra_overrides  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def listops_ckpt(listops_root, tmp_path_factory) -> Path:  # noqa: F811
    from tasks.common.runner import train

    out = tmp_path_factory.mktemp("lra_eval")
    result = train(compose_config(lra_overrides(listops_root, out, "lra_transformer_grc", steps=2)))
    return Path(result["run_dir"]) / "checkpoints" / "last.ckpt"


def _columns(path: Path) -> set[str]:
    return set(path.read_text().splitlines()[0].split(","))


def test_listops_checkpoint_evaluates_val_and_test_without_task_argument(listops_ckpt, tmp_path):
    """eval.yaml's defaults are the ImageNet task: only the checkpoint says this is ListOps."""
    from tasks.common.runner import evaluate

    cfg = compose_config([f"ckpt_path={listops_ckpt}", "trainer=cpu", "trainer.enable_progress_bar=false",
                          f"paths.output_dir={tmp_path}"], config_name="eval")
    result = evaluate(cfg, [f"ckpt_path={listops_ckpt}", "trainer=cpu", "trainer.enable_progress_bar=false"])
    assert result["splits"] == ["val", "test"]
    assert {"val/acc", "val/loss", "test/acc", "test/loss"} <= set(result["metrics"])
    assert all(0 <= result["metrics"][k] <= 100 for k in ("val/acc", "test/acc"))
    eval_dir = Path(result["eval_dir"])
    assert eval_dir == listops_ckpt.parent.parent / "eval" / "last"
    assert {"val/acc", "test/acc"} <= _columns(eval_dir / "csv" / "metrics.csv")
    saved = json.loads((eval_dir / "results.json").read_text())
    assert saved["metrics"] == result["metrics"]


def test_command_line_keys_apply_on_top_of_the_stored_sections():
    from omegaconf import OmegaConf

    from tasks.common.runner import restore_run_config

    stored = {"task": {"name": "lra_listops", "builder": "tasks.lra.build_task"},
              "model": {"name": "lra_transformer", "emb_dim": 16}, "grc": {"ratio": 0.5},
              "data": {"root": "/train/listops", "batch_size": 32, "max_length": 2000}}
    overrides = ["data.batch_size=4", "grc=paper"]
    cfg = restore_run_config(compose_config([*overrides, "paths.run_dir=x"], config_name="eval"), stored, overrides)
    assert cfg.task.name == "lra_listops" and cfg.model.name == "lra_transformer"
    assert cfg.data.batch_size == 4 and cfg.data.root == "/train/listops" and cfg.data.max_length == 2000
    assert cfg.grc.preset == "paper"  # a group chosen on the command line stays as composed
    same = restore_run_config(compose_config(["experiment=demo"], config_name="eval"), stored, ["experiment=demo"])
    assert same.task.name == "imagenet" and OmegaConf.select(same, "model.name") == "pvt_tiny_grc"


@pytest.mark.slow
def test_two_processes_count_every_sample_once(listops_ckpt, tmp_path):
    """``trainer.devices=2`` (two CPU processes over gloo) gives exactly the single-process numbers."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    results = {}
    for devices in (1, 2):
        eval_dir = tmp_path / f"d{devices}"
        proc = subprocess.run([sys.executable, "eval.py", f"ckpt_path={listops_ckpt}", "trainer.accelerator=cpu",
                               f"trainer.devices={devices}", "trainer.precision=32-true",
                               "trainer.enable_progress_bar=false", f"eval_dir={eval_dir}",
                               f"paths.output_dir={tmp_path}"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "test/acc=" in proc.stdout and proc.stdout.count("test/acc=") == 1  # printed once, by rank 0
        results[devices] = json.loads((eval_dir / "results.json").read_text())
    assert results[2]["world_size"] == 2
    for key in ("val/acc", "test/acc", "val/loss", "test/loss"):
        assert results[2]["metrics"][key] == pytest.approx(results[1]["metrics"][key], rel=1e-6), key
