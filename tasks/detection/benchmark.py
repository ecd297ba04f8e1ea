"""Detection speed: training step and inference time, and the framework's overhead over a bare PyTorch loop.

    python -m tasks.detection.benchmark [--device cuda] [--size 800 1216] [--batch 2] [--pairs 20] [--profile]

For Mask R-CNN and RetinaNet with PVT-Tiny and PVT-Tiny-GRC, on one fixed synthetic batch (random
boxes and masks at the given input size, so the detector's resize is a no-op), fp32:

* ``framework``: the task's :class:`~tasks.detection.module.DetectionModule` trained by the runner's own
  ``Trainer`` with the run's callbacks and CSV logger (``tasks.common.runner.build_trainer``; validation
  off): training_step with its logging and finite check, per-step seeding, the warm-up/step scheduler,
  GRC cache sync, perf and GRC monitors, the loader. One step is timed from one ``on_train_batch_start``
  to the next, so everything the loop does per step counts;
* ``bare``: ``losses = model(images, targets); sum(losses).backward(); opt.step(); opt.zero_grad()`` on
  the same model with the same optimizer object;
* ``infer``: ``model.eval()`` forward under ``torch.no_grad``.

Bare and framework steps are interleaved one by one, in pairs that start from the same state: before
each pair the weights, GRC caches, optimizer state and RNG are saved, the bare step runs from them and
they are restored, so both steps of a pair do the same compute (same proposals, same sampled RoIs, same
losses: checked, the losses of each pair must be equal). The order within a pair alternates. Each step
is timed in wall time and in process CPU time (all threads of this process; on a GPU the wall time is
what counts); the overhead is the median over pairs of framework / bare (target: under 1.05), with its
interquartile range, and the median per-pair difference framework - bare in milliseconds.
``--floor`` repeats the measurement with a trivial detector (one 4 x 5 linear layer giving the same loss
names; at least 100 pairs), so only the framework's own per-step work is left: its milliseconds per step, divided by a
detector's step time, bound the overhead on any device. ``--profile`` runs ``torch.profiler`` over one pair and lists the operators the
framework step calls more (or less) often than the bare step, i.e. what the framework adds per step.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]


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


def _clocks(device: str) -> tuple[float, float]:
    """(wall, process CPU time) after waiting for the device."""
    _sync(device)
    return time.perf_counter(), time.process_time()


def _config(detector: str, model: str, size: tuple[int, int], batch: int, device: str, run_dir: Path) -> Any:
    """The composed and resolved run config of ``task=coco_<detector> model=<model>`` at this size, fp32."""
    from hydra import compose, initialize_config_dir

    from tasks.common.runner import finalize_config

    task = "coco_maskrcnn" if detector == "maskrcnn" else "coco_retinanet"
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", [f"task={task}", f"model={model}", "data.root=unused", f"data.min_size={min(size)}",
                                f"data.max_size={max(size)}", f"data.batch_size={batch}",
                                "trainer=gpu" if device.startswith("cuda") else "trainer=cpu",
                                "trainer.precision=32-true", f"paths.output_dir={run_dir}"])
    return finalize_config(cfg, run_dir)


class _Snapshot:
    """Weights, buffers (GRC caches), optimizer state and RNG, saved into and restored from buffers that are
    allocated once (so the harness does not allocate or free hundreds of MB between timed steps)."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer):
        self.model, self.opt = model, opt
        self.weights: dict[str, torch.Tensor] = {}
        self.state: dict[Any, dict[str, Any]] = {}

    @staticmethod
    def _into(store: dict, key: Any, value: Any) -> None:
        if torch.is_tensor(value):
            kept = store.get(key)
            if kept is None or kept.shape != value.shape or kept.dtype != value.dtype:
                store[key] = value.detach().clone()
            else:
                kept.copy_(value)
        else:
            store[key] = value

    @torch.no_grad()
    def save(self) -> "_Snapshot":
        for k, v in self.model.state_dict().items():
            self._into(self.weights, k, v)
        for p in [p for p in self.state if p not in self.opt.state]:
            del self.state[p]
        for p, st in self.opt.state.items():
            kept = self.state.setdefault(p, {})
            for k in [k for k in kept if k not in st]:
                del kept[k]
            for k, v in st.items():
                self._into(kept, k, v)
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        return self

    @torch.no_grad()
    def restore(self) -> None:
        for k, v in self.model.state_dict().items():
            v.copy_(self.weights[k])
        for p in [p for p in self.opt.state if p not in self.state]:
            del self.opt.state[p]
        for p, saved in self.state.items():
            cur = self.opt.state.get(p)
            if cur and cur.keys() == saved.keys():
                for k, v in saved.items():
                    if torch.is_tensor(v):
                        cur[k].copy_(v)
                    else:
                        cur[k] = v
            else:
                self.opt.state[p] = {k: v.clone() if torch.is_tensor(v) else v for k, v in saved.items()}
        for p in self.model.parameters():
            p.grad = None
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


