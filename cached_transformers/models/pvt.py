"""PVT v1 (Pyramid Vision Transformer, Wang et al. 2021) and its cached (GRC) variants.

timm has no PVT v1, so it is written here with the parameter names of the official release
(``patch_embed1..4``, ``pos_embed1..4``, ``pos_drop1..4``, ``block1..4``, ``norm``, ``cls_token``,
``head``; blocks ``norm1 / attn (q, kv, proj, sr, norm) / norm2 / mlp (fc1, fc2)``), so the published
ImageNet checkpoints load with ``strict=True`` into ``pvt_tiny`` ... ``pvt_large``.

Architecture: embed dims (64, 128, 320, 512), heads (1, 2, 5, 8), MLP ratios (8, 8, 4, 4), spatial
reduction ratios (8, 4, 2, 1), qkv bias, block LayerNorms with eps 1e-6 (the patch embeddings' and the
attention's SR norms are default ``nn.LayerNorm``), patch sizes 4, 2, 2, 2, a class token in stage 4
(classification reads it), stochastic depth linearly spaced over all blocks. Position embeddings are
resized bilinearly when the input grid differs from the nominal one (as the official code does).
Init as the official code: trunc-normal(std .02) Linear weights, position embeddings and class
token, zero biases, LayerNorm ones/zeros (convolutions keep PyTorch's default).

Cached variants (``pvt_<size>_grc``): every block's ``attn`` is a
:class:`~cached_transformers.grc.GRCAttention` whose self branch is the PVT attention above (so the
baseline's weights sit under ``attn.self_attn.``) and whose memory branch is a second
``SRAttention`` at width D_m with the stage's SR ratio applied to the cache (``mem_reduce``, the
released module's behaviour) or none. T_m is the nominal token count at the nominal ``img_size``
(224: 3136 / 784 / 196 / 50, the last including the class token; 49 in a feature extractor).

Multi-scale features (detection): ``forward_intermediates`` / ``forward_features_pyramid`` give the
four stage outputs as B x C_i x H_i x W_i maps (before the final norm), and
``timm.create_model(name, features_only=True, out_indices=(0, 1, 2, 3))`` wraps the model in timm's
``FeatureGetterNet`` (``feature_info`` channels 64/128/320/512, strides 4/8/16/32). The classifier runs
stage 4 with its class token (an unpruned model's intermediates are the classifier's, the class
token dropped from the map); the feature extractor does not have one, as PVT's detection backbone:
:meth:`~PyramidVisionTransformer.prune_intermediate_layers` with the head pruned (what ``features_only``
does) deletes ``cls_token``, stage 4 then runs on its grid tokens with ``pos_embed4[:, 1:]`` (the
parameter keeps its class slot, so classification files load strictly) and each stage-4 GRC layer drops
its prefix slot (positional conv and cache on the grid tokens only, T_m = 49 at 224).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, register_notrace_function, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..grc import GRCAttention, GRCConfig, SRAttention
from ._common import grc_config_from, make_grc_layer, pair, project_model, reject_grc_kwargs

__all__ = ["PyramidVisionTransformer", "PatchEmbed", "Block"]


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: conv(k = s = patch) + LayerNorm; returns tokens and (H, W)."""

    def __init__(self, img_size: int | Tuple[int, int] = 224, patch_size: int = 4, in_chans: int = 3,
                 embed_dim: int = 64):
        super().__init__()
        self.img_size, self.patch_size = pair(img_size), pair(patch_size)
        self.H, self.W = self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1]
        self.num_patches = self.H * self.W
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


