"""A Transformer-XL-style attention cache for the vision models (the paper's Table 2 comparison host).

Each attention layer keeps the keys and values of its previous *training* batch and attends to
``[cached keys/values; current keys/values]``: no gating, no gradient across steps (the cache is a
detached copy), no new parameters. This is the "Transformer-XL cache" row of Table 2, the
alternative GRC is compared against.

Rules (the same as GRC's stored cache, method.md section 3):

* the cache is written exactly once per training forward (``model.train()`` with gradients enabled,
  not during a backward-time checkpoint recomputation), never in ``eval()`` and never under
  ``torch.no_grad()``; evaluation reads the cache left by the last training batch;
* sample ``b`` of a batch attends to sample ``b mod B'`` of the cached batch (B' its size), so a last
  batch of another size works; an empty cache (a fresh model) means plain self-attention;
* the cache is a non-persistent buffer: ``state_dict`` and parameters are exactly the baseline's, so
  baseline checkpoints load strictly and checkpoints of this model load into the baseline. A resumed
  run starts with an empty cache (one step without memory). Under DDP every process keeps its own.

:func:`add_xl_cache` converts a host attention module in place (timm's ViT ``Attention`` and the
project's PVT ``SRAttention``): the object keeps its parameters and names; only its forward changes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import register_notrace_module
from timm.models.vision_transformer import Attention as TimmAttention

from .grc.attention import SRAttention

__all__ = ["XLCacheMixin", "add_xl_cache", "xl_cache_layers", "reset_xl_caches"]


def _in_backward() -> bool:
    """True while autograd runs a backward pass (a non-reentrant checkpoint recomputing a forward); eager only:
    compiled code recomputes inside its backward graph, never in Python (the GRC layer's rule, grc/layer.py)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.view(b, n, h, c // h).transpose(1, 2)


class XLCacheMixin:
    """Forward of a host attention with the previous training batch's keys/values prepended."""

    xl_k: torch.Tensor | None
    xl_v: torch.Tensor | None
    cache_writes: int

    def _init_xl_cache(self) -> None:
        self.register_buffer("xl_k", None, persistent=False)  # type: ignore[attr-defined]
        self.register_buffer("xl_v", None, persistent=False)  # type: ignore[attr-defined]
        self.cache_writes = 0
        self._xl_prev: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)  # what the last write read

    def reset_cache(self) -> None:
        self.xl_k = self.xl_v = None
        self._xl_prev = (None, None)

    def _with_cache(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
        b = q.shape[0]
        ck, cv = self.xl_k, self.xl_v
        if _in_backward():  # a checkpoint recomputation reads what its forward read, and writes nothing
            ck, cv = self._xl_prev
        elif self.training and torch.is_grad_enabled():  # type: ignore[attr-defined]
            # rebinding (not copying) keeps the tensors this forward read unchanged for its graph
            self.xl_k, self.xl_v = k.detach(), v.detach()
            if not torch.compiler.is_compiling():  # Python bookkeeping stays out of compiled graphs
                self._xl_prev = (ck, cv)
                self.cache_writes += 1
        if ck is not None:
            idx = torch.arange(b, device=k.device) % ck.shape[0]
            k = torch.cat([ck[idx].to(k.dtype), k], dim=2)
            v = torch.cat([cv[idx].to(v.dtype), v], dim=2)
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale,  # type: ignore[attr-defined]
                                              dropout_p=dropout if self.training else 0.0)  # type: ignore[attr-defined]


@register_notrace_module  # FX: a leaf, so a traced model keeps the run-time cache rules (as GRCAttention)
class _XLTimmAttention(XLCacheMixin, TimmAttention):
    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("The XL attention cache supports unmasked, non-causal attention only.")
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = self._with_cache(q, k, v, self.attn_drop.p).transpose(1, 2).reshape(b, n, -1)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


@register_notrace_module
class _XLSRAttention(XLCacheMixin, SRAttention):
    def forward(self, x: torch.Tensor, H: int | None = None, W: int | None = None, kv: torch.Tensor | None = None,
                kv_hw: tuple[int, int] | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if kv is not None or attn_mask is not None:
            raise ValueError("The XL attention cache supports self-attention without masks only.")
        src = x
        if self.sr_ratio > 1:
            hw = (H, W) if H is not None else (int(x.shape[1] ** 0.5),) * 2
            src = self.reduce(x, hw)
        q = _heads(self.q(x), self.num_heads)
        k, v = self.kv(src).chunk(2, dim=-1)
        out = self._with_cache(q, _heads(k, self.num_heads), _heads(v, self.num_heads), self.attn_drop)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.dim)))


_CONVERSIONS: dict[type, type] = {TimmAttention: _XLTimmAttention, SRAttention: _XLSRAttention}


def add_xl_cache(attn: nn.Module) -> nn.Module:
    """Give ``attn`` (timm ``Attention`` or ``SRAttention``, exact type) an XL cache in place; returns it."""
    target = _CONVERSIONS.get(type(attn))
    if target is None:
        raise TypeError(f"No XL attention cache for {type(attn).__name__}; supported: "
                        f"{', '.join(t.__name__ for t in _CONVERSIONS)}.")
    attn.__class__ = target
    attn._init_xl_cache()  # type: ignore[attr-defined]
    return attn


def xl_cache_layers(model: nn.Module) -> list[XLCacheMixin]:
    return [m for m in model.modules() if isinstance(m, XLCacheMixin)]


def reset_xl_caches(model: nn.Module) -> None:
    for m in xl_cache_layers(model):
        m.reset_cache()
