"""The ImageNet task on the stand-in data: training runs, resume exactness, bad inputs, eval, signals."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, tiny_overrides


def _train(cfg):
    from tasks.common.runner import train

    return train(cfg)


def _columns(metrics_csv: Path) -> set[str]:
    with metrics_csv.open() as f:
        return set(next(csv.reader(f)))


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------- training runs
@pytest.mark.parametrize("model", ["pvt_tiny", "pvt_tiny_grc"])
def test_fast_dev_run(tiny, model):
    result = _train(tiny(f"model={model}", "trainer.fast_dev_run=true"))
    assert result["global_step"] == 1
    assert 0.0 <= result["metrics"]["val/acc1"] <= 100.0 and "val/acc5" in result["metrics"]


def test_bf16_mixed_training_run(tiny):
    """The precision GPUs get by default (`precision: auto` -> bf16-mixed), exercised with CPU autocast."""
    result = _train(tiny("model=pvt_grc", "trainer.max_steps=2", "trainer.precision=bf16-mixed"))
    assert result["global_step"] == 2 and 0.0 <= result["metrics"]["val/acc1"] <= 100.0
    sd = _load(Path(result["run_dir"]) / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(v.dtype == torch.float32 and v.abs().sum() > 0 for k, v in sd.items() if k.endswith(".cache"))


def test_run_directory_contract_and_grc_metrics(tiny, tmp_path):
    result = _train(tiny("model=pvt_grc", "trainer.max_steps=3"))
    run = Path(result["run_dir"])
    assert run == tmp_path / "run"
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert cfg.task.name == "imagenet" and cfg.model.name == "pvt_tiny_grc" and cfg.seed == 0
    assert "${" not in OmegaConf.to_yaml(cfg)  # resolved
    cols = _columns(run / "csv" / "metrics.csv")
    assert {"train/loss_step", "train/lr", "val/acc1", "val/acc5", "val/loss"} <= cols
    lam = [c for c in cols if c.startswith("grc/") and c.endswith("/sigmoid_lambda_mean")]
    assert len(lam) == 8 and any(c.endswith("_h0") for c in cols)  # PVT-Tiny: 8 attention layers
    ckpt = _load(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3 and "rng_states" in ckpt
    assert any(k.endswith(".cache") for k in ckpt["state_dict"])


@pytest.mark.slow
def test_compiled_training_keeps_checkpoint_keys_and_cache_updates(tiny, monkeypatch):
    import timm

    calls, compile_ = [], torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: (calls.append((type(self).__name__, kw)),
                                                                        compile_(self, **kw))[1])
    result = _train(tiny("model=pvt_grc", "trainer.max_steps=2", "compile.enabled=true", "compile.backend=aot_eager"))
    assert calls == [("PyramidVisionTransformer", {"backend": "aot_eager"})]
    sd = _load(Path(result["run_dir"]) / "checkpoints" / "last.ckpt")["state_dict"]
    assert not any("_orig_mod" in k for k in sd)
    model = timm.create_model("pvt_tiny_grc", num_classes=10, img_size=32)
    model.load_state_dict({k.removeprefix("model."): v for k, v in sd.items()}, strict=True)
    caches = [v for k, v in sd.items() if k.endswith(".cache")]
    assert len(caches) == 8 and all(c.abs().sum() > 0 for c in caches)


@pytest.mark.slow
def test_train_cli_end_to_end(standin_root, tmp_path):
    """The literal command lines: Hydra run dir, resolved config, metrics, exit status, resume, eval.py."""
    out = tmp_path / "outputs"
    args = ["data=standin", f"data.root={standin_root}", "data.batch_size=8", "data.num_workers=0", "trainer=cpu",
            "trainer.max_steps=2", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1", f"paths.output_dir={out}", "model=pvt_grc", "task=imagenet", "run_name=e2e"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = out / "imagenet" / "e2e"  # run_name given on the command line names the directory exactly
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "csv" / "metrics.csv").is_file()
    assert OmegaConf.load(run / ".hydra" / "config.yaml").paths.run_dir == str(run)
    assert "Finished" in proc.stdout and "val/acc1=" in proc.stdout
    # ckpt_path=last resumes in the same directory (a longer run is another recipe: resume_mismatch=allow)
    proc = subprocess.run([sys.executable, "train.py", *args, "trainer.max_steps=3", "ckpt_path=last",
                           "resume_mismatch=allow"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _load(run / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert "at step 3" in proc.stdout
    with (run / "csv" / "metrics.csv").open() as f:  # the history before the resume is kept
        steps = {int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss_step")}
    assert steps == {0, 1, 2}
    proc = subprocess.run([sys.executable, "eval.py", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "data=standin",
                           f"data.root={standin_root}", "data.num_workers=0", "trainer=cpu",
                           "trainer.enable_progress_bar=false", f"paths.output_dir={out}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val/acc1=" in proc.stdout and (run / "eval" / "last" / "csv" / "metrics.csv").is_file()


# ---------------------------------------------------------------------- resume exactness
def test_resume_mid_epoch_is_exact(standin_root, tmp_path):
    """N steps == N/2 steps + resume to N: same weights, GRC caches, optimizer, EMA (deterministic CPU)."""
    from conftest import compose_config

    def cfg(run: str, steps: int, *extra: str):
        return compose_config([*tiny_overrides(standin_root, tmp_path / run, steps=steps), "model=pvt_tiny_grc",
                               "trainer.deterministic=true", "task.scheduler.total_steps=14",
                               "task.scheduler.warmup_steps=3", "task.ema.enabled=true", "task.ema.decay=0.9",
                               "callbacks.model_checkpoint=null", "callbacks.last_checkpoint.every_n_train_steps=null",
                               *extra])

    _train(cfg("full", 14))                       # 10 batches per epoch: crosses an epoch boundary
    _train(cfg("split", 7))                       # stops mid-epoch 0
    half = _load(tmp_path / "split" / "run" / "checkpoints" / "last.ckpt")
    assert half["global_step"] == 7
    assert half["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"] == 7
    _train(cfg("split", 14, "ckpt_path=last", "resume_mismatch=allow"))  # max_steps 7 -> 14: another recipe
    a = _load(tmp_path / "full" / "run" / "checkpoints" / "last.ckpt")
    b = _load(tmp_path / "split" / "run" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 14
    caches = [k for k in a["state_dict"] if k.endswith(".cache")]
    assert caches and all(a["state_dict"][k].abs().sum() > 0 for k in caches)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for k, v in a["ema_state_dict"].items():
        assert torch.equal(v, b["ema_state_dict"][k]), k
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 14


# ---------------------------------------------------------------------- bad inputs
def test_missing_root(tiny, tmp_path):
    from tasks.common.errors import DataError

    with pytest.raises(DataError, match=r"does not exist; pass data.root=/path/to/imagenet .*make demo"):
        _train(tiny(f"data.root={tmp_path / 'nowhere'}"))


def test_malformed_roots(tiny, tmp_path):
    from tasks.common.errors import DataError

    no_val = tmp_path / "no_val"
    (no_val / "train" / "n01").mkdir(parents=True)
    with pytest.raises(DataError, match="has no val/ sub-folder"):
        _train(tiny(f"data.root={no_val}"))
    flat = tmp_path / "flat"
    (flat / "train" / "n01").mkdir(parents=True)
    (flat / "val").mkdir()
    (flat / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"x")
    with pytest.raises(DataError, match="holds 1 images directly instead of one sub-folder per class"):
        _train(tiny(f"data.root={flat}"))
    empty = tmp_path / "empty"
    (empty / "train" / "n01").mkdir(parents=True)
    (empty / "val" / "n01").mkdir(parents=True)
    with pytest.raises(DataError, match="has class folders but no images"):
        _train(tiny(f"data.root={empty}", "data.num_classes=1"))


def test_wrong_class_count(tiny):
    from tasks.common.errors import DataError

    with pytest.raises(DataError, match="has 10 classes in train/ but data.num_classes=1000"):
        _train(tiny("data.num_classes=1000"))


def test_cli_missing_root_is_one_sentence(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "data=standin", f"data.root={tmp_path / 'missing'}",
                           "trainer=cpu", f"paths.output_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: The dataset root") and "data.root=" in err and "make demo" in err
    assert "Traceback" not in proc.stderr


@pytest.fixture
def corrupt_root(standin_root, tmp_path):
    import shutil

    root = tmp_path / "corrupt"
    shutil.copytree(standin_root, root)
    bad = sorted((root / "train").glob("*/*.JPEG"))[3]
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    badval = sorted((root / "val").glob("*/*.JPEG"))[0]
    badval.write_bytes(b"")
    return root, bad, badval


def test_corrupt_image_fails_with_its_path(tiny, corrupt_root):
    from tasks.common.errors import DataError

    root, bad, badval = corrupt_root
    with pytest.raises(DataError, match=r"Corrupt or unreadable image .*(%s|%s).*data.on_corrupt=skip"
                       % (bad.name, badval.name)):
        _train(tiny(f"data.root={root}", "trainer.max_epochs=1", "trainer.max_steps=-1", "model=pvt_tiny"))


def test_corrupt_image_skip(tiny, corrupt_root, caplog):
    from tasks.classification.data import ImageFolderSplit, scan_split

    root, bad, badval = corrupt_root
    result = _train(tiny(f"data.root={root}", "data.on_corrupt=skip", "trainer.max_epochs=1", "trainer.max_steps=-1",
                         "model=pvt_tiny"))
    assert result["global_step"] == 10
    assert any(str(bad) in r.getMessage() for r in caplog.records)
    assert any(str(badval) in r.getMessage() for r in caplog.records)
    samples, _ = scan_split(root / "val")
    ds = ImageFolderSplit(samples, None, on_corrupt="skip", substitute=False)
    assert sum(ds[i] is None for i in range(len(ds))) == 1


# ---------------------------------------------------------------------- non-finite loss, signals
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    from tasks.classification.module import ImageClassifier
    from tasks.common.errors import NonFiniteLossError

    original = ImageClassifier.forward

    def forward(self, x):
        out = original(self, x)
        return out * float("nan") if self.training and self.global_step >= 2 else out

    monkeypatch.setattr(ImageClassifier, "forward", forward)
    with pytest.raises(NonFiniteLossError, match="non-finite.*step 2.*ckpt_path=last"):
        _train(tiny("model=pvt_tiny_grc", "trainer.max_steps=5", "callbacks.last_checkpoint.every_n_train_steps=1"))
    ckpt = _load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_sigusr1_saves_resumable_checkpoint_and_stops(tiny, tmp_path):
    import lightning.pytorch as pl

    from tasks.common.runner import StoppedBySignal

    class Kill(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGUSR1)

    cfg = tiny("model=pvt_tiny", "trainer.max_steps=6")
    OmegaConf.set_struct(cfg, False)
    cfg.callbacks.kill = {"_target_": f"{__name__}._KillAt2"} if False else None
    from tasks.common import runner

    original = runner.build_callbacks
    runner.build_callbacks = lambda c: [*original(c), Kill()]
    try:
        with pytest.raises(StoppedBySignal) as info:
            _train(cfg)
    finally:
        runner.build_callbacks = original
    assert info.value.exit_code == 128 + signal.SIGUSR1
    assert _load(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)
    result = _train(tiny("model=pvt_tiny", "trainer.max_steps=6", "ckpt_path=last"))
    assert result["global_step"] == 6 and result["resumed_from"].endswith("last.ckpt")


@pytest.mark.parametrize("kill_at", [9, 4], ids=["last-batch-of-epoch", "mid-epoch"])
def test_stop_and_resume_logs_every_validation_of_an_uninterrupted_run(tiny, tmp_path, kill_at):
    """A signal at the step whose validation is due (the epoch's last batch here: 80 images / batch 8)
    stops after that validation, so the resumed run neither repeats nor loses a validation row."""
    import lightning.pytorch as pl

    from tasks.common import runner
    from tasks.common.runner import StoppedBySignal

    def val_rows(run: Path) -> list[tuple]:
        with (run / "csv" / "metrics.csv").open() as f:
            return [(r["val/acc1"], r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]

    class Kill(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGUSR1)

    common = ("model=pvt_tiny", "trainer.max_steps=14", "callbacks.model_checkpoint=null", "trainer.deterministic=true")
    _train(tiny(*common, f"paths.run_dir={tmp_path}/full"))
    original = runner.build_callbacks
    runner.build_callbacks = lambda c: [*original(c), Kill()]
    try:
        with pytest.raises(StoppedBySignal):
            _train(tiny(*common, f"paths.run_dir={tmp_path}/split"))
    finally:
        runner.build_callbacks = original
    assert _load(tmp_path / "split" / "checkpoints" / "last.ckpt")["global_step"] == kill_at + 1
    _train(tiny(*common, f"paths.run_dir={tmp_path}/split", "ckpt_path=last"))
    assert len(val_rows(tmp_path / "full")) == 2  # the end of epoch 0 (step 10) and the end of the run
    assert val_rows(tmp_path / "split") == val_rows(tmp_path / "full")


@pytest.mark.slow
def test_sigterm_on_the_command_line(standin_root, tmp_path):
    out = tmp_path / "outputs"
    args = [sys.executable, "train.py", "data=standin", f"data.root={standin_root}", "data.batch_size=8",
            "data.num_workers=0", "trainer=cpu", "trainer.max_steps=400", "trainer.num_sanity_val_steps=0",
            "trainer.enable_progress_bar=false", "model=pvt_tiny", f"paths.output_dir={out}",
            "callbacks.last_checkpoint.every_n_train_steps=1", "callbacks.model_checkpoint=null", "run_name=sigterm"]
    proc = subprocess.Popen(args, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    last = out / "imagenet" / "sigterm" / "checkpoints" / "last.ckpt"
    import time

    deadline = time.time() + 240
    while not last.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Stopped by SIGTERM" in err and "ckpt_path=last" in err
    step = _load(last)["global_step"]
    assert 0 < step < 400


# ---------------------------------------------------------------------- eval.py
def test_evaluate_checkpoint(tiny, tmp_path):
    from tasks.common.runner import evaluate

    train_result = _train(tiny("model=pvt_tiny_grc", "trainer.max_steps=2", "task.ema.enabled=true"))
    ckpt = Path(train_result["run_dir"]) / "checkpoints" / "last.ckpt"
    # no model override: the model (pvt_tiny_grc) comes from the checkpoint's stored config
    cfg = tiny(f"ckpt_path={ckpt}", config_name="eval")
    result = evaluate(cfg, [])
    assert set(result["metrics"]) >= {"val/acc1", "val/acc5", "val/loss"}
    eval_dir = Path(result["eval_dir"])
    assert eval_dir == Path(train_result["run_dir"]) / "eval" / "last"
    assert {"val/acc1", "val/acc5", "val/loss"} <= _columns(eval_dir / "csv" / "metrics.csv")
    ema = evaluate(tiny(f"ckpt_path={ckpt}", "use_ema=true", config_name="eval"), ["use_ema=true"])
    assert ema["ema"] is True
    from tasks.common.errors import UserError

    with pytest.raises(UserError, match="does not match model 'pvt_tiny'"):
        evaluate(tiny(f"ckpt_path={ckpt}", "model=pvt_tiny", config_name="eval"), ["model=pvt_tiny"])


# ---------------------------------------------------------------------- EMA, stand-in
def test_ema_copies_caches_and_averages_weights():
    import cached_transformers
    import timm

    from tasks.common.ema import CacheCopyingEMA

    model = timm.create_model("pvt_tiny_grc", num_classes=10, img_size=32)
    ema = CacheCopyingEMA(model, decay=0.5)
    model.train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(2, 3, 32, 32))  # writes the caches
    ema.update(model, step=10)
    ema_caches = cached_transformers.grc_layers(ema.module)
    for name, layer in cached_transformers.grc_layers(model).items():
        assert torch.equal(ema_caches[name].cache, layer.cache) and layer.cache.abs().sum() > 0
    p_model = dict(model.named_parameters())
    for name, p in ema.module.named_parameters():
        assert not torch.equal(p, p_model[name])


def test_standin_is_deterministic(tmp_path):
    from tasks.classification.standin import WNIDS, generate

    a = generate(tmp_path / "a", train_per_class=2, val_per_class=1, size=32)
    b = generate(tmp_path / "b", train_per_class=2, val_per_class=1, size=32)
    files = sorted(p.relative_to(a) for p in a.rglob("*.JPEG"))
    assert len(files) == 3 * len(WNIDS)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert "NOT ImageNet" in (a / "README.txt").read_text()


# ---------------------------------------------------------------------- multi-process
@pytest.mark.slow
def test_ddp_sim_smoke(standin_root, tmp_path):
    out = tmp_path / "outputs"
    args = [sys.executable, "train.py", "trainer=ddp_sim", "data=standin", f"data.root={standin_root}",
            "data.batch_size=8", "data.num_workers=0", "trainer.max_steps=3", "trainer.num_sanity_val_steps=0",
            "trainer.enable_progress_bar=false", "model=pvt_tiny_grc", f"paths.output_dir={out}", "run_name=ddp_smoke"]
    proc = subprocess.run(args, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = out / "imagenet" / "ddp_smoke"
    ckpt = _load(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    assert "val/acc1" in _columns(run / "csv" / "metrics.csv")
    assert not list(run.glob("**/config.yaml"))[1:]  # the child process wrote no second config


# ---------------------------------------------------------------------- make demo: several seeds, mean +- std, verdict
def test_demo_summary_states_whether_the_difference_is_within_the_spread():
    import math

    from tasks.classification.demo import compare, mean_std, summary

    mean, std = mean_std([53.0, 44.0, 10.0])
    assert mean == pytest.approx(35.6667, abs=1e-3) and std == pytest.approx(22.679, abs=1e-3)  # sample std (n - 1)
    assert math.isnan(mean_std([47.0])[1])
    noisy = compare([53.0, 44.0, 10.0], [47.0, 53.0, 50.0])
    assert noisy.within is True and noisy.diff == pytest.approx(14.333, abs=1e-3)
    assert noisy.stderr == pytest.approx(math.sqrt(22.679 ** 2 / 3 + 3.0 ** 2 / 3), abs=1e-3)
    assert "within the seed-to-seed spread" in noisy.sentence and "neither model" in noisy.sentence
    clear = compare([40.0, 41.0, 42.0], [50.0, 51.0, 52.0])
    assert clear.within is False and "larger than the seed-to-seed spread" in clear.sentence
    assert "the cached model scored higher" in clear.sentence
    assert compare([50.0, 51.0, 52.0], [40.0, 41.0, 42.0]).sentence.endswith("the baseline model scored higher.")
    single = compare([53.0], [47.0])
    assert single.within is None and "run several seeds" in single.sentence
    runs = [{"variant": v, "model": m, "seed": s, "metrics": {"val/acc1": a, "val/acc5": 99.0}, "wall_s": 1.0,
             "run_dir": f"d{s}{v}"}
            for s, (b, c) in enumerate([(53.0, 47.0), (44.0, 53.0), (10.0, 50.0)])
            for v, m, a in (("baseline", "pvt_tiny", b), ("cached", "pvt_tiny_grc", c))]
    text = "\n".join(summary(runs))
    assert "baseline   pvt_tiny       val/acc1  35.67 +- 22.68  (mean +- std over 3 seeds)" in text
    assert "cached     pvt_tiny_grc   val/acc1  50.00 +-  3.00  (mean +- std over 3 seeds)" in text
    assert text.endswith(noisy.sentence)


def test_demo_trains_both_models_for_every_seed(tmp_path, capsys):
    """One train.py sweep: both models for every seed, each in its own run directory, then the summary."""
    from tasks.classification.demo import main

    rc = main(["--seeds", "0,1", "--epochs", "1", "--data", str(tmp_path / "standin"), "data.batch_size=8",
               "data.num_workers=0", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
               f"paths.multirun_dir={tmp_path}/multirun"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "(mean +- std over 2 seeds)" in out and "seed-to-seed spread" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("baseline   pvt", "cached     pvt"))]
    runs = [(r[1], r[2], r[-1]) for r in rows if len(r) == 7]  # model, seed, run dir
    assert [(m, s) for m, s, _ in runs] == [("pvt_tiny", "0"), ("pvt_tiny_grc", "0"), ("pvt_tiny", "1"),
                                          ("pvt_tiny_grc", "1")]  # baseline and cached alternate
    # one run directory per model and seed: no run overwrites another
    dirs = {d for _, _, d in runs}
    assert len(dirs) == 4 and all((Path(d) / "csv" / "metrics.csv").is_file() for d in dirs)
    assert all(Path(d).parent == tmp_path / "multirun" / "demo" for d in dirs)
