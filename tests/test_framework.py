"""The training framework: configs, entry-point guards, optimizer groups, schedule, loaders, loggers."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, REPO, compose_config

MODEL_CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")
                       if not p.stem.startswith(("lra_", "transformer_")))  # image models only (not ListOps, MT, LM)
EXPERIMENTS = sorted(p.relative_to(CONFIG_DIR / "experiment").with_suffix("").as_posix()
                     for p in (CONFIG_DIR / "experiment").rglob("*.yaml"))
TABLE1 = [e for e in EXPERIMENTS if e.startswith("paper/table1_")]
TABLE10 = [e for e in EXPERIMENTS if e.startswith("paper/table10_")]


# ---------------------------------------------------------------------- configs
def test_default_config_and_run_dir():
    cfg = compose_config(["task=imagenet", "model=pvt_grc"])
    assert cfg.task.name == "imagenet" and cfg.model.name == "pvt_tiny_grc"
    assert cfg.run_name == "pvt_tiny_grc-seed0"
    hydra_cfg = compose_config(["model=pvt_grc", "seed=3"])
    assert hydra_cfg.run_name == "pvt_tiny_grc-seed3"
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        full = compose("train", overrides=["model=pvt_grc"], return_hydra_config=True)
    assert full.hydra.run.dir == "outputs/imagenet/pvt_tiny_grc-seed0"  # no timestamp
    assert full.hydra.sweep.dir == "multirun/imagenet"
    assert "ckpt_path" in full.hydra.job.config.override_dirname.exclude_keys


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_model_config_instantiates(name, tiny):
    from tasks.classification.module import ImageClassifier

    cfg = tiny(f"model={name}")
    OmegaConf.set_struct(cfg, False)
    cfg.paths.run_dir = "unused"
    module = ImageClassifier(OmegaConf.to_container(cfg, resolve=True))
    n_grc = len(__import__("cached_transformers").grc_layers(module.model))
    assert (n_grc > 0) == cfg.model.name.endswith("_grc")
    module.eval()
    with torch.no_grad():
        assert module(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_cached_model_configs_differ_by_one_line():
    import yaml

    for path in (CONFIG_DIR / "model").glob("*_grc.yaml"):
        if path.stem == "pvt_grc":
            continue
        spec = yaml.safe_load(path.read_text())
        # Transformer-XL's cached twin also switches its memory (the segment memory is replaced by GRC)
        switch = {"memory": "grc"} if path.stem.startswith("transformer_xl") else {}
        base_name = {"transformer_xl": "transformer_xl_base"}.get(path.stem[:-4], path.stem[:-4])  # issue 14's name
        assert spec == {"defaults": [base_name], "name": spec["name"], **switch}, path
        base = yaml.safe_load((CONFIG_DIR / "model" / f"{base_name}.yaml").read_text())
        assert spec["name"] in (f"{base['name']}_grc", path.stem)


def test_grc_mapping_only_reaches_grc_models(monkeypatch):
    import timm
    from tasks.common import models

    seen = {}
    monkeypatch.setattr(models, "registered_models", lambda: ["a", "a_grc"])
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: seen.setdefault(name, kw))
    models.create_model("a", num_classes=3, grc={"ratio": 0.5})
    models.create_model("a_grc", num_classes=3, grc={"ratio": 0.5})
    assert "grc" not in seen["a"] and seen["a_grc"]["grc"] == {"ratio": 0.5}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name):
    cfg = compose_config([f"experiment={name}", "paths.run_dir=unused"])
    OmegaConf.resolve(cfg)
    assert cfg.run_name and cfg.task.name
    if name.startswith("paper/"):
        paper = cfg.paper
        assert isinstance(paper.table, int) and paper.variant in ("baseline", "cached", "xl_cache") and paper.metrics
    if name.startswith("paper/table1_"):
        assert isinstance(paper.table, int) and paper.row and paper.variant in ("baseline", "cached")
        assert all(0 < v <= 100 for v in paper.metrics.values())
        assert cfg.model.name.endswith("_grc") == (paper.variant == "cached")
        assert cfg.run_name == f"{name.split('/')[-1]}-seed0"


def test_table1_experiments_pin_the_recipe():
    assert len(TABLE1) == 16
    pairs = {}
    for name in TABLE1:
        cfg = compose_config([f"experiment={name}"])
        total = cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes
        assert total == 1024 and cfg.task.lr_scaling.rule == "linear" and cfg.trainer.max_epochs == 300
        assert cfg.data.img_size == 224 and cfg.data.crop_pct == 0.875 and cfg.task.optimizer.weight_decay == 0.05
        assert cfg.task.mixup.mixup_alpha == 0.8 and cfg.task.mixup.cutmix_alpha == 1.0
        assert cfg.task.label_smoothing == 0.1 and cfg.data.aug.re_prob == 0.25
        assert cfg.task.scheduler.warmup_lr == 1e-6 and cfg.task.scheduler.min_lr == 1e-5
        c = OmegaConf.to_container(cfg, resolve=False)
        for k in ("run_name", "paper"):
            c.pop(k)
        c["model"].pop("name")
        pairs.setdefault(cfg.paper.row, []).append(c)
    for row, (a, b) in pairs.items():
        assert a == b, f"{row}: baseline and cached recipes differ beyond the model name"


def test_table10_rows_are_the_pvt_tiny_recipe_with_one_ratio_each():
    def recipe(cfg):
        c = OmegaConf.to_container(cfg, resolve=False)
        for k in ("run_name", "paper"):
            c.pop(k)
        c["model"].pop("name"), c["grc"].pop("ratio")
        return c

    reference = recipe(compose_config(["experiment=paper/table1_pvt_tiny_cached"]))
    ratios = {}
    for name in TABLE10:
        cfg = compose_config([f"experiment={name}"])
        assert cfg.paper.table == 10 and recipe(cfg) == reference, name
        ratios[cfg.paper.row] = cfg.grc.ratio if cfg.model.name == "pvt_tiny_grc" else 0.0
        assert (cfg.model.name == "pvt_tiny") == (cfg.paper.variant == "baseline")
    assert ratios == {"r0": 0.0, "r0_125": 0.125, "r0_25": 0.25, "r0_5": 0.5, "r1_0": 1.0}
    from cached_transformers.models import create_model
    for r in (0.125, 0.25, 1.0):  # every ratio builds (D_m splits into the heads of all four stages)
        model = create_model("pvt_tiny_grc", num_classes=10, img_size=64, grc={"ratio": r})
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_a_task_carries_its_schedule_and_overrides_still_win():
    lra = compose_config(["task=lra_listops", "trainer=cpu"])
    assert (lra.trainer.accelerator, lra.trainer.max_steps, lra.trainer.max_epochs) == ("cpu", 5000, -1)
    assert lra.trainer.val_check_interval == 200
    assert compose_config(["task=lra_listops", "trainer.max_steps=10"]).trainer.max_steps == 10
    imagenet = compose_config(["task=imagenet"])
    assert (imagenet.trainer.max_epochs, imagenet.trainer.max_steps) == (300, -1)


# ---------------------------------------------------------------------- entry-point guards
def test_unknown_group_choice_lists_available():
    from tasks.common.cli import check_group_overrides
    from tasks.common.errors import ConfigError

    check_group_overrides(["task=imagenet", "model=pvt_grc,pvt_tiny", "experiment=paper/table1_pvt_tiny_cached"],
                          CONFIG_DIR)
    with pytest.raises(ConfigError, match=r"Unknown model 'pvt_huge'; available model configs: .*pvt_tiny_grc"):
        check_group_overrides(["model=pvt_huge"], CONFIG_DIR)
    with pytest.raises(ConfigError, match=r"Unknown task 'cifar'; available task configs: .*imagenet"):
        check_group_overrides(["task=cifar"], CONFIG_DIR)


@pytest.mark.parametrize("args,needle", [(["model=pvt_huge"], "Unknown model 'pvt_huge'"),
                                         (["task=cifar"], "Unknown task 'cifar'")])
def test_cli_unknown_name_is_one_sentence(args, needle):
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and needle in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_timm_model_name():
    from tasks.common.errors import ConfigError
    from tasks.common.models import create_model

    with pytest.raises(ConfigError, match="Unknown model name 'pvt_tiny_gcr'.*pvt_tiny_grc"):
        create_model("pvt_tiny_gcr", num_classes=10, img_size=32)


# ---------------------------------------------------------------------- optimizer, lr, schedule
def test_param_groups_and_lr_scaling():
    from tasks.common.optim import param_groups, scaled_lr

    import cached_transformers  # noqa: F401
    import timm

    model = timm.create_model("vit_small_patch16_224_grc", num_classes=10, img_size=32, depth=1)
    groups = {g["name"]: g for g in param_groups(model, 0.05)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert {"pos_embed", "cls_token"} <= no_decay and any(n.endswith(".lam") for n in no_decay)
    assert all(n.endswith(".bias") or "norm" in n or n in ("pos_embed", "cls_token") or n.endswith(".lam")
               for n in no_decay)
    assert all(model.get_parameter(n).ndim > 1 for n in decay)
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.05
    assert scaled_lr(5e-4, 1024) == pytest.approx(1e-3)
    assert scaled_lr(5e-4, 256, "linear", 512) == pytest.approx(2.5e-4)
    assert scaled_lr(5e-4, 2048, "sqrt", 512) == pytest.approx(1e-3)


def test_warmup_cosine_schedule():
    from tasks.common.optim import warmup_cosine_schedule

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = warmup_cosine_schedule(opt, total_steps=110, steps_per_epoch=2, warmup_epochs=5,
                                   warmup_lr=1e-6, min_lr=1e-5)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-6) and lrs[10] == pytest.approx(1e-3)
    assert lrs[5] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert lrs[60] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[-1] > 1e-5 and opt.param_groups[0]["lr"] == pytest.approx(1e-5)


# ---------------------------------------------------------------------- data loading
def test_resumable_loader_continues_mid_epoch():
    from tasks.common.data import EpochShuffleSampler, ResumableDataLoader, SeededSampler

    class Echo(torch.utils.data.Dataset):  # returns the (index, sample_seed) it is asked for
        def __len__(self):
            return 20

        def __getitem__(self, item):
            return item

    data = Echo()

    def loader():
        return ResumableDataLoader(data, sampler=SeededSampler(EpochShuffleSampler(20, seed=1), seed=1),
                                   batch_size=4, drop_last=True, collate_fn=lambda b: b)

    full = loader()
    full.sampler.set_epoch(2)
    reference = list(full)
    first = loader()
    first.sampler.set_epoch(2)
    it = iter(first)
    head = [next(it), next(it)]
    state = first.state_dict()
    assert state == {"epoch": 2, "batches": 2, "num_batches": 5}
    resumed = loader()
    resumed.load_state_dict(state)
    assert head + list(resumed) == reference  # same samples and the same per-sample seeds
    assert len({s for b in reference for _, s in b}) == 20
    nxt = loader()
    nxt.load_state_dict({"epoch": 2, "batches": 5, "num_batches": 5})  # saved at the epoch end: restart
    assert len(list(nxt)) == 5


def test_seeded_transforms_do_not_touch_global_rng():
    import random

    from tasks.common.seeding import derive_seed, seeded

    random.seed(0)
    torch.manual_seed(0)
    a = (random.random(), torch.rand(1).item())
    random.seed(0)
    torch.manual_seed(0)
    with seeded(derive_seed(1, "x")):
        inner = torch.rand(1).item()
    b = (random.random(), torch.rand(1).item())
    assert a == b
    with seeded(derive_seed(1, "x")):
        assert torch.rand(1).item() == inner


# ---------------------------------------------------------------------- strategy, precision, loggers
def test_strategy_never_broadcasts_buffers():
    from lightning.pytorch.strategies import DDPStrategy
    from tasks.common.errors import ConfigError
    from tasks.common.runner import build_strategy

    for trainer in ("ddp", "ddp_sim"):
        tcfg = OmegaConf.to_container(compose_config([f"trainer={trainer}"]).trainer)
        s = build_strategy(tcfg)
        assert isinstance(s, DDPStrategy) and s._ddp_kwargs["broadcast_buffers"] is False
    s = build_strategy({"strategy": "ddp", "accelerator": "cpu", "devices": 2})
    assert isinstance(s, DDPStrategy) and s._ddp_kwargs["broadcast_buffers"] is False
    assert build_strategy({"strategy": "auto", "accelerator": "cpu", "devices": 1}) == "auto"
    with pytest.raises(ConfigError, match="broadcast_buffers"):
        build_strategy({"strategy": {"_target_": "lightning.pytorch.strategies.DDPStrategy",
                                     "broadcast_buffers": True}})


def test_wandb_failure_falls_back_to_csv(monkeypatch, tmp_path):
    from lightning.pytorch.loggers import CSVLogger, WandbLogger
    from tasks.common.runner import build_loggers

    def broken(self):
        raise RuntimeError("no network")

    monkeypatch.setattr(WandbLogger, "experiment", property(broken))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_config(["logger=wandb", f"paths.run_dir={tmp_path}"])
    with pytest.warns(UserWarning, match="Logger 'wandb'.*could not start.*CSV"):
        loggers = build_loggers(cfg, tmp_path)
    assert len(loggers) == 1 and isinstance(loggers[0], CSVLogger)
    import os
    assert os.environ["WANDB_MODE"] == "offline"


def test_sweep_job_dirnames_are_flat_and_short():
    from tasks.common import job_dirname

    assert job_dirname("experiment=paper/table1_pvt_tiny_cached,seed=0", 3) == \
        "experiment=paper_table1_pvt_tiny_cached,seed=0"
    assert job_dirname("", 3) == "job3"
    assert job_dirname("x=" + "a" * 300, 7) == "job7"
