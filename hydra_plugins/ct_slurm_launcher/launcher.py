"""Hydra's submitit SLURM launcher (``hydra/launcher=slurm_*``) with three additions.

* **Job list.** After submitting, it writes ``<sweep dir>/slurm_jobs.tsv`` (SLURM job id, Hydra job
  number, job overrides), which ``python scripts/sweep.py --status <sweep dir>`` reads.
* **Detached mode.** With ``CT_SLURM_DETACH=1`` in the environment (``scripts/sweep.py --detach``
  sets it) ``train.py -m`` returns as soon as the jobs are submitted instead of waiting for them; the
  jobs run on, and ``scripts/compare.py <sweep dir>`` collects their results whenever they are done.
* **Early requeue signal.** Inside the job, before Hydra and the task are even loaded, the launcher's
  requeue signal (``additional_parameters.signal``, e.g. ``USR1@120``) is caught and remembered
  (:mod:`tasks.common.requeue`), so a signal that SLURM sends during start-up does not kill the task.
"""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any, Sequence
from unittest import mock

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurmLauncher

from tasks.common import requeue
from tasks.paper.sweep_status import JOBS_FILE  # one name for the writer (here) and the reader

log = logging.getLogger(__name__)

DETACH_ENV = "CT_SLURM_DETACH"


class _Submitted(Exception):
    """Raised after submission in detached mode, so that the plugin does not wait for the jobs."""


def requeue_signal_of(params: dict[str, Any]) -> int:
    """The signal named by ``additional_parameters.signal`` (``[B:]USR1@120`` -> SIGUSR1)."""
    value = str((params.get("additional_parameters") or {}).get("signal") or "USR1@120")
    name = value.split("@")[0].split(":")[-1].upper()
    return int(getattr(signal, name if name.startswith("SIG") else f"SIG{name}", signal.SIGUSR1))


class SlurmLauncher(_SubmititSlurmLauncher):
    """``hydra_plugins...SlurmLauncher`` + job list, detached mode, early requeue signal (module doc)."""

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:  # runs inside the SLURM job
        requeue.catch_signal(requeue_signal_of(self.params))
        return super().__call__(*args, **kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        detach = os.environ.get(DETACH_ENV, "").lower() in ("1", "true", "yes")
        submitted: list[Any] = []
        map_array = submitit.AutoExecutor.map_array

        def record(executor: Any, fn: Any, *iterables: Any) -> list[Any]:
            jobs = map_array(executor, fn, *iterables)
            submitted.extend(jobs)
            self._write_jobs(jobs, job_overrides, initial_job_idx)
            if detach:
                raise _Submitted
            return jobs

        with mock.patch.object(submitit.AutoExecutor, "map_array", record):
            try:
                return super().launch(job_overrides, initial_job_idx)
            except _Submitted:
                pass
        ids = ", ".join(j.job_id for j in submitted)
        log.info("Detached: submitted %d job(s) (%s); they run on without this process. Status: "
                 "python scripts/sweep.py --status %s; results: python scripts/compare.py %s",
                 len(submitted), ids, self.config.hydra.sweep.dir, self.config.hydra.sweep.dir)
        return [JobReturn(overrides=list(o), status=JobStatus.COMPLETED, _return_value=j.job_id)
                for o, j in zip(job_overrides, submitted)]

    def _write_jobs(self, jobs: Sequence[Any], job_overrides: Sequence[Sequence[str]], first: int) -> None:
        path = Path(str(self.config.hydra.sweep.dir)) / JOBS_FILE
        lines = [] if not path.is_file() else path.read_text().splitlines()
        if not lines:
            lines.append("job_id\tjob_num\toverrides")
        for i, (job, overrides) in enumerate(zip(jobs, job_overrides)):
            lines.append(f"{job.job_id}\t{first + i}\t{' '.join(overrides)}")
        path.write_text("\n".join(lines) + "\n")
