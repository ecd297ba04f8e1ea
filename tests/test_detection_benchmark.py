"""The framework-overhead benchmark compares like with like: each pair's bare and framework steps start from
the same state and do the same work (tiny sizes on CPU; nothing is timed against a threshold)."""
from __future__ import annotations

import math

from tasks.detection.benchmark import measure, profile_table, summarise


def test_pairs_do_the_same_work_and_the_summary_is_per_pair() -> None:
    res = measure("retinanet", "pvt_tiny_grc", (64, 96), batch=1, pairs=2, warmup=1, profile=True, num_classes=3)
    recs = res["records"]
    assert len(recs) == 2 and {r["bare_first"] for r in recs} == {True, False}  # the order alternates
    for r in recs:  # same state, same seed: the same losses, one detector forward each
        assert r["bare_loss"] == r["framework_loss"] and math.isfinite(r["bare_loss"])
        assert r["bare_forwards"] == r["framework_forwards"] == 1
        assert all(t > 0 for t in (*r["bare"], *r["framework"]))
    assert len({r["bare_loss"] for r in recs}) == 2  # the framework's steps do advance the state between pairs
    s = summarise(recs)
    ratios = sorted(r["framework"][0] / r["bare"][0] for r in recs)
    assert math.isclose(s["ratio_wall"], (ratios[0] + ratios[1]) / 2)
    table = profile_table(res["profile"])  # bare and framework step of the profiled (untimed) pair
    assert "operators differ" in table[-1]


def test_floor_leaves_only_the_framework() -> None:
    res = measure("maskrcnn", "pvt_tiny", (64, 96), batch=1, pairs=3, warmup=1, floor=True, num_classes=3)
    assert all(r["bare_loss"] == r["framework_loss"] and r["framework_forwards"] == 1 for r in res["records"])
    assert math.isnan(res["infer"])
