"""A CSV logger that keeps the history of a resumed run.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts, so a run resumed with
``ckpt_path=last`` would lose everything logged before the interruption. :class:`ResumableCSVLogger`
keeps the rows logged before the checkpoint's step, drops the rows of steps that are being redone
(logged after the checkpoint was written), and starts a fresh file for a fresh run after renaming an
existing one to ``metrics.<n>.csv`` (the first free n): a log is never deleted.
"""
from __future__ import annotations

import csv
import os
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _KeepingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, keep_before_step: int | None) -> None:
        self._keep_before_step = keep_before_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = self.metrics_file_path
        if not os.path.isfile(path):
            return
        if self._keep_before_step is None:  # a fresh run in a used directory: keep the old file as metrics.<n>.csv
            n = 1
            while os.path.exists(os.path.join(os.path.dirname(path), f"metrics.{n}.csv")):
                n += 1
            os.replace(path, os.path.join(os.path.dirname(path), f"metrics.{n}.csv"))
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") in (None, "") or int(float(r["step"])) < self._keep_before_step]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = sorted(keys)


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` (same arguments) that continues ``metrics.csv`` when a run resumes.

    Set :attr:`resume_step` (the checkpoint's ``global_step``) before training starts; ``None`` means a
    fresh run.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step: int | None = None

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:  # type: ignore[override]
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _KeepingWriter(log_dir=self.log_dir, keep_before_step=self.resume_step)
        return self._experiment
