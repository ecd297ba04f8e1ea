"""SLURM launching through Hydra's submitit launcher, against fake SLURM commands.

``tests/fake_sbatch/`` holds fake ``sbatch`` (records the script and arguments into
``$FAKE_SLURM_DIR`` and prints ``Submitted batch job 1234``), ``sacct`` (reports every job FAILED so
the waiting launcher returns at once), ``srun``/``scancel``/``scontrol``/``squeue``. The real
``python train.py -m ... hydra/launcher=slurm_*`` runs in a subprocess with those first on PATH; the
tests read what was submitted: the ``#SBATCH`` lines, and each array task's Hydra overrides from
the submitit pickles (the command line every job will run).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKE = REPO / "tests" / "fake_sbatch"
sys.path.insert(0, str(REPO))

from tasks.paper.sweep import SweepError, build_sweep_command, launcher_resources, paper_experiments  # noqa: E402

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover
    pl = None


class RequeueProbe(pl.Callback if pl is not None else object):  # type: ignore[misc]
    """Plays SLURM inside a job: SIGUSR1 (the pre-timeout signal) at step 1, then a hard kill at step 2.

    Does nothing once ``marker`` exists, so the requeued run trains normally.
    """

    def __init__(self, marker: str) -> None:
        self.marker = Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if self.marker.exists():
            return
        if trainer.global_step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        elif trainer.global_step == 2:
            self.marker.write_text("killed")
            os._exit(9)  # the time limit: no cleanup, no checkpoint


def _submit(tmp_path: Path, args: list[str], n_jobs: int = 2, extra_env: dict[str, str] | None = None
            ) -> tuple[list[str], str, Path]:
    """Run ``train.py -m <args>`` against the fake SLURM; return (sbatch scripts, output, sweep dir).

    The launcher would wait for the jobs' results; it is stopped as soon as the array is submitted
    and every job's pickle is in place (or after 120 s).
    """
    record = tmp_path / "sbatch_calls"
    sweep = tmp_path / "multirun"
    env = dict(os.environ, PATH=f"{FAKE}{os.pathsep}{os.environ['PATH']}", FAKE_SLURM_DIR=str(record),
               OMP_NUM_THREADS="1", SBATCH_PARTITION="gpu-test", SBATCH_ACCOUNT="proj42")
    env.pop("SBATCH_QOS", None)
    env.pop("SBATCH_CONSTRAINT", None)
    env.update(extra_env or {})
    cmd = [sys.executable, "train.py", "-m", *args, f"paths.multirun_dir={sweep}"]
    log = tmp_path / "launcher.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if list(record.glob("*.sh")) and len(list(sweep.rglob("*_submitted.pkl"))) >= n_jobs:
                time.sleep(0.5)
                break
            time.sleep(0.2)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    scripts = [p.read_text() for p in sorted(record.glob("*.sh"))] if record.is_dir() else []
    return scripts, log.read_text(), sweep


def _sbatch(script: str) -> dict[str, str]:
    out = {}
    for m in re.finditer(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.M):
        out[m.group(1)] = m.group(2) if m.group(2) is not None else "true"
    return out


def _job_overrides(sweep_root: Path) -> list[list[str]]:
    """The Hydra overrides of each submitted array task (from submitit's pickles), by task id."""
    found = []
    for pkl in sweep_root.rglob("*_submitted.pkl"):
        delayed = pickle.loads(pkl.read_bytes())
        found.append((int(delayed.args[2]), list(delayed.args[0])))
    return [o for _, o in sorted(found)]


def test_slurm_8gpu_two_job_sweep_sbatch_lines(tmp_path: Path) -> None:
    scripts, output, sweep = _submit(tmp_path, [
        "seed=0,1", "sweep_name=t", "ckpt_path=last", "hydra/launcher=slurm_8gpu",
        "trainer.devices=8", "trainer.num_nodes=1"])
    assert len(scripts) == 1, f"expected one sbatch call (a job array), got {len(scripts)}:\n{output[-3000:]}"
    flags = _sbatch(scripts[0])
    assert flags["array"] == "0-1%2"                     # two jobs, one array
    assert flags["nodes"] == "1"
    assert flags["gpus-per-node"] == "8"
    assert flags["ntasks-per-node"] == "8"               # one process per GPU (Lightning SLURMEnvironment)
    assert flags["cpus-per-task"] == "10"
    assert flags["time"] == "2880"
    assert flags["partition"] == "gpu-test"              # from $SBATCH_PARTITION
    assert flags["account"] == "proj42"
    assert flags["signal"] == "USR1@120"                 # Lightning's requeue signal, not submitit's USR2
    assert flags["requeue"] == "true"
    assert "qos" not in flags and "constraint" not in flags
    assert "srun" in scripts[0] and "submitit.core._submit" in scripts[0]
    assert "export OMP_NUM_THREADS=10" in scripts[0]
    # deterministic sweep folder (no timestamps) and every job's command line
    assert (sweep / "t" / "multirun.yaml").is_file()
    jobs = _job_overrides(sweep / "t")
    assert len(jobs) == 2
    for seed, overrides in enumerate(jobs):
        assert f"seed={seed}" in overrides
        assert {"ckpt_path=last", "trainer.devices=8", "trainer.num_nodes=1"} <= set(overrides)


def test_slurm_multinode_and_site_settings(tmp_path: Path) -> None:
    scripts, output, _ = _submit(tmp_path, [
        "seed=0,1", "sweep_name=mn", "hydra/launcher=slurm_multinode", "hydra.launcher.nodes=3",
        "hydra.launcher.timeout_min=600", "trainer.devices=8", "trainer.num_nodes=3"],
        n_jobs=2, extra_env={"SBATCH_CONSTRAINT": "a100", "CT_SLURM_SETUP": "module load cuda/12.4"})
    assert len(scripts) == 1, output[-3000:]
    flags = _sbatch(scripts[0])
    assert (flags["nodes"], flags["gpus-per-node"], flags["ntasks-per-node"]) == ("3", "8", "8")
    assert flags["time"] == "600"
    assert flags["constraint"] == "a100"
    assert "module load cuda/12.4" in scripts[0]


def test_slurm_1gpu_defaults(tmp_path: Path) -> None:
    scripts, output, _ = _submit(tmp_path, ["seed=0,1", "sweep_name=one", "hydra/launcher=slurm_1gpu"])
    assert len(scripts) == 1, output[-3000:]
    flags = _sbatch(scripts[0])
    assert (flags["nodes"], flags["gpus-per-node"], flags["ntasks-per-node"]) == ("1", "1", "1")
    assert flags["signal"] == "USR1@120" and flags["time"] == "1440"


def test_launcher_resources_follow_the_defaults_chain() -> None:
    assert launcher_resources("slurm_1gpu") == (1, 1)
    assert launcher_resources("slurm_8gpu") == (8, 1)
    assert launcher_resources("slurm_multinode") == (8, 2)
    assert launcher_resources("slurm_multinode", ["hydra.launcher.nodes=4"]) == (8, 4)
    assert launcher_resources("submitit_local") is None
    with pytest.raises(SweepError, match="Unknown launcher"):
        launcher_resources("slurm_nope")


def test_sweep_unknown_table_lists_tables_with_experiments() -> None:
    have = sorted(paper_experiments())
    proc = subprocess.run([sys.executable, "scripts/sweep.py", "--table", "9", "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "No experiment files for table 9" in proc.stderr
    assert f"Tables with experiment files: {', '.join(map(str, have)) or 'none'}" in proc.stderr
    with pytest.raises(SweepError, match="--table must be a number"):
        build_sweep_command("one")


@pytest.mark.slow
def test_requeue_is_owned_by_lightning_and_resumes(tmp_path: Path) -> None:
    """Submit a two-job array (fake sbatch), then run task 0 twice the way SLURM would (submitit's entry point,
    SLURM variables set): the first run gets SIGUSR1 and is killed; Lightning must have written
    hpc_ckpt_1.ckpt and called `scontrol requeue`; the second run must resume from that file."""
    standin = REPO / "data" / "standin"
    if not (standin / "val").is_dir():
        subprocess.run([sys.executable, "scripts/make_standin_imagenet.py", "--out", str(standin)], cwd=REPO,
                       check=True)
    marker = tmp_path / "killed_once"
    scripts, output, sweep = _submit(tmp_path, [
        "seed=0,1", "sweep_name=rq", "ckpt_path=last", "hydra/launcher=slurm_1gpu", "trainer.devices=1",
        "trainer.num_nodes=1", "data=standin", "model=pvt_tiny_grc", "data.img_size=32", "data.batch_size=8",
        "data.num_workers=0", "data.persistent_workers=false", "trainer.max_epochs=1", "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "hydra.sweep.subdir=job${hydra.job.num}",
        "+callbacks.probe._target_=test_paper_slurm.RequeueProbe",
        f"+callbacks.probe.marker={marker}"], n_jobs=2)
    assert len(scripts) == 1, output[-3000:]
    folder = next(sweep.rglob("1234_0_submitted.pkl")).parent.parent / "%j"
    slurm_env = {"SLURM_JOB_ID": "1234", "SLURM_ARRAY_JOB_ID": "1234", "SLURM_ARRAY_TASK_ID": "0",
                 "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1",
                 "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "train",
                 "SLURM_JOB_NODELIST": "localhost", "SLURM_NODELIST": "localhost", "SUBMITIT_EXECUTOR": "slurm"}
    env = dict(os.environ, **slurm_env, PATH=f"{FAKE}{os.pathsep}{os.environ['PATH']}",
               FAKE_SLURM_DIR=str(tmp_path / "sbatch_calls"), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    job = [sys.executable, "-u", "-m", "submitit.core._submit", str(folder)]
    first = subprocess.run(job, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 9 and marker.exists(), first.stdout[-3000:] + first.stderr[-3000:]
    (run_dir,) = [p.parent.parent for p in (sweep / "rq").rglob(".hydra/config.yaml")]
    assert sorted(p.name for p in run_dir.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_1.ckpt"]
    assert (tmp_path / "sbatch_calls" / "scontrol.log").read_text().split() == ["requeue", "1234_0"]
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()
    second = subprocess.run(job, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    result = json.loads((run_dir / "results.json").read_text())
    assert result["resumed_from"] == str(run_dir / "hpc_ckpt_1.ckpt")
    assert result["global_step"] == 4
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "sbatch_calls" / "scontrol.log").read_text().count("requeue") == 1
