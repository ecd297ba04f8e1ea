"""Per-sample seeding of the data path: same draws everywhere, CPU generators only, and its benchmark."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import tasks.common.seeding as seeding
from tasks.common.seeding import derive_seed, seeded

CUDA_SEEDING = ("manual_seed", "manual_seed_all", "seed", "seed_all")


def _draws() -> tuple:
    return (random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.standard_normal()),
            torch.rand(3).tolist(), torch.randn(3).tolist())


def _disturb() -> None:
    """Leave every generator mid-stream, with cached normals (Python's gauss, NumPy's legacy gauss)."""
    random.gauss(0, 1)
    np.random.standard_normal()
    torch.randn(5)


def test_seeded_draws_depend_on_the_seed_only_and_restore_the_globals():
    seed = derive_seed(3, "sample", 1, 0, 17)
    with seeded(seed):
        first = _draws()
    _disturb()
    random.seed(1), np.random.seed(1), torch.default_generator.manual_seed(1)
    outside = _draws()
    random.seed(1), np.random.seed(1), torch.default_generator.manual_seed(1)
    with seeded(seed):
        assert _draws() == first
    assert _draws() == outside                     # the main process's streams continue as if untouched
    with seeded(derive_seed(3, "sample", 1, 0, 18)):
        assert _draws() != first


def test_inside_a_worker_the_draws_are_the_same_without_save_restore(monkeypatch):
    seed = derive_seed(0, "sample", 0, 0, 5)
    with seeded(seed):
        reference = _draws()
    monkeypatch.setattr(seeding, "get_worker_info", lambda: object())  # as in a DataLoader worker
    saved = []
    monkeypatch.setattr(seeding.np.random, "get_state", lambda *a: saved.append(1))
    _disturb()
    with seeded(seed):
        assert _draws() == reference
    assert not saved                               # no state copies in a worker (they cost ~70 us a sample)


def test_in_process_loader_copies_the_global_states_once_per_batch(standin_root, monkeypatch):
    """num_workers=0: the globals are as before after every batch, at one copy per batch, not per sample."""
    loader = _imagenet(standin_root, num_workers=0)
    reference = [x for x, _ in loader]
    copies = []
    real_get_state = np.random.get_state
    monkeypatch.setattr(seeding.np.random, "get_state", lambda *a: copies.append(1) or real_get_state(*a))
    random.seed(5), np.random.seed(5), torch.default_generator.manual_seed(5)
    outside = _draws()
    random.seed(5), np.random.seed(5), torch.default_generator.manual_seed(5)
    it = iter(loader)
    first = next(it)[0]
    torch.randint(10, ()), np.random.rand(), random.random()  # the training step draws in between
    batches = [first, *(x for x, _ in it)]
    monkeypatch.undo()
    assert len(batches) == 10 and len(copies) == 11         # one per batch, one for the end of the epoch
    assert all(torch.equal(a, b) for a, b in zip(batches, reference))
    random.seed(5), np.random.seed(5), torch.default_generator.manual_seed(5)
    with seeding.preserve_global_rng():
        with seeded(123):
            _draws()
    assert _draws() == outside


# ---------------------------------------------------------------------- the loaders never seed CUDA
def _record_cuda_seeding(monkeypatch, log: Path) -> None:
    """Every CUDA seeding entry point appends one line to ``log`` (also from forked workers)."""
    import torch.cuda.random

    def recorder(name):
        def record(*args, **kwargs):
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {name}\n")
        return record

    for name in CUDA_SEEDING:
        monkeypatch.setattr(torch.cuda, name, recorder(name))
        monkeypatch.setattr(torch.cuda.random, name, recorder(name))


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _imagenet(root: Path, num_workers: int):
    from tasks.classification.data import ImageNetDataModule
    from tasks.common.loader_benchmark import imagenet_data_config

    cfg = dict(imagenet_data_config(), img_size=32)  # the DeiT/PVT recipe: RandAugment, random erasing
    dm = ImageNetDataModule(str(root), batch_size=8, num_workers=num_workers, pin_memory=False,
                            persistent_workers=False, seed=3, **cfg)
    dm.setup("fit")
    return dm.train_dataloader()


@pytest.fixture(scope="module")
def listops_root(tmp_path_factory):
    from tasks.lra.listops_gen import ListOpsSpec, prepare

    root = tmp_path_factory.mktemp("listops")
    prepare(root, ListOpsSpec(num_train=40, num_val=8, num_test=8, min_length=5, max_length=30, max_depth=3),
            workers=1, show_progress=False)
    return root


def test_training_loaders_never_reach_cuda_seeding(standin_root, listops_root, tmp_path, monkeypatch):
    """``torch.manual_seed`` also seeds CUDA: per sample in a worker that costs 0.2-0.6 ms (a lazy seed with
    a recorded stack), on a GPU it is device work. The ImageNet and ListOps training loaders call none."""
    from tasks.lra.data import ListOpsDataModule

    log = tmp_path / "cuda_seeding.log"
    _record_cuda_seeding(monkeypatch, log)
    loader = _imagenet(standin_root, num_workers=0)
    assert sum(len(b[1]) for b in loader) == 80
    dm = ListOpsDataModule(str(listops_root), max_length=32, batch_size=8, cache=False)
    dm.setup("fit")
    assert sum(len(b["label"]) for b in dm.train_dataloader()) == 40
    assert _calls(log) == []
    torch.manual_seed(0)                           # the recorder sees what the old per-sample seeding did
    assert _calls(log) == ["%d manual_seed_all" % os.getpid()]


def test_workers_seed_cuda_only_at_their_start(standin_root, tmp_path, monkeypatch):
    """With worker processes the only CUDA seeding left is the DataLoader's own, once per worker."""
    log = tmp_path / "cuda_seeding.log"
    _record_cuda_seeding(monkeypatch, log)
    assert sum(len(b[1]) for b in _imagenet(standin_root, num_workers=2)) == 80
    calls = _calls(log)
    assert len(calls) <= 2 and len({c.split()[0] for c in calls}) == len(calls)


