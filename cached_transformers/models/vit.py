"""Cached ViT-S (DeiT-S) on timm's own ``VisionTransformer``.

``vit_small_patch16_224_grc`` builds timm's ``vit_small_patch16_224`` architecture (patch 16, width
384, depth 12, 6 heads) and then, in every block, replaces ``attn`` with a
:class:`~cached_transformers.grc.GRCAttention` that keeps timm's own ``Attention`` object as its self
branch (:func:`~cached_transformers.models._common.wrap_block_attention`). Baseline keys therefore
map 1:1 (``blocks.3.attn.qkv.weight`` -> ``blocks.3.attn.self_attn.qkv.weight``) and with
``grc=False`` the model *is* timm's ``vit_small_patch16_224`` (same names, same count).

GRC per block: T_m = prefix tokens + patch grid (197 at 224: class token + 14 x 14), memory branch
``SRAttention(D_m, heads, qkv_bias=True)`` (no spatial reduction in ViT), positional conv on the
patch grid (class token excluded). The block's ``attn_mask`` / ``is_causal`` go to the self branch
only. Added modules get timm's ViT init (trunc-normal .02 Linear weights, zero biases).
Limitation: with ``dynamic_img_size=True`` the positional conv needs square patch grids.

Pre-training data and recipe are DeiT's (ImageNet mean/std, crop 0.875), which is what the default
config says; there are no published weights for the cached model (``pretrained=True`` has no URL).
``features_only=True`` works as for timm's ViT (``FeatureGetterNet`` over ``forward_intermediates``).
"""
from __future__ import annotations

from functools import partial
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn, init_weights_vit_timm

from ..grc import GRCConfig
from .pretrained import grc_checkpoint_filter
from ._common import grc_config_from, make_grc_layer, project_model, wrap_block_attention

__all__ = ["add_grc_to_vit"]


def add_grc_to_vit(model: VisionTransformer, config: GRCConfig) -> VisionTransformer:
    """Wrap every block's attention of a timm ``VisionTransformer`` in a GRC layer (in place)."""
    if not config.enabled:
        return model
    grid = tuple(model.patch_embed.grid_size)
    prefix = model.num_prefix_tokens
    init = partial(init_weights_vit_timm, needs_reset=True)
    for blk in model.blocks:
        host = blk.attn
        dim = host.proj.out_features
        wrap_block_attention(
            blk, lambda a: make_grc_layer(a, dim, a.num_heads, config, grid, num_prefix_tokens=prefix),
            init_fn=init)
    return model


def _build(config: GRCConfig, **kwargs: Any) -> VisionTransformer:
    return add_grc_to_vit(VisionTransformer(**kwargs), config)


default_cfgs = generate_default_cfgs({
    "vit_small_patch16_224_grc": {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
        "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "apache-2.0",
    },
})


@project_model(baseline="vit_small_patch16_224")
def vit_small_patch16_224_grc(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Cached ViT-S/16 (DeiT-S). GRC options: ``grc=`` (mapping / GRCConfig / False) or ``grc_<field>=``."""
    cfg, kwargs = grc_config_from(kwargs)
    out_indices = kwargs.pop("out_indices", 3)
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return build_model_with_cfg(
        partial(_build, cfg), "vit_small_patch16_224_grc", pretrained,
        pretrained_filter_fn=grc_checkpoint_filter(checkpoint_filter_fn),
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **dict(model_args, **kwargs))
