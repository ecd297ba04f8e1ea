"""The paper's tables as data, the run readers (CSV, wandb offline) and the throughput table (fast)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.paper.compare import compare_runs, to_markdown  # noqa: E402
from tasks.paper.runs import BrokenRun, Run, read_run, read_runs  # noqa: E402
from tasks.paper.tables import get_table, load_tables  # noqa: E402


def test_every_benchmark_table_is_data() -> None:
    tables = load_tables()
    assert sorted(tables) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    t1 = tables[1]
    assert [r.key for r in t1.rows] == ["vit_small", "pvt_tiny", "pvt_small", "pvt_medium", "swin_tiny",
                                        "pvt_v2_b2", "pvt_v2_b3", "pvt_v2_b4"]
    assert t1.value("PVT-Tiny", "cached", "val/acc1") == 78.4
    assert t1.value("pvt_tiny", "grc", "top5") == 94.2
    assert t1.value("vit_s", "baseline", "params") == 22.1 and t1.value("pvt_v2_b4", "cached", "flops") == 11.57
    assert tables[2].value("pvt_tiny", "xl_cache", "val/acc1") == 74.8
    assert tables[3].value("pvt_small", "baseline", "mask_ap") == 36.3
    assert tables[4].value("pvt_medium", "cached", "apl") == 60.2
    assert tables[5].value("transformer_xl_base", "rmt", "ppl") == 23.95
    assert tables[5].column("ppl").higher_is_better is False
    assert tables[6].value("bigbird", "cached", "test/acc") == 37.45
    assert tables[6].row("transformer").extra["leaderboard"]["test_acc"] == 36.37
    assert tables[7].value("iwslt15_en_vi", "cached", "bleu") == 30.2
    assert tables[8].value("swin_tiny_22k", "cached", "top5") == 96.4
    assert tables[9].value("pvt_small", "baseline", "test_img_s") == 689
    assert tables[10].value("r0.125", "cached", "val/acc1") == 75.7
    assert tables[10].reference("r0_25", "val/acc1") == 75.1  # gains of Table 10 are against r = 0
    with pytest.raises(KeyError, match="Unknown paper table 11"):
        get_table(11)


def _run_dir(root: Path, name: str, config: dict | None, csv: str | None) -> Path:
    d = root / name
    (d / "csv").mkdir(parents=True)
    if config is not None:
        (d / ".hydra").mkdir()
        (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if csv is not None:
        (d / "csv" / "metrics.csv").write_text(csv)
    return d


def test_csv_reading_and_broken_runs(tmp_path: Path) -> None:
    cfg = {"seed": 0, "task": {"name": "imagenet"}, "model": {"name": "pvt_tiny"},
           "paper": {"table": 1, "row": "pvt_tiny", "variant": "baseline", "metrics": {"val/acc1": 75.1}}}
    good = _run_dir(tmp_path, "good", cfg, "epoch,step,train/loss,val/acc1\n0,9,2.0,\n0,9,,40.0\n1,19,1.5,\n1,19,,38.0\n")
    run = read_run(good)
    assert isinstance(run, Run)
    assert run.history["val/acc1"] == [40.0, 38.0]
    assert run.final("val/acc1") == 38.0 and run.final("val/acc1", "best") == 40.0
    assert run.final("train/loss", "best", higher_is_better=False) == 1.5
    _run_dir(tmp_path, "ragged", cfg, "epoch,step,val/acc1\n0,1,2.0,7,7\n")
    _run_dir(tmp_path, "text", cfg, "epoch,step,val/acc1\n0,1,abc\n")
    _run_dir(tmp_path, "binary", cfg, None).joinpath("csv", "metrics.csv").write_bytes(b"\xff\xfe\x00\x81garbage")
    _run_dir(tmp_path, "noconfig", None, "epoch,step,val/acc1\n0,1,2.0\n")
    runs, broken = read_runs([str(tmp_path), str(tmp_path / "does-not-exist")])
    reasons = {b.path.name: b.reason for b in broken}
    assert [r.path.name for r in runs] == ["good"]
    assert "line 2 has 5 fields" in reasons["ragged"]
    assert "'abc' is not a number" in reasons["text"]
    assert "corrupt metrics.csv" in reasons["binary"]
    assert "missing config" in reasons["noconfig"]
    assert "no such file" in reasons["does-not-exist"]


def test_wandb_offline_run_is_read(tmp_path: Path) -> None:
    """A real wandb offline run (what wandb 0.31 writes) in a run dir without a CSV."""
    wandb = pytest.importorskip("wandb")
    run_dir = tmp_path / "wb"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump({
        "seed": 3, "task": {"name": "imagenet"}, "model": {"name": "pvt_tiny_grc"},
        "paper": {"table": 1, "row": "pvt_tiny", "variant": "cached", "metrics": {"val/acc1": 78.4}}}))
    os.environ.setdefault("WANDB_SILENT", "true")
    r = wandb.init(mode="offline", dir=str(run_dir), project="t", config={"seed": 3})
    for step, acc in enumerate([10.0, 30.0, 20.0]):
        r.log({"val/acc1": acc, "train/loss": 1.0 / (step + 1)}, step=step)
    r.finish()
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    deadline = time.time() + 20  # wandb's service may still be flushing the file when finish() returns
    while True:
        run = read_run(run_dir)
        if not isinstance(run, Run) or run.history.get("val/acc1") or time.time() > deadline:
            break
        time.sleep(0.2)
    assert isinstance(run, Run), getattr(run, "reason", "")
    assert run.sources == ("wandb",)
    assert run.history.get("val/acc1") == [10.0, 30.0, 20.0], (run.history, list(run_dir.rglob("*")))
    c = compare_runs([run], tolerance=60.0)
    md = to_markdown(c)
    assert "| PVT-Tiny | val/acc1 | 75.10 | - | 78.40 | 20.00 (n=1) |" in md
    assert c.tables[0].rows[0].verdict == "yes"


def test_broken_run_is_reported_not_raised(tmp_path: Path) -> None:
    runs = [Run(path=tmp_path / "a", config={"seed": 0, "paper": {"table": 6, "row": "transformer",
                                                                    "variant": "cached"}},
                history={"train/loss": [1.0]})]
    c = compare_runs(runs, [BrokenRun(tmp_path / "b", "corrupt metrics.csv")])
    md = to_markdown(c)
    assert f"`{tmp_path / 'a'}`: missing metric test/acc (logged: train/loss)" in md
    assert f"`{tmp_path / 'b'}`: corrupt metrics.csv" in md
    assert "No usable runs found." in md


def test_throughput_table_rows() -> None:
    from tasks.paper.throughput import throughput_table, to_markdown as tp_markdown

    rows = throughput_table([("pvt_tiny", "pvt_tiny_grc")], batch_size=2, img_size=32, device="cpu",
                            warmup=0, iters=1, num_classes=10)
    (row,) = rows
    assert row["model"] == "pvt_tiny" and row["cached"] == "pvt_tiny_grc"
    assert all(v > 0 for v in (*row["train_img_s"], *row["test_img_s"]))
    assert row["params_m"][1] > row["params_m"][0]
    assert row["paper_train_ratio"] == pytest.approx(257 / 313)
    assert "| pvt_tiny |" in tp_markdown(rows)
    with pytest.raises(ValueError, match="Unknown model"):
        throughput_table([("pvt_nope", "pvt_nope_grc")], batch_size=1, img_size=32, device="cpu")


def test_table10_experiment_files_compare_against_the_paper(tmp_path: Path) -> None:
    """Runs carrying the Table 10 files' paper blocks land on the right rows, gains against r = 0."""
    from conftest import CONFIG_DIR

    runs = []
    for i, path in enumerate(sorted((CONFIG_DIR / "experiment" / "paper").glob("table10_*.yaml"))):
        paper = yaml.safe_load(path.read_text())["paper"]
        runs.append(Run(path=tmp_path / path.stem, config={"seed": 0, "paper": paper},
                        history={"val/acc1": [70.0 + i]}))
    c = compare_runs(runs, tolerance=10.0)
    rows = {r.row: r for r in c.tables[0].rows if r.metric == "val/acc1"}
    assert c.tables[0].table.id == 10 and set(rows) == {"r0", "r0_125", "r0_25", "r0_5", "r1_0"}
    # sorted files: r0_125, r0_25, r0_5, r0 (baseline), r1_0 -> ours 70, 71, 72, 73, 74
    assert rows["r0_125"].paper_gain == pytest.approx(0.6) and rows["r0_125"].ours_gain == pytest.approx(-3.0)
    assert rows["r1_0"].ours["cached"].mean == 74.0
    md = to_markdown(c)
    assert "r = 0.125" in md and "75.70" in md and "78.50" in md


