"""fairseq's label-smoothed cross-entropy and inverse-square-root learning-rate schedule."""
from __future__ import annotations

import math

import torch

from .dictionary import PAD_ID


def label_smoothed_nll_loss(lprobs: torch.Tensor, target: torch.Tensor, epsilon: float,
                            ignore_index: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """fairseq's ``label_smoothed_nll_loss`` (summed over tokens, padding masked).

    ``eps_i = eps / (V - 1)``; ``loss = (1 - eps - eps_i) * nll + eps_i * sum_v(-log p_v)``. This is not
    ``CrossEntropyLoss(label_smoothing=eps)``, which spreads eps over all V classes. Returns (loss, nll).
    """
    lprobs = lprobs.reshape(-1, lprobs.shape[-1])
    target = target.reshape(-1, 1)
    nll = -lprobs.gather(dim=-1, index=target)
    smooth = -lprobs.sum(dim=-1, keepdim=True)
    pad = target.eq(ignore_index)
    nll, smooth = nll.masked_fill(pad, 0.0).sum(), smooth.masked_fill(pad, 0.0).sum()
    eps_i = epsilon / (lprobs.shape[-1] - 1)
    return (1.0 - epsilon - eps_i) * nll + eps_i * smooth, nll


def inverse_sqrt_schedule(optimizer: torch.optim.Optimizer, *, warmup_updates: int = 4000,
                          warmup_init_lr: float = 0.0, total_steps: int | None = None,
                          steps_per_epoch: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """fairseq's ``inverse_sqrt``: after s updates, lr = init + s (lr - init) / W for s < W, else
    lr * sqrt(W / s). ``lr`` is each group's lr when the scheduler is built; the step counts are accepted
    for the framework's scheduler signature and not used."""
    w = int(warmup_updates)

    def factor(peak: float):
        def f(s: int) -> float:
            if s < w:
                lr = warmup_init_lr + s * (peak - warmup_init_lr) / w
            else:
                lr = peak * math.sqrt(w) / math.sqrt(max(s, 1))
            return lr / peak if peak > 0 else 0.0
        return f

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(g["lr"]) for g in optimizer.param_groups])
