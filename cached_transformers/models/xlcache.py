"""Vision models with the Transformer-XL-style attention cache (paper Table 2): ``<baseline>_xlcache``.

``pvt_tiny_xlcache``, ``pvt_small_xlcache``, ``pvt_medium_xlcache`` and ``vit_small_patch16_224_xlcache``
build the baseline (``pvt_tiny`` ... / timm's ``vit_small_patch16_224``) and convert every block's
attention with :func:`cached_transformers.xlcache.add_xl_cache`: same parameters, same names, same
state_dict as the baseline (see that module for the cache rules). They are registered with timm
(``timm.create_model``, ``model=pvt_tiny_xlcache`` in the configs) and listed in :data:`XLCACHE_BASELINES`.
"""
from __future__ import annotations

from typing import Any

import timm
from torch import nn

from ..xlcache import add_xl_cache
from timm.models import register_model

from ._common import reject_grc_kwargs

XLCACHE_BASELINES: dict[str, str] = {}
"""XL-cache model name -> its baseline (parameter for parameter equal)."""


def convert_to_xl_cache(model: nn.Module) -> nn.Module:
    """Give every transformer block's ``attn`` of ``model`` the XL cache (in place)."""
    blocks = [m for m in model.modules() if hasattr(m, "attn") and hasattr(m, "mlp")]
    if not blocks:
        raise TypeError(f"{type(model).__name__} has no transformer blocks with an 'attn' to cache.")
    for blk in blocks:
        add_xl_cache(blk.attn)
    return model


def _make(name: str, baseline: str):
    def fn(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        reject_grc_kwargs(name, kwargs)
        return convert_to_xl_cache(timm.create_model(baseline, pretrained=pretrained, **kwargs))
    fn.__name__ = name
    fn.__doc__ = f"{baseline} with the Transformer-XL-style attention cache in every block (no extra parameters)."
    XLCACHE_BASELINES[name] = baseline
    return register_model(fn)  # timm's registry only: MODEL_NAMES / BASELINES stay the GRC family's


for _size in ("tiny", "small", "medium"):
    _make(f"pvt_{_size}_xlcache", f"pvt_{_size}")
_make("vit_small_patch16_224_xlcache", "vit_small_patch16_224")
