"""The `debug` config group (item 11), the run-seeded repeated-augmentation order (item 7) and the
everyday run output: printed config, perf/* metrics, console lines without a terminal (item 10)."""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import CONFIG_DIR, compose_config
from test_lra_train import listops_root, lra_overrides  # noqa: F401  (fixture)

DEBUG = sorted(p.stem for p in (CONFIG_DIR / "debug").glob("*.yaml"))


def _hydra(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


# ---------------------------------------------------------------------- debug group
@pytest.mark.parametrize("task", ["imagenet", "lra_listops"])
@pytest.mark.parametrize("mode", DEBUG)
def test_debug_modes_compose_for_every_task_outside_real_run_dirs(task, mode):
    real = _hydra(f"task={task}").hydra.run.dir
    cfg = _hydra(f"task={task}", f"debug={mode}")
    assert cfg.hydra.run.dir.startswith(f"outputs/debug/{task}/") and cfg.hydra.run.dir != real
    assert cfg.hydra.sweep.dir.startswith("multirun/debug/")
    assert cfg.data.num_workers == 0 and cfg.trainer.detect_anomaly is True and cfg.trainer.devices == 1
    assert list(cfg.logger) == ["csv"]
    assert cfg.trainer.val_check_interval is None  # validation at epoch ends also fits limited epochs


def test_debug_modes_are_the_template_set():
    assert set(DEBUG) == {"default", "fdr", "overfit", "limit", "profiler"}


def _train(cfg):
    from tasks.common.runner import train

    return train(cfg)


def test_debug_overfit_and_limit_train(tiny, tmp_path):
    """overfit_batches rebuilds the training loader with a sequential sampler; limit runs whole short epochs."""
    over = _train(tiny("model=pvt_tiny", "debug=overfit", "trainer.max_epochs=2", "trainer.max_steps=-1"))
    assert over["global_step"] == 6  # 3 batches x 2 epochs
    limit = _train(tiny("model=pvt_tiny", "debug=limit", "trainer.max_epochs=1", "trainer.max_steps=-1"))
    assert limit["global_step"] == 3 and "val/acc1" in limit["metrics"]


def test_debug_fdr_on_listops(listops_root, tmp_path):  # noqa: F811
    result = _train(compose_config([*lra_overrides(listops_root, tmp_path, "lra_transformer_grc"), "debug=fdr"]))
    assert result["global_step"] == 1


# ---------------------------------------------------------------------- repeated augmentation order
def test_repeated_aug_order_depends_on_the_run_seed(standin_root):
    from tasks.classification.data import ImageNetDataModule

    def order(seed: int, epoch: int = 0, rank: int = 0) -> list[int]:
        dm = ImageNetDataModule(str(standin_root), img_size=32, batch_size=4, num_workers=0, num_classes=10,
                                repeated_aug=True, num_repeats=3, seed=seed)
        dm.setup("fit")
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [i for i, _ in loader.sampler]

    orders = [order(s) for s in (0, 1, 2)]
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    assert order(1) == orders[1]                      # same seed, same order (a resumed run sees it again)
    assert order(1, epoch=1) != orders[1]             # a new order every epoch
    assert order(1, rank=1) != orders[1]              # ranks see their own part


# ---------------------------------------------------------------------- printed config, perf/*, console lines
def test_config_printed_perf_logged_and_console_lines(tiny, caplog):
    caplog.set_level(logging.INFO)
    result = _train(tiny("model=pvt_tiny", "trainer.max_steps=4", "trainer.log_every_n_steps=2"))
    run = Path(result["run_dir"])
    text = caplog.text
    assert text.count("Resolved config") == 1 and "task:" in text and "builder:" in text
    with (run / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    perf = [r for r in rows if r.get("perf/samples_per_s")]
    assert [int(r["step"]) for r in perf] == [2, 4]  # the first step (start-up) opens the first window
    assert all(float(r["perf/samples_per_s"]) > 0 and float(r["perf/step_s"]) > 0 for r in perf)
    assert "perf/gpu_mem_gb" not in rows[0]          # CPU run: no GPU column
    lines = [r.getMessage() for r in caplog.records if "samples/s" in r.getMessage()]
    assert len(lines) == 2 and "step 4/4 (100.0%)" in lines[1] and "ETA 0:00:00" in lines[1]
    assert "train/loss " in lines[0] and "s/step" in lines[0]


def test_progress_bar_only_on_a_terminal(monkeypatch, tiny):
    from omegaconf import OmegaConf

    from tasks.common import runner

    cfg = tiny("model=pvt_tiny", "trainer.enable_progress_bar=true")
    OmegaConf.set_struct(cfg, False)
    cfg.paths.run_dir = "unused"
    monkeypatch.setattr(runner, "_stdout_is_terminal", lambda: False)
    assert runner.build_trainer(cfg, Path("unused"), False, []).progress_bar_callback is None
    monkeypatch.setattr(runner, "_stdout_is_terminal", lambda: True)
    assert runner.build_trainer(cfg, Path("unused"), False, []).progress_bar_callback is not None


def test_eta_format():
    from tasks.common.perf import format_eta

    assert format_eta(0) == "0:00:00" and format_eta(3723) == "1:02:03"
    assert format_eta(2 * 86400 + 61) == "2d 00:01:01" and format_eta(float("inf")) == "?"
