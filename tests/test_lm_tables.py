"""Paper Tables 2 and 5: experiment files compose, pin their recipe, sweep and compare."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tasks.language_modeling.data import rank_tracks
from tasks.paper.compare import compare_paths, to_markdown
from tasks.paper.sweep import build_sweep_command, launcher_settings, paper_experiments
from tests.conftest import compose_config

T2 = [f"table2_{r}_{v}" for r in ("vit_s", "pvt_tiny", "pvt_small") for v in ("baseline", "xlcache", "cached")]
T5 = [f"table5_transformer_xl_{s}_{v}" for s in ("base", "large") for v in ("baseline", "cached")]


def _cfg(name: str, *overrides: str):
    cfg = compose_config([f"experiment=paper/{name}", "paths.run_dir=unused", *overrides])
    OmegaConf.resolve(cfg)
    return cfg


@pytest.mark.parametrize("name", T2)
def test_table2_rows_are_table1_recipes_with_the_host_model(name):
    cfg = _cfg(name)
    row, variant = name[len("table2_"):].rsplit("_", 1)
    t1 = _cfg(f"table1_{row}_{'cached' if variant == 'cached' else 'baseline'}")
    assert cfg.paper.table == 2 and cfg.run_name == f"{name}-seed0" and dict(cfg.paper.metrics)["val/acc5"] is None
    assert cfg.model.name == (t1.model.name + "_xlcache" if variant == "xlcache" else t1.model.name)
    strip = lambda c: {k: v for k, v in OmegaConf.to_container(c).items() if k not in ("paper", "run_name", "model")}
    assert strip(cfg) == strip(t1)  # the recipe lives once


@pytest.mark.parametrize("name", T5)
def test_table5_rows_pin_transformer_xl_recipes(name):
    cfg = _cfg(name)
    assert cfg.task.name == "wikitext103" and cfg.paper.table == 5 and "test/ppl" in cfg.paper.metrics
    assert (cfg.model.memory == "grc") == name.endswith("_cached")
    large = "_large_" in name
    assert cfg.model.n_layer == (18 if large else 16) and cfg.model.d_model == (1024 if large else 410)
    assert cfg.data.tgt_len == (384 if large else 150) and cfg.trainer.gradient_clip_val == 0.25
    assert cfg.callbacks.model_checkpoint.monitor == "val/ppl" and cfg.task.test_with_best
    # Transformer-XL's eval.py: 64 / 128-token segments, memory 640 / 1600, clamp 400 / 1000, same_length (XL only)
    assert (cfg.data.eval_tgt_len, cfg.model.eval_mem_len, cfg.model.clamp_len) == ((128, 1600, 1000) if large
                                                                                     else (64, 640, 400))
    assert cfg.model.same_length == name.endswith("_baseline")
    # run_wt103_{base,large}.sh --batch_size 60 / 128 tracks in all; eval.py's 10
    assert (cfg.data.tracks, cfg.data.eval_tracks) == ((128, 10) if large else (60, 10))
    assert cfg.trainer.devices == (8 if large else 4)  # base: Transformer-XL's 4 GPUs, 15 tracks each


@pytest.mark.parametrize("name", T5)
def test_table5_sweep_runs_transformer_xl_track_counts_on_its_8_gpu_jobs(name):
    """scripts/sweep.py --table 5 gives every job the launcher's 8 GPUs; the rows keep their tracks in all."""
    cmd = build_sweep_command(5, python="python")
    hw = [c for c in cmd if c.startswith(("trainer.devices=", "trainer.num_nodes=", "hydra/launcher="))]
    assert hw == ["hydra/launcher=slurm_8gpu", "trainer.devices=8", "trainer.num_nodes=1"]
    settings = launcher_settings("slurm_8gpu", cmd)
    assert (settings["nodes"], settings["gpus_per_node"], settings["tasks_per_node"]) == (1, 8, 8)
    cfg = _cfg(name, *hw[1:])
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    per_rank = [len(rank_tracks(cfg.data.tracks, r, world)) for r in range(world)]
    assert per_rank == ([16] * 8 if "_large_" in name else [8, 8, 8, 8, 7, 7, 7, 7])
    assert [len(rank_tracks(cfg.data.eval_tracks, r, world)) for r in range(world)] == [2, 2, 1, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("table,n", [(2, 9), (5, 4)])
def test_sweep_runs_every_row(table, n):
    assert len(paper_experiments()[table]) == n
    cmd = build_sweep_command(table, python="python")
    assert f"sweep_name=table{table}" in cmd and "hydra/launcher=slurm_8gpu" in cmd
    assert len([e for e in cmd if e.startswith("experiment=")][0].split(",")) == n


def test_compare_reads_table5_runs(tmp_path):
    for name, ppl in (("table5_transformer_xl_base_baseline", 24.5), ("table5_transformer_xl_base_cached", 23.1)):
        run = tmp_path / name
        (run / ".hydra").mkdir(parents=True)
        (run / "csv").mkdir()
        OmegaConf.save(_cfg(name), run / ".hydra" / "config.yaml")
        with open(run / "csv" / "metrics.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerows([["epoch", "step", "val/ppl", "test/ppl"], [0, 10, 25.0, ""], [0, 10, "", ppl]])
    text = to_markdown(compare_paths([str(tmp_path / "*")]))
    assert "Transformer-XL base" in text and "24.5" in text and "23.1" in text and "22.9" in text
