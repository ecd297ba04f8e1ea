"""The fused CPU kernels of the GRC layer (grc/output.py, grc/update.py): the output (mix + positional conv) and the gated update.

Each is checked against the composite PyTorch code it replaces (values and every gradient, float32 and a
float64 gradcheck), with shapes that take the whole-vector path and the scalar path, its custom op's
registration for torch.compile / export (``torch.library.opcheck``), and its fallback where the kernels are
not built. The layer-level parity with the released module on both paths is in test_grc_layer.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cached_transformers.grc import native, output, update


def _mix_pos_reference(s, m, alpha, x, w, b, grid):
    """The released computation: mix, then the grouped conv (channels-first) added to the grid tokens."""
    bsz, t, c = s.shape
    heads = alpha.shape[0]
    hd, md = c // heads, m.shape[-1] // heads
    mem = torch.zeros_like(s).view(bsz, t, heads, hd)
    mem = torch.cat([m.view(bsz, t, heads, md), mem[..., md:]], dim=-1).view(bsz, t, c)
    a = alpha.repeat_interleave(hd)
    out = (1 - a) * s + a * mem
    h, w_ = grid
    p = t - h * w_
    conv = F.conv2d(x[:, p:].transpose(1, 2).reshape(bsz, c, h, w_), w, b, padding=1, groups=c // 2)
    return torch.cat([out[:, :p], out[:, p:] + conv.flatten(2).transpose(1, 2)], dim=1)


# (batch, prefix tokens, grid, channels, heads): PVT-Tiny's stage-1 layout and ViT-S's (whole vectors),
# a head width / mixed width that are not multiples of the vector (scalar path), a one-column grid
MIX_SHAPES = [(2, 0, (5, 7), 64, 1), (2, 1, (4, 4), 384, 6), (3, 1, (3, 1), 20, 2), (2, 0, (4, 6), 128, 2)]


def _mix_inputs(shape, dtype, bias=True):
    bsz, p, (h, w), c, heads = shape
    t = p + h * w
    g = torch.Generator().manual_seed(0)
    make = lambda *size: torch.randn(*size, generator=g, dtype=dtype).requires_grad_(True)
    return (make(bsz, t, c), make(bsz, t, c // 2), torch.rand(heads, generator=g, dtype=dtype).requires_grad_(True),
            make(bsz, t, c), make(c, 2, 3, 3), make(c) if bias else None, (h, w))


@pytest.mark.parametrize("shape", MIX_SHAPES, ids=lambda s: f"p{s[1]}-{s[2][0]}x{s[2][1]}-c{s[3]}-h{s[4]}")
@pytest.mark.parametrize("bias", [True, False])
def test_mix_pos_kernel_equals_the_released_computation_in_float32(shape, bias):
    assert native.load()
    s, m, alpha, x, w, b, grid = _mix_inputs(shape, torch.float32, bias)
    conv = torch.nn.Conv2d(shape[3], shape[3], 3, padding=1, groups=shape[3] // 2, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(w)
        if bias:
            conv.bias.copy_(b)
    assert output.fused_applicable(s, m, x, conv)
    out = output.fused_mix_pos(s, m, alpha, x, conv, grid)
    expected = _mix_pos_reference(s, m, alpha, x, w, b, grid)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(expected)
    params = [conv.weight] + ([conv.bias] if bias else [])
    got = torch.autograd.grad(out, [s, m, alpha, x, *params], grad)
    want = torch.autograd.grad(expected, [s, m, alpha, x, w] + ([b] if bias else []), grad)
    for name, a, r in zip(["s", "m", "alpha", "x", "weight", "bias"], got, want):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4, msg=lambda text: f"d {name}: {text}")


@pytest.mark.parametrize("path", ["native", "fallback"])
@pytest.mark.parametrize("shape", [(1, 1, (2, 2), 32, 2), MIX_SHAPES[2]], ids=["vectors", "scalars"])
def test_mix_pos_op_passes_gradcheck_and_opcheck_in_float64(shape, path, monkeypatch):
    # fallback: what an exported program runs where the kernels are not built; vectors: 8 doubles per vector
    if path == "fallback":
        monkeypatch.setattr(native, "_state", {"ok": False})
    s, m, alpha, x, w, b, (h, w_) = _mix_inputs(shape, torch.float64)
    op = output._mix_pos_op
    torch.testing.assert_close(op(s, m, alpha, x, w, b, h, w_), _mix_pos_reference(s, m, alpha, x, w, b, (h, w_)))
    assert torch.autograd.gradcheck(lambda *a: op(*a, h, w_), (s, m, alpha, x, w, b))
    torch.library.opcheck(op, (s, m, alpha, x, w, b, h, w_))


def test_mix_pos_is_not_taken_where_it_does_not_apply():
    assert native.load()
    s, m, alpha, x = torch.randn(2, 16, 64), torch.randn(2, 16, 32), torch.rand(2), torch.randn(2, 16, 64)
    pair = torch.nn.Conv2d(64, 64, 3, padding=1, groups=32)
    assert output.fused_applicable(s, m, x, pair)
    assert not output.fused_applicable(s, m, x, None)                                   # no positional conv
    assert not output.fused_applicable(s, m, x, torch.nn.Conv2d(64, 64, 3, padding=1, groups=16))  # ratio 0.25
    assert not output.fused_applicable(s.bfloat16(), m.bfloat16(), x.bfloat16(), pair.bfloat16())  # autocast dtypes
    assert not output.fused_applicable(s, m, x.double(), pair)                         # mixed dtypes


def _update_inputs(b, t, d, dtype, norm):
    g = torch.Generator().manual_seed(1)
    make = lambda *size: torch.randn(*size, generator=g, dtype=dtype).requires_grad_(True)
    ln = torch.nn.LayerNorm(d, dtype=dtype) if norm else None
    if ln is not None:
        with torch.no_grad():
            ln.weight.normal_(generator=g)
            ln.bias.normal_(generator=g)
    return make(b, t, 3 * d), make(1, t, d), make(d, d), ln


# the memory width of every paper model (32: whole vectors), one with a partial vector, one without LayerNorm
UPDATE_SHAPES = [(3, 7, 32, True), (2, 5, 20, True), (2, 5, 36, False), (4, 49, 32, True)]


@pytest.mark.parametrize("shape", UPDATE_SHAPES, ids=lambda s: f"b{s[0]}-t{s[1]}-d{s[2]}-{'ln_gelu' if s[3] else 'linear'}")
def test_gated_update_kernel_equals_the_composite_code_in_float32(shape):
    assert native.load()
    z, prev, wc, ln = _update_inputs(*shape[:3], torch.float32, shape[3])
    assert update.update_applicable(z, prev, wc, ln)
    out = update.gated_update(z, prev, wc, ln)
    expected = update.update_composite(z, prev, wc, ln)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(expected)
    inputs = [z, prev, wc] + ([ln.weight, ln.bias] if ln is not None else [])
    for name, a, r in zip(["z", "prev", "wc", "ln weight", "ln bias"], torch.autograd.grad(out, inputs, grad),
                          torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4, msg=lambda text: f"d {name}: {text}")


@pytest.mark.parametrize("path", ["native", "fallback"])
@pytest.mark.parametrize("norm", [True, False], ids=["ln_gelu", "linear"])
def test_gated_update_op_passes_gradcheck_and_opcheck_in_float64(norm, path, monkeypatch):
    if path == "fallback":
        monkeypatch.setattr(native, "_state", {"ok": False})
    z, prev, wc, ln = _update_inputs(2, 5, 20, torch.float64, norm)
    torch.testing.assert_close(update.gated_update(z, prev, wc, ln), update.update_composite(z, prev, wc, ln))
    args = (z, prev, wc) + ((ln.weight, ln.bias, ln.eps) if norm else (None, None, 1e-5))
    rest = args[3:]
    assert torch.autograd.gradcheck(lambda z_, p_, w_: update._gated_update_op(z_, p_, w_, *rest)[0], args[:3])
    if norm:
        assert torch.autograd.gradcheck(lambda w, b: update._gated_update_op(*args[:3], w, b, ln.eps)[0],
                                        (ln.weight, ln.bias))
    torch.library.opcheck(update._gated_update_op, args)


def test_gated_update_is_not_taken_where_it_does_not_apply():
    assert native.load()
    z, prev, wc, ln = _update_inputs(2, 4, 16, torch.float32, True)
    assert update.update_applicable(z, prev, wc, ln) and update.update_applicable(z, prev, wc, None)
    assert not update.update_applicable(z, prev, wc, torch.nn.LayerNorm(16, elementwise_affine=False))
    assert not update.update_applicable(z.bfloat16(), prev, wc, ln)                   # autocast dtypes
    assert not update.update_applicable(z, prev.double(), wc, ln)                     # mixed dtypes
