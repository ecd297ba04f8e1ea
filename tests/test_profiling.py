"""MAC counting, the MAC floor used by the speed benchmark, and the benchmark script itself (no timing asserted)."""
from __future__ import annotations

import importlib.util
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import cached_transformers  # noqa: F401  (registers the models)
from cached_transformers import grc_layers
from cached_transformers.profiling import count_macs, mac_floor_copy

ROOT = Path(__file__).resolve().parents[1]


def pos_conv_macs(model: torch.nn.Module) -> int:
    """3x3 conv with C/D_m input channels per group over each layer's grid: weight numel x grid tokens."""
    return sum(layer.pos_conv.weight.numel() * (layer.cache_len - layer.num_prefix_tokens)
               for layer in grc_layers(model).values())


def test_count_macs_matches_the_released_pvt_tiny_counts():
    x = torch.randn(1, 3, 224, 224)
    base = count_macs(timm.create_model("pvt_tiny"), x)
    cached = count_macs(timm.create_model("pvt_tiny_grc"), x)
    assert round(base / 1e9, 2) == 1.93 and round(cached / 1e9, 2) == 2.26


@pytest.mark.parametrize("name,kw", [("pvt_tiny_grc", dict(img_size=64)),
                                     ("vit_small_patch16_224_grc", dict(img_size=64, depth=2))])
def test_mac_floor_keeps_every_product_but_the_positional_conv(name, kw):
    model = timm.create_model(name, num_classes=10, **kw)
    floor = mac_floor_copy(model)
    x = torch.randn(1, 3, 64, 64)
    assert count_macs(model, x) - count_macs(floor, x) == pos_conv_macs(model)

    before = {k: v.cache.clone() for k, v in grc_layers(model).items()}
    model.eval()
    with torch.no_grad():
        expected = model(x)
    floor.train()
    floor(torch.randn(2, 3, 64, 64)).sum().backward()  # the floor trains (it is timed with backward)
    assert all(p.grad is not None for n, p in floor.named_parameters() if ".mem_attn." in n and "sr" not in n)
    with torch.no_grad():  # the original model is untouched: same caches, same outputs
        assert all(torch.equal(v.cache, before[k]) for k, v in grc_layers(model).items())
        torch.testing.assert_close(model(x), expected)


def test_benchmark_script_prints_the_table_with_floor_rows(capsys):
    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--img-size", "32", "--batch-size", "1", "--iters", "1", "--warmup", "0",
                       "--floor", "--device", "cpu", "--malloc", "system"]) == 0
    out = capsys.readouterr().out
    for model in ("pvt_tiny", "vit_small_patch16_224"):
        assert f"| {model} | cached |" in out and f"| {model} | floor |" in out
        assert f"- {model}: goal " in out


@pytest.mark.slow
def test_benchmark_script_times_compiled_variants_next_to_the_floor(capsys):
    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--img-size", "32", "--batch-size", "1", "--iters", "1", "--warmup", "1", "--floor",
                       "--reference", "--compile", "--compile-backend", "eager", "--device", "cpu", "--malloc", "system"]) == 0
    out = capsys.readouterr().out
    for model in ("pvt_tiny", "vit_small_patch16_224"):
        for variant in ("cached", "floor", "cached compiled", "floor compiled"):
            assert f"| {model} | {variant} |" in out
        assert f"- {model} compiled: cached ratio - floor ratio = train " in out
    assert out.count("  paired by round (") == 2
    assert "- pvt_tiny eager training step: released module / this layer = " in out


def test_compile_verdicts_judge_the_issue_goals():
    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = lambda variant, train, infer: dict(model="m", variant=variant, train_ratio=train, infer_ratio=infer)
    lines = bench.compile_verdicts([row("cached compiled", 1.30, 1.20), row("floor compiled", 1.27, 1.10),
                                    row("cached", 1.40, 1.30), row("released", 1.55, 1.45)])
    assert "train +0.030, infer +0.100 (goal <= 0.05: not met" in lines[0]
    assert "= 1.107x (goal >= 1.1x: met" in lines[1]
    # with per-round ratios the gap is also given paired by round: its median and quartiles
    rounds = lambda variant, train, infer: dict(row(variant, statistics.median(train), statistics.median(infer)),
                                                train_rounds=train, infer_rounds=infer)
    lines = bench.compile_verdicts([rounds("cached compiled", [1.30, 1.32, 1.40, 1.31, 1.29], [1.2] * 5),
                                    rounds("floor compiled", [1.27, 1.30, 1.33, 1.24, 1.28], [1.1] * 5)])
    assert "train +0.030, infer +0.100 (goal <= 0.05: not met" in lines[0]  # medians: 1.31 - 1.28
    assert lines[1] == ("  paired by round (the two ratios of one interleaved round subtracted; median [quartiles] over "
                        "rounds): train +0.030 [+0.020, +0.070], infer +0.100 [+0.100, +0.100]")


_REFAULT_PROBE = """
import resource, sys, torch
from cached_transformers.profiling import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
for step in range(8):  # a training step's activations: allocated, filled, freed, allocated again
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2 ** 20).fill_(1.0)  # 64 MiB
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory applies to glibc's malloc")
def test_keep_freed_memory_stops_re_allocations_from_faulting_their_pages_in_again():
    def faults(mode: str) -> list[int]:
        out = subprocess.run([sys.executable, "-c", _REFAULT_PROBE, mode], capture_output=True, text=True,
                             check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
        return [int(v) for v in out.split()]

    pages = 16 * 2 ** 20 * 4 // 4096
    assert min(faults("system")) > pages // 2  # glibc maps a 64 MiB block afresh every time
    kept = faults("keep")
    # the heap grows during the first rounds (an aligned block does not fit the one freed), then the
    # re-allocations reuse its pages
    assert kept[0] > pages // 2 and max(kept[4:]) < pages // 20