class FloorDetector(torch.nn.Module):
    """A detector with no compute: the losses of ``names`` from one 4 x 5 linear layer (``--floor``)."""

    def __init__(self, names: tuple[str, ...]):
        super().__init__()
        self.names = names
        self.lin = torch.nn.Linear(4, len(names))

    def forward(self, images: list, targets: list | None = None) -> dict[str, torch.Tensor]:
        out = self.lin(torch.ones(1, 4, device=self.lin.weight.device)).square().mean(0)
        return dict(zip(self.names, out))


LOSS_NAMES = {"maskrcnn": ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"),
              "retinanet": ("classification", "bbox_regression")}


def bare_step(model: torch.nn.Module, opt: torch.optim.Optimizer, images: list, targets: list) -> float:
    """One step of the bare loop; returns the loss."""
    losses = model(images, targets)
    loss = sum(losses.values())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _profile_counts(prof: Any) -> dict[str, tuple[int, float]]:
    return {e.key: (e.count, e.self_cpu_time_total / 1e3) for e in prof.key_averages()}


def measure(detector: str, model: str, size: tuple[int, int] = (800, 1216), batch: int = 2, pairs: int = 20,
            device: str = "cpu", warmup: int = 2, profile: bool = False, num_classes: int = 80,
            floor: bool = False) -> dict[str, Any]:
    """Interleaved bare / framework steps from the same state; returns the per-pair records.

    ``records``: one dict per measured pair: ``bare`` and ``framework`` (wall s, CPU s), ``bare_loss``,
    ``framework_loss``, ``bare_forwards``, ``framework_forwards`` (detector forwards in the step);
    ``profile`` (with ``profile=True``): operator -> (calls, self CPU ms) of the bare and the framework step.
    """
    import lightning.pytorch as pl

    from tasks.common.runner import build_callbacks, build_loggers, build_trainer
    from tasks.common.seeding import derive_seed, seed_globals
    from tasks.detection.module import DetectionModule

    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory(prefix="det_benchmark_")
    run_dir = Path(tmp.name)
    cfg = _config(detector, model, size, batch, device, run_dir)
    from omegaconf import OmegaConf

    module = DetectionModule(OmegaConf.to_container(cfg, resolve=True), {i + 1: i + 1 for i in range(num_classes)})
    if floor:
        module.model = FloorDetector(LOSS_NAMES[detector])
    images, targets = synthetic_batch(batch, size, num_classes, detector == "maskrcnn", device)
    _, model_targets = module._prepare((images, targets))  # RetinaNet's labels 0..C-1, as the task feeds it
    cpu_batch = ([x.cpu() for x in images], [{k: v.cpu() for k, v in t.items()} for t in targets])
    total = warmup + int(profile) + pairs + 1  # the last step only closes the timing of the one before
    loader = torch.utils.data.DataLoader([cpu_batch] * total, batch_size=None, collate_fn=lambda b: b)

    forwards = [0]
    module.model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    records: list[dict[str, Any]] = []
    out: dict[str, Any] = {"records": records}

    class Paired(pl.Callback):
        """Runs the bare step of each pair next to the framework step and times both."""

        def __init__(self) -> None:
            self.start: tuple[float, float] | None = None
            self.inserted = (0.0, 0.0)
            self.forwards_at_start = 0
            self.prof: Any = None
            self.snap = self.after = None  # set in on_train_start (the optimizer exists then)

        def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            self.snap = _Snapshot(module.model, trainer.optimizers[0])
            self.after = _Snapshot(module.model, trainer.optimizers[0])

        def _bare(self, trainer: pl.Trainer, idx: int, rec: dict[str, Any], snap: _Snapshot) -> None:
            snap.restore()
            seed_globals(derive_seed(module.seed, "step", trainer.current_epoch, idx, trainer.global_rank))
            n0 = forwards[0]
            profiling = profile and idx == warmup
            prof = torch.profiler.profile(activities=_activities(device)) if profiling else None
            if prof is not None:
                prof.__enter__()
            t0 = _clocks(device)
            rec["bare_loss"] = bare_step(module.model, trainer.optimizers[0], images, model_targets)
            t1 = _clocks(device)
            if prof is not None:
                prof.__exit__(None, None, None)
                out.setdefault("profile", {})["bare"] = _profile_counts(prof)
            rec["bare"] = (t1[0] - t0[0], t1[1] - t0[1])
            rec["bare_forwards"] = forwards[0] - n0

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
            now = _clocks(device)
            if self.prof is not None:
                self.prof.__exit__(None, None, None)
                out.setdefault("profile", {})["framework"] = _profile_counts(self.prof)
                self.prof = None
            if self.start is not None and idx - 1 >= warmup:
                rec = records[-1]
                rec["framework"] = (now[0] - self.start[0] - self.inserted[0], now[1] - self.start[1] - self.inserted[1])
                rec["framework_forwards"] = forwards[0] - self.forwards_at_start - rec["bare_forwards_inside"]
            if idx >= total - 1:
                self.start = None
                return
            rec = {"pair": idx - warmup, "bare_forwards_inside": 0, "profiled": profile and idx == warmup}
            records.append(rec)
            self.snap.save()
            rec["bare_first"] = idx % 2 == 0
            if rec["bare_first"]:
                self._bare(trainer, idx, rec, self.snap)
                self.snap.restore()
            self.inserted = (0.0, 0.0)
            if profile and idx == warmup:
                self.prof = torch.profiler.profile(activities=_activities(device))
                self.prof.__enter__()
            self.forwards_at_start = forwards[0]
            self.start = _clocks(device)

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
            if idx >= total - 1:
                return
            rec = records[-1]
            rec["framework_loss"] = float(outputs["loss"].detach())
            if rec["bare_first"]:
                return
            if self.prof is not None:  # the profiled pair is bare-first unless warmup is odd
                self.prof.__exit__(None, None, None)
                out.setdefault("profile", {})["framework"] = _profile_counts(self.prof)
                self.prof = None
            t0 = _clocks(device)
            n0 = forwards[0]
            self.after.save()
            self._bare(trainer, idx, rec, self.snap)
            self.after.restore()
            rec["bare_forwards_inside"] = forwards[0] - n0
            t1 = _clocks(device)
            self.inserted = (t1[0] - t0[0], t1[1] - t0[1])

    loggers = build_loggers(cfg, run_dir)
    callbacks = [Paired(), *build_callbacks(cfg)]
    trainer = build_trainer(cfg, run_dir, loggers, callbacks, max_steps=total, max_epochs=None, limit_val_batches=0,
                            num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                            log_every_n_steps=int(cfg.trainer.get("log_every_n_steps") or 50))
    module.to(device)
    trainer.fit(module, train_dataloaders=loader)
    out["records"] = [r for r in records if "framework" in r and not r["profiled"]]  # the profiler's pair: slower
    out["infer"] = float("nan") if floor else infer(module.model, images, 3, device)
    tmp.cleanup()
    return out


