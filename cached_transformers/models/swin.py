"""Cached Swin-T on timm's own ``SwinTransformer``.

The replacement step (:func:`add_grc_to_swin`): build timm's ``swin_tiny_patch4_window7_224``, then in
every block replace ``attn`` (timm's ``WindowAttention``) with a :class:`SwinGRCAttention` that keeps
the window attention object as its ``self_attn``. Baseline keys map 1:1 with ``.self_attn.`` inserted
(``layers.0.blocks.0.attn.qkv.weight`` -> ``layers.0.blocks.0.attn.self_attn.qkv.weight``); with
``grc=False`` the model is timm's Swin-T parameter for parameter.

Design (the paper gives no details for Swin; this is the project's choice):

* The GRC layer sees what the window attention sees: the windows of the (possibly shifted) feature
  map as a batch of nW * B sequences of window-area tokens.
* T_m = the window's token count (49 for 7 x 7 windows; a block whose window was clamped to a smaller
  feature map, e.g. at small inputs, uses that window). Each window's summary is resized to T_m,
  which is the identity, so the cache is a "typical window" memory.
* **One cache per layer, shared across windows and window positions**: the stored-cache update is
  the mean over all nW * B windows of the batch; every window gates itself into its own private copy
  of that cache and attends to it (memory branch ``SRAttention(D_m, heads, qkv_bias=True)``, no
  spatial reduction, since Swin has none).
* The positional conv runs per window on its window grid (7 x 7), zero-padded at window borders.
* The shifted-window attention mask (and the relative position bias) apply to the self branch only;
  the memory branch attends to the whole cache from every query.

``set_input_size`` keeps working (the window size change is forwarded to the kept window
attention; the cache keeps its length and summaries are resized to it). Added modules get timm's
Swin/ViT init. ``features_only=True`` works as for timm's Swin (``FeatureListNet`` over the stages,
NHWC stage outputs; the GRC layers live inside the stages).
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn
from timm.models.vision_transformer import init_weights_vit_timm

from ..grc import GRCAttention, GRCConfig
from .pretrained import grc_checkpoint_filter
from ._common import grc_config_from, make_grc_layer, project_model, wrap_block_attention

__all__ = ["SwinGRCAttention", "add_grc_to_swin"]


class SwinGRCAttention(GRCAttention):
    """GRC layer called the Swin way: ``forward(x_windows, mask=None)``; the mask goes to the self branch.

    The positional conv grid is the current window (``self_attn.window_size``).
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, mask=mask)

    def set_window_size(self, window_size: Any) -> None:
        """Forwarded to the kept window attention (timm's ``set_input_size`` calls it)."""
        self.self_attn.set_window_size(window_size)

    def _square_grid(self, t: int) -> tuple[int, int]:
        h, w = self.self_attn.window_size
        if h * w == t:
            return int(h), int(w)
        return super()._square_grid(t)


def add_grc_to_swin(model: SwinTransformer, config: GRCConfig) -> SwinTransformer:
    """Wrap every block's window attention of a timm ``SwinTransformer`` in a GRC layer (in place)."""
    if not config.enabled:
        return model
    init = partial(init_weights_vit_timm, needs_reset=True)
    for stage in model.layers:
        for blk in stage.blocks:
            grid = tuple(int(v) for v in blk.window_size)
            wrap_block_attention(
                blk, lambda a, grid=grid: make_grc_layer(a, a.dim, a.num_heads, config, grid,
                                                         layer_cls=SwinGRCAttention),
                init_fn=init)
    return model


def _build(config: GRCConfig, **kwargs: Any) -> SwinTransformer:
    return add_grc_to_swin(SwinTransformer(**kwargs), config)


default_cfgs = generate_default_cfgs({
    "swin_tiny_patch4_window7_224_grc": {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
        "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head.fc",
        "license": "mit",
    },
})


@project_model(baseline="swin_tiny_patch4_window7_224")
def swin_tiny_patch4_window7_224_grc(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Cached Swin-T. GRC options: ``grc=`` (mapping / GRCConfig / False) or ``grc_<field>=``."""
    cfg, kwargs = grc_config_from(kwargs)
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    merged = dict(model_args, **kwargs)
    out_indices = merged.pop("out_indices", tuple(range(len(merged["depths"]))))
    return build_model_with_cfg(
        partial(_build, cfg), "swin_tiny_patch4_window7_224_grc", pretrained,
        pretrained_filter_fn=grc_checkpoint_filter(checkpoint_filter_fn),
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **merged)
