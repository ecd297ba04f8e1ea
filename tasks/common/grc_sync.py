"""Averages the GRC caches across processes once per optimisation step (``cached_transformers.sync_caches``).

The GRC layers do not communicate inside their forward. This callback calls ``sync_caches`` in
``on_before_optimizer_step``, which Lightning runs once per optimisation step on every rank, after the
last micro-batch of gradient accumulation and before the optimiser step. All ranks run the same
optimisation steps, so the collectives always match, however many forwards each rank ran. The EMA
update (after the step) and every checkpoint written at a step boundary therefore see the averaged
caches. A checkpoint written inside an accumulation window (a validation between micro-batches, when
``val_check_interval`` is not a multiple of ``accumulate_grad_batches``) gets the cross-rank average too,
from ``on_save_checkpoint`` (``synced_cache_state``: one collective on every rank, the file's copies
only), while each rank trains on with its own caches as if no checkpoint had been written.
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


class GRCCacheSync(pl.Callback):
    """One coalesced all-reduce of every ``sync="mean"`` GRC cache per optimisation step."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if trainer.world_size > 1:
            from cached_transformers import sync_caches

            sync_caches(pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # Lightning calls this on every rank for every checkpoint (the file is written by rank 0 only)
        if trainer.world_size > 1:
            from cached_transformers import synced_cache_state

            state = checkpoint.get("state_dict")
            for key, value in synced_cache_state(pl_module).items():
                if state is not None and key in state:
                    state[key] = value.to(state[key].dtype)
