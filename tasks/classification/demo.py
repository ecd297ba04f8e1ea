"""``make demo``: baseline vs cached PVT-Tiny on the stand-in data (NOT ImageNet), over several seeds.

    python -m tasks.classification.demo [--seeds 0,1,2] [--epochs N] [--data DIR] [extra train.py overrides ...]

1. generates ``data/standin`` if it is missing (``scripts/make_standin_imagenet.py``);
2. runs ``python train.py -m experiment=demo seed=0,1,2 model=pvt_tiny,pvt_tiny_grc sweep_name=demo``: one
   Hydra sweep in one process (the import cost is paid once), baseline and cached alternating seed by seed,
   each job a normal run in ``multirun/demo/<its overrides>/`` (resumable with ``ckpt_path=last``);
3. prints every run's final val/acc1, then mean +- standard deviation over the seeds per model and one
   sentence saying whether the difference between the two means is within the seed-to-seed spread.

With 100 validation images one image is one point of accuracy, and a few epochs leave both models far
from converged: a single seed says nothing about which model is better, which is why the demo runs several.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from .standin import generate, is_complete

REPO = Path(__file__).resolve().parents[2]
MODELS = (("baseline", "pvt_tiny"), ("cached", "pvt_tiny_grc"))
METRIC = "val/acc1"
FINISHED = re.compile(r"^Finished (.+) at step \d+ \(")  # train.py's last line names the run directory


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the deviation is nan for fewer than two values."""
    if not values:
        raise ValueError("no values")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


@dataclass(frozen=True)
class Verdict:
    """cached - baseline, its standard error over the seeds, and whether it lies within the spread."""

    diff: float
    stderr: float
    within: bool | None   # None: one seed per model, no spread to compare with
    sentence: str


def compare(baseline: Sequence[float], cached: Sequence[float], metric: str = METRIC) -> Verdict:
    """Whether the cached - baseline difference of the seed means is within the seed-to-seed spread.

    The spread is two standard errors of the difference of the means, 2 * sqrt(s_b^2 / n_b + s_c^2 / n_c)
    (s: the sample standard deviation over seeds): a difference inside it is what reseeding alone produces.
    """
    (mb, sb), (mc, sc) = mean_std(baseline), mean_std(cached)
    diff = mc - mb
    if len(baseline) < 2 or len(cached) < 2:
        return Verdict(diff, math.nan, None,
                       f"One seed per model has no spread to compare the difference ({diff:+.1f} points of {metric}) "
                       f"with; run several seeds (--seeds 0,1,2) before reading anything into it.")
    stderr = math.sqrt(sb ** 2 / len(baseline) + sc ** 2 / len(cached))
    within = abs(diff) <= 2 * stderr
    head = (f"Cached - baseline = {diff:+.1f} points of {metric} (standard error {stderr:.1f} over "
            f"{len(baseline)} and {len(cached)} seeds)")
    if within:
        return Verdict(diff, stderr, True,
                       f"{head}: the difference is within the seed-to-seed spread (2 standard errors = "
                       f"{2 * stderr:.1f}), so these runs show neither model to be better.")
    better = "cached" if diff > 0 else "baseline"
    return Verdict(diff, stderr, False,
                   f"{head}: the difference is larger than the seed-to-seed spread (2 standard errors = "
                   f"{2 * stderr:.1f}); on this stand-in data and short schedule the {better} model scored higher.")


