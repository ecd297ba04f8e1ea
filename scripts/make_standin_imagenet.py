#!/usr/bin/env python
"""Generate the stand-in image classification set in the ImageNet folder layout (NOT ImageNet).

    python scripts/make_standin_imagenet.py --out data/standin

Writes ``<out>/train/<wnid>/*.JPEG`` and ``<out>/val/<wnid>/*.JPEG``: 10 procedurally drawn classes
(coloured shapes and textures), deterministic for a given ``--seed``. Train on it with ``data=standin``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.classification.standin import generate, is_complete  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/standin", help="output folder (default: data/standin)")
    p.add_argument("--train-per-class", type=int, default=40)
    p.add_argument("--val-per-class", type=int, default=10)
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="regenerate even if the folder is complete")
    a = p.parse_args()
    if not a.force and is_complete(a.out, a.train_per_class, a.val_per_class):
        print(f"{a.out}: stand-in data already present (use --force to regenerate).")
        return
    generate(a.out, a.train_per_class, a.val_per_class, a.size, a.seed)
    print(f"Wrote the stand-in data set (NOT ImageNet) to {a.out}: 10 classes, "
          f"{a.train_per_class}/{a.val_per_class} train/val images per class, {a.size}x{a.size} JPEG.")


if __name__ == "__main__":
    main()
