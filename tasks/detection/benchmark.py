"""Detection speed: training step and inference time, and the framework's overhead over a bare PyTorch loop.

    python -m tasks.detection.benchmark [--device cuda] [--size 800 1333] [--batch 2] [--steps 20] [--rounds 3]

For Mask R-CNN and RetinaNet with PVT-Tiny and PVT-Tiny-GRC, on one fixed synthetic batch (random
boxes and masks at the given input size, so the detector's resize is a no-op):

* ``bare``: ``losses = model(images, targets); sum(losses).backward(); opt.step(); opt.zero_grad()``;
* ``framework``: the same model inside :class:`~tasks.detection.module.DetectionModule` stepped by a
  Lightning ``Trainer`` (the task's training_step with its logging, finite check, per-step seeding, the
  warm-up/step scheduler), timed between the first and last batch by a callback;
* ``infer``: ``model.eval()`` forward under ``torch.no_grad``.

Bare and framework runs are interleaved per round; the minimum over rounds is reported, and the ratio
framework / bare (the framework's overhead; the target is under 1.05).
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import torch


def synthetic_batch(batch: int, size: tuple[int, int], num_classes: int, with_masks: bool, device: str,
                    seed: int = 0) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    h, w = size
    images, targets = [], []
    for i in range(batch):
        images.append(torch.rand(3, h, w, generator=g))
        n = 5
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = (0.1 + 0.3 * torch.rand(n, 2, generator=g)) * torch.tensor([w, h])
        boxes = torch.cat([xy, xy + wh], 1)
        t = {"boxes": boxes, "labels": torch.randint(1, num_classes + 1, (n,), generator=g),
             "image_id": torch.tensor(i)}
        if with_masks:
            masks = torch.zeros(n, h, w, dtype=torch.uint8)
            for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
                masks[k, y1:y2, x1:x2] = 1
            t["masks"] = masks
        targets.append(t)
    return [x.to(device) for x in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _module(detector: str, model: str, size: tuple[int, int], batch: int, num_classes: int) -> Any:
    """The task's DetectionModule for the composed ``task=coco_<detector> model=<model>`` config."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tasks.detection.module import DetectionModule

    task = "coco_maskrcnn" if detector == "maskrcnn" else "coco_retinanet"
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "configs"), version_base="1.3"):
        cfg = compose("train", [f"task={task}", f"model={model}", "data.root=unused", f"data.min_size={min(size)}",
                                f"data.max_size={max(size)}", f"data.batch_size={batch}", "paths.run_dir=unused"])
    return DetectionModule(OmegaConf.to_container(cfg, resolve=True), {i + 1: i + 1 for i in range(num_classes)})


def bare_steps(model: torch.nn.Module, images: list, targets: list, steps: int, device: str) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-4)
    model.train()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        losses = model(images, targets)
        sum(losses.values()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return (time.perf_counter() - start) / steps


def framework_steps(module: Any, images: list, targets: list, steps: int, device: str) -> float:
    import lightning.pytorch as pl

    class Timer(pl.Callback):
        t0 = t1 = 0.0

        def on_train_batch_start(self, trainer: Any, *_: Any) -> None:
            if trainer.global_step == 1:
                _sync(device)
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
            _sync(device)
            self.t1 = time.perf_counter()

    cpu_batch = ([x.cpu() for x in images], [{k: v.cpu() for k, v in t.items()} for t in targets])
    loader = torch.utils.data.DataLoader([cpu_batch] * (steps + 1), batch_size=None, collate_fn=lambda b: b)
    timer = Timer()
    trainer = pl.Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, max_steps=steps + 1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[timer], limit_val_batches=0, log_every_n_steps=50,
                         precision="32-true")
    trainer.fit(module, train_dataloaders=loader)
    return (timer.t1 - timer.t0) / steps


@torch.no_grad()
def infer(model: torch.nn.Module, images: list, steps: int, device: str) -> float:
    model.eval()
    model(images)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        model(images)
    _sync(device)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, nargs=2, default=[800, 1216], metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--detectors", default="maskrcnn,retinanet")
    p.add_argument("--models", default="pvt_tiny,pvt_tiny_grc")
    a = p.parse_args(argv)
    size = (a.size[0], a.size[1])
    print(f"device {a.device}, batch {a.batch} x {size[0]}x{size[1]}, {a.steps} steps x {a.rounds} rounds (min)")
    print(f"{'detector':<10} {'backbone':<13} {'bare s/step':>11} {'framework':>10} {'ratio':>6} {'infer s/batch':>13}")
    for det in a.detectors.split(","):
        for name in a.models.split(","):
            torch.manual_seed(0)
            module = _module(det, name, size, a.batch, 80)
            images, targets = synthetic_batch(a.batch, size, 80, det == "maskrcnn", a.device)
            module.to(a.device)
            _, model_targets = module._prepare((images, targets))  # RetinaNet's labels 0..C-1, as the task feeds it
            bare, frame = [], []
            bare_steps(module.model, images, model_targets, 1, a.device)  # warm-up
            for _ in range(a.rounds):
                bare.append(bare_steps(module.model, images, model_targets, a.steps, a.device))
                frame.append(framework_steps(module, images, targets, a.steps, a.device))
                module.to(a.device)
            inf = infer(module.model, images, a.steps, a.device)
            print(f"{det:<10} {name:<13} {min(bare):>11.3f} {min(frame):>10.3f} {min(frame) / min(bare):>6.3f} "
                  f"{inf:>13.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
