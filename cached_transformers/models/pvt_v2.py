"""Cached PVTv2 (B0-B5) on timm's own ``PyramidVisionTransformerV2``.

The replacement step (one place, :func:`add_grc_to_pvt_v2`): build timm's baseline, then in every
block replace ``attn`` with a :class:`PvtV2GRCAttention` that keeps timm's attention object as its
``self_attn``. Baseline keys map 1:1 with ``.self_attn.`` inserted
(``stages.0.blocks.0.attn.q.weight`` -> ``stages.0.blocks.0.attn.self_attn.q.weight``), and with
``grc=False`` the model is timm's ``pvt_v2_bX`` parameter for parameter.

Calling convention. PVTv2 blocks call ``attn(x, feat_size)`` while the GRC layer calls its self
branch as ``self_attn(x, H, W)``. Two thin adapters, neither adding parameters or key levels:

* :class:`PvtV2GRCAttention` (a ``GRCAttention``) accepts the block's ``(x, feat_size)`` call;
* the kept timm attention gets the class :class:`PvtV2HostAttention`, a subclass of timm's PVTv2
  ``Attention`` whose only change is ``forward(x, H, W)`` -> ``Attention.forward(x, (H, W))`` (the
  object, its parameters and init are untouched; only its class is switched).

Memory branch. ``SRAttention(D_m, heads, qkv_bias=True, sr_ratio=sr)``: with ``mem_reduce`` (the
reference preset) the cache is spatially reduced exactly like the host reduces its keys/values
(PVTv2's own SR conv + LayerNorm, ratios 8, 4, 2, 1), on the cache's own nominal grid; without it the
memory branch attends to the full cache. T_m is the stage's nominal token count at the nominal
``img_size`` (keyword, default 224; timm's PVTv2 itself has no such argument): 3136 / 784 / 196 / 49
at 224 (PVTv2 has no class token). The overlapping patch embeddings give grids ceil(S/4), then
halving with ceil. Added modules get timm's PVTv2 init.

Not supported: the linear-attention variant (``pvt_v2_b2_li`` / ``linear=True``): its attention pools
keys/values to a fixed 7 x 7 grid and has no SR ratio the memory branch could mirror; building it
raises a ``ValueError``.

``features_only=True`` works as for timm's PVTv2 (``FeatureListNet`` over the stages; the GRC layers
live inside the stages, so they are kept).
"""
from __future__ import annotations

from functools import partial
from typing import Any, List, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models import pvt_v2 as timm_pvt_v2
from timm.models.pvt_v2 import PyramidVisionTransformerV2, checkpoint_filter_fn

from ..grc import GRCAttention, GRCConfig
from .pretrained import grc_checkpoint_filter
from ._common import conv_out, grc_config_from, make_grc_layer, pair, project_model, wrap_block_attention

__all__ = ["PvtV2GRCAttention", "PvtV2HostAttention", "add_grc_to_pvt_v2", "pvt_v2_stage_grids"]


class PvtV2HostAttention(timm_pvt_v2.Attention):
    """timm's PVTv2 attention, callable as ``forward(x, H, W)`` (or ``forward(x, feat_size)``)."""

    def forward(self, x: torch.Tensor, H: Any, W: int | None = None) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, H if W is None else (H, W))


class PvtV2GRCAttention(GRCAttention):
    """GRC layer called the PVTv2 way: ``forward(x, feat_size)`` with ``feat_size = (H, W)``."""

    def forward(self, x: torch.Tensor, feat_size: List[int], **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, feat_size[0], feat_size[1], **kwargs)


def pvt_v2_stage_grids(img_size: int | Sequence[int], num_stages: int = 4) -> list[tuple[int, int]]:
    """Token grids of the PVTv2 stages for an input size (patch embed 7/4/3, then 3/2/1 per stage)."""
    h, w = pair(img_size)
    grids = []
    for i in range(num_stages):
        k, s, p = (7, 4, 3) if i == 0 else (3, 2, 1)
        h, w = conv_out(h, k, s, p), conv_out(w, k, s, p)
        grids.append((h, w))
    return grids