# ---------------------------------------------------------------------- Table 8: IN-22k pre-training, IN-1k fine-tuning
def test_table8_experiments_compose_to_swins_two_stage_recipe() -> None:
    """Fine-tuning rows carry the paper's numbers and start from their own variant's pre-training run."""
    from omegaconf import OmegaConf

    from conftest import compose_config

    table = get_table(8)
    swin = "swin_tiny_patch4_window7_224"
    for variant, model in (("baseline", swin), ("cached", f"{swin}_grc")):
        pre = compose_config([f"experiment=pretrain/in22k_swin_t_{variant}", "paths.run_dir=unused"])
        assert pre.task.name == "imagenet22k" and pre.model.name == model and pre.data.num_classes is None
        assert pre.trainer.max_epochs == 90 and pre.task.scheduler.warmup_epochs == 5
        total = pre.data.batch_size * pre.trainer.devices * pre.trainer.num_nodes * pre.trainer.accumulate_grad_batches
        assert total == 4096
        assert pre.task.optimizer.lr * total / pre.task.lr_scaling.base_batch_size == pytest.approx(1e-3)

        ft = compose_config([f"experiment=paper/table8_swin_t_{variant}", "paths.run_dir=unused",
                             f"in22k_checkpoints.{variant}=/ckpt/{variant}.ckpt"])
        OmegaConf.resolve(ft)
        assert ft.task.name == "imagenet" and ft.model.name == model and ft.data.num_classes == 1000
        assert ft.model.pretrained == f"/ckpt/{variant}.ckpt" and ft.run_name == f"table8_swin_t_{variant}-seed0"
        assert (ft.trainer.max_epochs, ft.data.img_size, ft.task.optimizer.weight_decay) == (30, 224, 1e-8)
        assert ft.data.batch_size * ft.trainer.devices == 1024
        assert ft.paper.pretrain.experiment == f"pretrain/in22k_swin_t_{variant}"
        row = table.row(ft.paper.row)
        assert row is not None and row.key == "swin_tiny_22k"
        paper = row.values[variant]
        assert dict(ft.paper.metrics) == {"val/acc1": paper["top1"], "val/acc5": paper["top5"]}


