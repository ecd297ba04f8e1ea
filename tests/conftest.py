"""Shared test fixtures: config composition with tiny CPU limits, stand-in data, a RunIf-style skip.

Tests compose the real configs with ``hydra.initialize_config_dir`` + ``compose`` and force the CPU
(``trainer=cpu``),
tiny images (32x32), tiny batches, few steps and no worker processes, so each training run takes
seconds on a 2-core machine.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HYDRA_FULL_ERROR", "0")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterable  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import tasks.common  # noqa: E402,F401  (registers the ct_or and ct_job_dir resolvers)


def run_if(*, cuda: bool = False, min_gpus: int = 0) -> pytest.MarkDecorator:
    """Skip unless the requirements are met (``@run_if(cuda=True)``)."""
    import torch

    reasons = []
    if (cuda or min_gpus) and not torch.cuda.is_available():
        reasons.append("needs CUDA")
    elif min_gpus and torch.cuda.device_count() < min_gpus:
        reasons.append(f"needs {min_gpus} GPUs")
    return pytest.mark.skipif(bool(reasons), reason=", ".join(reasons) or "ok")


def compose_config(overrides: Iterable[str] = (), config_name: str = "train"):
    """Compose ``configs/<config_name>.yaml`` with overrides (no Hydra runtime, nothing resolved)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def tiny_overrides(data_root: Path, out: Path, *, steps: int | None = 2) -> list[str]:
    """CPU, 32x32, batch 8, no workers, no progress bar, outputs under ``out``."""
    ov = [
        "data=standin", f"data.root={data_root}", "data.img_size=32", "data.batch_size=8",
        "data.num_workers=0", "trainer=cpu", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1",
        f"paths.output_dir={out}/outputs", f"paths.run_dir={out}/run",
        "callbacks.grc_monitor.every_n_steps=1",
    ]
    if steps is not None:
        ov.append(f"trainer.max_steps={steps}")
    return ov


@pytest.fixture(scope="session")
def standin_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small stand-in data set (10 classes x 8 train / 4 val images of 32x32)."""
    from tasks.classification.standin import generate

    return generate(tmp_path_factory.mktemp("standin"), train_per_class=8, val_per_class=4, size=32)


@pytest.fixture
def tiny(standin_root: Path, tmp_path: Path):
    """``tiny(*overrides) -> DictConfig`` composed with :func:`tiny_overrides` first."""
    def make(*overrides: str, config_name: str = "train"):
        base = tiny_overrides(standin_root, tmp_path)
        if config_name != "train":  # eval.yaml has no callbacks group
            base = [o for o in base if not o.startswith("callbacks.")]
        return compose_config([*base, *overrides], config_name)
    return make
