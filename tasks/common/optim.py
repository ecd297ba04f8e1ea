"""Optimizer parameter groups, the explicit learning-rate scaling rule and the warm-up + cosine schedule.

Optimizers and schedulers are configured with ``_target_`` + ``_partial_: true``; the task calls the
partials with what only the running trainer knows (parameter groups, the scaled lr, step counts).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from .errors import ConfigError

NO_DECAY_KEYWORDS = ("pos_embed", "cls_token", "dist_token", "relative_position_bias_table", "absolute_pos_embed")


def no_decay_names(model: nn.Module, keywords: Iterable[str] = NO_DECAY_KEYWORDS) -> set[str]:
    """Names of parameters without weight decay.

    Rule (DeiT/PVT/timm): every parameter with ``ndim <= 1`` (norm weights, biases, GRC's lambda),
    every ``*.bias``, every name containing one of ``keywords`` (position embeddings, class tokens)
    and whatever ``model.no_weight_decay()`` lists (exact names or name prefixes).
    """
    listed: set[str] = set()
    if hasattr(model, "no_weight_decay"):
        listed = {str(n) for n in model.no_weight_decay()}
    out = set()
    for name, p in model.named_parameters():
        if (p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in keywords)
                or name in listed or any(name.startswith(f"{n}.") for n in listed)):
            out.add(name)
    return out


def param_groups(model: nn.Module, weight_decay: float,
                 keywords: Iterable[str] = NO_DECAY_KEYWORDS) -> list[dict[str, Any]]:
    """Two AdamW groups: ``decay`` (weight_decay) and ``no_decay`` (0.0); frozen parameters are left out."""
    skip = no_decay_names(model, keywords)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def scaled_lr(base_lr: float, total_batch_size: int, rule: str = "linear", base_batch_size: int = 512) -> float:
    """The learning rate for ``total_batch_size`` (all devices x nodes x accumulation).

    ``linear``: base_lr * total / base (Goyal et al.; DeiT/PVT: 5e-4 x total / 512);
    ``sqrt``: base_lr * sqrt(total / base); ``none``: base_lr. Set explicitly so timm's implicit
    rules never apply.
    """
    if rule == "linear":
        return base_lr * total_batch_size / base_batch_size
    if rule == "sqrt":
        return base_lr * math.sqrt(total_batch_size / base_batch_size)
    if rule in ("none", None):
        return base_lr
    raise ConfigError(f"Unknown lr scaling rule {rule!r}; use task.lr_scaling.rule=linear, sqrt or none.")


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, *, total_steps: int, steps_per_epoch: int,
                           warmup_epochs: float = 5.0, warmup_steps: int | None = None,
                           warmup_lr: float = 1e-6, min_lr: float = 1e-5) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warm-up from ``warmup_lr`` to the peak lr, then cosine decay to ``min_lr``.

    Step s (0-based, stepped after every optimizer step) gets
    ``warmup_lr + (peak - warmup_lr) * s / W`` for s < W and
    ``min_lr + (peak - min_lr) * (1 + cos(pi * (s - W) / (total - W))) / 2`` afterwards,
    W = ``warmup_steps`` or ``round(warmup_epochs * steps_per_epoch)``. The peak is each group's lr
    when the scheduler is built (the scaled lr). ``warmup_lr`` and ``min_lr`` are absolute values
    (DeiT/PVT do not scale them with the batch size).
    """
    w = int(warmup_steps) if warmup_steps is not None else int(round(warmup_epochs * steps_per_epoch))
    total = max(int(total_steps), 1)
    w = min(w, total)
    peaks = [g["lr"] for g in optimizer.param_groups]

    def factor(peak: float):
        def f(step: int) -> float:
            if step < w:
                lr = warmup_lr + (peak - warmup_lr) * step / max(w, 1)
            else:
                t = min((step - w) / max(total - w, 1), 1.0)
                lr = min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
            return lr / peak if peak > 0 else 0.0
        return f

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(p) for p in peaks])


def constant_schedule(optimizer: torch.optim.Optimizer, **_: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """A constant learning rate (accepts and ignores the step counts)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
