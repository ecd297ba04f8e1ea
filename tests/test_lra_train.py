"""ListOps through the training framework: every encoder (baseline and cached) trains a few steps via
the same code path as ``python train.py task=lra_listops ...``, logs the contract's metrics and tests
with the best-validation checkpoint; the Table 6 experiment files pin LRA's recipe."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, compose_config
from tasks.common.errors import DataError

TABLE6 = sorted(p.stem for p in (CONFIG_DIR / "experiment" / "paper").glob("table6_*.yaml"))
LRA_MODELS = ["lra_transformer", "lra_transformer_grc", "lra_bigbird", "lra_bigbird_grc", "lra_reformer",
              "lra_reformer_grc"]


@pytest.fixture(scope="session")
def listops_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tasks.lra.listops_gen import ListOpsSpec, prepare

    root = tmp_path_factory.mktemp("listops")
    prepare(root, ListOpsSpec(num_train=48, num_val=16, num_test=16, min_length=5, max_length=30, max_depth=3,
                              max_args=4, seed=0), workers=1, show_progress=False)
    return root


def lra_overrides(root: Path, out: Path, model: str, steps: int = 4) -> list[str]:
    return [
        "task=lra_listops", f"model={model}", f"data.root={root}", "data.max_length=32", "data.batch_size=8",
        "data.num_workers=0", "data.persistent_workers=false", "model.emb_dim=16", "model.mlp_dim=32",
        "model.num_heads=2", "model.num_layers=1", "model.bigbird={block_size: 4}",
        "model.reformer={chunk_len: 4, n_buckets: 4}", "trainer=cpu", f"trainer.max_steps={steps}",
        "trainer.val_check_interval=2", "trainer.check_val_every_n_epoch=null", "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
        "task.scheduler.warmup_steps=2", f"paths.output_dir={out}/outputs", f"paths.run_dir={out}/run",
    ]


def _metrics(run_dir: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    with open(run_dir / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if v not in ("", None) and k not in ("epoch", "step"):
                    out.setdefault(k, []).append(float(v))
    return out


@pytest.mark.parametrize("model", LRA_MODELS)
def test_every_encoder_trains_through_the_framework(model, listops_root, tmp_path):
    from tasks.common.runner import train

    result = train(compose_config(lra_overrides(listops_root, tmp_path, model)))
    run = Path(result["run_dir"])
    assert result["global_step"] == 4
    logged = _metrics(run)
    assert {"train/loss", "train/lr", "val/acc", "val/loss", "test/acc"} <= set(logged)
    assert all(0 <= a <= 100 for a in logged["val/acc"] + logged["test/acc"]) and len(logged["test/acc"]) == 1
    assert result["metrics"]["test/acc"] == pytest.approx(logged["test/acc"][0])
    state = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    caches = [v for k, v in state.items() if k.endswith(".cache")]
    if model.endswith("_grc"):
        assert len(caches) == 1 and caches[0].shape == (1, 33, 8) and float(caches[0].abs().sum()) > 0
    else:
        assert not caches
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert saved.task.name == "lra_listops" and saved.model.name == model


def test_eval_py_path_reads_the_checkpoint(listops_root, tmp_path):
    from tasks.common.runner import evaluate, train

    result = train(compose_config(lra_overrides(listops_root, tmp_path, "lra_transformer_grc", steps=2)))
    ckpt = Path(result["run_dir"]) / "checkpoints" / "best.ckpt"
    cfg = compose_config(["task=lra_listops", f"data.root={listops_root}", "data.max_length=32", "data.num_workers=0",
                          "trainer=cpu", "trainer.enable_progress_bar=false", f"ckpt_path={ckpt}",
                          f"paths.output_dir={tmp_path}/eval"], config_name="eval")
    metrics = evaluate(cfg)["metrics"]
    assert 0 <= metrics["val/acc"] <= 100


def test_missing_data_is_one_clear_error(tmp_path):
    from tasks.common.runner import train

    cfg = compose_config(lra_overrides(tmp_path / "nowhere", tmp_path, "lra_transformer"))
    with pytest.raises(DataError, match="prepare_listops.py --out"):
        train(cfg)


@pytest.mark.parametrize("name", TABLE6)
def test_table6_experiments_pin_the_recipe(name):
    cfg = compose_config([f"experiment=paper/{name}", "paths.run_dir=unused"])
    OmegaConf.resolve(cfg)
    assert cfg.task.name == "lra_listops" and cfg.paper.table == 6
    assert cfg.model.name.endswith("_grc") == (cfg.paper.variant == "cached")
    assert cfg.run_name == f"{name}-seed0"
    assert cfg.data.max_length == 2000 and cfg.data.batch_size * cfg.trainer.devices == 32
    assert cfg.trainer.max_steps == 5000 and cfg.task.scheduler.warmup_steps == 1000
    assert cfg.task.optimizer.lr == 0.05 and list(cfg.task.optimizer.betas) == [0.9, 0.98]
    assert cfg.task.optimizer.eps == 1e-9 and cfg.task.optimizer.weight_decay == 0.1
    assert (cfg.model.emb_dim, cfg.model.mlp_dim, cfg.model.num_heads, cfg.model.num_layers) == (512, 1024, 8, 4)
    assert cfg.callbacks.model_checkpoint.monitor == "val/acc" and cfg.task.test_with_best


def test_table6_pairs_differ_only_by_model_name():
    configs: dict[str, list] = {}
    for name in TABLE6:
        cfg = compose_config([f"experiment=paper/{name}"])
        c = OmegaConf.to_container(cfg, resolve=False)
        row, variant = c["paper"]["row"], c["paper"]["variant"]
        for k in ("run_name", "paper"):
            c.pop(k)
        assert c["model"].pop("name") == f"lra_{name.split('_')[1]}" + ("_grc" if variant == "cached" else "")
        configs.setdefault(row, []).append(c)
    assert sorted(configs) == ["BigBird", "Reformer", "Transformer"]
    for row, (a, b) in configs.items():
        assert a == b, row


def test_listops_demo_composes():
    cfg = compose_config(["experiment=listops_demo", "paths.run_dir=unused"])
    OmegaConf.resolve(cfg)
    assert cfg.model.name == "lra_transformer_grc" and cfg.model.emb_dim == 64 and cfg.data.generate.max_depth == 3
    base = compose_config(["experiment=listops_demo", "model=lra_transformer", "paths.run_dir=unused"])
    assert base.model.name == "lra_transformer" and base.model.emb_dim == 64


def test_resume_mid_epoch_is_exact(listops_root, tmp_path):
    """N steps == N/2 steps + resume to N for the cached Reformer (dropout, fresh LSH rotations, cache):
    same weights, caches and optimizer state. 6 batches per epoch: the split is mid-epoch 0, the end in epoch 1."""
    from tasks.common.runner import train

    def cfg(run: str, steps: int, *extra: str):
        return compose_config([*lra_overrides(listops_root, tmp_path / run, "lra_reformer_grc", steps=steps),
                               "trainer.deterministic=true", "trainer.val_check_interval=100",
                               "callbacks.last_checkpoint.every_n_train_steps=null", *extra])

    train(cfg("full", 9))
    train(cfg("split", 4))
    half = torch.load(tmp_path / "split" / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert half["global_step"] == 4
    train(cfg("split", 9, "ckpt_path=last", "resume_mismatch=allow"))  # extends max_steps, a recipe key
    a, b = (torch.load(tmp_path / r / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
            for r in ("full", "split"))
    assert a["global_step"] == b["global_step"] == 9
    assert any(k.endswith(".cache") for k in a["state_dict"])
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
