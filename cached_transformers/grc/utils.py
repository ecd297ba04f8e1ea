"""Whole-model helpers for GRC layers: find them, reset, copy (EMA) and read their mixing weights."""
from __future__ import annotations

import torch
from torch import nn

from .layer import GRCAttention


def grc_layers(model: nn.Module) -> dict[str, GRCAttention]:
    """Every GRC layer of ``model`` by its module name, in definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, GRCAttention)}


def reset_caches(model: nn.Module) -> int:
    """Zero every stored cache (the detection recipe: 'the cache C will be initialized to zeros').

    Returns the number of layers reset.
    """
    layers = grc_layers(model)
    for layer in layers.values():
        layer.reset_cache()
    return len(layers)


@torch.no_grad()
def copy_caches(src: nn.Module, dst: nn.Module) -> int:
    """Copy the stored caches of ``src`` into ``dst`` (EMA models copy the cache, never average it).

    Layers are matched by module name; a wrapper prefix (DDP's ``module.``, timm EMA's ``module.``)
    on either side is ignored. Returns the number of caches copied.
    """
    def strip(name: str) -> str:
        while name.startswith("module."):
            name = name[len("module."):]
        return name

    src_layers = {strip(k): v for k, v in grc_layers(src).items()}
    count = 0
    for name, layer in grc_layers(dst).items():
        other = src_layers.get(strip(name))
        if other is not None:
            for mine, theirs in zip(layer.state_tensors(), other.state_tensors()):  # causal: pending too
                mine.copy_(theirs)
            count += 1
    return count


@torch.no_grad()
def mixing_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """sigmoid(lambda) per head of every GRC layer (paper Fig. 5), as CPU float tensors."""
    return {name: torch.sigmoid(layer.lam.detach().float()).cpu() for name, layer in grc_layers(model).items()}
