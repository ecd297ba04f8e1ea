"""Aspect-ratio grouped training batches that shard over DDP ranks and resume mid-epoch.

mmdetection's ``DistributedGroupSampler`` behaviour, deterministic in (seed, epoch): every batch holds
images of one aspect group (w/h > 1 or not); within each group the images are shuffled and the group
is padded with its own images to whole batches; the batches of all groups are shuffled together, the
list is padded to a multiple of the world size and rank r takes batches r, r + world, ... So every rank
steps the same number of batches and each image appears once per epoch (plus the padding repeats).

:class:`GroupedBatchSampler` yields lists of ``(index, sample_seed)``; :class:`GroupedBatchLoader`
counts the batches handed out and has the same ``state_dict`` as ``tasks.common.data.ResumableDataLoader``,
so ``ResumableDataModuleMixin`` saves and restores its position in the epoch.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from tasks.common.seeding import derive_seed


class GroupedBatchSampler(Sampler[list]):
    def __init__(self, groups: Sequence[int], batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1,
                 shuffle: bool = True):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.groups = [int(g) for g in groups]
        self.batch_size, self.seed, self.rank, self.world = int(batch_size), int(seed), int(rank), int(world)
        self.shuffle = shuffle
        self.epoch = 0
        self.skip = 0  # batches to skip at the start of the next iteration (set by the loader)
        # Lightning calls set_epoch on ``loader.sampler`` and ``loader.batch_sampler.sampler`` only
        self.sampler = _EpochForwarder(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _all_batches(self) -> list[list[int]]:
        g = torch.Generator()
        g.manual_seed(derive_seed(self.seed, "groups", self.epoch))
        batches: list[list[int]] = []
        for group in sorted(set(self.groups)):
            idx = torch.tensor([i for i, k in enumerate(self.groups) if k == group], dtype=torch.long)
            if self.shuffle:
                idx = idx[torch.randperm(len(idx), generator=g)]
            pad = (-len(idx)) % self.batch_size
            if pad:
                idx = torch.cat([idx, idx.repeat(pad // len(idx) + 1)[:pad]])
            batches.extend(idx.view(-1, self.batch_size).tolist())
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        pad = (-len(batches)) % self.world
        batches += batches[:pad]
        return batches

    def rank_batches(self) -> list[list[int]]:
        """This rank's batches of the current epoch (index lists)."""
        return self._all_batches()[self.rank::self.world]

    def __iter__(self) -> Iterator[list]:
        skip, self.skip = self.skip, 0
        for pos, batch in enumerate(self.rank_batches()):
            if pos < skip:
                continue
            yield [(i, derive_seed(self.seed, "sample", self.epoch, self.rank, pos, j)) for j, i in enumerate(batch)]

    def __len__(self) -> int:
        per_group = [sum(1 for k in self.groups if k == g) for g in set(self.groups)]
        n = sum(-(-c // self.batch_size) for c in per_group)
        return -(-n // self.world)


class _EpochForwarder:
    """``batch_sampler.sampler`` for Lightning: its ``set_epoch`` reaches the grouped batch sampler."""

    def __init__(self, owner: GroupedBatchSampler):
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class GroupedBatchLoader(DataLoader):
    """A DataLoader over a :class:`GroupedBatchSampler` whose position in the epoch survives a checkpoint."""

    def __init__(self, dataset: Any, *, batch_sampler: GroupedBatchSampler, **kwargs: Any):
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self._consumed = 0
        self._resume_at = 0

    def __iter__(self) -> Iterator[Any]:
        start, self._resume_at = self._resume_at, 0
        self.batch_sampler.skip = start
        self._consumed = start
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.batch_sampler.epoch), "batches": int(self._consumed), "num_batches": len(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.set_epoch(int(state["epoch"]))
        batches = int(state.get("batches", 0))
        self._resume_at = batches if 0 < batches < len(self) else 0
        self._consumed = self._resume_at
