"""Params and FLOPs of every Table 1 model, baseline and cached, next to the paper's numbers.

    python scripts/model_table.py [--img-size 224] [--preset reference|paper] [--ratio 0.5]

Counts come from ``torch.utils.flop_counter`` (one eval forward of a 1 x 3 x S x S input, reported
in GMACs, the unit of the paper's "FLOPs") and ``sum(p.numel())`` with the 1000-class head. The
"released" column is what the authors' released module counts inside PVT v1 (method.md section 2),
which the reference preset must reproduce exactly for the parameters.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

import cached_transformers  # noqa: E402,F401
from cached_transformers.models import BASELINES  # noqa: E402
from cached_transformers.profiling import count_macs, count_params  # noqa: E402
from tasks.paper.tables import get_table  # noqa: E402

# Table 1 row key -> cached model; its baseline comes from the library's BASELINES mapping.
TABLE1_MODELS = {
    "vit_small": "vit_small_patch16_224_grc", "pvt_tiny": "pvt_tiny_grc", "pvt_small": "pvt_small_grc",
    "pvt_medium": "pvt_medium_grc", "swin_tiny": "swin_tiny_patch4_window7_224_grc",
    "pvt_v2_b2": "pvt_v2_b2_grc", "pvt_v2_b3": "pvt_v2_b3_grc", "pvt_v2_b4": "pvt_v2_b4_grc",
}
# Params (M) the authors' released module counts inside PVT v1 (method.md section 2).
RELEASED_PARAMS = {"pvt_tiny": (13.23, 15.67), "pvt_small": (24.49, 29.36), "pvt_medium": (44.21, 53.48)}


def measure(name: str, img_size: int, grc: dict | None) -> tuple[float, float]:
    kwargs = {"grc": grc} if grc is not None else {}
    model = timm.create_model(name, pretrained=False, num_classes=1000, **kwargs)
    macs = count_macs(model, torch.randn(1, 3, img_size, img_size))
    return count_params(model) / 1e6, macs / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--preset", default="reference", choices=["reference", "paper"])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--rows", default=",".join(TABLE1_MODELS), help="comma list of Table 1 row keys")
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in TABLE1_MODELS]
    if unknown:
        p.error(f"unknown row(s) {unknown}; choose from {', '.join(TABLE1_MODELS)}.")
    table = get_table(1)
    grc = {"preset": args.preset, "ratio": args.ratio}
    print(f"### Table 1 models at {args.img_size}px, GRC preset={args.preset}, r={args.ratio} "
          f"(GMACs from torch.utils.flop_counter)\n")
    print("| model | params M base -> cached (ours) | paper | released module | "
          "GMACs base -> cached (ours) | paper | MAC ratio ours | paper |")
    print("|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for key in rows:
        grc_name = TABLE1_MODELS[key]
        base_name = BASELINES[grc_name]
        pb, fb = measure(base_name, args.img_size, None)
        pc, fc = measure(grc_name, args.img_size, grc)
        paper = {v: {c: table.value(key, v, c) for c in ("params", "flops")} for v in ("baseline", "cached")}
        released = RELEASED_PARAMS.get(key)
        rel = f"{released[0]:.2f} -> {released[1]:.2f}" if released else "-"
        print(f"| {table.row(key).label} | {pb:.2f} -> {pc:.2f} | {paper['baseline']['params']} -> "
              f"{paper['cached']['params']} | {rel} | {fb:.2f} -> {fc:.2f} | {paper['baseline']['flops']:.2f} -> "
              f"{paper['cached']['flops']:.2f} | {fc / fb:.3f} | "
              f"{paper['cached']['flops'] / paper['baseline']['flops']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
