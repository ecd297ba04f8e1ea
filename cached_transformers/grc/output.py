"""The GRC layer's output on CPU in one kernel: the lambda mix of the two branches plus the positional conv.

    out = (1 - a_h) s + a_h [m in each head's first D_m/H channels] + conv(x) on the grid tokens

Eagerly that is five passes over B x T x D (scale, in-place ``addcmul_``, conv, in-place add, and
autograd's copies of the in-place views in the backward). The custom op ``cached_transformers::mix_pos``
runs ``csrc/pair_conv.cpp``: the mix is added to each output row in the conv's own pass, and the backward
is one pass plus the conv's backward. It is one autograd node eagerly and one opaque call to
``torch.compile``. The layer takes it for float32 / float64 CPU tensors with the native kernels built and
a positional conv of two channels per group (ratio 0.5); everywhere else (GPUs, where inductor fuses the
mix itself, bf16, other ratios) it runs :func:`mix` and the positional conv, which the op also falls back
to. Equal to the composite code to float32 round-off (tests/test_fused_kernels.py).
"""
from __future__ import annotations

import torch

from . import native
from .posconv import _pair_conv_backward_op, pair_grouped_conv3x3


def mix(s: torch.Tensor, m: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """(1 - a_h) s_h + a_h m_h in each head's first D_m/H channels, (1 - a_h) s_h in the others (a new tensor).

    A per-channel scale plus an in-place ``addcmul_`` into the mixed channels: no zero padding is built.
    """
    b, t, d = s.shape
    heads = alpha.shape[0]
    out = s * (1 - alpha).repeat_interleave(d // heads)
    out.view(b, t, heads, d // heads)[..., : m.shape[-1] // heads].addcmul_(m.view(b, t, heads, -1), alpha[:, None])
    return out


def composite(s: torch.Tensor, m: torch.Tensor, alpha: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor:
    """The fused op's sums from PyTorch operations (its fallback where the kernels are not built)."""
    b, t, d = s.shape
    h, w = grid
    p = t - h * w
    out = mix(s, m, alpha)
    grid_x = x[:, p:].reshape(b, h, w, d).permute(0, 3, 1, 2)                # channels-last view, no copy
    out[:, p:] += pair_grouped_conv3x3(grid_x, weight, bias).view(b, h * w, d)
    return out


@torch.library.custom_op("cached_transformers::mix_pos", mutates_args=())
def _mix_pos_op(s: torch.Tensor, m: torch.Tensor, alpha: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, grid_h: int, grid_w: int) -> torch.Tensor:
    if native.usable(s):
        return torch.ops.cached_transformers_cpu.mix_pos_forward(s, m, alpha, x, weight, bias, grid_h, grid_w)
    with torch.no_grad():  # e.g. an exported program run where the kernels are not built
        return composite(s, m, alpha, x, weight, bias, (grid_h, grid_w))


@_mix_pos_op.register_fake
def _(s, m, alpha, x, weight, bias, grid_h, grid_w):
    return torch.empty_like(s, memory_format=torch.contiguous_format)


@torch.library.custom_op("cached_transformers::mix_pos_backward", mutates_args=())
def _mix_pos_backward_op(grad: torch.Tensor, s: torch.Tensor, m: torch.Tensor, alpha: torch.Tensor, x: torch.Tensor,
                         weight: torch.Tensor, grid_h: int, grid_w: int) -> list[torch.Tensor]:
    if native.usable(s):
        return torch.ops.cached_transformers_cpu.mix_pos_backward(grad, s, m, alpha, x, weight, grid_h, grid_w)
    # the same gradients from PyTorch operations (autograd does not run inside a custom op)
    b, t, d = s.shape
    heads, p = alpha.shape[0], t - grid_h * grid_w
    hd, md = d // heads, m.shape[-1] // heads
    g = grad.view(b, t, heads, hd)
    g_mixed = g[..., :md]
    g_alpha = (g_mixed * m.view(b, t, heads, md)).sum((0, 1, 3)) - (g * s.view(b, t, heads, hd)).sum((0, 1, 3))
    grid_x = x[:, p:].reshape(b, grid_h, grid_w, d).permute(0, 3, 1, 2)
    g_grid, g_weight, g_bias = _pair_conv_backward_op(grad[:, p:].reshape(b, grid_h, grid_w, d), grid_x, weight, True)
    g_x = torch.zeros_like(x)
    g_x[:, p:] = g_grid.permute(0, 2, 3, 1).reshape(b, grid_h * grid_w, d)
    return [grad * (1 - alpha).repeat_interleave(hd), (g_mixed * alpha[:, None]).reshape(b, t, heads * md), g_alpha,
            g_x, g_weight, g_bias]


@_mix_pos_backward_op.register_fake
def _(grad, s, m, alpha, x, weight, grid_h, grid_w):
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (s, m, alpha, x, weight)] + [
        weight.new_empty(weight.shape[0])]


def _setup_context(ctx, inputs, output) -> None:
    s, m, alpha, x, weight, bias, grid_h, grid_w = inputs
    ctx.save_for_backward(s, m, alpha, x, weight)
    ctx.grid, ctx.has_bias = (grid_h, grid_w), bias is not None


def _backward(ctx, grad):
    gs, gm, galpha, gx, gw, gb = _mix_pos_backward_op(grad, *ctx.saved_tensors, *ctx.grid)
    return gs, gm, galpha, gx, gw, gb if ctx.has_bias else None, None, None


_mix_pos_op.register_autograd(_backward, setup_context=_setup_context)


def fused_applicable(s: torch.Tensor, m: torch.Tensor, x: torch.Tensor, conv: torch.nn.Conv2d | None) -> bool:
    """Whether the layer's output takes the fused kernel: CPU float32 / float64 and a 2-channel-group conv."""
    return conv is not None and conv.in_channels // conv.groups == 2 and native.usable(s, m, x, conv.weight)


def fused_mix_pos(s: torch.Tensor, m: torch.Tensor, alpha: torch.Tensor, x: torch.Tensor, conv: torch.nn.Conv2d,
                  grid: tuple[int, int]) -> torch.Tensor:
    """``mix(s, m, alpha)`` plus ``conv(x)`` on the grid tokens (x: B x T x D, the last h * w tokens the grid)."""
    return _mix_pos_op(s, m, alpha, x, conv.weight, conv.bias, *grid)
