"""The detection demo: baseline vs cached PVT-Tiny Mask R-CNN on generated shapes (NOT COCO), side by side.

    python -m tasks.detection.demo [--data data/coco_shapes] [extra train.py overrides ...]

1. generates ``data/coco_shapes`` (100 train / 40 val images, COCO layout) if it is missing;
2. runs ``python train.py experiment=coco_demo model=pvt_tiny`` and ``... model=pvt_tiny_grc`` (normal
   runs: ``outputs/coco_maskrcnn/coco_demo-<model>/``, resumable with ``ckpt_path=last``);
3. prints, for both, box / mask AP at the first validation and the final COCO metrics (from their
   ``csv/metrics.csv``) and the wall time of the run.
``task=coco_retinanet`` as an extra override runs the RetinaNet pair instead.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

from .shapes import generate, is_complete

REPO = Path(__file__).resolve().parents[2]
MODELS = (("baseline", "pvt_tiny"), ("cached", "pvt_tiny_grc"))
SHOWN = ("val/bbox_mAP", "val/bbox_mAP_50", "val/bbox_mAP_75", "val/segm_mAP", "val/segm_mAP_50")


def validations(metrics_csv: Path) -> list[dict[str, float]]:
    """Every validation of a run, in order: the ``step`` and ``val/*`` values of the Lightning CSV log's rows
    that have ``val/bbox_mAP``."""
    out = []
    with metrics_csv.open() as f:
        for row in csv.DictReader(f):
            if row.get("val/bbox_mAP") not in ("", None):
                out.append({k: float(v) for k, v in row.items()
                            if k and (k == "step" or k.startswith("val/")) and v not in ("", None)})
    return out


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
        vals = validations(run_dir / "csv" / "metrics.csv")
        if not vals:
            print(f"demo: the {variant} run logged no validation in {run_dir / 'csv' / 'metrics.csv'}; check "
                  f"trainer.check_val_every_n_epoch against trainer.max_epochs.", file=sys.stderr)
            return 1
        rows.append((variant, model, vals[0], vals[-1], wall, run_dir))

    print("\nGenerated shapes (4 categories, 96-160 px) -- NOT COCO; these numbers say nothing about Tables 3-4.")
    shown = [m for m in SHOWN if any(m in r[3] for r in rows)]
    first = [m for m in ("val/bbox_mAP", "val/segm_mAP") if m in rows[0][2]]
    print(f"{'variant':<10} {'model':<14} " + " ".join(f"{'first ' + m[4:]:>16}" for m in first)
          + " " + " ".join(f"{m[4:]:>11}" for m in shown) + f" {'wall s':>7}  run dir")
    for variant, model, v0, v1, wall, run_dir in rows:
        print(f"{variant:<10} {model:<14} " + " ".join(f"{v0.get(k, float('nan')):>16.2f}" for k in first) + " "
              + " ".join(f"{v1.get(k, float('nan')):>11.2f}" for k in shown) + f" {wall:>7.0f}  {run_dir}")
    steps = ", ".join(f"{variant} at steps {int(v0.get('step', -1)) + 1} and {int(v1.get('step', -1)) + 1}"
                      for variant, _, v0, v1, _, _ in rows)
    print(f"(first validation and final validation: {steps})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
