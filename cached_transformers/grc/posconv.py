"""The GRC positional conv with two channels per group: a native CPU kernel, else two depthwise convs.

The released module's ``pos_emb`` is ``Conv2d(D, D, 3, padding=1, groups=D_m)``; with the default
ratio 0.5 each group maps 2 input channels to 2 output channels, for which oneDNN has no fast kernel.

On CPU in float32 / float64 the custom op below runs ``csrc/pair_conv.cpp`` (built on first use by
``native.py``): forward and backward each make one pass over the activations, with each channel pair
handled as a swap of neighbouring vector lanes. Elsewhere (GPUs, bfloat16, float16, or where the
build failed) the same sums are computed as two depthwise convs, for which cuDNN and oneDNN have fast
channels-last kernels:

    out[2g+o] = conv(x[2g+o], W[2g+o, o]) + conv(x[2g+1-o], W[2g+o, 1-o])
              = same[2g+o]                 + cross[2g+1-o]

where ``same`` and ``cross`` are depthwise convs of ``x`` (``cross`` evaluated at its input channel)
and the second term is swapped within each channel pair; the swap is done in place in the forward and
the backward is written by hand (``aten.convolution_backward`` for both convs), so no extra copies or
zero-filled gradients are made. The custom op (``torch.library``) is one opaque kernel to
``torch.compile``. Both paths equal the grouped conv to float32 round-off; the parameter stays the
grouped conv's ``C x 2 x 3 x 3`` weight, so checkpoints are unchanged. Their speed against the grouped
conv: ``python scripts/benchmark.py --suite posconv`` (docs/library.md).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import native


def _split_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C x 2 x 3 x 3 grouped weight -> (same, cross) depthwise weights, each C x 1 x 3 x 3.

    same[2g+o] = W[2g+o, o]; cross[2g+i] = W[2g+1-i, i] (indexed by the input channel it reads).
    """
    c = weight.shape[0]
    w = weight.view(c // 2, 2, 2, 3, 3)                                   # g, o, i
    same = w.diagonal(dim1=1, dim2=2).permute(0, 3, 1, 2).reshape(c, 1, 3, 3)
    cross = w.flip(1).diagonal(dim1=1, dim2=2).permute(0, 3, 1, 2).reshape(c, 1, 3, 3)
    return same, cross


def _merge_weight_grad(g_same: torch.Tensor, g_cross: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_split_weight` for gradients: two C x 1 x 3 x 3 -> C x 2 x 3 x 3."""
    c = g_same.shape[0]
    out = g_same.new_empty(c // 2, 2, 2, 3, 3)
    s, x = g_same.view(c // 2, 2, 3, 3), g_cross.view(c // 2, 2, 3, 3)
    out.diagonal(dim1=1, dim2=2).copy_(s.permute(0, 2, 3, 1))             # W[2g+o, o] = same[2g+o]
    out[:, 1, 0] = x[:, 0]                                                 # W[2g+1-i, i] = cross[2g+i]
    out[:, 0, 1] = x[:, 1]
    return out.view(c, 2, 3, 3)


def _swap_pairs(t: torch.Tensor) -> torch.Tensor:
    """A new tensor with the channel pairs of a ... x C tensor swapped (2k <-> 2k+1)."""
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    pairs, src = out.view(*t.shape[:-1], -1, 2), t.reshape(*t.shape[:-1], -1, 2)
    pairs[..., 0].copy_(src[..., 1])
    pairs[..., 1].copy_(src[..., 0])
    return out


def _pair_forward(grid: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """grid: B x C x H x W channels-last -> B x H x W x C (contiguous)."""
    c = grid.shape[1]
    w_same, w_cross = _split_weight(weight)
    same = F.conv2d(grid, w_same, bias, padding=1, groups=c).permute(0, 2, 3, 1)
    cross = F.conv2d(grid, w_cross, None, padding=1, groups=c).permute(0, 2, 3, 1)
    same = same.contiguous()
    sp, cp = same.view(*same.shape[:-1], c // 2, 2), cross.reshape(*same.shape[:-1], c // 2, 2)
    sp[..., 0].add_(cp[..., 1])
    sp[..., 1].add_(cp[..., 0])
    return same


# Custom ops (opaque to torch.compile, which calls these eager kernels): inductor's own lowering of the two
# depthwise convs and their backward ran 3-5x slower than this eager code on CPU in a compiled training
# step (ViT-S layer, 1 thread: the positional conv was ~15 of the ~18 ms the compiled layer spent above
# its GEMM floor).
@torch.library.custom_op("cached_transformers::pair_conv3x3", mutates_args=())
def _pair_conv_op(grid: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    grid = grid.contiguous(memory_format=torch.channels_last)
    if native.usable(grid):  # one pass over the activations (csrc/pair_conv.cpp)
        return torch.ops.cached_transformers_cpu.pair_conv3x3_forward(grid.permute(0, 2, 3, 1), weight, bias)
    return _pair_forward(grid, weight, bias)


@_pair_conv_op.register_fake
def _(grid, weight, bias):
    b, c, h, w = grid.shape
    return grid.new_empty(b, h, w, c)


@torch.library.custom_op("cached_transformers::pair_conv3x3_backward", mutates_args=())
def _pair_conv_backward_op(grad: torch.Tensor, grid: torch.Tensor, weight: torch.Tensor,
                           has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grid = grid.contiguous(memory_format=torch.channels_last)
    c = grid.shape[1]
    if native.usable(grid):
        gx, gw, gb = torch.ops.cached_transformers_cpu.pair_conv3x3_backward(grad, grid.permute(0, 2, 3, 1), weight)
        return gx.permute(0, 3, 1, 2), gw, gb
    w_same, w_cross = _split_weight(weight)
    grad = grad.to(grid.dtype).contiguous()
    g_same = grad.permute(0, 3, 1, 2)                                  # channels-last view
    g_cross = _swap_pairs(grad).permute(0, 3, 1, 2)
    args = ([1, 1], [1, 1], [1, 1], False, [0, 0], c)
    gx1, gw1, gb = torch.ops.aten.convolution_backward(
        g_same, grid, w_same, [c] if has_bias else None, *args, [True, True, has_bias])
    gx2, gw2, _ = torch.ops.aten.convolution_backward(g_cross, grid, w_cross, None, *args, [True, True, False])
    return gx1.add_(gx2), _merge_weight_grad(gw1, gw2), gb if has_bias else weight.new_zeros(c)


@_pair_conv_backward_op.register_fake
def _(grad, grid, weight, has_bias):
    return torch.empty_like(grid), torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    grid, weight, bias = inputs
    ctx.save_for_backward(grid, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    grid, weight = ctx.saved_tensors
    gx, gw, gb = _pair_conv_backward_op(grad, grid, weight, ctx.has_bias)
    return gx, gw, gb if ctx.has_bias else None


_pair_conv_op.register_autograd(_backward, setup_context=_setup_context)


def pair_grouped_conv3x3(grid: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv2d(grid, weight, bias, padding=1, groups=C // 2)`` for a C x 2 x 3 x 3 weight.

    grid: B x C x H x W (any layout; made channels-last). Returns B x H x W x C, contiguous.
    """
    if weight.shape[1] != 2 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"pair_grouped_conv3x3 needs a C x 2 x 3 x 3 weight, got {tuple(weight.shape)}.")
    device = grid.device.type
    autocast = torch.is_autocast_enabled(device)
    if autocast:  # cast as autocast would cast a conv, then run without it
        dt = torch.get_autocast_dtype(device)
        grid, weight = grid.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
        return _pair_conv_op(grid, weight, bias)
