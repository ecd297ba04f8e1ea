"""State of the SLURM jobs of a sweep (``python scripts/sweep.py --status multirun/table<N>``).

The SLURM launcher (``hydra_plugins/ct_slurm_launcher``) writes ``<sweep dir>/slurm_jobs.tsv`` at
submission: job id, Hydra job number, overrides (one line per job and submission; a resubmitted
sweep appends). States come from ``sacct`` (needs SLURM accounting) and, where that fails, ``squeue``
(which only knows pending and running jobs).
"""
from __future__ import annotations

import csv
import subprocess
from dataclasses import dataclass
from pathlib import Path

JOBS_FILE = "slurm_jobs.tsv"


class StatusError(ValueError):
    """A user-fixable problem (no job list in that folder, no SLURM commands)."""


@dataclass
class JobState:
    job_id: str
    job_num: int
    overrides: str
    state: str = "UNKNOWN"
    elapsed: str = ""
    exit_code: str = ""


def read_jobs(sweep_dir: str | Path) -> list[JobState]:
    """The newest submission of each Hydra job of the sweep, by job number."""
    path = Path(sweep_dir) / JOBS_FILE
    if not path.is_file():
        raise StatusError(f"{path} does not exist: pass the sweep folder of a SLURM sweep "
                          f"(e.g. multirun/table1), as printed when it was submitted.")
    jobs: dict[int, JobState] = {}
    with path.open() as f:
        for row in csv.DictReader(f, delimiter="\t"):
            jobs[int(row["job_num"])] = JobState(row["job_id"], int(row["job_num"]), row.get("overrides") or "")
    return [jobs[k] for k in sorted(jobs)]


def _run(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def query_states(jobs: list[JobState]) -> str:
    """Fill in each job's state; returns the source (``sacct``, ``squeue`` or ``none``)."""
    if not jobs:
        return "none"
    by_id = {j.job_id: j for j in jobs}
    ids = ",".join(by_id)
    out = _run(["sacct", "-X", "-n", "-P", "-j", ids, "-o", "JobID,State,Elapsed,ExitCode"])
    if out is not None:
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) >= 4 and parts[0] in by_id:  # the last line of a job id is its newest attempt
                job = by_id[parts[0]]
                job.state, job.elapsed, job.exit_code = parts[1].split()[0], parts[2], parts[3]
        return "sacct"
    out = _run(["squeue", "-h", "-j", ids, "-o", "%i|%T|%M"])
    if out is None:
        raise StatusError("Neither sacct nor squeue answered: run this on a machine of the cluster "
                          "(where the SLURM commands work).")
    for job in jobs:
        job.state = "NOT IN QUEUE (finished? sacct unavailable)"
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) >= 3 and parts[0] in by_id:
            by_id[parts[0]].state, by_id[parts[0]].elapsed = parts[1], parts[2]
    return "squeue"


def format_status(sweep_dir: str | Path, jobs: list[JobState], source: str) -> str:
    lines = [f"{len(jobs)} job(s) of {sweep_dir} (states from {source}):",
             f"{'job id':<14} {'job':>4}  {'state':<12} {'elapsed':>10}  overrides"]
    for j in jobs:
        lines.append(f"{j.job_id:<14} {j.job_num:>4}  {j.state:<12} {j.elapsed:>10}  {j.overrides}")
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j.state] = counts.get(j.state, 0) + 1
    lines.append("total: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(lines)
