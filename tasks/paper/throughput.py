"""Throughput table in the layout of the paper's cost table (method.md section 4 / tables.yaml table 9).

Train and test images per second of each (baseline, cached) pair on the machine at hand, with the
cached/baseline ratio next to the paper's V100 ratio (absolute numbers differ between machines; the
ratio is what carries over)::

    python -m tasks.paper.throughput --device cuda --batch-size 64
    python -m tasks.paper.throughput --models pvt_tiny:pvt_tiny_grc --device cpu --batch-size 4 --img-size 112

Train = forward + cross-entropy + backward + AdamW step in train mode (the GRC caches update as in
training); test = eval forward under ``torch.inference_mode``. Each is the median time of ``iters``
batches after ``warmup``, the baseline and the cached model timed in turn (interleaved), so that a
machine whose speed drifts affects both alike. Synthetic inputs; nothing is read from disk.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from typing import Any, Sequence

import torch

from cached_transformers.profiling import interleaved_times

PAPER_PAIRS: list[tuple[str, str]] = [("pvt_tiny", "pvt_tiny_grc"), ("pvt_small", "pvt_small_grc"),
                                      ("pvt_medium", "pvt_medium_grc")]


def _steps(model: torch.nn.Module, batch_size: int, img_size: int, device: torch.device, amp: str):
    """(train_step, test_step) closures of one model on synthetic B x 3 x S x S batches."""
    model = model.to(device)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    classes = getattr(model, "num_classes", 1000) or 1000
    y = torch.randint(0, classes, (batch_size,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def train_step() -> None:
        model.train()
        with autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    @torch.inference_mode()
    def test_step() -> None:
        model.eval()
        with autocast():
            model(x)

    return train_step, test_step


def measure_models(models: dict[str, torch.nn.Module], batch_size: int, img_size: int, device: torch.device,
                   warmup: int = 3, iters: int = 10, amp: str = "none") -> dict[str, dict[str, Any]]:
    """{name: {"train_img_s", "test_img_s", "train_s", "test_s"}} of several models, timed interleaved.

    ``*_img_s`` come from the median step; ``train_s`` / ``test_s`` hold every timed step's seconds,
    round by round (entry i of every model is from the same round), for paired comparisons.
    """
    steps = {name: _steps(m, batch_size, img_size, device, amp) for name, m in models.items()}
    train = interleaved_times({n: s[0] for n, s in steps.items()}, warmup, iters, device)
    test = interleaved_times({n: s[1] for n, s in steps.items()}, warmup, iters, device)
    return {n: {"train_img_s": batch_size / statistics.median(train[n]), "test_img_s": batch_size / statistics.median(test[n]),
                "train_s": train[n], "test_s": test[n]} for n in models}


def _paper_row(model: str) -> dict[str, dict[str, float]]:
    from .tables import get_table

    row = get_table(9).row(model)
    return row.values if row is not None else {}


def throughput_table(models: Sequence[tuple[str, str]] = tuple(PAPER_PAIRS), batch_size: int = 64,
                     img_size: int = 224, device: str | torch.device | None = None, warmup: int = 3,
                     iters: int = 10, amp: str = "none", num_classes: int = 1000) -> list[dict[str, Any]]:
    """Measure each (baseline, cached) pair. One row per pair::

        {"model", "baseline", "cached", "device", "batch_size", "img_size",
         "params_m": (base, cached),
         "train_img_s": (base, cached), "test_img_s": (base, cached),
         "train_ratio", "test_ratio",                      # cached / baseline images per second
         "paper_train_ratio", "paper_test_ratio"}          # the paper's V100 ratio, or None

    Args:
        models: pairs of timm model names (``import cached_transformers`` registers the cached ones).
        batch_size, img_size: synthetic input size B x 3 x S x S.
        device: ``"cuda"``, ``"cpu"``, ...; default cuda when available.
        warmup, iters: untimed and timed batches (median is reported).
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` autocast.
    """
    import timm

    import cached_transformers  # noqa: F401  (registers the models with timm)

    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    rows: list[dict[str, Any]] = []
    for base_name, cached_name in models:
        for name in (base_name, cached_name):
            if not timm.is_model(name):
                raise ValueError(f"Unknown model {name!r} (timm has no such model; cached ones end in _grc).")
        pair = {}
        for name in (base_name, cached_name):
            torch.manual_seed(0)
            pair[name] = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size)
        params = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in pair.items()}
        measured = measure_models(pair, batch_size, img_size, dev, warmup, iters, amp)
        del pair
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        b, c = measured[base_name], measured[cached_name]
        paper = _paper_row(base_name)
        pb, pc = paper.get("baseline", {}), paper.get("cached", {})
        rows.append({
            "model": base_name, "baseline": base_name, "cached": cached_name, "device": _device_name(dev),
            "batch_size": batch_size, "img_size": img_size,
            "params_m": (params[base_name], params[cached_name]),
            "train_img_s": (b["train_img_s"], c["train_img_s"]), "test_img_s": (b["test_img_s"], c["test_img_s"]),
            "train_ratio": c["train_img_s"] / b["train_img_s"], "test_ratio": c["test_img_s"] / b["test_img_s"],
            "paper_train_ratio": pc["train_img_s"] / pb["train_img_s"] if "train_img_s" in pb and "train_img_s" in pc else None,
            "paper_test_ratio": pc["test_img_s"] / pb["test_img_s"] if "test_img_s" in pb and "test_img_s" in pc else None,
        })
    return rows


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as the paper's throughput table plus ratios."""
    if not rows:
        return "No models measured.\n"
    r0 = rows[0]
    out = [f"Throughput, {r0['device']}, batch {r0['batch_size']}, {r0['img_size']}px (images/s, higher is better)", "",
           "| model | params M (base -> cached) | train base | train cached | train ratio | paper train ratio "
           "| test base | test cached | test ratio | paper test ratio |",
           "|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    for r in rows:
        out.append(f"| {r['model']} | {r['params_m'][0]:.2f} -> {r['params_m'][1]:.2f} "
                   f"| {r['train_img_s'][0]:.1f} | {r['train_img_s'][1]:.1f} | {ratio(r['train_ratio'])} "
                   f"| {ratio(r['paper_train_ratio'])} | {r['test_img_s'][0]:.1f} | {r['test_img_s'][1]:.1f} "
                   f"| {ratio(r['test_ratio'])} | {ratio(r['paper_test_ratio'])} |")
    out.append("")
    out.append("Paper (V100): PVT-Tiny 313/930 -> 257/768, PVT-Small 181/689 -> 146/561, "
               "PVT-Medium 101/393 -> 84/319 images/s (train/test).")
    return "\n".join(out) + "\n"


def _parse_pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        base, _, cached = item.partition(":")
        pairs.append((base, cached or f"{base}_grc"))
    return pairs


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.paper.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(f"{b}:{c}" for b, c in PAPER_PAIRS),
                   help="comma list of baseline:cached pairs (cached defaults to <baseline>_grc)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 on GPU, 8 on CPU")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for but no GPU is visible; use --device cpu.")
    batch = args.batch_size or (64 if device.type == "cuda" else 8)
    try:
        rows = throughput_table(_parse_pairs(args.models), batch_size=batch, img_size=args.img_size, device=device,
                                warmup=args.warmup, iters=args.iters, amp=args.amp)
    except ValueError as err:
        p.error(str(err))
    print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
