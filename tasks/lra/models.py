"""LRA encoders for ListOps: Transformer, BigBird, Reformer, each with an optional GRC cache.

The encoder follows LRA's classifier (benchmarks.md section 3): token embedding (N(0, 1) init), a
learned zero-initialised CLS token prepended, fixed sinusoidal positions added, dropout, pre-norm
blocks ``x + Drop(Attn(LN(x)))`` and ``x + MLP(LN(x))`` (MLP: Dense(mlp)-GELU-Drop-Dense(emb)-Drop),
a final LayerNorm, and the head Dense(mlp)-ReLU-Dense(num_classes) on the CLS token. Dense layers are
Xavier-uniform with zero bias (LRA's initialisers).

``attention`` picks the host attention of every block:

* ``"full"``: dense multi-head attention (``cached_transformers.SelfAttention``);
* ``"bigbird"``: :class:`~tasks.lra.attention.BlockSparseAttention`;
* ``"reformer"``: :class:`~tasks.lra.attention.LSHSelfAttention`.

With ``grc.enabled`` every block's attention becomes ``GRCAttention(emb, heads, self_attn=<the host
attention, unchanged>, cache_len=max_length + 1, config=GRCConfig.make(preset="reference",
padding="valid", pos_encoding="none", ...), mem_attn=...)``. ``memory`` chooses the memory branch:
``"dense"`` (plain attention over the T_m cache tokens, what the Transformer uses), or ``"sparse"``
(the host's own pattern as cross attention: block-sparse for BigBird, LSH for Reformer), which keeps
the cached sparse models sub-quadratic. ``"auto"`` (default) = dense for full attention, sparse
otherwise.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cached_transformers import GRCAttention, GRCConfig, SelfAttention
from cached_transformers.grc import optional_grc_config

from .attention import (BlockSparseAttention, BlockSparseCrossAttention, LSHCrossAttention, LSHSelfAttention,
                        query_padding)
from .tokenizer import NUM_CLASSES, PAD_ID, VOCAB_SIZE

ATTENTIONS = ("full", "bigbird", "reformer")
GRC_DEFAULTS = dict(preset="reference", padding="valid", pos_encoding="none", ratio=0.5)


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """length x dim fixed sinusoidal table (sin on even channels, cos on odd ones)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return pe


def grc_config(grc: Any) -> GRCConfig | None:
    """``grc`` (None / bool / mapping / GRCConfig) -> GRCConfig over this task's ``GRC_DEFAULTS``, or None (off)."""
    return optional_grc_config(grc, GRC_DEFAULTS)


class MlpBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class EncoderBlock(nn.Module):
    """Pre-norm block. forward(x: B x T x D, key_padding_mask: B x T bool (True = pad)) -> B x T x D."""

    def __init__(self, attn: nn.Module, dim: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.attn, self.drop = nn.LayerNorm(dim), attn, nn.Dropout(dropout)
        self.norm2, self.mlp = nn.LayerNorm(dim), MlpBlock(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        with query_padding(getattr(self.attn, "mem_attn", None), key_padding_mask):
            x = x + self.drop(self.attn(h, key_padding_mask=key_padding_mask))
        return x + self.mlp(self.norm2(x))


class LRAClassifier(nn.Module):
    """LRA sequence classifier with a Transformer / BigBird / Reformer encoder, optionally cached.

    Args:
        attention: "full" | "bigbird" | "reformer".
        max_length: input tokens (2000); the GRC cache holds ``max_length + 1`` tokens (with CLS).
        emb_dim, mlp_dim, num_heads, num_layers, dropout, attn_dropout: LRA's 512 / 1024 / 8 / 4 / 0.1 / 0.1.
        head_dim: hidden width of the classifier head (LRA: mlp_dim).
        grc: None/False (baseline) or a mapping of GRCConfig fields (``enabled`` included).
        memory: GRC memory branch, "auto" | "dense" | "sparse" (see the module docstring).
        bigbird: BlockSparseAttention options (block_size, num_global_blocks, num_window_blocks,
            num_random_blocks). reformer: LSH options (chunk_len, n_hashes, n_buckets).

    forward(tokens: B x L int64 (0 = pad), padding_mask: B x L bool (True = pad) | None) -> B x num_classes.
    """

    def __init__(self, attention: str = "full", vocab_size: int = VOCAB_SIZE, num_classes: int = NUM_CLASSES,
                 max_length: int = 2000, emb_dim: int = 512, mlp_dim: int = 1024, num_heads: int = 8,
                 num_layers: int = 4, dropout: float = 0.1, attn_dropout: float = 0.1, head_dim: int | None = None,
                 grc: Any = None, memory: str = "auto", bigbird: Mapping[str, Any] | None = None,
                 reformer: Mapping[str, Any] | None = None):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"Unknown LRA attention {attention!r}; choose one of {list(ATTENTIONS)}.")
        if memory not in ("auto", "dense", "sparse"):
            raise ValueError(f"memory must be auto|dense|sparse, got {memory!r}.")
        self.attention, self.max_length, self.emb_dim = attention, int(max_length), emb_dim
        self.grc = grc_config(grc)
        self.memory = ("dense" if attention == "full" else "sparse") if memory == "auto" else memory
        if self.memory == "sparse" and attention == "full" and self.grc is not None:
            raise ValueError("memory='sparse' needs a sparse host (bigbird or reformer).")
        self.bigbird_kwargs = dict(bigbird or {})
        self.reformer_kwargs = dict(reformer or {})

        self.embed = nn.Embedding(vocab_size, emb_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, emb_dim))
        self.register_buffer("pos", sinusoidal_positions(self.max_length + 1, emb_dim), persistent=False)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            EncoderBlock(self._attention(i, emb_dim, num_heads, attn_dropout), emb_dim, mlp_dim, dropout)
            for i in range(num_layers))
        self.norm = nn.LayerNorm(emb_dim)
        head_dim = head_dim or mlp_dim
        self.head = nn.Sequential(nn.Linear(emb_dim, head_dim), nn.ReLU(), nn.Linear(head_dim, num_classes))
        self._init_weights()

    # ------------------------------------------------------------------ construction
    def _host(self, layer: int, dim: int, heads: int, attn_dropout: float) -> nn.Module:
        if self.attention == "full":
            return SelfAttention(dim, heads, qkv_bias=True, attn_drop=attn_dropout)
        if self.attention == "bigbird":
            return BlockSparseAttention(dim, heads, attn_drop=attn_dropout, seed=layer, **self.bigbird_kwargs)
        return LSHSelfAttention(dim, heads, attn_drop=attn_dropout, seed=layer, **self.reformer_kwargs)

    def _memory(self, layer: int, dm: int, heads: int) -> nn.Module | None:
        if self.memory == "dense":
            return None  # GRCAttention's default: plain attention over the cache
        if self.attention == "bigbird":
            return BlockSparseCrossAttention(dm, heads, seed=1000 + layer, **self.bigbird_kwargs)
        return LSHCrossAttention(dm, heads, seed=1000 + layer, **self.reformer_kwargs)

    def _attention(self, layer: int, dim: int, heads: int, attn_dropout: float) -> nn.Module:
        host = self._host(layer, dim, heads, attn_dropout)
        if self.grc is None:
            return host
        dm = int(dim * self.grc.ratio)
        return GRCAttention(dim, heads, self_attn=host, cache_len=self.max_length + 1, config=self.grc,
                            mem_attn=self._memory(layer, dm, heads))

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.embed.weight, std=1.0)

    # ------------------------------------------------------------------ forward
    def positions(self, t: int) -> torch.Tensor:
        if t <= self.pos.shape[0]:
            return self.pos[:t]
        return sinusoidal_positions(t, self.emb_dim).to(self.pos)

    def encode(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: B x L -> B x (L + 1) x D final-normed features (CLS first)."""
        b, length = tokens.shape
        if padding_mask is None:
            padding_mask = tokens == PAD_ID
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.embed(tokens)], 1)
        mask = torch.cat([padding_mask.new_zeros(b, 1), padding_mask.bool()], 1)
        x = self.drop(x + self.positions(length + 1))
        for block in self.blocks:
            x = block(x, key_padding_mask=mask)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encode(tokens, padding_mask)[:, 0])