def _activities(device: str) -> list[Any]:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


@torch.no_grad()
def infer(model: torch.nn.Module, images: list, steps: int, device: str) -> float:
    model.eval()
    model(images)
    t0 = _clocks(device)
    for _ in range(steps):
        model(images)
    return (_clocks(device)[0] - t0[0]) / steps


def summarise(records: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over pairs: step times, framework / bare ratios (wall, CPU) and their quartiles."""
    def q(values: list[float]) -> tuple[float, float, float]:
        if len(values) < 2:
            return values[0], values[0], values[0]
        lo, mid, hi = statistics.quantiles(values, n=4)
        return lo, statistics.median(values), hi

    res: dict[str, float] = {}
    for i, clock in enumerate(("wall", "cpu")):
        ratios = [r["framework"][i] / r["bare"][i] for r in records]
        res[f"bare_{clock}"] = statistics.median(r["bare"][i] for r in records)
        res[f"framework_{clock}"] = statistics.median(r["framework"][i] for r in records)
        res[f"ratio_{clock}_q1"], res[f"ratio_{clock}"], res[f"ratio_{clock}_q3"] = q(ratios)
        res[f"extra_ms_{clock}"] = 1e3 * statistics.median(r["framework"][i] - r["bare"][i] for r in records)
    return res


def profile_table(prof: dict[str, dict[str, tuple[int, float]]], top: int = 15) -> list[str]:
    """Operators whose call count differs between the framework and the bare step, by CPU time."""
    bare, frame = prof.get("bare", {}), prof.get("framework", {})
    rows = []
    for key in set(bare) | set(frame):
        nb, tb = bare.get(key, (0, 0.0))
        nf, tf = frame.get(key, (0, 0.0))
        if nb != nf:
            rows.append((abs(tf - tb), key, nb, nf, tb, tf))
    rows.sort(reverse=True)
    lines = [f"  {'operator':<52} {'bare calls':>10} {'framework':>10} {'bare ms':>9} {'framework ms':>12}"]
    lines += [f"  {k[:52]:<52} {nb:>10} {nf:>10} {tb:>9.2f} {tf:>12.2f}" for _, k, nb, nf, tb, tf in rows[:top]]
    total_b = sum(t for _, t in bare.values())
    total_f = sum(t for _, t in frame.values())
    lines.append(f"  ({len(rows)} operators differ; self CPU time of all operators: bare {total_b:.1f} ms, "
                 f"framework {total_f:.1f} ms)")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, nargs=2, default=[800, 1216], metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--pairs", type=int, default=20, help="measured bare/framework pairs (after --warmup pairs)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--detectors", default="maskrcnn,retinanet")
    p.add_argument("--models", default="pvt_tiny,pvt_tiny_grc")
    p.add_argument("--floor", action="store_true",
                   help="also measure with a trivial detector: the framework's own ms per step")
    p.add_argument("--profile", action="store_true",
                   help="list the operators the framework step adds (one extra pair, not timed)")
    a = p.parse_args(argv)
    size = (a.size[0], a.size[1])
    print(f"device {a.device}, batch {a.batch} x {size[0]}x{size[1]}, fp32, {a.pairs} interleaved pairs "
          f"(after {a.warmup}); medians over pairs, ratio = framework / bare per pair [quartiles]")
    print(f"{'detector':<10} {'backbone':<13} {'bare s':>7} {'frame s':>7} {'ratio wall':>20} {'+ms':>6} "
          f"{'bare cpu s':>10} {'ratio cpu':>20} {'+ms':>6} {'infer s':>8}")
    runs = [(det, name, False) for det in a.detectors.split(",") for name in a.models.split(",")]
    if a.floor:
        runs += [(det, "(floor)", True) for det in a.detectors.split(",")]
    for det, name, floor in runs:
        res = measure(det, "pvt_tiny" if floor else name, size, a.batch, max(a.pairs, 100) if floor else a.pairs,
                      a.device, a.warmup, a.profile and not floor, floor=floor)
        recs = res["records"]
        same = all(r["bare_loss"] == r["framework_loss"] for r in recs)
        fwd = {(r["bare_forwards"], r["framework_forwards"]) for r in recs}
        s = summarise(recs)
        print(f"{det:<10} {name:<13} {s['bare_wall']:>7.3f} {s['framework_wall']:>7.3f} "
              f"{s['ratio_wall']:>6.3f} [{s['ratio_wall_q1']:.3f}, {s['ratio_wall_q3']:.3f}] "
              f"{s['extra_ms_wall']:>6.1f} {s['bare_cpu']:>10.3f} {s['ratio_cpu']:>6.3f} "
              f"[{s['ratio_cpu_q1']:.3f}, {s['ratio_cpu_q3']:.3f}] {s['extra_ms_cpu']:>6.1f} "
              f"{res['infer']:>8.3f}", flush=True)
        if not same or fwd != {(1, 1)}:
            print(f"  WARNING: the two steps of a pair differ (equal losses: {same}; detector forwards "
                  f"bare/framework: {sorted(fwd)}), so the ratio compares different work.")
        if a.profile and "profile" in res:
            print("\n".join(profile_table(res["profile"])), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
