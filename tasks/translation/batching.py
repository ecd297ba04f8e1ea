"""Token-based batching with fairseq's semantics, sharded across ranks and resumable mid-epoch.

fairseq (``LanguagePairDataset.ordered_indices`` + ``data_utils.batch_by_size``):

1. a random permutation of the sentence pairs (seeded), stable-sorted by target length, then
   stable-sorted by source length (so: by source length, ties by target length, ties in random order);
2. greedy contiguous batches: a pair's size is ``max(src_len, tgt_len)`` (``</s>`` included); a batch is
   full when ``(len(batch) + 1) * max size > max_tokens`` (padding counted) or it holds ``max_sentences``;
   a full batch is cut to a multiple of ``required_batch_size_multiple`` (8) and the rest carries over;
3. the list of batches is fixed for the run; each epoch shuffles it (seed + epoch);
4. rank r of W takes batches r, r + W, ...; ranks with one batch fewer repeat their first batch as a
   *dummy* batch (fairseq uses an empty one), which the training step weights by zero.

Validation and test batches are built the same way without shuffling.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from tasks.common.errors import ConfigError
from tasks.common.seeding import derive_seed


def ordered_indices(src_sizes: np.ndarray, tgt_sizes: np.ndarray, shuffle: bool, seed: int = 0) -> np.ndarray:
    """fairseq's order: (seeded) permutation, stable sort by target then by source length."""
    n = len(src_sizes)
    if shuffle:
        indices = np.random.default_rng(derive_seed(seed, "order") % (1 << 63)).permutation(n)
    else:
        indices = np.arange(n)
    indices = indices[np.argsort(tgt_sizes[indices], kind="mergesort")]
    return indices[np.argsort(src_sizes[indices], kind="mergesort")]


def batch_by_size(indices: np.ndarray, num_tokens: np.ndarray, max_tokens: int | None,
                  max_sentences: int | None = None, multiple: int = 8) -> list[np.ndarray]:
    """Greedy batches over ``indices`` (in that order) as in fairseq's ``batch_by_size``.

    ``num_tokens[i]`` is the size of pair i. No batch holds more than ``max_tokens`` tokens counting
    padding (batch size x its longest pair) nor more than ``max_sentences`` pairs.
    """
    max_tokens = int(max_tokens or 0)
    max_sentences = int(max_sentences or 0)
    if max_tokens <= 0 and max_sentences <= 0:
        raise ConfigError("Batching needs data.max_tokens (fairseq's --max-tokens, e.g. 4096) or data.max_sentences.")
    sizes = num_tokens[indices]
    if max_tokens > 0 and len(sizes) and int(sizes.max()) > max_tokens:
        raise ConfigError(f"A sentence pair has {int(sizes.max())} tokens, more than data.max_tokens={max_tokens}; "
                          f"raise data.max_tokens or lower data.max_positions (longer pairs are then skipped).")
    batches: list[np.ndarray] = []
    batch: list[int] = []
    lens: list[int] = []
    longest = 0
    for idx, n in zip(indices.tolist(), sizes.tolist()):
        longest = max(longest, n)
        full = bool(batch) and (
            (max_sentences > 0 and len(batch) == max_sentences)
            or (max_tokens > 0 and (len(batch) + 1) * longest > max_tokens))
        if full:
            cut = max(multiple * (len(batch) // multiple), len(batch) % multiple)
            batches.append(np.asarray(batch[:cut], dtype=np.int64))
            batch, lens = batch[cut:], lens[cut:]
            # the carried-over pairs plus this one could still exceed the limit: close them as a batch
            while batch and max_tokens > 0 and (len(batch) + 1) * max(max(lens), n) > max_tokens:
                batches.append(np.asarray(batch, dtype=np.int64))
                batch, lens = [], []
        batch.append(idx)
        lens.append(n)
        longest = max(lens)
    if batch:
        batches.append(np.asarray(batch, dtype=np.int64))
    return batches


class TokenBatchSampler(Sampler[list]):
    """Yields lists of pair indices; the epoch's order comes from (seed, epoch) only.

    Items are ``(index, dummy)`` pairs (``dummy``: a padding batch of a rank with one batch fewer).
    :meth:`resume` skips the batches a checkpointed run has already trained on (the loader counts them,
    since DataLoader workers draw batches from the sampler ahead of training).
    """

    def __init__(self, batches: Sequence[np.ndarray], *, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.batches = list(batches)
        self.shuffle, self.seed, self.rank, self.world = shuffle, seed, rank, max(int(world_size), 1)
        self.epoch = 0
        self._resume_at = 0  # batches of this epoch to skip on the next iteration (resume)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_batches(self, epoch: int | None = None) -> list[tuple[np.ndarray, bool]]:
        """This rank's (batch, dummy) list for ``epoch``."""
        epoch = self.epoch if epoch is None else epoch
        order = np.arange(len(self.batches))
        if self.shuffle:
            order = np.random.default_rng(derive_seed(self.seed, "batches", epoch) % (1 << 63)).permutation(order)
        mine = [(self.batches[i], False) for i in order[self.rank::self.world]]
        per_rank = -(-len(self.batches) // self.world)
        while mine and len(mine) < per_rank:
            mine.append((mine[0][0], True))
        return mine

    def __len__(self) -> int:
        return -(-len(self.batches) // self.world)

    def __iter__(self) -> Iterator[list]:
        start, self._resume_at = self._resume_at, 0
        for batch, dummy in self.epoch_batches()[start:]:
            yield [(int(i), dummy) for i in batch]

    def resume(self, epoch: int, batches: int) -> int:
        """Make the next iteration start after ``batches`` batches of ``epoch``; returns the skip."""
        self.epoch = int(epoch)
        self._resume_at = int(batches) if 0 < int(batches) < len(self) else 0
        return self._resume_at
