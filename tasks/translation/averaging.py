"""Checkpoint averaging (fairseq's scripts/average_checkpoints.py semantics, GRC caches kept).

Every floating-point tensor of the model state is the arithmetic mean over the inputs (computed in
float64, stored in the input dtype). The GRC caches (buffers ``*.cache``) are NOT averaged: they are taken
from the newest input, since a cache is a state of the recurrence, not a weight (a mean of caches from
different steps is no state the model ever saw). Integer tensors are also taken from the newest input.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch

from tasks.common.errors import UserError

EPOCH = re.compile(r"epoch=(\d+)\.ckpt$")


def is_cache_key(key: str) -> bool:
    """GRC layers store their cache as the buffer ``<layer>.cache``."""
    return key == "cache" or key.endswith(".cache")


def epoch_checkpoints(run_dir: Path, last: int) -> list[Path]:
    files = sorted((p for p in (run_dir / "checkpoints").glob("epoch=*.ckpt") if EPOCH.search(p.name)),
                   key=lambda p: int(EPOCH.search(p.name).group(1)))
    if len(files) < last:
        raise UserError(f"{run_dir / 'checkpoints'} has {len(files)} epoch checkpoints, fewer than --last {last}; "
                        f"lower --last or keep more (callbacks.epoch_checkpoints.save_top_k).")
    return files[-last:]


def average_checkpoints(paths: Sequence[Path]) -> dict:
    """The newest (last) checkpoint with the mean ``state_dict`` of all ``paths``."""
    if not paths:
        raise UserError("No checkpoints to average; pass --inputs or --run-dir with --last.")
    states = []
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"Checkpoint {p} does not exist.")
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
        states.append(ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt)
        newest = ckpt
    keys = list(states[-1].keys())
    for p, s in zip(paths, states):
        if list(s.keys()) != keys:
            raise UserError(f"{p} holds other tensors than {paths[-1]}; average checkpoints of one run only.")
    out = {}
    for k in keys:
        last = states[-1][k]
        if not torch.is_floating_point(last) or is_cache_key(k):
            out[k] = last.clone()
            continue
        total = torch.zeros_like(last, dtype=torch.float64)
        for s in states:
            total += s[k].to(torch.float64)
        out[k] = (total / len(states)).to(last.dtype)
    if isinstance(newest, dict) and "state_dict" in newest:
        result = {k: v for k, v in newest.items() if k not in ("optimizer_states", "lr_schedulers", "ema_state_dict")}
        result["state_dict"] = out
        result["averaged_from"] = [str(p) for p in paths]
        return result
    return out
