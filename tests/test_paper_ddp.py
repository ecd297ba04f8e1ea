"""Multi-process correctness of the training framework with 2 CPU processes (DDP over gloo).

One real ``train.py`` run with ``trainer=ddp_sim`` and a probe callback (:class:`DDPProbe`, added
through ``+callbacks.probe``) that writes, from EVERY rank, what must agree or differ across ranks:

* the GRC caches after training: identical on every rank for ``grc.sync=mean`` (and different for
  ``grc.sync=none``, checked by a second run);
* the training sampler's indices (repeated augmentation: each rank gets its own share) and the
  validation shard (disjoint, together exactly the validation set, no padding duplicates);
* the number of validation images each rank scored (sums to the validation set);
* the logged val/acc1, which must equal an accuracy recomputed from per-rank correct counts
  (torchmetrics synchronises across ranks);
* which ranks actually wrote checkpoint files (rank 0 only).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover
    pl = None

REPO = Path(__file__).resolve().parents[1]
STANDIN = REPO / "data" / "standin"

pytestmark = pytest.mark.slow


class DDPProbe(pl.Callback if pl is not None else object):  # type: ignore[misc]
    """Records per-rank facts into ``<run_dir>/probe/rank<r>.pt`` (used by the tests below)."""

    def __init__(self) -> None:
        self.saves: list[str] = []
        self.val_seen = 0
        self.val_correct = 0

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        io = trainer.strategy.checkpoint_io
        original = io.save_checkpoint

        def recording_save(checkpoint: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
            self.saves.append(str(path))
            return original(checkpoint, path, *args, **kwargs)
        io.save_checkpoint = recording_save

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking:
            return
        x, y = batch[0], batch[1]
        with torch.no_grad():
            pred = pl_module(x).argmax(-1)
        self.val_seen += int(y.shape[0])
        self.val_correct += int((pred == y).sum())

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.val_seen = self.val_correct = 0

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        from cached_transformers import grc_layers

        train_sampler = trainer.train_dataloader.sampler
        base = getattr(train_sampler, "base", train_sampler)
        if hasattr(base, "set_epoch"):
            base.set_epoch(0)
        val_loader = trainer.val_dataloaders
        val_loader = val_loader[0] if isinstance(val_loader, (list, tuple)) else val_loader
        val_indices = [int(i if not isinstance(i, tuple) else i[0]) for i in val_loader.sampler]
        out = Path(trainer.default_root_dir) / "probe"
        out.mkdir(parents=True, exist_ok=True)
        torch.save({
            "rank": trainer.global_rank, "world": trainer.world_size,
            "caches": {k: v.cache.detach().cpu().clone() for k, v in grc_layers(pl_module).items()},
            "train_indices": [int(i) for i in base], "val_indices": val_indices,
            "val_seen": self.val_seen, "val_correct": self.val_correct,
            "logged_acc1": float(trainer.callback_metrics.get("val/acc1", float("nan"))),
            "saves": list(self.saves), "sampler": type(getattr(base, "base", base)).__name__,  # RunSeededEpochs wraps
        }, out / f"rank{trainer.global_rank}.pt")


def _train_ddp(out: Path, sync: str, timeout: int = 400) -> Path:
    cmd = [sys.executable, "train.py", "trainer=ddp_sim", "data=standin", "model=pvt_tiny_grc",
           f"grc.sync={sync}", f"paths.output_dir={out}", f"run_name=ddp-{sync}", "data.img_size=32",
           "data.batch_size=8", "data.num_workers=0", "data.persistent_workers=false",
           "data.repeated_aug=true", "data.num_repeats=3",
           "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.num_sanity_val_steps=0",
           "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
           "+callbacks.probe._target_=test_paper_ddp.DDPProbe"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = out / "imagenet" / f"ddp-{sync}"
    assert run_dir.is_dir(), proc.stdout[-2000:]
    return run_dir


def _load(run_dir: Path) -> list[dict]:
    probes = sorted((run_dir / "probe").glob("rank*.pt"))
    assert len(probes) == 2, f"expected one probe file per rank, found {probes}"
    return [torch.load(p, weights_only=False) for p in probes]


@pytest.fixture(scope="module")
def ddp_mean_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not STANDIN.is_dir():
        subprocess.run([sys.executable, "scripts/make_standin_imagenet.py", "--out", str(STANDIN)], cwd=REPO,
                       check=True)
    return _train_ddp(tmp_path_factory.mktemp("ddp"), "mean")


def test_caches_identical_across_ranks_with_sync_mean(ddp_mean_run: Path) -> None:
    r0, r1 = _load(ddp_mean_run)
    assert r0["world"] == r1["world"] == 2
    assert r0["caches"] and r0["caches"].keys() == r1["caches"].keys()
    for name in r0["caches"]:
        c0, c1 = r0["caches"][name], r1["caches"][name]
        assert c0.abs().sum() > 0, f"{name}: the cache was never updated"
        torch.testing.assert_close(c0, c1, rtol=0, atol=1e-6, msg=f"{name}: caches differ across ranks")


def test_samplers_and_metrics_are_rank_correct(ddp_mean_run: Path) -> None:
    r0, r1 = _load(ddp_mean_run)
    # training: repeated augmentation gives each rank its own, equally long share
    assert r0["sampler"] == "RepeatAugSampler"
    assert len(r0["train_indices"]) == len(r1["train_indices"]) > 0
    assert r0["train_indices"] != r1["train_indices"]
    # validation: disjoint shards that together are exactly the validation set (no padding)
    v0, v1 = set(r0["val_indices"]), set(r1["val_indices"])
    assert not v0 & v1
    n_val = len(v0 | v1)
    assert sorted(v0 | v1) == list(range(n_val))
    assert r0["val_seen"] + r1["val_seen"] == n_val
    # the logged accuracy is the accuracy over all ranks' images (torchmetrics sync), on every rank
    expected = 100.0 * (r0["val_correct"] + r1["val_correct"]) / n_val
    assert r0["logged_acc1"] == pytest.approx(expected, abs=1e-3)
    assert r1["logged_acc1"] == pytest.approx(expected, abs=1e-3)


def test_only_rank_zero_writes_checkpoints_and_logs(ddp_mean_run: Path) -> None:
    r0, r1 = _load(ddp_mean_run)
    assert r0["saves"], "rank 0 wrote no checkpoint"
    assert r1["saves"] == [], f"rank 1 wrote checkpoints: {r1['saves']}"
    ckpts = sorted(p.name for p in (ddp_mean_run / "checkpoints").iterdir())
    assert ckpts == ["best.ckpt", "last.ckpt"], ckpts
    assert sorted(p.name for p in (ddp_mean_run / "csv").glob("*.csv")) == ["metrics.csv"]
    # one run directory: the second process did not create its own
    assert sorted(p.name for p in ddp_mean_run.parent.iterdir()) == [ddp_mean_run.name]


def test_caches_differ_across_ranks_with_sync_none(tmp_path: Path, ddp_mean_run: Path) -> None:
    r0, r1 = _load(_train_ddp(tmp_path, "none"))
    differing = [n for n in r0["caches"] if not torch.allclose(r0["caches"][n], r1["caches"][n], atol=1e-6)]
    assert differing, "with grc.sync=none each rank should keep its own cache"