def test_augmentation_does_not_depend_on_the_worker_count(standin_root):
    """Workers skip the save/restore of the global generators; the batches stay those of the main process."""
    batches = [list(_imagenet(standin_root, num_workers=n)) for n in (0, 2)]
    assert len(batches[0]) == len(batches[1]) == 10
    for (x0, y0), (x2, y2) in zip(*batches):
        assert torch.equal(y0, y2) and torch.equal(x0, x2)


# ---------------------------------------------------------------------- benchmark code path
def test_loader_benchmark_reports_both_timings_and_the_ratio(listops_root, tmp_path, capsys):
    from tasks.common.loader_benchmark import (imagenet_loader_benchmark, listops_loader_benchmark,
                                               make_jpeg_folder, print_results)

    root = make_jpeg_folder(tmp_path / "jpegs", images=8, size=48, classes=2)
    assert len(list((root / "train").glob("*/*.JPEG"))) == 8 and len(list((root / "val").glob("*/*.JPEG"))) == 2
    results = [imagenet_loader_benchmark(root, batch_size=4, rounds=1, passes=1, img_size=32),
               listops_loader_benchmark(listops_root, batch_size=8, rounds=1, passes=1, max_length=32, clock="wall")]
    for r in results:
        assert r["framework_ms"] > 0 and r["plain_ms"] > 0
        assert r["ratio"] == pytest.approx(r["framework_ms"] / r["plain_ms"])
    assert results[0]["samples"] == 8 and results[1]["samples"] == 40
    assert [r["clock"] for r in results] == ["cpu", "wall"]
    print_results(results)
    out = capsys.readouterr().out
    assert "| imagenet |" in out and "| listops |" in out and "ratio" in out


def test_benchmark_script_data_flag_runs_the_loader_benchmark(monkeypatch):
    import importlib.util

    import tasks.common.loader_benchmark as lb

    calls = []
    monkeypatch.setattr(lb, "main", lambda argv=None: calls.append(argv))
    spec = importlib.util.spec_from_file_location("benchmark_script", Path(__file__).parents[1] / "scripts" / "benchmark.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--data"]) == 0 and calls == [[]]