@register_notrace_function  # depends on the input's grid: one FX call (timm's feature path)
def resize_stage_pos_embed(pos: torch.Tensor, hw: tuple[int, int], nominal: tuple[int, int], prefix: int) -> torch.Tensor:
    """A 1 x (prefix + h*w) x C position embedding on the ``nominal`` grid, bilinearly resized to ``hw``."""
    if tuple(hw) == tuple(nominal):
        return pos
    grid = pos[:, prefix:].reshape(1, nominal[0], nominal[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(hw), mode="bilinear").reshape(1, -1, hw[0] * hw[1]).permute(0, 2, 1)
    return torch.cat([pos[:, :prefix], grid], dim=1)


class Block(nn.Module):
    """PVT block: ``x + attn(norm1(x), H, W)``, then ``x + mlp(norm2(x))`` (attn may be a GRC layer)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: float | None = None, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6), sr_ratio: int = 1,
                 grc: GRCConfig | None = None, cache_grid: tuple[int, int] | None = None,
                 num_prefix_tokens: int = 0):
        super().__init__()
        self.norm1 = norm_layer(dim)
        attn = SRAttention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                           proj_drop=drop, sr_ratio=sr_ratio)
        if grc is not None and grc.enabled:
            attn = make_grc_layer(attn, dim, num_heads, grc, cache_grid, num_prefix_tokens, sr_ratio)
        self.attn = attn
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PyramidVisionTransformer(nn.Module):
    """PVT v1 for classification (class token in stage 4; none as a feature extractor), optionally with GRC.

    Args:
        img_size: nominal input size (position embeddings and GRC cache lengths are sized for it;
            other sizes work, the embeddings are resized and the GRC summaries resized to T_m).
        grc: a :class:`GRCConfig` (None or ``enabled=False``: the plain baseline, parameter for parameter).
        Others as the official PVT.
    """

    def __init__(self, img_size: int | Tuple[int, int] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "token",
                 embed_dims: Tuple[int, ...] = (64, 128, 320, 512), num_heads: Tuple[int, ...] = (1, 2, 5, 8),
                 mlp_ratios: Tuple[float, ...] = (8, 8, 4, 4), qkv_bias: bool = True, qk_scale: float | None = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6),
                 depths: Tuple[int, ...] = (3, 4, 6, 3), sr_ratios: Tuple[int, ...] = (8, 4, 2, 1),
                 grc: GRCConfig | None = None):
        super().__init__()
        if global_pool not in ("token", ""):
            raise ValueError(f"PVT v1 pools with its class token: global_pool must be 'token' or '', "
                             f"got {global_pool!r}")
        if len(depths) != 4:
            raise ValueError(f"PVT v1 has 4 stages, got depths={depths}")
        self.num_classes, self.global_pool, self.in_chans = num_classes, global_pool, in_chans
        self.depths, self.embed_dims = tuple(depths), tuple(embed_dims)
        self.num_prefix_tokens = 1
        self.grc_config = grc if grc is not None and grc.enabled else None
        self.grad_checkpointing = False
        img_size = pair(img_size)

        n_blocks = sum(depths)
        dpr = [drop_path_rate * j / (n_blocks - 1) if n_blocks > 1 else 0.0 for j in range(n_blocks)]
        cur, scale, in_dim = 0, 1, in_chans
        self.feature_info: list[dict[str, Any]] = []
        for i in range(4):
            patch = patch_size if i == 0 else 2
            stage_img = (img_size[0] // scale, img_size[1] // scale)
            pe = PatchEmbed(stage_img, patch, in_dim, embed_dims[i])
            scale *= patch
            prefix = 1 if i == 3 else 0
            setattr(self, f"patch_embed{i + 1}", pe)
            setattr(self, f"pos_embed{i + 1}", nn.Parameter(torch.zeros(1, pe.num_patches + prefix, embed_dims[i])))
            setattr(self, f"pos_drop{i + 1}", nn.Dropout(p=drop_rate))
            setattr(self, f"block{i + 1}", nn.ModuleList([
                Block(embed_dims[i], num_heads[i], mlp_ratios[i], qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                      dpr[cur + j], norm_layer, sr_ratios[i], grc=self.grc_config, cache_grid=(pe.H, pe.W),
                      num_prefix_tokens=prefix)
                for j in range(depths[i])]))
            cur += depths[i]
            in_dim = embed_dims[i]
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=scale, module=f"block{i + 1}"))
        self.norm = norm_layer(embed_dims[3])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[3]))
        self.num_features = self.head_hidden_size = embed_dims[3]
        self.head = nn.Linear(embed_dims[3], num_classes) if num_classes > 0 else nn.Identity()
        self._num_stages = 4

        for i in range(4):
            trunc_normal_(getattr(self, f"pos_embed{i + 1}"), std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ timm model API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"} | {f"pos_embed{i + 1}" for i in range(self._num_stages)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^cls_token|^patch_embed1|^pos_embed1",
                    blocks=[(r"^(?:patch_embed|pos_embed|block)(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block (non-reentrant, so GRC caches are still written once per step)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("token", ""):
                raise ValueError("PVT v1 pools with its class token: global_pool must be 'token' or ''")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # ------------------------------------------------------------------ forward
    def _prefix(self, i: int) -> int:
        """Class tokens before the grid tokens of stage ``i`` (0-based): 1 in the classifier's stage 4, else 0."""
        return self.num_prefix_tokens if i == 3 else 0

    def _pos_embed(self, i: int, hw: tuple[int, int]) -> torch.Tensor:
        """Stage ``i`` (0-based) position embedding for an (H, W) grid, bilinearly resized if needed.

        ``pos_embed4``'s slot 0 is the class token's; without the class token it is left out (``[:, 1:]``).
        """
        pe = getattr(self, f"patch_embed{i + 1}")
        pos = getattr(self, f"pos_embed{i + 1}")
        if i == 3 and not self.num_prefix_tokens:
            pos = pos[:, 1:]
        return resize_stage_pos_embed(pos, hw, (pe.H, pe.W), self._prefix(i))

    def _stage(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Run stage ``i`` on a B x C x H x W map (or the image); returns tokens and their grid."""
        x, hw = getattr(self, f"patch_embed{i + 1}")(x)
        if self._prefix(i):
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = getattr(self, f"pos_drop{i + 1}")(x + self._pos_embed(i, hw))
        for blk in getattr(self, f"block{i + 1}"):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, hw[0], hw[1], use_reentrant=False)
            else:
                x = blk(x, hw[0], hw[1])
        return x, hw

    @staticmethod
    def _to_map(x: torch.Tensor, hw: tuple[int, int], prefix: int) -> torch.Tensor:
        b, _, c = x.shape
        return x[:, prefix:].reshape(b, hw[0], hw[1], c).permute(0, 3, 1, 2).contiguous()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> normed stage-4 tokens B x (1 + H4*W4) x C4 (class token first; none in a feature extractor)."""
        for i in range(4):
            x, hw = self._stage(i, x)
            if i < 3:
                x = self._to_map(x, hw, 0)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
            stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs as B x C_i x H_i x W_i maps (timm's convention).

        Args:
            indices: stages to return (int: the last n; sequence: those indices; None: all four).
            norm: apply the final norm to the stage-4 map (the only stage that has one).
            stop_early: stop after the last requested stage.
            intermediates_only: return only the list; else ``(final normed tokens, list)``.
        """
        if output_fmt != "NCHW":
            raise ValueError("PVT v1 intermediates are NCHW maps only.")
        take_indices, max_index = feature_take_indices(self._num_stages, indices)
        last = max_index if (stop_early or intermediates_only) else self._num_stages - 1
        intermediates = []
        for i in range(last + 1):
            x, hw = self._stage(i, x)
            if i in take_indices:
                tokens = self.norm(x) if (norm and i == 3) else x
                intermediates.append(self._to_map(tokens, hw, self._prefix(i)))
            if i < 3:
                x = self._to_map(x, hw, 0)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def forward_features_pyramid(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The four stage maps B x C_i x H_i x W_i (strides 4, 8, 16, 32) for an FPN."""
        return self.forward_intermediates(x, intermediates_only=True)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last requested one (and the head / final norm) for feature use.

        Without the head (``prune_head``, what timm's ``features_only`` asks) the model is a feature
        extractor, as PVT's detection backbone: :meth:`drop_class_token`.
        """
        take_indices, max_index = feature_take_indices(self._num_stages, indices)
        for i in range(max_index + 1, self._num_stages):
            delattr(self, f"patch_embed{i + 1}")
            delattr(self, f"pos_embed{i + 1}")
            delattr(self, f"pos_drop{i + 1}")
            delattr(self, f"block{i + 1}")
        if max_index < 3:
            self.norm = nn.Identity()
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        self._num_stages = max_index + 1
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head or max_index < 3:
            self.reset_classifier(0, "")
            self.drop_class_token()
        return take_indices

    def drop_class_token(self) -> None:
        """Run stage 4 without the class token from now on (PVT's detection backbone; no classifier reads it).

        ``cls_token`` is deleted; stage 4 adds ``pos_embed4[:, 1:]`` (the parameter keeps the class slot,
        so a classification file still loads strictly); every stage-4 GRC layer drops its prefix slot
        (:meth:`GRCAttention.drop_prefix_tokens`: positional conv and cache on the grid tokens only).
        """
        if not self.num_prefix_tokens:
            return
        del self.cls_token
        self.num_prefix_tokens = 0
        if self._num_stages == 4:
            for blk in self.block4:
                if isinstance(blk.attn, GRCAttention):
                    blk.attn.drop_prefix_tokens()


# ---------------------------------------------------------------------- registration
def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
        "interpolation": "bicubic", "fixed_input_size": False, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed1.proj", "classifier": "head",
        "license": "apache-2.0", **kwargs,
    }


_SIZES = {
    "tiny": (2, 2, 2, 2),
    "small": (3, 4, 6, 3),
    "medium": (3, 4, 18, 3),
    "large": (3, 8, 27, 3),
}

default_cfgs = generate_default_cfgs({f"pvt_{s}{g}": _cfg() for s in _SIZES for g in ("", "_grc")})


def _create_pvt(variant: str, pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    from .pretrained import grc_checkpoint_filter  # (imports this module)

    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        PyramidVisionTransformer, variant, pretrained, pretrained_filter_fn=grc_checkpoint_filter(),
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs)


def _baseline(size: str, pretrained: bool, kwargs: dict[str, Any]) -> PyramidVisionTransformer:
    name = f"pvt_{size}"
    reject_grc_kwargs(name, kwargs)
    return _create_pvt(name, pretrained, **dict(dict(depths=_SIZES[size]), **kwargs))


def _cached(size: str, pretrained: bool, kwargs: dict[str, Any]) -> PyramidVisionTransformer:
    cfg, kwargs = grc_config_from(kwargs)
    return _create_pvt(f"pvt_{size}_grc", pretrained, grc=cfg, **dict(dict(depths=_SIZES[size]), **kwargs))


@project_model()
def pvt_tiny(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """PVT-Tiny (13.23M params)."""
    return _baseline("tiny", pretrained, kwargs)


@project_model()
def pvt_small(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """PVT-Small (24.49M params)."""
    return _baseline("small", pretrained, kwargs)


@project_model()
def pvt_medium(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """PVT-Medium (44.21M params)."""
    return _baseline("medium", pretrained, kwargs)


@project_model()
def pvt_large(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """PVT-Large."""
    return _baseline("large", pretrained, kwargs)


@project_model(baseline="pvt_tiny")
def pvt_tiny_grc(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """Cached PVT-Tiny (15.67M params with the reference preset). GRC options: ``grc=`` / ``grc_<field>=``."""
    return _cached("tiny", pretrained, kwargs)


@project_model(baseline="pvt_small")
def pvt_small_grc(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """Cached PVT-Small (29.36M params with the reference preset)."""
    return _cached("small", pretrained, kwargs)


@project_model(baseline="pvt_medium")
def pvt_medium_grc(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """Cached PVT-Medium (53.48M params with the reference preset)."""
    return _cached("medium", pretrained, kwargs)


@project_model(baseline="pvt_large")
def pvt_large_grc(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """Cached PVT-Large."""
    return _cached("large", pretrained, kwargs)
