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


@torch.no_grad()
def sync_caches(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Average every ``sync="mean"`` GRC cache of ``model`` across the processes of ``group``.

    Every rank must call it the same number of times (once per optimisation step), like any collective.
    Returns the number of collectives issued: 0 without an initialised process group of more than one
    process or without a ``mean`` layer, otherwise one per (dtype, device) of the caches, i.e. 1.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return 0
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for layer in grc_layers(model).values():
        if layer.config.sync == "mean":  # the cache, and in causal mode the pending summary too
            for t in layer.state_tensors():
                buckets.setdefault((t.dtype, t.device), []).append(t)
    world = dist.get_world_size(group)
    for caches in buckets.values():
        flat = torch.cat([c.reshape(-1) for c in caches])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(world)
        for cache, part in zip(caches, flat.split([c.numel() for c in caches])):
            cache.copy_(part.view_as(cache))
    return len(buckets)
