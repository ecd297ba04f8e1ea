"""Attention blocks the GRC layer is built from, all on ``F.scaled_dot_product_attention``.

``SRAttention`` is PVT's spatial-reduction attention (q / kv / proj, optional ``sr`` conv + ``norm``;
parameter names match the official PVT v1 release). With ``sr_ratio=1`` it is plain multi-head
attention, which is what the GRC memory branch uses for hosts without spatial reduction.

``SelfAttention`` is a plain multi-head self-attention with a key padding mask and a causal flag,
the self branch of the language models.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """B x N x C -> B x H x N x C/H."""
    b, n, c = t.shape
    return t.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def padding_to_attn_mask(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """B x T bool (True = padding) -> B x 1 x 1 x T bool mask for SDPA (True = attend)."""
    if key_padding_mask is None:
        return None
    return (~key_padding_mask.bool())[:, None, None, :]


@register_notrace_module  # its grid handling depends on shapes: an FX leaf (timm's feature path)
class SRAttention(nn.Module):
    """Multi-head attention with optional spatial reduction of the keys/values (PVT v1).

    forward(x: B x N x C, H, W, kv: B x M x C | None, kv_hw: (h, w) | None) -> B x N x C.
    ``kv`` defaults to ``x`` laid out on the (H, W) grid; ``kv_hw`` is the grid of ``kv`` for the
    spatial reduction (its leading ``M - h*w`` tokens, e.g. a class token, bypass the reduction).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, sr_ratio: int = 1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}.")
        self.dim, self.num_heads, self.sr_ratio = dim, num_heads, sr_ratio
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def reduce(self, kv: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Spatially reduce B x (P + h*w) x C tokens on the (h, w) grid; P prefix tokens pass through."""
        b, m, c = kv.shape
        h, w = hw
        prefix = m - h * w
        if prefix < 0:
            raise ValueError(f"{m} tokens do not fill a {h}x{w} grid.")
        grid = kv[:, prefix:].transpose(1, 2).reshape(b, c, h, w)
        red = self.norm(self.sr(grid).flatten(2).transpose(1, 2))
        return torch.cat([kv[:, :prefix], red], dim=1) if prefix else red

    def forward(self, x: torch.Tensor, H: int | None = None, W: int | None = None,
                kv: torch.Tensor | None = None, kv_hw: tuple[int, int] | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if kv is None:
            kv, kv_hw = x, (kv_hw or ((H, W) if H is not None else None))
        if self.sr_ratio > 1:
            if kv_hw is None:
                side = int(kv.shape[1] ** 0.5)
                kv_hw = (side, side)
            kv = self.reduce(kv, kv_hw)
        q = _heads(self.q(x), self.num_heads)
        k, v = self.kv(kv).chunk(2, dim=-1)  # strided views: SDPA reads them without a copy
        k, v = _heads(k, self.num_heads), _heads(v, self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.dim)
        return self.proj_drop(self.proj(out))


class SelfAttention(nn.Module):
    """Multi-head self-attention with padding mask and causal option (language self branch).

    forward(x: B x T x C, key_padding_mask: B x T bool (True = pad) | None) -> B x T x C.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, causal: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}.")
        self.dim, self.num_heads, self.causal, self.attn_drop = dim, num_heads, causal, attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        mask = padding_to_attn_mask(key_padding_mask)
        if self.causal:
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            mask = causal if mask is None else mask & causal
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, t, c)))
