"""``make demo``: baseline vs cached PVT-Tiny on the stand-in data (NOT ImageNet), over several seeds.

    python -m tasks.classification.demo [--seeds 0,1,2] [--epochs N] [--data DIR] [extra train.py overrides ...]

1. generates ``data/standin`` if it is missing (``scripts/make_standin_imagenet.py``);
2. for each seed, trains ``python train.py experiment=demo model=pvt_tiny seed=S`` and then
   ``... model=pvt_tiny_grc seed=S`` (in this process, one normal run each, in its own run directory);
3. prints every run's final val/acc1, then mean +- standard deviation over the seeds per model and one
   sentence saying whether the difference between the two means is within the seed-to-seed spread.

With 100 validation images one image is one point of accuracy, and a few epochs leave both models far
from converged: a single seed says nothing about which model is better, which is why the demo runs several.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .standin import generate, is_complete

REPO = Path(__file__).resolve().parents[2]
MODELS = (("baseline", "pvt_tiny"), ("cached", "pvt_tiny_grc"))
METRIC = "val/acc1"


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


def train_one(overrides: list[str]) -> dict:
    """One ``train.py`` run in this process (composed from configs/train.yaml with ``overrides``)."""
    from hydra import compose, initialize_config_dir

    import tasks.common  # noqa: F401  (registers the resolvers the config uses)
    from tasks.common.runner import train

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return train(cfg)


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
        runs = []
        for seed in seeds:  # baseline and cached alternate, so a busy machine slows both alike
            for variant, model in MODELS:
                overrides = ["experiment=demo", f"model={model}", f"seed={seed}", *extra]
                print(f"\n=== {variant}, seed {seed}: python train.py {' '.join(overrides)}", flush=True)
                start = time.time()
                result = train_one(overrides)
                runs.append({"variant": variant, "model": model, "seed": seed, "metrics": result["metrics"],
                             "wall_s": time.time() - start, "run_dir": result["run_dir"]})
        print("\n" + "\n".join(summary(runs)), flush=True)
        return 0

    return exit_on_user_error(run)


if __name__ == "__main__":
    sys.exit(main())
