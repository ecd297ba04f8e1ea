"""Shared pieces of the model files: the project's model list and the GRC wrapping step.

Every model family builds its GRC layers through :func:`make_grc_layer`, so all of them follow the
same rule (method.md section 1): the host attention is kept as the *self branch* (``self_attn``),
the memory branch is the project's :class:`~cached_transformers.grc.SRAttention` at width
D_m = r * D with the host's heads, and it spatially reduces the cache like the host reduces its
keys/values (PVT's ``sr`` conv + LayerNorm) when ``config.mem_reduce`` is on.

:func:`wrap_block_attention` is the replacement step used for hosts that build their attention
inside their blocks (timm's ViT, PVTv2, Swin): the host module object itself becomes
``<block>.attn.self_attn``, so a baseline checkpoint maps 1:1 onto the GRC model with ``.self_attn.``
inserted after ``.attn`` in every attention key (see :func:`baseline_key_to_grc`).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

from timm.models import register_model
from torch import nn

from ..grc import GRCAttention, GRCConfig, SRAttention, memory_width, split_grc_kwargs

MODEL_NAMES: list[str] = []
"""Every model name this project registers with timm, in registration order."""

BASELINES: dict[str, str] = {}
"""GRC model name -> the timm name of its baseline (parameter for parameter equal with GRC off)."""


def project_model(baseline: str | None = None) -> Callable:
    """Decorator: register a model entry point with timm and record it in :data:`MODEL_NAMES`."""
    def deco(fn: Callable) -> Callable:
        MODEL_NAMES.append(fn.__name__)
        if baseline is not None:
            BASELINES[fn.__name__] = baseline
        return register_model(fn)
    return deco


def reject_grc_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Baseline factories take no GRC options: say where they belong instead of ignoring them."""
    bad = sorted(k for k in kwargs if k == "grc" or k.startswith("grc_"))
    if bad:
        raise TypeError(f"{name} is a baseline without GRC and takes no GRC options {bad}; "
                        f"use {name}_grc for the cached model.")


def grc_config_from(kwargs: dict[str, Any]) -> tuple[GRCConfig, dict[str, Any]]:
    """Split ``grc=`` / ``grc_<field>=`` options from model keyword arguments (clear error if unknown)."""
    return split_grc_kwargs(dict(kwargs))


def make_grc_layer(self_attn: nn.Module, dim: int, num_heads: int, config: GRCConfig,
                   cache_grid: tuple[int, int], num_prefix_tokens: int = 0, sr_ratio: int = 1,
                   layer_cls: type[GRCAttention] = GRCAttention) -> GRCAttention:
    """GRC layer around ``self_attn`` for a host working on a ``cache_grid`` token grid.

    T_m = ``num_prefix_tokens + h * w`` (the host's nominal token count); the memory branch is
    ``SRAttention(D_m, num_heads, qkv_bias=True, sr_ratio=sr_ratio if config.mem_reduce else 1)``.
    A ratio whose D_m does not split into the heads raises :func:`memory_width`'s error.
    """
    dm = memory_width(dim, num_heads, config.ratio)
    sr = sr_ratio if config.mem_reduce else 1
    mem = SRAttention(dm, num_heads, qkv_bias=True, sr_ratio=sr)
    h, w = cache_grid
    return layer_cls(dim, num_heads, self_attn=self_attn, cache_len=num_prefix_tokens + h * w, config=config,
                     mem_attn=mem, cache_grid=(h, w), num_prefix_tokens=num_prefix_tokens)


def init_added_modules(layer: GRCAttention, init_fn: Callable[[nn.Module], None]) -> None:
    """Apply the host's weight init to the modules GRC adds (not to the kept ``self_attn``).

    ``lam`` (lambda_init) and the zero cache are set by the layer itself and are left alone.
    """
    for name, module in layer.named_modules():
        if name == "" or name == "self_attn" or name.startswith("self_attn."):
            continue
        init_fn(module)


def wrap_block_attention(block: nn.Module, make: Callable[[nn.Module], GRCAttention],
                         init_fn: Callable[[nn.Module], None] | None = None, attr: str = "attn") -> GRCAttention:
    """The replacement step: ``block.<attr>`` becomes ``make(old_attn)`` which keeps it as ``self_attn``."""
    host = getattr(block, attr)
    layer = make(host)
    if layer.self_attn is not host:
        raise RuntimeError("the GRC layer must keep the host attention object as its self branch")
    if init_fn is not None:
        init_added_modules(layer, init_fn)
    setattr(block, attr, layer)
    return layer


_ATTN_KEY = re.compile(r"(^|\.)attn\.(?!self_attn\.)")


def baseline_key_to_grc(key: str) -> str:
    """Map a baseline checkpoint key onto the GRC model's key (``blocks.0.attn.qkv.weight`` ->
    ``blocks.0.attn.self_attn.qkv.weight``); keys outside the attention are unchanged."""
    return _ATTN_KEY.sub(lambda m: f"{m.group(1)}attn.self_attn.", key, count=1)


def conv_out(n: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution along one axis."""
    return (n + 2 * padding - kernel) // stride + 1


def pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)