def add_grc_to_pvt_v2(model: PyramidVisionTransformerV2, config: GRCConfig,
                      img_size: int | Sequence[int] = 224) -> PyramidVisionTransformerV2:
    """Wrap every block's attention of a timm PVTv2 in a GRC layer (in place); see the module doc."""
    if not config.enabled:
        return model
    grids = pvt_v2_stage_grids(img_size, len(model.stages))
    for stage, grid in zip(model.stages, grids):
        for blk in stage.blocks:
            host = blk.attn
            if host.pool is not None:
                raise ValueError("GRC does not support PVTv2's linear attention (pvt_v2_b2_li / linear=True): it pools "
                                 "keys/values to a fixed 7x7 grid, which the cache's memory branch cannot mirror. "
                                 "Use the spatial-reduction variants pvt_v2_b0_grc ... pvt_v2_b5_grc.")
            sr = host.sr.kernel_size[0] if host.sr is not None else 1
            host.__class__ = PvtV2HostAttention

            def make(a: torch.nn.Module, sr: int = sr, grid: tuple[int, int] = grid) -> GRCAttention:
                return make_grc_layer(a, a.dim, a.num_heads, config, grid, sr_ratio=sr, layer_cls=PvtV2GRCAttention)

            wrap_block_attention(blk, make, init_fn=model._init_weights)
    return model


def _build(config: GRCConfig, img_size: int | Sequence[int] = 224, **kwargs: Any) -> PyramidVisionTransformerV2:
    return add_grc_to_pvt_v2(PyramidVisionTransformerV2(**kwargs), config, img_size)


def _cfg() -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "fixed_input_size": False, "license": "apache-2.0",
    }


_ARCHS = {
    "b0": dict(depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256), num_heads=(1, 2, 5, 8)),
    "b1": dict(depths=(2, 2, 2, 2), embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8)),
    "b2": dict(depths=(3, 4, 6, 3), embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8)),
    "b3": dict(depths=(3, 4, 18, 3), embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8)),
    "b4": dict(depths=(3, 8, 27, 3), embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8)),
    "b5": dict(depths=(3, 6, 40, 3), embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(4, 4, 4, 4)),
}

default_cfgs = generate_default_cfgs({f"pvt_v2_{b}_grc": _cfg() for b in _ARCHS})


def _create(arch: str, pretrained: bool, kwargs: dict[str, Any]) -> PyramidVisionTransformerV2:
    cfg, kwargs = grc_config_from(kwargs)
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        partial(_build, cfg), f"pvt_v2_{arch}_grc", pretrained,
        pretrained_filter_fn=grc_checkpoint_filter(checkpoint_filter_fn),
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **dict(_ARCHS[arch], **kwargs))


@project_model(baseline="pvt_v2_b0")
def pvt_v2_b0_grc(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformerV2:
    """Cached PVTv2-B0. GRC options: ``grc=`` / ``grc_<field>=``; ``img_size=`` sets the cache lengths."""
    return _create("b0", pretrained, kwargs)


@project_model(baseline="pvt_v2_b1")
def pvt_v2_b1_grc(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformerV2:
    """Cached PVTv2-B1."""
    return _create("b1", pretrained, kwargs)


@project_model(baseline="pvt_v2_b2")
def pvt_v2_b2_grc(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformerV2:
    """Cached PVTv2-B2."""
    return _create("b2", pretrained, kwargs)


@project_model(baseline="pvt_v2_b3")
def pvt_v2_b3_grc(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformerV2:
    """Cached PVTv2-B3."""
    return _create("b3", pretrained, kwargs)


@project_model(baseline="pvt_v2_b4")
def pvt_v2_b4_grc(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformerV2:
    """Cached PVTv2-B4."""
    return _create("b4", pretrained, kwargs)


@project_model(baseline="pvt_v2_b5")
def pvt_v2_b5_grc(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformerV2:
    """Cached PVTv2-B5."""
    return _create("b5", pretrained, kwargs)
