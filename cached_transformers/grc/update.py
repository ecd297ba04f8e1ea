"""The GRC gated update on CPU as one fused kernel around its GEMM.

    new = lerp(p, LN(gelu(z_c + (sigmoid(z_r) * p) Wc^T)), sigmoid(z_u))

for the gate pre-activations z = [z_r | z_u | z_c] and the stored cache p. Eagerly that is about ten
passes over B x T_m x D_m forward and twenty backward. The custom op ``cached_transformers::gated_update``
runs ``csrc/gated_update.cpp``: one pass on each side of the GEMM (keeping the reset product and the
candidate's pre-activation for the backward), and a backward of one pass, two GEMMs and one pass. It is
one autograd node eagerly and one opaque call to ``torch.compile``. The layer takes it for float32 /
float64 CPU tensors with the native kernels built; everywhere else (GPUs, where inductor fuses the same
operations, bf16) it runs :func:`update_composite`, which the op also falls back to. Equal to the
composite code to float32 round-off (tests/test_fused_kernels.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native

def update_composite(z: torch.Tensor, prev: torch.Tensor, wc: torch.Tensor, norm) -> torch.Tensor:
    """C_new = g_u * C_cand + (1 - g_u) * C_prev from z = [z_r | z_u | z_c] (B x T_m x 3 D_m), prev 1 x T_m x D_m.

    The candidate is ``z_c + (g_r * prev) Wc^T``, through ``norm(gelu(.))`` when a norm is given
    (``ln_gelu``). Under autocast the result is in the activations' dtype (the stored cache stays float32).
    """
    reset_z, update_z, cand_z = z.split(prev.shape[-1], dim=-1)
    reset, update = torch.sigmoid(reset_z), torch.sigmoid(update_z)
    cand = cand_z + F.linear(reset * prev, wc)
    if norm is not None:
        cand = norm(F.gelu(cand))
    dt = cand.dtype
    return torch.lerp(prev.to(dt).expand_as(cand), cand, update.to(dt))


def _layer_norm(weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
    if weight is None:
        return None
    return lambda t: F.layer_norm(t, weight.shape, weight, bias, eps)


@torch.library.custom_op("cached_transformers::gated_update", mutates_args=())
def _gated_update_op(z: torch.Tensor, prev: torch.Tensor, wc: torch.Tensor, ln_weight: torch.Tensor | None,
                     ln_bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (new cache, q = sigmoid(z_r) * prev, a = z_c + q Wc^T); q and a are what the backward reads."""
    if native.usable(z):
        return torch.ops.cached_transformers_cpu.gated_update_forward(z, prev, wc, ln_weight, ln_bias, eps)
    with torch.no_grad():
        q = torch.sigmoid(z[..., : prev.shape[-1]]) * prev
        a = z[..., 2 * prev.shape[-1]:] + F.linear(q, wc)
        return update_composite(z, prev, wc, _layer_norm(ln_weight, ln_bias, eps)), q, a


@_gated_update_op.register_fake
def _(z, prev, wc, ln_weight, ln_bias, eps):
    shape = (*z.shape[:-1], prev.shape[-1])
    return z.new_empty(shape), z.new_empty(shape), z.new_empty(shape)