def test_table8_fine_tuning_without_its_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    from conftest import compose_config
    from tasks.common.errors import ConfigError
    from tasks.common.runner import train

    cfg = compose_config(["experiment=paper/table8_swin_t_cached", f"data.root={tmp_path}", "trainer=cpu",
                          f"paths.output_dir={tmp_path}/out", f"paths.run_dir={tmp_path}/run"])
    with pytest.raises(ConfigError, match=r"in22k_checkpoints.cached is not set: pass in22k_checkpoints.cached=PATH, "
                                          r"the checkpoints/last.ckpt of the run `python train.py "
                                          r"experiment=pretrain/in22k_swin_t_cached`"):
        train(cfg)


def test_sweep_table8_runs_pretraining_then_fine_tuning() -> None:
    import subprocess

    def sweep(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "scripts/sweep.py", "--table", "8", "--dry-run", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    pre = sweep("--stage", "pretrain", "data.root=/in22k")
    assert pre.returncode == 0, pre.stderr
    assert pre.stdout.splitlines()[0].split()[1:] == [
        "train.py", "-m", "experiment=pretrain/in22k_swin_t_baseline,pretrain/in22k_swin_t_cached", "seed=0",
        "sweep_name=table8_pretrain", "ckpt_path=last", "hydra/launcher=slurm_8gpu", "trainer.devices=8",
        "trainer.num_nodes=1", "data.root=/in22k"]
    ft = sweep("in22k_checkpoints.baseline=/b.ckpt", "in22k_checkpoints.cached=/c.ckpt")
    assert ft.returncode == 0, ft.stderr
    assert ft.stdout.splitlines()[0].split()[1:] == [
        "train.py", "-m", "experiment=paper/table8_swin_t_baseline,paper/table8_swin_t_cached", "seed=0,1,2",
        "sweep_name=table8", "ckpt_path=last", "hydra/launcher=slurm_8gpu", "trainer.devices=8", "trainer.num_nodes=1",
        "in22k_checkpoints.baseline=/b.ckpt", "in22k_checkpoints.cached=/c.ckpt"]
    assert ft.stdout.splitlines()[1].startswith("SLURM per job:")  # the resources each job asks for
    missing = sweep("in22k_checkpoints.cached=/c.ckpt")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip() == (
        "error: Table 8 fine-tunes pre-trained checkpoints: pass in22k_checkpoints.baseline=PATH (each the "
        "checkpoints/last.ckpt of its pre-training run, from `python scripts/sweep.py --table 8 --stage pretrain`).")


def test_table8_experiment_files_compare_against_the_paper(tmp_path: Path) -> None:
    from conftest import CONFIG_DIR

    runs = []
    for path, acc in ((CONFIG_DIR / "experiment" / "paper" / "table8_swin_t_baseline.yaml", 80.0),
                      (CONFIG_DIR / "experiment" / "paper" / "table8_swin_t_cached.yaml", 81.0)):
        paper = yaml.safe_load(path.read_text())["paper"]
        runs.append(Run(path=tmp_path / path.stem, config={"seed": 0, "paper": paper},
                        history={"val/acc1": [acc], "val/acc5": [95.0]}))
    c = compare_runs(runs, tolerance=10.0)
    rows = {r.metric: r for r in c.tables[0].rows}
    assert c.tables[0].table.id == 8 and rows["val/acc1"].row == "swin_tiny_22k"
    assert rows["val/acc1"].paper_gain == pytest.approx(0.8) and rows["val/acc1"].ours_gain == pytest.approx(1.0)
