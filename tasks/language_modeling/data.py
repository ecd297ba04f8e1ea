"""WikiText-103 in its released layout, read as one token stream split into parallel tracks.

Layout: ``data.root`` holds ``wiki.train.tokens``, ``wiki.valid.tokens``, ``wiki.test.tokens``. Every
line is split on whitespace and ends with ``<eos>`` (blank lines too, as Transformer-XL's corpus
reader does for WikiText). The word-level vocabulary is built from the train split only (every
train word, ordered by frequency then first appearance; ``<unk>`` and ``<eos>`` always exist);
valid/test words missing from it map to ``<unk>`` and their count is logged.

Stream batching (Transformer-XL's ``LMOrderedIterator``): a split's token stream of N tokens is cut
into ``world * batch_size`` contiguous tracks of ``N // (world * batch_size)`` tokens (the remainder,
fewer than ``world * batch_size`` tokens, is dropped and logged); process ``rank`` owns tracks
``rank * batch_size ... (rank + 1) * batch_size - 1``. Segment ``i`` is the ``tgt_len`` tokens at
offset ``i * tgt_len`` of every track (the last one may be shorter), with targets shifted by one, so
consecutive batches continue the same text in every row: this is what lets the XL memory or the
GRC cache of row ``b`` carry across batches. Segments come in order, never shuffled.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from tasks.common.data import (EpochShuffleSampler, ResumableDataLoader, ResumableDataModuleMixin, SeededSampler,
                               rank_world)
from tasks.common.errors import DataError

log = logging.getLogger(__name__)

SPLIT_FILES = {"train": "wiki.train.tokens", "val": "wiki.valid.tokens", "test": "wiki.test.tokens"}
UNK, EOS = "<unk>", "<eos>"


def split_path(root: str | os.PathLike | None, split: str) -> Path:
    """The file of ``split`` under ``root``; a clear DataError when the folder or file is missing or empty."""
    if root is None or str(root) in ("", "???", "None"):
        raise DataError("No WikiText folder given: set data.root=<dir holding wiki.train.tokens, "
                        "wiki.valid.tokens and wiki.test.tokens> (WikiText-103's wikitext-103/ folder).")
    path = Path(root).expanduser() / SPLIT_FILES[split]
    if not path.is_file():
        raise DataError(f"{path} does not exist; data.root must hold wiki.train.tokens, wiki.valid.tokens and "
                        f"wiki.test.tokens (the unpacked wikitext-103 release).")
    if path.stat().st_size == 0 or not path.read_text(encoding="utf-8").strip():
        raise DataError(f"{path} is empty (no words); re-extract the WikiText release into {path.parent}.")
    return path


def read_words(path: Path) -> Iterable[list[str]]:
    """Lines of ``path`` as word lists, each ending with ``<eos>``."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield line.split() + [EOS]


class Vocab:
    """Word-level vocabulary: ``<unk>`` = 0, ``<eos>`` = 1, then train words by frequency (ties: first seen)."""

    def __init__(self, words: list[str]):
        self.itos = list(words)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.unk = self.stoi[UNK]

    @classmethod
    def build(cls, lines: Iterable[list[str]]) -> "Vocab":
        counts: Counter[str] = Counter()
        for words in lines:
            counts.update(words)
        ordered = sorted(counts, key=lambda w: -counts[w])  # sorted() is stable: ties keep first appearance
        return cls([UNK, EOS] + [w for w in ordered if w not in (UNK, EOS)])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, lines: Iterable[list[str]]) -> tuple[torch.Tensor, int]:
        """(one int64 stream of every line's ids, number of words mapped to ``<unk>`` that are not ``<unk>``)."""
        ids: list[int] = []
        missing = 0
        get, unk = self.stoi.get, self.unk
        for words in lines:
            for w in words:
                i = get(w)
                if i is None:
                    missing += 1
                    i = unk
                ids.append(i)
        return torch.tensor(ids, dtype=torch.long), missing


def batchify(stream: torch.Tensor, batch_size: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, int]:
    """(this rank's ``batch_size`` x L tracks, tokens dropped at the end of the stream).

    The stream is cut into ``world * batch_size`` contiguous tracks of equal length L; row b of the
    result is track ``rank * batch_size + b``.
    """
    n_tracks = batch_size * world
    length = stream.numel() // n_tracks
    if length < 2:
        raise DataError(f"A stream of {stream.numel()} tokens cannot be split into {n_tracks} tracks of at least "
                        f"2 tokens; lower data.batch_size / data.eval_batch_size or use more text.")
    tracks = stream[: length * n_tracks].view(n_tracks, length)
    return tracks[rank * batch_size:(rank + 1) * batch_size].contiguous(), stream.numel() - length * n_tracks


