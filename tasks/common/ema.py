"""Exponential moving average of the weights (timm ``ModelEmaV3``) that copies GRC caches.

The stored GRC cache is state, not a weight: averaging it would mix caches from different points of
training. After every EMA update the caches are copied from the live model with
``cached_transformers.copy_caches`` (method.md section 3: "EMA copies of the model copy the cache").
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class CacheCopyingEMA:
    """Holds a ``ModelEmaV3`` of ``model`` outside the LightningModule's parameters.

    Args:
        model: the live model (not the DDP wrapper).
        decay: EMA decay (DeiT: 0.99996).
        warmup: timm's decay warm-up (``use_warmup``).
        every_n_steps: update every N optimizer steps.
        device: keep the EMA on another device (e.g. ``"cpu"``) to save accelerator memory.
    """

    def __init__(self, model: nn.Module, decay: float = 0.99996, warmup: bool = False, every_n_steps: int = 1,
                 device: str | None = None):
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(model, decay=decay, use_warmup=warmup, device=device, exclude_buffers=True)
        self.ema.module.requires_grad_(False)
        self.every_n_steps = max(int(every_n_steps), 1)

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """EMA update of the parameters, then copy buffers and caches (never averaged)."""
        from cached_transformers import copy_caches

        if step % self.every_n_steps:
            return
        self.ema.update(model, step=step)
        copy_caches(model, self.ema.module)

    def to(self, device: torch.device) -> "CacheCopyingEMA":
        if self.ema.device is None:
            self.ema.module.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return self.ema.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.module.load_state_dict(state)