@torch.library.custom_op("cached_transformers::gated_update_backward", mutates_args=())
def _gated_update_backward_op(grad: torch.Tensor, z: torch.Tensor, prev: torch.Tensor, wc: torch.Tensor,
                              q: torch.Tensor, a: torch.Tensor, ln_weight: torch.Tensor | None,
                              ln_bias: torch.Tensor | None, eps: float) -> list[torch.Tensor]:
    if native.usable(z):
        return torch.ops.cached_transformers_cpu.gated_update_backward(grad, z, prev, wc, q, a, ln_weight, ln_bias, eps)
    # the same gradients from PyTorch operations (autograd does not run inside a custom op)
    reset, update = torch.sigmoid(z[..., : prev.shape[-1]]), torch.sigmoid(z[..., prev.shape[-1]: 2 * prev.shape[-1]])
    if ln_weight is None:
        cand, g_a = a, grad * update
        g_w, g_b = z.new_empty(0), z.new_empty(0)  # distinct tensors: a custom op's outputs may not alias
    else:
        act = F.gelu(a)
        mean, var = act.mean(-1, keepdim=True), act.var(-1, unbiased=False, keepdim=True)
        rstd = torch.rsqrt(var + eps)
        xhat = (act - mean) * rstd
        cand = xhat * ln_weight + ln_bias
        g_c = grad * update
        g_w, g_b = (g_c * xhat).sum((0, 1)), g_c.sum((0, 1))
        g_xhat = g_c * ln_weight
        g_act = rstd * (g_xhat - g_xhat.mean(-1, keepdim=True) - xhat * (g_xhat * xhat).mean(-1, keepdim=True))
        cdf = 0.5 * (1 + torch.erf(a * 0.5 ** 0.5))
        pdf = torch.exp(-0.5 * a * a) * (2 * torch.pi) ** -0.5
        g_a = g_act * (cdf + a * pdf)
    g_update = grad * (cand - prev) * update * (1 - update)
    g_q = g_a @ wc
    g_wc = g_a.flatten(0, 1).t() @ q.flatten(0, 1)
    g_reset = g_q * prev * reset * (1 - reset)
    g_prev = (grad * (1 - update) + g_q * reset).sum(0, keepdim=True)
    return [torch.cat([g_reset, g_update, g_a], dim=-1), g_prev, g_wc, g_w, g_b]


@_gated_update_backward_op.register_fake
def _(grad, z, prev, wc, q, a, ln_weight, ln_bias, eps):
    norm = [torch.empty_like(t) if t is not None else z.new_empty(0) for t in (ln_weight, ln_bias)]
    return [torch.empty_like(z), torch.empty_like(prev), torch.empty_like(wc)] + norm


def _update_setup_context(ctx, inputs, output) -> None:
    z, prev, wc, ln_weight, ln_bias, eps = inputs
    _, q, a = output
    ctx.save_for_backward(z, prev, wc, q, a, ln_weight, ln_bias)
    ctx.eps = eps
    ctx.set_materialize_grads(False)  # q and a are not used outside: no zero gradients for them


def _update_backward(ctx, grad, grad_q, grad_a):
    if grad is None:  # the new cache did not reach the loss
        return None, None, None, None, None, None
    z, prev, wc, q, a, ln_weight, ln_bias = ctx.saved_tensors
    gz, gprev, gwc, gw, gb = _gated_update_backward_op(grad, z, prev, wc, q, a, ln_weight, ln_bias, ctx.eps)
    norm = ln_weight is not None
    return gz, gprev, gwc, gw if norm else None, gb if norm else None, None


_gated_update_op.register_autograd(_update_backward, setup_context=_update_setup_context)


def update_applicable(z: torch.Tensor, prev: torch.Tensor, wc: torch.Tensor, norm: torch.nn.Module | None) -> bool:
    """Whether the gated update takes the fused kernel: CPU float32 / float64, a LayerNorm with both affine parameters or none."""
    if norm is not None and not (isinstance(norm, torch.nn.LayerNorm) and norm.weight is not None
                                 and norm.bias is not None and len(norm.normalized_shape) == 1):
        return False
    return native.usable(z, prev, wc, *(() if norm is None else (norm.weight,)))


def gated_update(z: torch.Tensor, prev: torch.Tensor, wc: torch.Tensor, norm: torch.nn.LayerNorm | None) -> torch.Tensor:
    """:func:`update_composite` as one fused kernel (call where :func:`update_applicable` holds)."""
    if norm is None:
        return _gated_update_op(z, prev, wc, None, None, 1e-5)[0]
    return _gated_update_op(z, prev, wc, norm.weight, norm.bias, norm.eps)[0]
