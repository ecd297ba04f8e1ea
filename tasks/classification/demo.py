"""``make demo``: baseline vs cached PVT-Tiny on the stand-in data (NOT ImageNet), side by side.

    python -m tasks.classification.demo [--epochs 6] [--out-root outputs] [extra train.py overrides ...]

1. generates ``data/standin`` if it is missing (``scripts/make_standin_imagenet.py``);
2. runs ``python train.py experiment=demo model=pvt_tiny`` and ``... model=pvt_tiny_grc`` (each a
   normal run: ``outputs/imagenet/demo-<model>/``, resumable with ``ckpt_path=last``);
3. prints the final val/acc1, val/acc5 and wall time of both from their ``csv/metrics.csv``.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

from .standin import generate, is_complete

REPO = Path(__file__).resolve().parents[2]
MODELS = (("baseline", "pvt_tiny"), ("cached", "pvt_tiny_grc"))


def last_val_metrics(metrics_csv: Path) -> dict[str, float]:
    """The last logged value of every ``val/*`` column of a Lightning CSV log."""
    out: dict[str, float] = {}
    with metrics_csv.open() as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k and k.startswith("val/") and v not in ("", None):
                    out[k] = float(v)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=None, help="override the demo's trainer.max_epochs")
    p.add_argument("--data", default="data/standin", help="stand-in folder (generated if missing)")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides for both runs")
    a = p.parse_args(argv)

    data = Path(a.data)
    if not is_complete(data):
        print(f"Generating the stand-in data (NOT ImageNet) in {data} ...", flush=True)
        generate(data)
    extra = [f"data.root={data.resolve()}", *a.overrides]
    if a.epochs:
        extra.append(f"trainer.max_epochs={a.epochs}")

    rows = []
    for variant, model in MODELS:
        cmd = [sys.executable, str(REPO / "train.py"), "experiment=demo", f"model={model}", *extra]
        print(f"\n=== {variant}: {' '.join(cmd[1:])}", flush=True)
        start = time.time()
        proc = subprocess.run(cmd, cwd=os.getcwd())
        wall = time.time() - start
        if proc.returncode != 0:
            print(f"demo: the {variant} run failed (exit {proc.returncode}).", file=sys.stderr)
            return proc.returncode
        run_dir = Path("outputs") / "imagenet" / f"demo-{model}"
        for o in extra:
            if o.startswith("paths.output_dir="):
                run_dir = Path(o.split("=", 1)[1]) / "imagenet" / f"demo-{model}"
        rows.append((variant, model, last_val_metrics(run_dir / "csv" / "metrics.csv"), wall, run_dir))

    print("\nStand-in data (10 procedural classes, 32x32) -- NOT ImageNet; these numbers say nothing about Table 1.")
    print(f"{'variant':<10} {'model':<14} {'val/acc1':>9} {'val/acc5':>9} {'val/loss':>9} {'wall s':>7}  run dir")
    for variant, model, m, wall, run_dir in rows:
        print(f"{variant:<10} {model:<14} {m.get('val/acc1', float('nan')):>9.2f} {m.get('val/acc5', float('nan')):>9.2f} "
              f"{m.get('val/loss', float('nan')):>9.3f} {wall:>7.0f}  {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
