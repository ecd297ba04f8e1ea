"""Sweeps, comparison with the paper and the analysis figures on REAL (tiny) training runs.

A module-scoped fixture runs ``scripts/sweep.py --table 1 --rows pvt_tiny --seeds 0,1 --launcher local``
with stand-in data at 32 px for two training steps: four real runs (baseline and cached, two seeds)
that carry the experiment files' ``paper:`` blocks. The tests compare them with the paper, add broken
copies (missing metric, corrupt CSV, missing config), and draw the figures from their checkpoints.
"""
from __future__ import annotations

import csv
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STANDIN = REPO / "data" / "standin"
# the experiment files pin the ImageNet recipe (1000 classes, 8 devices, bf16): undo what CPU runs cannot use
TINY = ["data=standin", "trainer=cpu", "data.num_classes=10", "trainer.devices=1", "trainer.precision=32-true",
        "data.img_size=32", "data.batch_size=8", "data.num_workers=0",
        "data.persistent_workers=false", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=2", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "hydra.sweep.subdir=job${hydra.job.num}"]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MPLBACKEND="Agg")


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _ensure_standin() -> None:
    if not (STANDIN / "val").is_dir():
        subprocess.run([sys.executable, "scripts/make_standin_imagenet.py", "--out", str(STANDIN)], cwd=REPO,
                       check=True, env=_env())


def _last(path: Path, metric: str) -> float:
    with path.open() as f:
        values = [float(r[metric]) for r in csv.DictReader(f) if r.get(metric)]
    return values[-1]


@pytest.fixture(scope="module")
def table1_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """{variant: [run dirs]} of a real two-seed Table 1 PVT-Tiny sweep on the stand-in data."""
    _ensure_standin()
    root = tmp_path_factory.mktemp("paper_runs")
    proc = _run([sys.executable, "scripts/sweep.py", "--table", "1", "--rows", "pvt_tiny", "--seeds", "0,1",
                 "--launcher", "local", *TINY, f"paths.multirun_dir={root}"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].endswith(f"paths.multirun_dir={root}")  # the exact command, printed first
    runs: dict[str, list[Path]] = {}
    for cfg_file in sorted(root.rglob(".hydra/config.yaml")):
        cfg = yaml.safe_load(cfg_file.read_text())
        runs.setdefault(cfg["paper"]["variant"], []).append(cfg_file.parent.parent)
    assert sorted(runs) == ["baseline", "cached"] and all(len(v) == 2 for v in runs.values()), runs
    return runs


def test_sweep_dry_run_prints_one_multirun_for_the_whole_table() -> None:
    proc = _run([sys.executable, "scripts/sweep.py", "--table", "1", "--seeds", "0,1,2", "--dry-run",
                 "trainer.max_epochs=300"])
    assert proc.returncode == 0, proc.stderr
    line, resources = proc.stdout.strip().splitlines()
    assert resources.startswith("SLURM per job:")  # what each job asks for, printed under the command
    args = line.split()
    assert args[1:3] == ["train.py", "-m"]
    experiments = next(a for a in args if a.startswith("experiment=")).split("=", 1)[1].split(",")
    assert "paper/table1_pvt_tiny_baseline" in experiments and "paper/table1_pvt_tiny_cached" in experiments
    assert len(experiments) % 2 == 0 and len(experiments) >= 2
    for expected in ("seed=0,1,2", "sweep_name=table1", "ckpt_path=last", "hydra/launcher=slurm_8gpu",
                     "trainer.devices=8", "trainer.num_nodes=1"):
        assert expected in args, (expected, line)
    assert args[-1] == "trainer.max_epochs=300"


def test_compare_real_runs_with_broken_ones(table1_runs: dict[str, list[Path]], tmp_path: Path) -> None:
    good = table1_runs["baseline"][0]
    no_metric = tmp_path / "broken" / "no_metric"
    shutil.copytree(good, no_metric, ignore=shutil.ignore_patterns("checkpoints"))
    with (good / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    keep = [k for k in rows[0] if not k.startswith("val/acc1")]
    with (no_metric / "csv" / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keep, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    corrupt = tmp_path / "broken" / "corrupt_csv"
    shutil.copytree(good, corrupt, ignore=shutil.ignore_patterns("checkpoints"))
    with (corrupt / "csv" / "metrics.csv").open("a") as f:
        f.write("0,1,\x00garbage,with,too,many,fields,1,2,3,4,5,6,7,8,9\n")
    no_config = tmp_path / "broken" / "no_config"
    shutil.copytree(good, no_config, ignore=shutil.ignore_patterns("checkpoints", ".hydra"))

    out_md, out_png = tmp_path / "comparison.md", tmp_path / "comparison.png"
    sweep_root = table1_runs["baseline"][0].parent
    proc = _run([sys.executable, "scripts/compare.py", str(sweep_root), str(tmp_path / "broken"),
                 "--tolerance", "0.5", "--out", str(out_md), "--png", str(out_png)])
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert out_md.read_text() == text.rstrip("\n") + "\n" or out_md.read_text() in text
    assert "### Table 1: ImageNet-1k classification" in text
    assert out_png.stat().st_size > 1000

    def stat(variant: str) -> str:
        vals = [_last(d / "csv" / "metrics.csv", "val/acc1") for d in table1_runs[variant]]
        return f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f} (n=2)"
    line = next(ln for ln in text.splitlines() if ln.startswith("| PVT-Tiny | val/acc1 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2:6] == ["75.10", stat("baseline"), "78.40", stat("cached")], line
    assert cells[6] == "+3.30"
    assert cells[8].startswith("no (")  # two steps on the stand-in do not reproduce ImageNet
    assert any(ln.startswith("| PVT-Tiny | val/acc5 |") for ln in text.splitlines())
    broken = text.split("### Broken runs", 1)[1]
    assert f"`{no_metric}`: missing metric val/acc1" in broken
    assert f"`{corrupt}`: corrupt metrics.csv (line" in broken
    assert f"`{no_config}`: missing config .hydra/config.yaml" in broken
    assert "Compared 5 run(s)" in text  # 4 good + the one without val/acc1 (reported broken)


def test_runs_without_paper_block_are_other_runs(table1_runs: dict[str, list[Path]], tmp_path: Path) -> None:
    src = table1_runs["cached"][1]
    other = tmp_path / "other" / "run"
    shutil.copytree(src, other, ignore=shutil.ignore_patterns("checkpoints"))
    cfg_file = other / ".hydra" / "config.yaml"
    cfg = yaml.safe_load(cfg_file.read_text())
    cfg["paper"] = None
    cfg_file.write_text(yaml.safe_dump(cfg))
    proc = _run([sys.executable, "scripts/compare.py", str(tmp_path / "other"), "--reduce", "best"])
    assert proc.returncode == 0, proc.stderr
    assert "### Other runs (no `paper:` block)" in proc.stdout
    acc = _last(other / "csv" / "metrics.csv", "val/acc1")
    assert f"| imagenet | pvt_tiny_grc | 1 | {cfg['seed']} | {acc:.2f} (n=1) |" in proc.stdout
    assert "### Table" not in proc.stdout


def test_figures_from_real_checkpoints(table1_runs: dict[str, list[Path]], tmp_path: Path) -> None:
    cached = table1_runs["cached"][0] / "checkpoints" / "last.ckpt"
    baseline = table1_runs["baseline"][0] / "checkpoints" / "last.ckpt"
    fig5, fig4 = tmp_path / "fig5.png", tmp_path / "fig4.png"
    proc = _run([sys.executable, "scripts/figures.py", "lambda", "--ckpt", str(cached), "--out", str(fig5)])
    assert proc.returncode == 0, proc.stderr
    assert "8 GRC layers" in proc.stdout and fig5.stat().st_size > 1000
    images = sorted((STANDIN / "val").glob("*/*"))[:2]
    proc = _run([sys.executable, "scripts/figures.py", "branches", "--ckpt", str(cached), "--images",
                 *map(str, images), "--layer", "middle", "--out", str(fig4)])
    assert proc.returncode == 0, proc.stderr
    assert "GRC layer block3.0.attn" in proc.stdout and fig4.stat().st_size > 1000
    for figure in (["lambda"], ["branches", "--model", "pvt_tiny_grc", "--images", str(images[0])]):
        proc = _run([sys.executable, "scripts/figures.py", *figure, "--ckpt", str(baseline),
                     "--out", str(tmp_path / "no.png")])
        assert proc.returncode == 2
        assert "error:" in proc.stderr and "GRC" in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "no.png").exists()


@pytest.mark.slow
def test_submitit_local_two_job_sweep_end_to_end(tmp_path: Path) -> None:
    _ensure_standin()
    proc = _run([sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", "seed=0,1",
                 "model=pvt_tiny", "sweep_name=local", *TINY, "data.batch_size=4", f"paths.multirun_dir={tmp_path}"],
                timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for job in (0, 1):
        run = tmp_path / "local" / f"job{job}"
        assert (run / "csv" / "metrics.csv").is_file(), sorted(p.name for p in tmp_path.rglob("*"))[:50]
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["seed"] == job
        assert _last(run / "csv" / "metrics.csv", "val/acc1") >= 0
