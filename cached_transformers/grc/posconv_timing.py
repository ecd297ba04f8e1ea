"""Timing of the GRC positional conv's implementations (``scripts/benchmark.py --suite posconv``).

Three ways to compute the released module's ``Conv2d(C, C, 3, padding=1, groups=C // 2)`` on the token
grids of the paper's backbones: the grouped conv itself (oneDNN / cuDNN), two depthwise convs with a
hand-written backward (``posconv._pair_forward``; GPUs, bfloat16), and the native CPU kernel
(``csrc/pair_conv.cpp``). Each is timed on channels-last inputs as the layer passes them, forward alone
(inference) and forward + backward (training), interleaved round by round; the median is reported.
"""
from __future__ import annotations

import functools
import statistics

import torch
import torch.nn.functional as F

from ..profiling import interleaved_times
from . import native, posconv

# (name, B, H, W, C): PVT-Tiny's four stages and ViT-S at 224 px, batch 8 (the CPU benchmark's batch)
SHAPES = [("PVT-Tiny stage 1", 8, 56, 56, 64), ("PVT-Tiny stage 2", 8, 28, 28, 128),
          ("PVT-Tiny stage 3", 8, 14, 14, 320), ("PVT-Tiny stage 4", 8, 7, 7, 512), ("ViT-S", 8, 14, 14, 384)]


def _grouped(grid, weight, bias):
    return F.conv2d(grid, weight, bias, padding=1, groups=weight.shape[0] // 2).permute(0, 2, 3, 1)


def _depthwise_pair(grid, weight, bias):
    with native.disabled():
        return posconv.pair_grouped_conv3x3(grid, weight, bias)


def time_positional_conv(shapes=SHAPES, iters: int = 20, warmup: int = 3, scale: float = 1.0) -> list[dict]:
    """Rows of (shape, implementation, forward ms, forward + backward ms) on CPU, median of ``iters``.

    ``scale`` shrinks the grids (tests use a small one); the native kernel is skipped where it did not build.
    """
    impls = {"grouped conv": _grouped, "two depthwise convs": _depthwise_pair}
    if native.load():
        impls["native kernel"] = posconv.pair_grouped_conv3x3
    rows = []
    for name, b, h, w, c in shapes:
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
        grid = torch.randn(b, c, h, w).to(memory_format=torch.channels_last).requires_grad_(True)
        weight, bias = torch.randn(c, 2, 3, 3, requires_grad=True), torch.randn(c, requires_grad=True)
        grad = torch.randn(b, h, w, c)

        def forward(fn):
            with torch.no_grad():
                fn(grid, weight, bias)

        def train(fn):
            torch.autograd.backward(fn(grid, weight, bias), grad)

        calls = {(key, phase): functools.partial(step, fn) for key, fn in impls.items()
                 for phase, step in (("fwd", forward), ("train", train))}
        times = interleaved_times(calls, warmup, iters)  # machine drift hits every implementation alike
        for key in impls:
            fwd, trn = (statistics.median(times[(key, p)]) * 1e3 for p in ("fwd", "train"))
            rows.append(dict(shape=name, size=f"{b}x{h}x{w}x{c}", impl=key, fwd_ms=fwd, train_ms=trn))
    return rows


def print_table(rows: list[dict]) -> None:
    base = {(r["shape"]): r for r in rows if r["impl"] == "grouped conv"}
    print(f"\n### GRC positional conv, CPU ({torch.get_num_threads()} threads), channels-last, median ms "
          f"(ratio to the grouped conv)\n")
    print("| grid | B x H x W x C | implementation | forward ms | forward + backward ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        g = base[r["shape"]]
        print(f"| {r['shape']} | {r['size']} | {r['impl']} | {r['fwd_ms']:.3f} ({r['fwd_ms'] / g['fwd_ms']:.2f}x) | "
              f"{r['train_ms']:.3f} ({r['train_ms'] / g['train_ms']:.2f}x) |")
    if not any(r["impl"] == "native kernel" for r in rows):
        print("\nThe native kernel did not build on this machine (see the warning above).")
