"""The native CPU kernels of the GRC layer (cached_transformers/grc/csrc, built on first use): the build, its
portable variant and its failure; the positional conv against the grouped conv (the fused output and update
kernels: test_fused_kernels.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cached_transformers.grc import native
from cached_transformers.grc.posconv import pair_grouped_conv3x3

ROOT = Path(__file__).resolve().parents[1]

# channel counts below, at and above a vector block (16 floats / 8 doubles), with a partial block left over;
# grids of one row or column, where every tap but the centre falls outside
SHAPES = [(2, 5, 7, 6), (2, 4, 4, 18), (1, 1, 1, 4), (2, 1, 5, 20), (2, 3, 2, 48), (1, 6, 1, 34), (8, 14, 14, 64)]


def grouped_conv(x, w, b):
    """The released module's positional conv: one grouped conv, channels-first, on a B x H x W x C tensor."""
    return F.conv2d(x.permute(0, 3, 1, 2), w, b, padding=1, groups=w.shape[0] // 2).permute(0, 2, 3, 1)


def test_the_kernels_build_on_this_machine():
    assert native.load(), "the native kernels did not build: see the RuntimeWarning"
    assert hasattr(torch.ops.cached_transformers_cpu, "pair_conv3x3_forward")
    assert native.build_name().endswith(torch.backends.cpu.get_cpu_capability().lower())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_backward_equal_the_grouped_conv_in_float32(shape, bias):
    assert native.load()
    x = torch.randn(*shape, requires_grad=True)
    c = shape[-1]
    w = torch.randn(c, 2, 3, 3, requires_grad=True)
    b = torch.randn(c, requires_grad=True) if bias else None
    expected = grouped_conv(x, w, b)
    out = torch.ops.cached_transformers_cpu.pair_conv3x3_forward(x.detach(), w.detach(), b.detach() if bias else None)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (x, w, b) if bias else (x, w), grad)
    gx, gw, gb = torch.ops.cached_transformers_cpu.pair_conv3x3_backward(grad, x.detach(), w.detach())
    torch.testing.assert_close(gx, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, want[1], rtol=1e-5, atol=1e-4)  # sums over up to 1,568 positions
    if bias:
        torch.testing.assert_close(gb, want[2], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES[:6], ids=lambda s: "x".join(map(str, s)))
def test_gradients_pass_gradcheck_in_float64_through_the_layer_s_op(shape):
    assert native.load()
    b_, h, w_, c = shape
    x = torch.randn(b_, c, h, w_, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_(True)
    w = torch.randn(c, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(pair_grouped_conv3x3(x, w, b), grouped_conv(x.permute(0, 2, 3, 1), w, b))
    assert torch.autograd.gradcheck(pair_grouped_conv3x3, (x, w, b))


def test_non_contiguous_and_channels_first_inputs_give_the_same_values():
    assert native.load()
    x = torch.randn(2, 32, 6, 5)  # channels-first: the op makes it channels-last
    w, b = torch.randn(32, 2, 3, 3), torch.randn(32)
    torch.testing.assert_close(pair_grouped_conv3x3(x, w, b), F.conv2d(x, w, b, padding=1, groups=16).permute(0, 2, 3, 1),
                               rtol=1e-5, atol=1e-5)


def test_the_disabling_variable_selects_the_pytorch_path_without_building(monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CACHED_TRANSFORMERS_NATIVE", "0")
    assert not native.load() and not native.usable(torch.zeros(1))
    x, w = torch.randn(2, 8, 4, 4), torch.randn(8, 2, 3, 3)
    torch.testing.assert_close(pair_grouped_conv3x3(x, w, None), F.conv2d(x, w, None, padding=1, groups=4).permute(0, 2, 3, 1),
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_and_gpus_keep_the_pytorch_path():
    assert not native.usable(torch.zeros(1, dtype=torch.bfloat16))
    assert not native.usable(torch.zeros(1, device="meta"))


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT), **env})


CHECK = """
    import warnings, torch, torch.nn.functional as F
    from cached_transformers.grc import native
    from cached_transformers.grc.posconv import pair_grouped_conv3x3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = native.load()
    x = torch.randn(2, 48, 5, 6).to(memory_format=torch.channels_last).requires_grad_(True)
    w, b = torch.randn(48, 2, 3, 3, requires_grad=True), torch.randn(48, requires_grad=True)
    out = pair_grouped_conv3x3(x, w, b)
    ref = F.conv2d(x, w, b, padding=1, groups=24).permute(0, 2, 3, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4)
    # the fused update and output kernels (ATen's generic vector type in the portable build)
    from cached_transformers.grc import output, update
    z, prev, wc = torch.randn(2, 5, 60, requires_grad=True), torch.randn(1, 5, 20), torch.randn(20, 20)
    ln = torch.nn.LayerNorm(20)
    new, ref = update.gated_update(z, prev, wc, ln), update.update_composite(z, prev, wc, ln)
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(new.sum(), z)[0], torch.autograd.grad(ref.sum(), z)[0],
                               rtol=1e-4, atol=1e-4)
    conv = torch.nn.Conv2d(48, 48, 3, padding=1, groups=24)
    s, m, a, xs = torch.randn(2, 31, 48), torch.randn(2, 31, 24), torch.rand(2), torch.randn(2, 31, 48)
    with torch.no_grad():
        torch.testing.assert_close(output.fused_mix_pos(s, m, a, xs, conv, (5, 6)),
                                   output.composite(s, m, a, xs, conv.weight, conv.bias, (5, 6)), rtol=1e-5, atol=1e-5)
    print("LOADED", loaded, native.build_name(), "WARNINGS", [str(c.message) for c in caught])
"""


@pytest.mark.slow
def test_the_portable_build_without_vector_extensions_is_correct(tmp_path):
    # ATEN_CPU_CAPABILITY=default: what a CPU without AVX2 gets (GCC splits the 64-byte vectors into SSE2)
    result = _run(CHECK, ATEN_CPU_CAPABILITY="default", TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED True cached_transformers_cpu_default WARNINGS []" in result.stdout, result.stdout


@pytest.mark.slow
def test_a_failed_build_warns_once_and_the_layer_keeps_working(tmp_path):
    result = _run(CHECK, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED False" in result.stdout, result.stdout
    assert result.stdout.count("could not be built") == 1 and "CACHED_TRANSFORMERS_NATIVE=0" in result.stdout


def test_benchmark_posconv_suite_times_every_implementation(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--suite", "posconv", "--img-size", "16", "--iters", "1", "--warmup", "0", "--device", "cpu",
                       "--malloc", "system"]) == 0
    out = capsys.readouterr().out
    for impl in ("grouped conv", "two depthwise convs", "native kernel"):
        assert out.count(f"| {impl} |") == 5, out  # PVT-Tiny's four stages and ViT-S
    assert "| PVT-Tiny stage 1 | 8x4x4x64 | native kernel |" in out
