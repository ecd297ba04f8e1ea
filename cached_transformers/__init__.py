"""Cached Transformers: the Gated Recurrent Cache (GRC) attention and the paper's vision backbones.

Importing the package registers the models with timm, so ``timm.create_model("pvt_tiny_grc")`` works.
The library depends on torch and timm only (no Hydra, no Lightning).
"""
from .grc import (PRESETS, GRCAttention, GRCConfig, SelfAttention, SRAttention, copy_caches, grc_layers,
                  memory_width, mixing_weights, padding_to_attn_mask, reset_caches, split_grc_kwargs,
                  sync_caches, synced_cache_state)
from .convert import convert_reference_state_dict
from . import models  # registers models with timm
from .models import CheckpointMismatchError, PretrainedReport, load_pretrained

__all__ = [
    "CheckpointMismatchError", "GRCAttention", "GRCConfig", "PRESETS", "PretrainedReport",
    "convert_reference_state_dict", "load_pretrained", "SRAttention", "SelfAttention", "copy_caches", "grc_layers",
    "memory_width", "mixing_weights", "padding_to_attn_mask", "reset_caches", "split_grc_kwargs", "sync_caches",
    "synced_cache_state",
]
