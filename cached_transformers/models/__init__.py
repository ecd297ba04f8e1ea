"""The paper's vision backbones, registered with timm on import.

Registered names (:data:`MODEL_NAMES`):

* PVT v1 written here (timm has none): ``pvt_tiny``, ``pvt_small``, ``pvt_medium``, ``pvt_large`` and
  their cached variants ``pvt_<size>_grc``;
* cached variants of timm's own baselines: ``vit_small_patch16_224_grc`` (DeiT-S),
  ``pvt_v2_b0_grc`` ... ``pvt_v2_b5_grc``, ``swin_tiny_patch4_window7_224_grc``.

Every ``*_grc`` model takes GRC options as ``grc=`` (a mapping, a :class:`GRCConfig`, or ``False`` for
the exact baseline) or flat ``grc_<field>=`` keywords; :data:`BASELINES` maps each to its baseline.

Use ``timm.create_model(name, ...)`` or :func:`create_model` (same, with a clear error for unknown
names); :func:`load_checkpoint` loads weights and handles GRC cache lengths; :func:`load_pretrained`
starts a model from a project checkpoint, a plain state_dict, an official PVT release file or (for a
cached model) its baseline's weights.
"""
from __future__ import annotations

from typing import Any

import timm
from torch import nn

from . import pvt, pvt_v2, swin, vit  # noqa: F401  (registers the models with timm)
from ._common import BASELINES, MODEL_NAMES, baseline_key_to_grc
from ._loading import CheckpointMismatchError, load_checkpoint, resize_cache_tensor
from .pretrained import PretrainedReport, load_pretrained
from .pvt import PyramidVisionTransformer

__all__ = ["BASELINES", "CheckpointMismatchError", "MODEL_NAMES", "PretrainedReport", "PyramidVisionTransformer",
           "available_models", "baseline_key_to_grc", "create_model", "load_checkpoint", "load_pretrained",
           "resize_cache_tensor"]


def available_models() -> list[str]:
    """This project's models and the timm baselines of its cached models, sorted."""
    return sorted(set(MODEL_NAMES) | set(BASELINES.values()))


def create_model(name: str, *, any_timm: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` restricted to :func:`available_models` (set ``any_timm`` for all of timm).

    Raises:
        ValueError: ``name`` is not one of this project's models (the message lists them).
    """
    known = available_models()
    if name not in known and not (any_timm and timm.is_model(name)):
        raise ValueError(f"Unknown model {name!r}. Available models: {', '.join(known)}.")
    return timm.create_model(name, **kwargs)
