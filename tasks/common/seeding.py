"""Deterministic randomness that does not depend on process layout or on where a run was resumed.

Every random draw in training is a function of (seed, purpose, epoch/step, rank, sample position):

* data augmentation: each sample is transformed under ``sample_seed(seed, epoch, rank, position)``,
  so it does not matter which DataLoader worker loads it or whether the epoch was resumed halfway
  (:func:`seeded` reseeds the CPU generators only, in microseconds, and never reaches CUDA seeding);
* per-step randomness (Mixup/CutMix draws, dropout, drop path): the global generators are reseeded
  at the start of every training step with ``derive_seed(seed, "step", global_step, rank)``.

A run of N steps and a run of N/2 steps resumed to N therefore draw the same numbers. The global
RNG states are still saved in checkpoints (``rng_states``) for code outside this scheme.
"""
from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import get_worker_info


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seed_globals(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def reseed_cpu(seed: int) -> None:
    """Seed Python's, NumPy's and torch's CPU generator for one sample's transform (a few microseconds).

    Never ``torch.manual_seed``: it also seeds every CUDA device, which in a process without CUDA
    (a DataLoader worker) queues a lazy seed with a recorded Python stack (0.2-0.6 ms a call) and in
    one with CUDA launches device work. Each generator is fully reset (cached normals included), so
    the draws depend on ``seed`` only.
    """
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.default_generator.manual_seed(seed)


_preserving = False  # True while preserve_global_rng() holds copies of the global states


@contextlib.contextmanager
def preserve_global_rng() -> Iterator[None]:
    """Restore the Python, NumPy and torch-CPU global states after the block; :func:`seeded` blocks inside
    skip their own copies. In-process loaders fetch each batch under it (one copy per batch, not per sample).
    """
    global _preserving
    if _preserving:
        yield
        return
    py, nps, th = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    _preserving = True
    try:
        yield
    finally:
        _preserving = False
        random.setstate(py)
        np.random.set_state(nps)
        torch.default_generator.set_state(th)


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run a block (one sample's transform) under ``seed``: Python, NumPy and the torch CPU generator.

    ``None`` runs the block unchanged. CUDA generators are never touched (data transforms run on CPU).
    The global states are as before once the block (or the enclosing :func:`preserve_global_rng`, as
    around each batch of an in-process ``ResumableDataLoader``) ends; inside a DataLoader worker, where
    the global generators serve nothing else (every seeded sample reseeds them), nothing is copied.
    The copies are what costs (NumPy's ``get_state``/``set_state`` ~70 us); the block's draws are the
    same either way, so augmentation does not depend on the worker count.
    """
    if seed is None:
        yield
        return
    if _preserving or get_worker_info() is not None:
        reseed_cpu(seed)
        yield
        return
    with preserve_global_rng():
        reseed_cpu(seed)
        yield


def collect_rng_states() -> dict[str, Any]:
    """Global RNG states as plain Python objects and tensors (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(state), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch.cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`collect_rng_states` (missing entries are left alone)."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "numpy" in states:
        kind, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "python" in states:
        version, state, gauss = states["python"]
        random.setstate((version, tuple(state), gauss))
    if "torch.cuda" in states and torch.cuda.is_available():
        cuda_states = states["torch.cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
