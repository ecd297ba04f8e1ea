"""Training loaders against a plain DataLoader with the same dataset work (``scripts/benchmark.py --data``).

The framework's training loaders add per-sample seeding (:mod:`tasks.common.seeding`), a resumable
sampler and a batch counter (:mod:`tasks.common.data`) on top of what a plain loader does. This
measures what that costs, in-process (``num_workers=0``, so the number is the per-sample work a
DataLoader worker does), per task:

* ImageNet: a generated folder of JPEGs (default 96 images of 400 x 400, 4 classes), the DeiT/PVT
  training transform of ``configs/data/imagenet.yaml``; ``ImageNetDataModule.train_dataloader()``
  against ``DataLoader(timm.data.ImageDataset(train, transform=dm.train_tf), shuffle=True)``.
* ListOps: generated LRA-format data; ``ListOpsDataModule.train_dataloader()`` against
  ``DataLoader(dm.datasets["train"], shuffle=True, collate_fn=<the module's collate>)``.

The two loaders of a task are timed in turn, one epoch each, the order alternating per round, and
the minimum over rounds is kept, so load from other processes hits both alike. The clock is this
process's CPU time by default (``clock="cpu"``; in-process loading is single-threaded work, and CPU
time is far less disturbed by other processes on a shared machine than wall time); ``clock="wall"``
times wall-clock. Result: ``{"framework_ms", "plain_ms"}`` (per sample), ``"ratio"`` = framework /
plain, and the clock.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[2]


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def time_loaders(loaders: dict[str, Callable[[int], Iterable]], samples: int, rounds: int = 5,
                 passes: int = 1, warmup: int = 1, clock: str = "cpu") -> dict[str, float]:
    """Min over ``rounds`` of the ms per sample of ``passes`` epochs of each ``loaders[name](epoch)``.

    The loaders are timed in turn within a round, in alternating order; ``samples`` is one epoch's count.
    """
    now = CLOCKS[clock]
    names = list(loaders)
    best = {n: float("inf") for n in names}
    for r in range(-warmup, rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            start = now()
            for p in range(passes):
                for _ in loaders[name](max(r, 0) * passes + p):
                    pass
            if r >= 0:
                best[name] = min(best[name], (now() - start) * 1e3 / (samples * passes))
    return best


def _result(task: str, best: dict[str, float], samples: int, batch_size: int, rounds: int,
            clock: str) -> dict[str, Any]:
    return {"task": task, "framework_ms": best["framework"], "plain_ms": best["plain"],
            "ratio": best["framework"] / best["plain"], "samples": samples, "batch_size": batch_size,
            "rounds": rounds, "clock": clock}


# ---------------------------------------------------------------------------------------------- ImageNet
def make_jpeg_folder(root: str | Path, images: int = 96, size: int = 400, classes: int = 4, seed: int = 0) -> Path:
    """``root/{train,val}/<wnid>/*.JPEG``: ``images`` training images over ``classes`` classes (stand-in
    drawings, see :mod:`tasks.classification.standin`) and one validation image per class."""
    from tasks.classification.standin import WNIDS, render

    root = Path(root)
    for split, count in (("train", images), ("val", classes)):
        for i in range(count):
            label = i % classes
            folder = root / split / WNIDS[label]
            folder.mkdir(parents=True, exist_ok=True)
            img = render(label, size, np.random.default_rng([seed, split == "val", i]))
            img.save(folder / f"{WNIDS[label]}_{i:05d}.JPEG", "JPEG", quality=90)
    return root


def imagenet_data_config() -> dict[str, Any]:
    """The transform fields of ``configs/data/imagenet.yaml`` (img_size, aug, crop_pct, mean, std)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "configs" / "data" / "imagenet.yaml")
    return {k: OmegaConf.to_container(cfg[k]) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in ("img_size", "aug", "crop_pct", "mean", "std")}


def imagenet_loader_benchmark(root: str | Path | None = None, images: int = 96, image_size: int = 400,
                              classes: int = 4, batch_size: int = 32, rounds: int = 5, passes: int = 3,
                              img_size: int | None = None, clock: str = "cpu") -> dict[str, Any]:
    """Time the ImageNet training loader against a plain one (see the module docstring).

    ``root``: an ImageNet-layout folder; by default one is generated in a temporary folder.
    Each timing covers ``passes`` epochs: the cost of a sample depends on its RandAugment draws, and
    more epochs average that out. ``img_size`` overrides the recipe's crop size (tests use a small one).
    """
    import timm.data

    from tasks.classification.data import ImageNetDataModule

    with tempfile.TemporaryDirectory(prefix="loader_benchmark_") as tmp:
        if root is None:
            root = make_jpeg_folder(Path(tmp) / "jpegs", images, image_size, classes)
        cfg = imagenet_data_config()
        if img_size is not None:
            cfg["img_size"] = img_size
        dm = ImageNetDataModule(str(root), batch_size=batch_size, num_workers=0, pin_memory=False, **cfg)
        dm.setup("fit")
        framework = dm.train_dataloader()
        plain = DataLoader(timm.data.ImageDataset(str(Path(root) / "train"), transform=dm.train_tf),
                           batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0)
        samples = len(framework) * batch_size

        def run_framework(epoch: int) -> Iterable:
            framework.sampler.set_epoch(epoch)
            return framework

        best = time_loaders({"framework": run_framework, "plain": lambda _: plain}, samples, rounds, passes,
                            clock=clock)
    return _result("imagenet", best, samples, batch_size, rounds, clock)


# ---------------------------------------------------------------------------------------------- ListOps
def listops_loader_benchmark(root: str | Path | None = None, sequences: int = 2048, batch_size: int = 32,
                             rounds: int = 5, passes: int = 20, max_length: int = 2000,
                             clock: str = "cpu") -> dict[str, Any]:
    """Time the ListOps training loader against a plain one (see the module docstring).

    ``root``: a ListOps data folder; by default ``sequences`` training rows of LRA's lengths are generated.
    A sample costs microseconds, so each timing covers ``passes`` epochs.
    """
    from tasks.lra.data import ListOpsDataModule, _Collate
    from tasks.lra.listops_gen import ListOpsSpec, prepare

    with tempfile.TemporaryDirectory(prefix="loader_benchmark_") as tmp:
        if root is None:
            root = Path(tmp) / "listops"
            lengths = dict(min_length=max_length // 4, max_length=max_length)
            prepare(root, ListOpsSpec(num_train=sequences, num_val=8, num_test=8, **lengths), workers=1,
                    show_progress=False)
        dm = ListOpsDataModule(str(root), max_length=max_length, batch_size=batch_size, num_workers=0, cache=False)
        dm.setup("fit")
        framework = dm.train_dataloader()
        plain = DataLoader(dm.datasets["train"], batch_size=batch_size, shuffle=True, num_workers=0,
                           collate_fn=_Collate(dm.trim_padding))
        samples = len(dm.datasets["train"])

        def run_framework(epoch: int) -> Iterable:
            framework.sampler.set_epoch(epoch)
            return framework

        best = time_loaders({"framework": run_framework, "plain": lambda _: plain}, samples, rounds, passes,
                            clock=clock)
    return _result("listops", best, samples, batch_size, rounds, clock)


# ---------------------------------------------------------------------------------------------- entry
def print_results(results: list[dict[str, Any]]) -> None:
    print("| task | training loader (ms/sample) | plain DataLoader (ms/sample) | ratio | goal <= 1.05 |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['task']} | {r['framework_ms']:.4g} | {r['plain_ms']:.4g} | x{r['ratio']:.3f} | "
              f"{'yes' if r['ratio'] <= 1.05 else 'no'} |")
    r = results[0]
    clock = "CPU time of this process" if r["clock"] == "cpu" else "wall-clock time"
    print(f"(in-process, batch {r['batch_size']}, {clock}, min of {r['rounds']} interleaved rounds; "
          f"on a busy machine repeat the run and compare the ranges)")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="imagenet,listops", help="comma list of imagenet, listops")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--root", default=None, help="time this ImageNet-layout folder instead of generated JPEGs")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="cpu: this process's CPU time")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = set(tasks) - {"imagenet", "listops"}
    if unknown:
        p.error(f"unknown task(s) {sorted(unknown)}; choose from imagenet, listops.")
    results = []
    if "imagenet" in tasks:
        results.append(imagenet_loader_benchmark(args.root, batch_size=args.batch_size, rounds=args.rounds,
                                                 clock=args.clock))
    if "listops" in tasks:
        results.append(listops_loader_benchmark(batch_size=args.batch_size, rounds=args.rounds, clock=args.clock))
    print_results(results)
    return results


if __name__ == "__main__":
    main()
