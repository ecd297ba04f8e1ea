"""Run directories identify the recipe; checkpoints carry its fingerprint; a resume across recipes is
refused; a fresh start never deletes an earlier run's logs or checkpoints (issue 9, item 4)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, compose_config
from tasks.common.errors import ConfigError


def run_dir(*overrides: str) -> str:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True).hydra.run.dir


def test_run_dirs_differ_by_recipe_and_not_by_execution_settings():
    base = run_dir("model=pvt_grc")
    assert base == "outputs/imagenet/pvt_tiny_grc-seed0"
    paper = run_dir("model=pvt_grc", "grc=paper")
    ratio = run_dir("model=pvt_grc", "grc.ratio=0.25")
    lr = run_dir("model=pvt_grc", "task.optimizer.lr=1e-3")
    assert len({base, paper, ratio, lr}) == 4
    assert ratio == "outputs/imagenet/pvt_tiny_grc-seed0+grc.ratio-0.25"
    # the same command (in any order, with resume/location/worker/logger/device settings) finds the same directory
    assert run_dir("grc.ratio=0.25", "model=pvt_grc", "ckpt_path=last", "data.root=/elsewhere", "data.num_workers=2",
                   "logger=wandb", "trainer.devices=4", "paths.data_dir=/d", "resume_mismatch=allow") == ratio
    assert run_dir("model=pvt_grc", "seed=2") == "outputs/imagenet/pvt_tiny_grc-seed2"
    # experiment files name their runs; overrides on top still change the directory
    exp = "experiment=paper/table1_pvt_tiny_cached"
    assert run_dir(exp, "data.root=/x") == "outputs/imagenet/table1_pvt_tiny_cached-seed0"
    assert run_dir(exp, "grc.ratio=0.25").endswith("table1_pvt_tiny_cached-seed0+grc.ratio-0.25")
    assert run_dir(exp, "model=pvt_small_grc").endswith("+model-pvt_small_grc")  # not in that run_name
    # run_name on the command line is the directory; very long suffixes become a short hash
    assert run_dir("model=pvt_grc", "run_name=mine", "grc.ratio=0.25") == "outputs/imagenet/mine"
    long = run_dir("model=pvt_grc", *(f"+task.x{i}={'v' * 20}" for i in range(8)))
    name = long.rsplit("/", 1)[1]
    assert name.startswith("pvt_tiny_grc-seed0+h") and len(name) < 40
    assert run_dir("model=pvt_grc", "data.aug.scale=[0.5,1.0]").endswith("+data.aug.scale-_0.5_1.0_")
    # a directory can be handed back on the command line unquoted (ckpt_path=<dir>/checkpoints/last.ckpt)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for path in (paper, ratio, lr, long):
        (parsed,) = OverridesParser.create().parse_overrides([f"ckpt_path={path}/checkpoints/last.ckpt"])
        assert not parsed.is_sweep_override() and parsed.value() == f"{path}/checkpoints/last.ckpt"


def test_sweep_dir_exclusions_are_not_recipe_keys():
    """Keys kept out of multirun job directory names must not change the recipe fingerprint either."""
    from tasks.common.fingerprint import is_recipe_key

    cfg = OmegaConf.load(CONFIG_DIR / "hydra" / "default.yaml")
    for key in cfg.job.config.override_dirname.exclude_keys:
        assert not is_recipe_key(key) or key == "logger", key


def _train(cfg):
    from tasks.common.runner import train

    return train(cfg)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_checkpoint_fingerprint_and_refused_resume(tiny, tmp_path):
    from tasks.common.fingerprint import fingerprint, recipe_values

    first = _train(tiny("model=pvt_tiny", "trainer.max_steps=1"))
    ckpt_file = Path(first["run_dir"]) / "checkpoints" / "last.ckpt"
    ckpt = _load(ckpt_file)
    stored = ckpt["recipe"]
    assert stored["fingerprint"] == fingerprint(stored["values"])
    assert stored["values"]["task.optimizer.lr"] == 5e-4 and "data.root" not in stored["values"]
    assert not any(k.startswith(("paths.", "callbacks.", "logger.")) for k in stored["values"])

    # another learning rate, same directory: refused with the differing key and the way out
    with pytest.raises(ConfigError, match=r"different recipe \(task\.optimizer\.lr: 0\.0005 -> 0\.001\).*"
                                          r"resume_mismatch=allow"):
        _train(tiny("model=pvt_tiny", "trainer.max_steps=1", "task.optimizer.lr=1e-3", "ckpt_path=last"))
    # settings outside the recipe do not block the resume; the explicit override allows the other recipe
    resumed = _train(tiny("model=pvt_tiny", "trainer.max_steps=1", "ckpt_path=last", "data.val_batch_size=4",
                          "trainer.log_every_n_steps=5"))
    assert resumed["resumed_from"] == str(ckpt_file)
    allowed = _train(tiny("model=pvt_tiny", "trainer.max_steps=2", "task.optimizer.lr=1e-3", "ckpt_path=last",
                          "resume_mismatch=allow"))
    assert allowed["global_step"] == 2

    # checkpoints written before fingerprints existed are judged by their stored config
    old = _load(ckpt_file)
    del old["recipe"]
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.raises(ConfigError, match=r"old\.ckpt was written by a different recipe \(task\.optimizer\.lr"):
        _train(tiny("model=pvt_tiny", "trainer.max_steps=3", f"ckpt_path={tmp_path / 'old.ckpt'}"))
    assert recipe_values(old["hyper_parameters"]["cfg"])["task.optimizer.lr"] == 1e-3


def test_slurm_requeue_checkpoint_of_another_recipe_is_refused(tiny, tmp_path, monkeypatch):
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    first = _train(tiny("model=pvt_tiny", "trainer.max_steps=1"))
    run = Path(first["run_dir"])
    (run / "checkpoints" / "last.ckpt").rename(run / "hpc_ckpt_1.ckpt")
    monkeypatch.setattr(SLURMEnvironment, "detect", staticmethod(lambda: True))
    with pytest.raises(ConfigError, match=r"hpc_ckpt_1\.ckpt was written by a different recipe \(grc"):
        _train(tiny("model=pvt_tiny", "trainer.max_steps=2", "grc=paper"))


def _csv_steps(path: Path) -> set[int]:
    with path.open() as f:
        return {int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss_step")}


def test_fresh_start_keeps_the_previous_run(tiny):
    from tasks.paper.runs import read_run

    first = _train(tiny("model=pvt_tiny", "trainer.max_steps=3"))
    run = Path(first["run_dir"])
    first_ckpt = _load(run / "checkpoints" / "last.ckpt")
    second = _train(tiny("model=pvt_tiny", "trainer.max_steps=1"))  # same directory, no ckpt_path: starts over
    assert second["resumed_from"] is None and second["global_step"] == 1
    assert _csv_steps(run / "csv" / "metrics.1.csv") == {0, 1, 2}      # the first run's log, kept
    assert _csv_steps(run / "csv" / "metrics.csv") == {0}               # the new run's log
    kept = _load(run / "previous" / "1" / "checkpoints" / "last.ckpt")
    assert kept["global_step"] == 3 and torch.equal(kept["state_dict"]["model.head.weight"],
                                                     first_ckpt["state_dict"]["model.head.weight"])
    assert (run / "previous" / "1" / "results.json").is_file()
    assert _load(run / "checkpoints" / "last.ckpt")["global_step"] == 1
    # scripts/compare.py reads the current run's metrics.csv
    result = read_run(run)
    assert len(result.history["train/loss_step"]) == 1  # one step: the new run's, not the first run's three
    _train(tiny("model=pvt_tiny", "trainer.max_steps=1"))
    assert (run / "csv" / "metrics.2.csv").is_file()
    assert (run / "previous" / "2" / "checkpoints" / "last.ckpt").is_file()


def test_csv_logger_renames_instead_of_deleting(tmp_path):
    from tasks.common.loggers import ResumableCSVLogger

    for value in (1.0, 2.0, 3.0):
        logger = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")
        logger.log_metrics({"val/acc": value}, step=0)
        logger.save()
    names = sorted(p.name for p in (tmp_path / "csv").glob("metrics*.csv"))
    assert names == ["metrics.1.csv", "metrics.2.csv", "metrics.csv"]
    assert "1.0" in (tmp_path / "csv" / "metrics.1.csv").read_text()
    assert "3.0" in (tmp_path / "csv" / "metrics.csv").read_text()
