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
