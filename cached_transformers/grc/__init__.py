"""The Gated Recurrent Cache: configuration, the attention layer and whole-model helpers."""
from .attention import SelfAttention, SRAttention, padding_to_attn_mask
from .config import PRESETS, GRCConfig, optional_grc_config, split_grc_kwargs
from .layer import GRCAttention, memory_width
from .sync import sync_caches, synced_cache_state
from .utils import copy_caches, grc_layers, mixing_weights, reset_caches

__all__ = [
    "GRCAttention", "GRCConfig", "PRESETS", "SRAttention", "SelfAttention", "copy_caches", "grc_layers",
    "memory_width", "mixing_weights", "optional_grc_config", "padding_to_attn_mask", "reset_caches",
    "split_grc_kwargs", "sync_caches", "synced_cache_state",
]
