"""Checkpoint loading that understands GRC caches and absolute position embeddings.

A GRC cache's length T_m is fixed by the model's nominal input size (e.g. 3136 tokens for PVT stage 1
at 224 x 224, 784 at 112 x 112). A checkpoint whose cache has another length cannot load as-is;
:func:`load_checkpoint` says which layer and both lengths, and with ``resize_cache=True`` resizes each
such cache along its tokens with nearest-neighbour interpolation (what the layer does to its
summaries), so e.g. an ImageNet model can seed a model built for another size. A model built for
another size usually has other absolute position embeddings too (PVT v1's ``pos_embed1..4``, ViT's
``pos_embed``): ``resize_pos_embed=True`` resamples those (PVT: bilinear, as PVT resizes them at run
time; ViT: timm's bicubic resampling), otherwise their mismatch is reported the same way.

:func:`resize_caches` and :func:`resize_pos_embeds` are the two steps on their own; they are shared
with :func:`cached_transformers.load_pretrained`, which also reads files of other layouts.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from ..grc import grc_layers
from .pvt import PyramidVisionTransformer

__all__ = ["CheckpointMismatchError", "load_checkpoint", "resize_cache_tensor", "resize_caches", "resize_pos_embeds"]


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not fit the model; the message says which and what to do."""


def resize_cache_tensor(cache: torch.Tensor, length: int) -> torch.Tensor:
    """1 x T x D_m -> 1 x length x D_m, nearest neighbour along the tokens (identity if equal)."""
    if cache.shape[1] == length:
        return cache
    return F.interpolate(cache.transpose(1, 2).float(), size=length, mode="nearest").transpose(1, 2).to(cache.dtype)


def _unwrap(state_dict: Any) -> dict[str, torch.Tensor]:
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = torch.load(state_dict, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a state_dict mapping or a path, got {type(state_dict).__name__}")
    for key in ("state_dict", "model", "state_dict_ema"):  # common wrappers (Lightning, timm train scripts)
        inner = state_dict.get(key)
        if isinstance(inner, Mapping) and not any(isinstance(v, torch.Tensor) for v in state_dict.values()):
            state_dict = inner
            break
    return dict(state_dict)


def _pos_embed_targets(model: nn.Module) -> dict[str, tuple[tuple[int, int], int, str, bool]]:
    """Absolute position embeddings the loader can resample: key -> (grid, prefix tokens, mode, antialias)."""
    targets = {}
    for name, module in model.named_modules():
        pre = f"{name}." if name else ""
        if isinstance(module, PyramidVisionTransformer):
            for i in range(module._num_stages):
                pe = getattr(module, f"patch_embed{i + 1}")
                targets[f"{pre}pos_embed{i + 1}"] = ((pe.H, pe.W), 1 if i == 3 else 0, "bilinear", False)
        elif isinstance(module, VisionTransformer) and getattr(module, "pos_embed", None) is not None:
            prefix = 0 if module.no_embed_class else module.num_prefix_tokens
            targets[f"{pre}pos_embed"] = (tuple(module.patch_embed.grid_size), prefix, "bicubic", True)
    return targets


def resize_caches(sd: dict[str, torch.Tensor], model: nn.Module, resize: bool) -> list[str]:
    """Fit every GRC cache of ``sd`` (in place) to the model's length; returns the keys resized.

    A layer that dropped its prefix slots (:meth:`GRCAttention.drop_prefix_tokens`, PVT's stage 4 as a
    feature extractor) takes a cache with those slots by dropping them (not a resize: always done).

    Raises:
        CheckpointMismatchError: a length differs and ``resize`` is False, or a width D_m differs.
    """
    resized = []
    for name, layer in grc_layers(model).items():
        for buf in ("cache", "pending") if layer.config.causal else ("cache",):  # causal: the pending summary too
            key = f"{name}.{buf}" if name else buf
            if key not in sd:
                continue
            saved, want = sd[key], getattr(layer, buf)
            if saved.dim() != 3 or saved.shape[2] != want.shape[2]:
                ratio = f" (r = {saved.shape[-1] / layer.dim:g})" if saved.dim() == 3 else ""
                raise CheckpointMismatchError(
                    f"GRC cache width {tuple(saved.shape)} in the checkpoint but {tuple(want.shape)} in the model for "
                    f"{key}: the checkpoint was trained with another GRC ratio{ratio}, which cannot be resized; build "
                    f"the model with that ratio.")
            dropped = layer.dropped_prefix_tokens
            if dropped and saved.shape[1] == want.shape[1] + dropped:  # the host's file with its class token's slot
                sd[key] = saved[:, dropped:]
                resized.append(key)
            elif saved.shape[1] != want.shape[1]:
                if not resize:
                    raise CheckpointMismatchError(
                        f"GRC cache length {saved.shape[1]} in the checkpoint but {want.shape[1]} in the model for "
                        f"{key}; pass resize_cache=True to resize it (nearest along tokens), or build the model with "
                        f"the img_size the checkpoint was trained at.")
                sd[key] = resize_cache_tensor(saved, want.shape[1])
                resized.append(key)
    return resized


def resize_pos_embeds(sd: dict[str, torch.Tensor], model: nn.Module, resize: bool) -> list[str]:
    """Resample (in place) absolute position embeddings of another grid (PVT v1, ViT); returns the keys.

    The checkpoint's grid is taken to be square. Raises :class:`CheckpointMismatchError` when a
    length differs and ``resize`` is False.
    """
    resized = []
    params = dict(model.state_dict())
    for key, (grid, prefix, mode, antialias) in _pos_embed_targets(model).items():
        if key not in sd or key not in params or sd[key].shape == params[key].shape:
            continue
        saved, want = sd[key], params[key]
        if not resize:
            raise CheckpointMismatchError(
                f"position embedding {key} has {saved.shape[1]} tokens in the checkpoint but {want.shape[1]} in the "
                f"model (built for another input size); pass resize_pos_embed=True to resample it.")
        sd[key] = resample_abs_pos_embed(saved, list(grid), num_prefix_tokens=prefix, interpolation=mode,
                                         antialias=antialias)
        resized.append(key)
    return resized


def load_checkpoint(model: nn.Module, state_dict: Mapping[str, Any] | str | os.PathLike, strict: bool = True,
                    resize_cache: bool = False, resize_pos_embed: bool = False) -> Any:
    """Load ``state_dict`` into ``model``, checking every GRC cache length first.

    Args:
        model: the model (its GRC layers are found by module name).
        state_dict: a state_dict, a wrapper dict holding one under ``state_dict`` / ``model``, or a path.
        strict: passed to ``load_state_dict``.
        resize_cache: resize caches of another length to the model's (nearest along tokens) instead of
            raising.
        resize_pos_embed: resample absolute position embeddings of another grid (PVT v1, ViT) to the
            model's; the checkpoint's grid is taken to be square.

    Returns ``load_state_dict``'s result (missing / unexpected keys). For files of other layouts
    (Lightning checkpoints, official PVT releases, a baseline's weights in a cached model) use
    :func:`cached_transformers.load_pretrained`.

    Raises:
        CheckpointMismatchError (a ``ValueError``): a cache length differs and ``resize_cache`` is False,
            a cache width D_m differs (the GRC ratio differs: not resizable), or a position embedding's
            length differs and ``resize_pos_embed`` is False.
    """
    sd = _unwrap(state_dict)
    resize_caches(sd, model, resize_cache)
    resize_pos_embeds(sd, model, resize_pos_embed)
    return model.load_state_dict(sd, strict=strict)
