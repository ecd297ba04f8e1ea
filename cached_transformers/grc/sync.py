"""Cross-process cache synchronisation: one coalesced collective per optimisation step.

The GRC layers never communicate inside their forward (that would cost one collective and one host
synchronisation per layer and micro-batch, and hang whenever ranks run different numbers of
forwards). Instead the training loop calls :func:`sync_caches` once per optimisation step, after
gradient accumulation and before a checkpoint is written: every cache whose layer has
``sync="mean"`` is flattened into one buffer per dtype and device (one buffer for a model, whose caches
are all float32), averaged with a single ``all_reduce`` and copied back. Layers with ``sync="none"``
keep their per-rank caches.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .utils import grc_layers


def _mean_layers(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{state_dict key: tensor}`` of every ``sync="mean"`` layer's state (causal layers: cache and pending)."""
    out = {}
    for name, layer in grc_layers(model).items():
        if layer.config.sync == "mean":
            for buf, t in zip(("cache", "pending"), layer.state_tensors()):
                out[f"{name}.{buf}" if name else buf] = t
    return out


def _all_reduce_mean(tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> tuple[list[torch.Tensor], int]:
    """The cross-rank means of ``tensors`` (new tensors), one flat all_reduce per (dtype, device)."""
    buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.dtype, t.device), []).append(i)
    world = dist.get_world_size(group)
    means: list[torch.Tensor] = list(tensors)
    for idx in buckets.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(world)
        for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            means[i] = part.view_as(tensors[i])
    return means, len(buckets)


def _distributed(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


@torch.no_grad()
def sync_caches(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Average every ``sync="mean"`` GRC cache of ``model`` across the processes of ``group`` (in place).

    Every rank must call it the same number of times (once per optimisation step), like any collective.
    Returns the number of collectives issued: 0 without an initialised process group of more than one
    process or without a ``mean`` layer, otherwise one per (dtype, device) of the caches, i.e. 1.
    """
    if not _distributed(group):
        return 0
    live = list(_mean_layers(model).values())
    means, issued = _all_reduce_mean(live, group)
    for t, m in zip(live, means):
        t.copy_(m)
    return issued


@torch.no_grad()
def synced_cache_state(model: nn.Module, group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
    """The cross-rank means of every ``sync="mean"`` GRC state tensor, by state_dict key, *without* changing
    the model (one collective; every rank must call it). For a checkpoint written between two
    ``sync_caches`` calls (inside a gradient-accumulation window): the file gets the averaged caches while
    each rank trains on with its own, exactly as if no checkpoint had been written. ``{}`` when not distributed."""
    if not _distributed(group):
        return {}
    state = _mean_layers(model)
    means, _ = _all_reduce_mean(list(state.values()), group)
    return {k: m.clone() for k, m in zip(state, means)}
