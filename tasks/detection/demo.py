"""The detection demo: baseline vs cached PVT-Tiny Mask R-CNN on generated shapes (NOT COCO), side by side.

    python -m tasks.detection.demo [--data data/coco_shapes] [extra train.py overrides ...]

1. generates ``data/coco_shapes`` (100 train / 40 val images, COCO layout) if it is missing;
2. runs ``python train.py experiment=coco_demo model=pvt_tiny`` and ``... model=pvt_tiny_grc`` (normal
   runs: ``outputs/coco_maskrcnn/coco_demo-<model>/``, resumable with ``ckpt_path=last``);
3. prints the final COCO metrics and wall time of both from their ``csv/metrics.csv``.
``task=coco_retinanet`` as an extra override runs the RetinaNet pair instead.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from tasks.classification.demo import last_val_metrics

from .shapes import generate, is_complete

REPO = Path(__file__).resolve().parents[2]
MODELS = (("baseline", "pvt_tiny"), ("cached", "pvt_tiny_grc"))
SHOWN = ("val/bbox_mAP", "val/bbox_mAP_50", "val/bbox_mAP_75", "val/segm_mAP", "val/segm_mAP_50")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/coco_shapes", help="generated shapes folder (created if missing)")
    p.add_argument("--train", type=int, default=100, help="training images to generate")
    p.add_argument("--val", type=int, default=40, help="validation images to generate")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides for both runs")
    a = p.parse_args(argv)

    data = Path(a.data)
    if not is_complete(data, a.train, a.val):
        print(f"Generating shapes in the COCO layout (NOT COCO) in {data} ...", flush=True)
        generate(data, a.train, a.val)
    extra = [f"data.root={data.resolve()}", *a.overrides]
    task = next((o.split("=", 1)[1] for o in a.overrides if o.startswith("task=")), "coco_maskrcnn")
    out_root = next((o.split("=", 1)[1] for o in a.overrides if o.startswith("paths.output_dir=")), "outputs")

    rows = []
    for variant, model in MODELS:
        cmd = [sys.executable, str(REPO / "train.py"), "experiment=coco_demo", f"model={model}", *extra]
        print(f"\n=== {variant}: {' '.join(cmd[1:])}", flush=True)
        start = time.time()
        proc = subprocess.run(cmd, cwd=os.getcwd())
        wall = time.time() - start
        if proc.returncode != 0:
            print(f"demo: the {variant} run failed (exit {proc.returncode}).", file=sys.stderr)
            return proc.returncode
        run_dir = Path(out_root) / task / f"coco_demo-{model}"
        rows.append((variant, model, last_val_metrics(run_dir / "csv" / "metrics.csv"), wall, run_dir))

    print("\nGenerated shapes (4 categories, 96-160 px) -- NOT COCO; these numbers say nothing about Tables 3-4.")
    shown = [m for m in SHOWN if any(m in r[2] for r in rows)]
    print(f"{'variant':<10} {'model':<14} " + " ".join(f"{m[4:]:>11}" for m in shown) + f" {'wall s':>7}  run dir")
    for variant, model, m, wall, run_dir in rows:
        print(f"{variant:<10} {model:<14} " + " ".join(f"{m.get(k, float('nan')):>11.2f}" for k in shown)
              + f" {wall:>7.0f}  {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