def summary(runs: Sequence[dict], metric: str = METRIC) -> list[str]:
    """The lines printed at the end: one per run, mean +- std per model, and the verdict sentence."""
    lines = ["Stand-in data (10 procedural classes, 32x32) -- NOT ImageNet; these numbers say nothing about Table 1.",
             f"{'variant':<10} {'model':<14} {'seed':>4} {metric:>9} {'val/acc5':>9} {'wall s':>7}  run dir"]
    for r in runs:
        m = r["metrics"]
        lines.append(f"{r['variant']:<10} {r['model']:<14} {r['seed']:>4} {m.get(metric, math.nan):>9.2f} "
                     f"{m.get('val/acc5', math.nan):>9.2f} {r['wall_s']:>7.0f}  {r['run_dir']}")
    by_variant: dict[str, list[float]] = {}
    for r in runs:
        by_variant.setdefault(r["variant"], []).append(r["metrics"][metric])
    lines.append("")
    for variant, model in MODELS:
        if variant in by_variant:
            mean, std = mean_std(by_variant[variant])
            lines.append(f"{variant:<10} {model:<14} {metric} {mean:6.2f} +- {std:5.2f}  "
                         f"(mean +- std over {len(by_variant[variant])} seeds)")
    if "baseline" in by_variant and "cached" in by_variant:
        lines.append(compare(by_variant["baseline"], by_variant["cached"], metric).sentence)
    return lines


def run_sweep(overrides: list[str]) -> tuple[int, list[dict]]:
    """Run ``python train.py -m <overrides>``, echoing its output; (exit status, each finished job's run).

    ``train.py`` ends every job with ``Finished <run dir> at step ...``; the run's ``results.json`` and
    resolved ``.hydra/config.yaml`` there give its metrics, model and seed.
    """
    cmd = [sys.executable, str(REPO / "train.py"), "-m", *overrides]
    proc = subprocess.Popen(cmd, cwd=os.getcwd(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # its output as it comes
    runs, variants = [], {model: variant for variant, model in MODELS}
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        m = FINISHED.match(line)
        if m:
            run_dir = Path(m.group(1))
            result = json.loads((run_dir / "results.json").read_text())
            config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
            model = str(config.model.name)
            runs.append({"variant": variants.get(model, model), "model": model, "seed": int(config.seed),
                         "metrics": result["metrics"], "wall_s": float(result["wall_s"]), "run_dir": str(run_dir)})
    return proc.wait(), runs


def main(argv: list[str] | None = None) -> int:
    from tasks.common.cli import check_group_overrides, exit_on_user_error
    from tasks.common.errors import ConfigError

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, each trains both models (default 0,1,2)")
    p.add_argument("--epochs", type=int, default=None, help="override the demo's trainer.max_epochs")
    p.add_argument("--data", default="data/standin", help="stand-in folder (generated if missing)")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides for every run")
    a = p.parse_args(argv)

    def run() -> int:
        try:
            seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--seeds must be comma-separated integers such as 0,1,2, got {a.seeds!r}.") from None
        if not seeds:
            raise ConfigError("--seeds needs at least one seed, e.g. --seeds 0,1,2.")
        check_group_overrides(a.overrides, REPO / "configs")
        data = Path(a.data)
        if not is_complete(data):
            print(f"Generating the stand-in data (NOT ImageNet) in {data} ...", flush=True)
            generate(data)
        extra = [f"data.root={data.resolve()}", *a.overrides]
        if a.epochs:
            extra.append(f"trainer.max_epochs={a.epochs}")
        # seeds vary slowest: baseline and cached alternate, so a busy machine slows both alike
        overrides = ["experiment=demo", "seed=" + ",".join(map(str, seeds)),
                     "model=" + ",".join(model for _, model in MODELS), "sweep_name=demo", *extra]
        print(f"python train.py -m {' '.join(overrides)}", flush=True)
        start = time.time()
        rc, runs = run_sweep(overrides)
        if rc != 0 or len(runs) != len(seeds) * len(MODELS):
            print(f"demo: the sweep stopped (exit {rc}) after {len(runs)} of {len(seeds) * len(MODELS)} runs; "
                  f"its output is above.", file=sys.stderr, flush=True)
            return rc or 1
        print("\n" + "\n".join(summary(runs)), flush=True)
        print(f"The demo took {time.time() - start:.0f} s.", flush=True)
        return 0

    return exit_on_user_error(run)


if __name__ == "__main__":
    sys.exit(main())
