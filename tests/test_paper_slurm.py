"""SLURM launching through Hydra's submitit launcher, against fake SLURM commands (fast, no daemons):
what each preset puts into the sbatch script. The real path (time limit, requeue, resume, DDP) is in
tests/test_slurm_real.py, against a real SLURM.

``tests/fake_sbatch/`` holds fake ``sbatch`` (records the script and arguments into
``$FAKE_SLURM_DIR`` and prints ``Submitted batch job 1234``), ``sacct`` (reports every job FAILED so
the waiting launcher returns at once), ``srun``/``scancel``/``scontrol``/``squeue``. The real
``python train.py -m ... hydra/launcher=slurm_*`` runs in a subprocess with those first on PATH; the
tests read what was submitted: the ``#SBATCH`` lines, and each array task's Hydra overrides from
the submitit pickles (the command line every job will run).
"""
from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKE = REPO / "tests" / "fake_sbatch"
sys.path.insert(0, str(REPO))

from tasks.paper.sweep import SweepError, build_sweep_command, launcher_resources, paper_experiments  # noqa: E402


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
    assert flags["signal"] == "USR1@120"                 # the framework's requeue signal, not submitit's USR2
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


def test_slurm_cpu_tasks_follow_devices_and_no_gpu_line(tmp_path: Path) -> None:
    """CPU jobs: no --gpus-per-node, one task per trainer.devices (2-rank DDP over gloo)."""
    scripts, output, _ = _submit(tmp_path, ["seed=0,1", "sweep_name=cpu", "hydra/launcher=slurm_cpu", "trainer=ddp_sim"])
    assert len(scripts) == 1, output[-3000:]
    flags = _sbatch(scripts[0])
    assert "gpus-per-node" not in flags and "gres" not in flags
    assert (flags["nodes"], flags["ntasks-per-node"], flags["cpus-per-task"]) == ("1", "2", "2")
    assert flags["signal"] == "USR1@120" and flags["requeue"] == "true"


def test_zero_gpus_gives_one_task_per_device_not_zero(tmp_path: Path) -> None:
    scripts, output, _ = _submit(tmp_path, ["seed=0,1", "sweep_name=zero", "hydra/launcher=slurm_1gpu",
                                            "hydra.launcher.gpus_per_node=0", "trainer=cpu"])
    assert len(scripts) == 1, output[-3000:]
    assert _sbatch(scripts[0])["ntasks-per-node"] == "1"


def test_sweep_dry_run_prints_the_resources(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "scripts/sweep.py", "--table", "1", "--rows", "pvt_tiny", "--seeds", "0",
                           "--launcher", "slurm_8gpu", "--dry-run", "hydra.launcher.mem_gb=200"], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, SBATCH_PARTITION="gpu-test", SBATCH_ACCOUNT="proj42"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1] == ("SLURM per job: partition=gpu-test account=proj42 nodes=1 tasks/node=8 "
                                           "CPUs/task=10 memory=200 GB/node GPUs/node=8 time=2880 min")
    local = subprocess.run([sys.executable, "scripts/sweep.py", "--table", "1", "--launcher", "local", "--detach",
                            "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert local.returncode == 2 and "--detach needs a SLURM launcher" in local.stderr
    missing = subprocess.run([sys.executable, "scripts/sweep.py", "--status", str(tmp_path)], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "slurm_jobs.tsv does not exist" in missing.stderr


def test_launcher_resources_follow_the_defaults_chain() -> None:
    assert launcher_resources("slurm_cpu") == (0, 1)
    assert launcher_resources("slurm_1gpu", ["hydra.launcher.gpus_per_node=null"]) == (0, 1)
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


def test_requeue_helpers_read_the_slurm_environment() -> None:
    import signal

    from hydra_plugins.ct_slurm_launcher.launcher import requeue_signal_of
    from tasks.common import requeue

    assert requeue.slurm_job_id({"SLURM_JOB_ID": "77", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3"}) == "70_3"
    assert requeue.slurm_job_id({"SLURM_JOB_ID": "77"}) == "77"
    assert requeue.slurm_job_id({}) is None
    assert requeue.restarted({"SLURM_RESTART_COUNT": "1"}) and not requeue.restarted({})
    assert requeue_signal_of({"additional_parameters": {"signal": "USR1@120"}}) == signal.SIGUSR1
    assert requeue_signal_of({"additional_parameters": {"signal": "B:USR2@60"}}) == signal.SIGUSR2
    assert requeue_signal_of({}) == signal.SIGUSR1
