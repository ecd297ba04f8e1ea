"""Convert state_dicts saved from the authors' released GRC code into this project's layout.

Released names (per GRC layer prefix ``P.``)      ->  project names
``P.attn_self_func.*``                             ->  ``P.self_attn.*``
``P.attn_mem.*``                                   ->  ``P.mem_attn.*``
``P.linear_reset.*`` + ``P.linear_update.*``       ->  ``P.gate.*`` (rows: reset, then update)
``P.linear_add.*``                                 ->  ``P.cand.*``
``P.Norm1.*``                                      ->  ``P.cand_norm.*``
``P.lam``                                          ->  ``P.lam``
``P.pos_emb.*``                                    ->  ``P.pos_conv.*``
``P.gr_cache`` (2023 code) or ``P.tk_mem`` (2022)  ->  ``P.cache``

Everything else (PVT's ``patch_embed1``, ``block1.0.norm1``, ``head``, ...) already uses the official
PVT names and passes through. The released gates concatenate [cache, input], the project's default
``concat_order``, so weights are not permuted.
"""
from __future__ import annotations

from typing import Mapping

import torch

_SINGLE = {"attn_self_func.": "self_attn.", "attn_mem.": "mem_attn.", "linear_add.": "cand.",
           "Norm1.": "cand_norm.", "pos_emb.": "pos_conv."}
_REQUIRED = ("linear_reset.weight", "linear_update.weight", "linear_add.weight", "Norm1.weight", "lam")
_CACHE_NAMES = ("gr_cache", "tk_mem")


def _unwrap(state_dict: Mapping) -> Mapping:
    for key in ("state_dict", "model", "model_ema"):
        if key in state_dict and isinstance(state_dict[key], Mapping) and len(state_dict) <= 4:
            return _unwrap(state_dict[key])
    return state_dict


def _strip_module(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def convert_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return ``state_dict`` (released layout) converted to the project layout.

    Accepts a plain state_dict or a checkpoint dict holding one under ``state_dict`` / ``model``;
    a DDP ``module.`` prefix is removed. Raises ``KeyError`` naming every missing key of every GRC layer.
    """
    sd = {_strip_module(k): v for k, v in _unwrap(state_dict).items()}
    prefixes = sorted({k.split("attn_self_func.")[0] for k in sd if "attn_self_func." in k})
    if not prefixes:
        raise KeyError("No GRC layer found (no key contains 'attn_self_func.'): this is not a state_dict "
                       "of the released GRC code; load project checkpoints directly.")
    missing = []
    for p in prefixes:
        missing += [p + name for name in _REQUIRED if p + name not in sd]
        if not any(p + c in sd for c in _CACHE_NAMES):
            missing.append(p + "gr_cache")
    if missing:
        raise KeyError(f"The released state_dict misses {len(missing)} key(s) of its GRC layers, e.g. "
                       f"{missing[:4]}; it is incomplete, so re-export it from the model that was trained.")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            out[key] = value
            continue
        rest = key[len(prefix):]
        if rest.startswith(("linear_reset.", "linear_update.")):
            continue  # fused below
        if rest in _CACHE_NAMES:
            out[prefix + "cache"] = value
            continue
        for old, new in _SINGLE.items():
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        out[prefix + rest] = value
    for p in prefixes:
        for param in ("weight", "bias"):
            r, u = sd.get(f"{p}linear_reset.{param}"), sd.get(f"{p}linear_update.{param}")
            if r is not None and u is not None:
                out[f"{p}gate.{param}"] = torch.cat([r, u], dim=0)
    return out