class SegmentDataset(Dataset):
    """Segment i of the tracks: ``{"input": B x t, "target": B x t, "segment": i}`` (t = tgt_len, last may be shorter).

    Inputs are track positions ``[i*tgt_len, i*tgt_len + t)``, targets the next tokens; every token
    but each track's first is a target exactly once.
    """

    def __init__(self, tracks: torch.Tensor, tgt_len: int):
        if tgt_len < 1:
            raise DataError(f"data.tgt_len must be at least 1, got {tgt_len}.")
        self.tracks, self.tgt_len = tracks, int(tgt_len)
        self.n = -(-(tracks.shape[1] - 1) // self.tgt_len)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, item: Any) -> dict[str, Any]:
        i = int(item[0]) if isinstance(item, tuple) else int(item)
        if not 0 <= i < self.n:
            raise IndexError(i)
        start = i * self.tgt_len
        end = min(start + self.tgt_len, self.tracks.shape[1] - 1)
        return {"input": self.tracks[:, start:end], "target": self.tracks[:, start + 1:end + 1], "segment": i}


def _single(items: list[dict[str, Any]]) -> dict[str, Any]:
    return items[0]


class WikiTextDataModule(ResumableDataModuleMixin, pl.LightningDataModule):
    """WikiText in its released layout as in-order segment batches (see the module docstring).

    Args:
        root: folder with ``wiki.{train,valid,test}.tokens``.
        batch_size / eval_batch_size: tracks per process for training / evaluation.
        tgt_len / eval_tgt_len: segment length for training / evaluation.
        num_workers, pin_memory: DataLoader options.
        seed: unused for the order (segments are never shuffled); kept for the framework's signature.
    """

    def __init__(self, root: str | None = None, batch_size: int = 60, eval_batch_size: int | None = 10,
                 tgt_len: int = 150, eval_tgt_len: int | None = None, num_workers: int = 0,
                 pin_memory: bool = True, seed: int = 0):
        super().__init__()
        self.root, self.batch_size = root, int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.tgt_len, self.eval_tgt_len = int(tgt_len), int(eval_tgt_len or tgt_len)
        self.num_workers, self.pin_memory, self.seed = int(num_workers), bool(pin_memory), int(seed)
        self.vocab: Vocab | None = None
        self.streams: dict[str, torch.Tensor] = {}
        self.unknown: dict[str, int] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.vocab is not None:
            return
        paths = {s: split_path(self.root, s) for s in SPLIT_FILES}
        self.vocab = Vocab.build(read_words(paths["train"]))
        for split, path in paths.items():
            self.streams[split], self.unknown[split] = self.vocab.encode(read_words(path))
        for split in ("val", "test"):
            if self.unknown[split]:
                log.warning("%s: %d of %d tokens are not in the train vocabulary and map to <unk>",
                            paths[split].name, self.unknown[split], self.streams[split].numel())
        log.info("WikiText %s: vocabulary %d words (train); tokens train %d, val %d, test %d",
                 self.root, len(self.vocab), *(self.streams[s].numel() for s in ("train", "val", "test")))

    @property
    def vocab_size(self) -> int:
        self.setup()
        return len(self.vocab)  # type: ignore[arg-type]


    def dataset(self, split: str) -> SegmentDataset:
        """This process's segments of ``split`` (tracks by rank, see :func:`batchify`)."""
        self.setup()
        rank, world = rank_world(getattr(self, "trainer", None))
        train = split == "train"
        tracks, dropped = batchify(self.streams[split], self.batch_size if train else self.eval_batch_size, rank, world)
        if dropped:
            log.info("%s: the last %d tokens do not fill a track and are not used", split, dropped)
        return SegmentDataset(tracks, self.tgt_len if train else self.eval_tgt_len)

    def _kwargs(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "collate_fn": _single,
                "pin_memory": self.pin_memory and torch.cuda.is_available()}

    def train_dataloader(self) -> ResumableDataLoader:
        dataset = self.dataset("train")
        rank = rank_world(getattr(self, "trainer", None))[0]
        sampler = SeededSampler(EpochShuffleSampler(len(dataset), shuffle=False), seed=self.seed, rank=rank,
                                seed_samples=False)
        return self.track_train_loader(ResumableDataLoader(dataset, sampler=sampler, batch_size=1, **self._kwargs()))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _eval_loader(self, split: str) -> DataLoader:
        # an explicit in-order sampler: Lightning must not swap in a DistributedSampler (ranks own tracks)
        dataset = self.dataset(split)
        return DataLoader(dataset, sampler=EpochShuffleSampler(len(dataset), shuffle=False), batch_size=1,
                          **self._kwargs())
