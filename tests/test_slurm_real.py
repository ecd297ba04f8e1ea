"""The SLURM path against a real single-node SLURM 22.05 (tests/slurm_cluster.py; skipped, with the
reason, where the Debian packages or root are missing; ``.ci/run`` installs them).

* a two-job paper sweep through ``scripts/sweep.py --detach`` with the SLURM CPU launcher: the
  command returns after submitting, ``--status`` lists the jobs, ``scripts/compare.py`` collects them;
* a job that hits its time limit (2 minutes, see ``LIMIT_MIN``; ``--signal=USR1@1``) while
  training: the framework saves ``last.ckpt`` at a step boundary and requeues it itself
  (``scontrol requeue``), SLURM restarts it, it resumes, and the run ends exactly like an
  uninterrupted one (same validation results, same final weights); the blocking launcher waits through the
  requeue and exits 0. Once for one process and once for a 2-rank CPU DDP job (gloo).

Test-side help that does not change what is tested: the first attempt sleeps after each step until
the signal came (so the run is still training at the time limit without costing CPU), and once the
job is requeued its time limit is raised to 5 minutes (so the resumed attempt is not cut again). The
test cluster kills a job 1 minute after its limit (``OverTimeLimit=1``, see tests/slurm_cluster.py).
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from slurm_cluster import LocalSlurm, unavailable_reason  # noqa: E402

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover
    pl = None

REPO = Path(__file__).resolve().parents[1]
REASON = unavailable_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

TINY = ["data=standin", "data.img_size=32", "data.batch_size=8", "data.num_workers=0",
        "data.persistent_workers=false", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "trainer.num_sanity_val_steps=0"]
SLURM_CPU = ["hydra/launcher=slurm_cpu", "hydra.launcher.mem_gb=1", "hydra.launcher.cpus_per_task=1"]
# The time limit of the first attempt. SLURM's own minimum is 1 minute, but its limit and signal checks
# run every 30 s, so with 1 minute the signal may come 29 s after the start, while two DDP ranks were
# still starting up on a loaded 2-core machine (measured: about 50 s); the run then stops before its
# first step and the resume would start from step 0. 2 minutes make the signal land mid-training.
LIMIT_MIN = 2


class SlowFirstAttempt(pl.Callback if pl is not None else object):  # type: ignore[misc]
    """Records each attempt's first step in ``<run_dir>/attempts.txt``; a fresh attempt sleeps
    ``seconds`` after every step until a stop signal arrived (long enough to meet the time limit)."""

    def __init__(self, seconds: float = 5.0) -> None:
        self.seconds = seconds
        self.fresh = True

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.fresh = trainer.global_step == 0
        if trainer.is_global_zero:
            with open(Path(trainer.default_root_dir) / "attempts.txt", "a") as f:
                f.write(f"{trainer.global_step}\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        from tasks.common.callbacks import LastCheckpoint

        signalled = any(getattr(cb, "received_signal", None) for cb in trainer.callbacks
                        if isinstance(cb, LastCheckpoint))
        if self.fresh and not signalled:
            time.sleep(self.seconds)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as c:
        yield c


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tasks.classification.standin import generate

    return generate(tmp_path_factory.mktemp("standin"), train_per_class=8, val_per_class=4, size=32)


def _env(cluster: LocalSlurm) -> dict[str, str]:
    env = cluster.client_env(dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg",
                                  PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)])))
    for key in ("SBATCH_PARTITION", "SBATCH_ACCOUNT", "SBATCH_QOS", "SBATCH_CONSTRAINT"):
        env.pop(key, None)
    return env


def _sacct(cluster: LocalSlurm, *args: str) -> list[list[str]]:
    out = cluster.run("sacct", "-X", "-n", "-P", *args, check=False).stdout
    return [line.split("|") for line in out.splitlines() if line]


def _rows(metrics_csv: Path) -> list[dict[str, str]]:
    with metrics_csv.open() as f:
        return list(csv.DictReader(f))


def _val_metrics(metrics_csv: Path) -> list[tuple]:
    """The validation results in order (values only: after a mid-epoch resume Lightning labels the
    logged rows one step off, see docs/training.md)."""
    keys = ("val/acc1", "val/acc5", "val/loss")
    return [tuple(row[k] for k in keys) for row in _rows(metrics_csv) if row.get("val/loss")]


def test_detached_two_job_sweep_status_and_compare(cluster: LocalSlurm, standin: Path, tmp_path: Path,
                                                   time_limited_jobs: dict[str, dict]) -> None:
    env = _env(cluster)
    sweep = [sys.executable, "scripts/sweep.py", "--table", "1", "--rows", "pvt_tiny", "--seeds", "0",
             "--launcher", "slurm_cpu", "--detach", *TINY, f"data.root={standin}", "trainer=cpu",
             "data.num_classes=10", "trainer.devices=1", "trainer.precision=32-true", "trainer.max_epochs=1",
             "trainer.limit_train_batches=2", "trainer.limit_val_batches=2", "hydra.launcher.mem_gb=1",
             "hydra.launcher.cpus_per_task=1", f"paths.multirun_dir={tmp_path}"]
    proc = subprocess.run(sweep, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "hydra/launcher=slurm_cpu" in lines[0]
    assert lines[1] == ("SLURM per job: partition=default account=default nodes=1 tasks/node=1 CPUs/task=1 "
                        "memory=1 GB/node GPUs/node=0 time=240 min")
    assert f"--status {tmp_path / 'table1'}" in proc.stdout
    ids = [line.split("\t")[0] for line in (tmp_path / "table1" / "slurm_jobs.tsv").read_text().splitlines()[1:]]
    assert len(ids) == 2, ids
    # the detached command returned although the jobs had not finished; they run on
    status = [sys.executable, "scripts/sweep.py", "--status", str(tmp_path / "table1")]
    deadline = time.time() + 400
    while time.time() < deadline:
        out = subprocess.run(status, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "2 job(s)" in out.stdout and all(i in out.stdout for i in ids)
        if out.stdout.splitlines()[-1] == "total: 2 COMPLETED":
            break
        assert "FAILED" not in out.stdout and "CANCELLED" not in out.stdout, out.stdout + cluster.logs()
        time.sleep(3)
    else:
        pytest.fail(f"the sweep did not finish:\n{out.stdout}\n{cluster.logs()}")
    cmp = subprocess.run([sys.executable, "scripts/compare.py", str(tmp_path / "table1")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert "PVT-Tiny" in cmp.stdout and "n=1" in cmp.stdout.replace(" ", "") or "1 seed" in cmp.stdout, cmp.stdout


def _launch_time_limited(cluster: LocalSlurm, standin: Path, out: Path, trainer: str) -> dict:
    train = [*TINY, f"data.root={standin}", "model=pvt_tiny_grc", f"trainer={trainer}", "trainer.max_steps=30",
             "trainer.deterministic=true", "trainer.log_every_n_steps=2", "seed=3"]
    log = out / "launcher.log"
    out.mkdir(parents=True, exist_ok=True)
    launcher = subprocess.Popen(
        [sys.executable, "train.py", "-m", *train, *SLURM_CPU, f"hydra.launcher.timeout_min={LIMIT_MIN}",
         "hydra.launcher.signal_delay_s=1", "ckpt_path=last", "sweep_name=tl", f"paths.multirun_dir={out}",
         "hydra.sweep.subdir=job", "+callbacks.slow._target_=test_slurm_real.SlowFirstAttempt"],
        cwd=REPO, env=_env(cluster), stdout=log.open("w"), stderr=subprocess.STDOUT)
    return {"train": train, "launcher": launcher, "log": log, "out": out, "job": None}


@pytest.fixture(scope="module")
def time_limited_jobs(cluster: LocalSlurm, standin: Path, tmp_path_factory: pytest.TempPathFactory):
    """A single-process and a 2-rank DDP job (LIMIT_MIN limit), submitted together as early as possible
    (the sweep test asks for this fixture, so both run while it runs)."""
    root = tmp_path_factory.mktemp("time_limit")
    runs = {t: _launch_time_limited(cluster, standin, root / t, t) for t in ("cpu", "ddp_sim")}
    try:
        yield runs
    finally:
        for r in runs.values():
            if r["launcher"].poll() is None:
                r["launcher"].kill()
                r["launcher"].wait()


@pytest.fixture(scope="module")
def time_limited(cluster: LocalSlurm, time_limited_jobs: dict[str, dict]) -> dict[str, dict]:
    """Waits for both jobs: each job's time limit is raised once it was requeued; the same runs without
    SLURM (the references) run while the resumed attempts do."""
    runs = time_limited_jobs
    deadline = time.time() + 400
    while time.time() < deadline and any(r["job"] is None for r in runs.values()):
        for t, r in runs.items():
            ids = (r["out"] / "tl" / "slurm_jobs.tsv")
            if r["job"] is None and ids.is_file() and len(ids.read_text().splitlines()) > 1:
                job = ids.read_text().splitlines()[1].split("\t")[0]
                if "REQUEUED" in [row[1] for row in _sacct(cluster, "-D", "-j", job, "-o", "JobID,State")]:
                    cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=5")
                    r["job"] = job
        if any(r["launcher"].poll() is not None and r["job"] is None for r in runs.values()):
            break
        time.sleep(1)
    for t, r in runs.items():  # while the resumed attempts run
        r["ref"] = subprocess.run([sys.executable, "train.py", *r["train"], f"paths.output_dir={r['out'] / 'ref'}",
                                   "run_name=ref"], cwd=REPO, env=_env(cluster), capture_output=True, text=True,
                                  timeout=400)
    for r in runs.values():
        try:
            r["launcher"].wait(timeout=max(deadline - time.time(), 1) + 200)
        except subprocess.TimeoutExpired:
            pass
        if r["job"] is not None:  # the launcher returns with the result; the step may still be ending
            for _ in range(30):
                states = [row[1] for row in _sacct(cluster, "-D", "-j", r["job"], "-o", "JobID,State")]
                if states and states[-1] not in ("RUNNING", "COMPLETING", "PENDING"):
                    break
                time.sleep(1)
            r["states"] = states
    return runs


@pytest.mark.parametrize("trainer", ["cpu", "ddp_sim"])
def test_time_limit_requeue_resumes_exactly(cluster: LocalSlurm, time_limited: dict[str, dict], trainer: str) -> None:
    r = time_limited[trainer]
    log = r["log"].read_text()
    assert r["job"] is not None, f"never requeued:\n{log[-3000:]}\n{cluster.logs()}"
    assert r["launcher"].returncode == 0, log[-3000:] + cluster.logs()
    assert r["states"][0] == "REQUEUED" and r["states"][-1] == "COMPLETED", r["states"]  # not TIMEOUT
    run = r["out"] / "tl" / "job"
    job_logs = "".join(p.read_text() for p in run.parent.glob(".submitit/*/*_log.out"))
    assert f"Requeued SLURM job {r['job']}" in (run / "train.log").read_text() + job_logs
    # each attempt starts where the previous one stopped, in the middle of the run (a resumed attempt may
    # itself be requeued if the signal reaches it before its time limit was raised)
    attempts = [int(s) for s in (run / "attempts.txt").read_text().split()]
    assert len(attempts) >= 2 and attempts[0] == 0 and attempts == sorted(set(attempts)) and attempts[-1] < 30, attempts
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert not list(run.rglob("hpc_ckpt_*.ckpt"))
    # exactly the uninterrupted run (same process count, no SLURM)
    assert r["ref"].returncode == 0, r["ref"].stdout[-3000:] + r["ref"].stderr[-3000:]
    ref_run = r["out"] / "ref" / "imagenet" / "ref"
    assert _val_metrics(run / "csv" / "metrics.csv") == _val_metrics(ref_run / "csv" / "metrics.csv")
    a = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(ref_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 30
    for k, v in b["state_dict"].items():
        assert torch.equal(a["state_dict"][k], v), k
