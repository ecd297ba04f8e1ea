"""Resumable, process-layout-independent data loading shared by the tasks.

Lightning saves ``state_dict()`` of every training DataLoader that has one in the checkpoint
(``loops.fit_loop.state_dict.combined_loader``) and calls ``load_state_dict`` before iterating again,
which is how a run resumes in the middle of an epoch:

* :class:`EpochShuffleSampler` / :class:`ShardSampler` / timm's ``RepeatAugSampler`` (wrapped in
  :class:`RunSeededEpochs`, which gives it the run seed) / ``DistributedSampler`` decide the order of
  one epoch from (seed, epoch) only;
* :class:`SeededSampler` wraps any of them, yields ``(index, sample_seed)`` pairs (the dataset
  transforms each sample under its own seed, see :mod:`tasks.common.seeding`) and can skip the
  samples already consumed in the epoch;
* :class:`ResumableDataLoader` counts the batches it has handed out and exposes them as its state.

Lightning does not prefetch from loaders with a length, so the count equals the batches trained on.

Lightning restores loader states only when it builds the train loader after loading the checkpoint;
when ``configure_optimizers`` asks for ``trainer.estimated_stepping_batches`` (as the warm-up/cosine
schedule must) the loader is built first and the saved position would be ignored. Data modules
therefore also carry the position themselves (:class:`ResumableDataModuleMixin`): Lightning saves
and restores a data module's ``state_dict`` before any loader exists.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from .seeding import derive_seed, preserve_global_rng

_END = object()


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` drawn from (seed, epoch); ``shuffle=False`` keeps the order."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator()
        g.manual_seed(derive_seed(self.seed, "order", self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class RunSeededEpochs(Sampler[int]):
    """Give a sampler that seeds its order with the epoch alone (timm's ``RepeatAugSampler`` draws its
    permutation from ``manual_seed(epoch)``) a seed drawn from (run seed, epoch) instead, so runs with
    different ``seed`` see different orders and the same seed the same order (also after a resume).
    """

    def __init__(self, base: Sampler[int], seed: int = 0):
        self.base, self.seed = base, int(seed)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.base.set_epoch(derive_seed(self.seed, "order", self.epoch))  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[int]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]


class ShardSampler(Sampler[int]):
    """Every ``world``-th index starting at ``rank``: exact, unpadded evaluation under DDP."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededSampler(Sampler[tuple]):
    """Wrap an index sampler: yield ``(index, sample_seed)`` and optionally skip a prefix of the epoch.

    ``sample_seed`` is ``derive_seed(seed, "sample", epoch, rank, position)`` or ``None`` when
    ``seed_samples`` is False (evaluation transforms are deterministic).
    """

    def __init__(self, base: Sampler[int] | Sequence[int], seed: int = 0, rank: int = 0,
                 seed_samples: bool = True):
        self.base, self.seed, self.rank, self.seed_samples = base, seed, rank, seed_samples
        self.epoch = 0
        self.skip = 0  # samples to skip at the start of the next iteration (set by the loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple]:
        skip, self.skip = self.skip, 0
        indices = map(int, itertools.islice(self.base, skip, None))
        if not self.seed_samples:  # C-level iteration: no per-sample Python frame (ListOps: ~5% of a sample)
            return zip(indices, itertools.repeat(None))
        return ((idx, derive_seed(self.seed, "sample", self.epoch, self.rank, pos))
                for pos, idx in enumerate(indices, start=skip))

    def __len__(self) -> int:
        return len(self.base)


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`SeededSampler` whose position in the epoch survives a checkpoint.

    Any other sampler is wrapped in a ``SeededSampler(sampler, seed=0)`` (Lightning rebuilds the loader
    with a ``SequentialSampler`` for ``trainer.overfit_batches``).

    ``state_dict() -> {"epoch", "batches", "num_batches"}``; ``load_state_dict`` makes the next
    iteration start after the saved number of batches of the saved epoch (a saved position at the
    end of an epoch starts the next epoch from the beginning). The iteration is lazy, so the sampler
    epoch that Lightning sets right before an epoch is the one used.
    """

    def __init__(self, dataset: Any, *, sampler: SeededSampler, batch_size: int, **kwargs: Any):
        if not isinstance(sampler, SeededSampler):
            # Lightning swaps in a SequentialSampler for trainer.overfit_batches (debug=overfit): seed it too
            sampler = SeededSampler(sampler, seed=0)
        super().__init__(dataset, sampler=sampler, batch_size=batch_size, **kwargs)
        self._consumed = 0
        self._resume_at = 0

    def __iter__(self) -> Iterator[Any]:
        start, self._resume_at = self._resume_at, 0
        self.sampler.skip = start * self.batch_size
        self._consumed = start
        batches = super().__iter__()
        # in-process with seeded samples: one copy of the global RNG states per batch, not per sample
        preserve = self.num_workers == 0 and self.sampler.seed_samples
        while True:
            with preserve_global_rng() if preserve else contextlib.nullcontext():
                batch = next(batches, _END)
            if batch is _END:
                return
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches": int(self._consumed), "num_batches": len(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(int(state["epoch"]))
        batches = int(state.get("batches", 0))
        self._resume_at = batches if 0 < batches < len(self) else 0
        self._consumed = self._resume_at


def rank_world(trainer: Any | None) -> tuple[int, int]:
    """``(global rank, world size)`` of ``trainer``; ``(0, 1)`` without one (a module used on its own)."""
    return (0, 1) if trainer is None else (int(trainer.global_rank), int(trainer.world_size))


class ResumableDataModuleMixin:
    """For a ``LightningDataModule``: save the train loader's position with the data module's state.

    Call :meth:`track_train_loader` on the loader ``train_dataloader()`` returns.
    """

    _train_loader: ResumableDataLoader | None = None
    _pending_loader_state: dict[str, int] | None = None

    def track_train_loader(self, loader: ResumableDataLoader) -> ResumableDataLoader:
        if self._pending_loader_state is not None:
            loader.load_state_dict(self._pending_loader_state)
            self._pending_loader_state = None
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("train_loader")
        if state is None:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state)
        else:
            self._pending_loader_state = dict(state)
