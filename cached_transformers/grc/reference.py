"""An independent, deliberately literal re-derivation of the authors' released GRC module.

Written from method.md section 1 (not from the authors' file): explicit softmax attention, three
separate gate Linears, zero padding materialised, the released parameter names
(``attn_self_func``, ``attn_mem``, ``linear_reset``, ``linear_update``, ``linear_add``, ``Norm1``,
``lam``, ``pos_emb``, ``gr_cache``). The project's fused ``GRCAttention`` is tested against it, and
``scripts/benchmark.py --reference`` times it to show what the fusion saves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RefPVTAttention(nn.Module):
    """PVT v1 attention as released: kv grid defaults to a square of the *query* length."""

    def __init__(self, dim, num_heads=1, qkv_bias=True, sr_ratio=1):
        super().__init__()
        self.dim, self.num_heads, self.sr_ratio = dim, num_heads, sr_ratio
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, q, kv=None, H=None, W=None):
        B, N, C = q.shape
        kv = q if kv is None else kv
        h = self.num_heads
        qh = self.q(q).reshape(B, N, h, C // h).permute(0, 2, 1, 3)
        if H is None:
            H = W = int(N ** 0.5)
        if self.sr_ratio > 1:
            red = self.sr(kv.permute(0, 2, 1).reshape(B, C, H, W)).reshape(B, C, -1).permute(0, 2, 1)
            kv = self.norm(red)
        kvh = self.kv(kv).reshape(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4)
        attn = ((qh @ kvh[0].transpose(-2, -1)) * self.scale).softmax(-1)
        return self.proj((attn @ kvh[1]).transpose(1, 2).reshape(B, N, C))


class RefGRC(nn.Module):
    """The released GRC-Attention, literal. Cache length fixed at construction for testing."""

    def __init__(self, dim, num_heads, sr_ratio, cache_len, cls_dim=0, ratio=0.5):
        super().__init__()
        dm = int(dim * ratio)
        self.cache_dim, self.heads, self.cls_dim = dm, num_heads, cls_dim
        self.attn_self_func = RefPVTAttention(dim, num_heads, sr_ratio=sr_ratio)
        self.attn_mem = RefPVTAttention(dm, num_heads, sr_ratio=sr_ratio)
        self.linear_reset = nn.Linear(2 * dm, dm)
        self.linear_update = nn.Linear(2 * dm, dm)
        self.linear_add = nn.Linear(2 * dm, dm)
        self.Norm1 = nn.LayerNorm(dm)
        self.lam = nn.Parameter(torch.zeros(num_heads) - 1)
        self.pos_emb = nn.Conv2d(dim, dim, kernel_size=3, groups=dm, stride=1, padding=1)
        self.register_buffer("gr_cache", torch.zeros(1, cache_len, dm))

    def forward(self, x, H, W):
        B, T, C = x.shape
        pe = self.pos_emb(x[:, self.cls_dim:, :].reshape(B, H, W, C).permute(0, 3, 1, 2))
        pe = pe.reshape(B, -1, T - self.cls_dim).transpose(1, 2)
        if self.cls_dim:
            pe = torch.cat([pe.new_zeros(B, self.cls_dim, C), pe], dim=1)
        x_self = self.attn_self_func(x, kv=x, H=H, W=W).reshape(B, T, self.heads, -1)
        cache = self.gr_cache.expand(B, -1, -1)
        summ = x_self.reshape(B, T, C)[:, :, : self.cache_dim]
        summ = F.interpolate(summ.transpose(1, 2), self.gr_cache.shape[1]).transpose(1, 2)
        reset = torch.sigmoid(self.linear_reset(torch.cat([cache, summ], -1)))
        upd = torch.sigmoid(self.linear_update(torch.cat([cache, summ], -1)))
        cand = self.Norm1(F.gelu(self.linear_add(torch.cat([reset * cache, summ], -1))))
        new = upd * cand + (1 - upd) * cache
        if self.training:
            self.gr_cache.data = new.mean(0, keepdim=True).detach()
        x_mem = self.attn_mem(x[:, :, : self.cache_dim], new).reshape(B, T, self.heads, -1)
        alpha = torch.sigmoid(self.lam).view(1, 1, -1, 1)
        pad = x_mem.new_zeros(B, T, self.heads, (C - self.cache_dim) // self.heads)
        out = alpha * torch.cat([x_mem, pad], -1) + (1 - alpha) * x_self
        return out.reshape(B, T, C) + pe
