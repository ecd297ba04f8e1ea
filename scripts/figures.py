#!/usr/bin/env python
"""The paper's analysis figures from a checkpoint (Lightning .ckpt or plain state_dict).

    python scripts/figures.py lambda --ckpt outputs/imagenet/<run>/checkpoints/last.ckpt --out fig5.png
    python scripts/figures.py branches --ckpt <ckpt> --model vit_small_patch16_224_grc \
        --images a.jpg b.jpg --layer middle --out fig4.png

lambda (Fig. 5): sigma(lambda) per layer and head, read from every `...lam` tensor (no model is built).
branches (Fig. 4): o_self / o_mem maps of one GRC layer (first, middle, last, an index or a module name)
for the given images, averaged over channels, class tokens dropped, min-max normalised, on the token
grid. The image size and GRC options come from the checkpoint (--img-size / --grc key=value override).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.paper.figures import FigureError, plot_branches, plot_lambda  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="figure", required=True)
    lam = sub.add_parser("lambda", help="sigma(lambda) per layer and head (paper Fig. 5)")
    lam.add_argument("--ckpt", required=True)
    lam.add_argument("--out", default="fig5_lambda.png")
    lam.add_argument("--title", default=None)
    br = sub.add_parser("branches", help="o_self / o_mem maps of a GRC layer (paper Fig. 4)")
    br.add_argument("--ckpt", required=True)
    br.add_argument("--model", default=None,
                    help="timm name of the cached model, e.g. vit_small_patch16_224_grc (default: from the checkpoint)")
    br.add_argument("--images", nargs="+", required=True)
    br.add_argument("--layer", default="middle", help="first, middle, last, an index or a module name")
    br.add_argument("--img-size", type=int, default=None, help="default: from the checkpoint")
    br.add_argument("--grc", nargs="*", default=None, metavar="KEY=VALUE",
                    help="GRC options the model was trained with (default: from the checkpoint)")
    br.add_argument("--out", default="fig4_branches.png")
    br.add_argument("--title", default=None)
    args = p.parse_args(argv)
    try:
        if args.figure == "lambda":
            weights = plot_lambda(args.ckpt, args.out, title=args.title)
            means = [float(w.mean()) for w in weights.values()]
            print(f"wrote {args.out}: {len(weights)} GRC layers, mean sigma(lambda) per layer "
                  + " ".join(f"{m:.3f}" for m in means))
        else:
            grc = None
            if args.grc is not None:
                grc = {}
                for item in args.grc:
                    key, sep, value = item.partition("=")
                    if not sep:
                        p.error(f"--grc takes key=value items, got {item!r}")
                    grc[key] = yaml.safe_load(value)
            layer = plot_branches(args.ckpt, args.model, args.images, args.out, layer=args.layer,
                                  img_size=args.img_size, grc=grc, title=args.title)
            print(f"wrote {args.out}: GRC layer {layer}, {len(args.images)} image(s)")
    except FigureError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
