"""WikiText-103 in its released layout, read as one token stream split into parallel tracks.

Layout: ``data.root`` holds ``wiki.train.tokens``, ``wiki.valid.tokens``, ``wiki.test.tokens``. Every
line is split on whitespace and ends with ``<eos>`` (blank lines too, as Transformer-XL's corpus
reader does for WikiText). The word-level vocabulary is built from the train split only (every
train word, ordered by frequency then first appearance; ``<unk>`` and ``<eos>`` always exist);
valid/test words missing from it map to ``<unk>`` and their count is logged.

Stream batching (Transformer-XL's ``LMOrderedIterator``): a split's token stream of N tokens is cut
into T contiguous tracks of ``N // T`` tokens (the remainder, fewer than T tokens, is dropped and
logged). T is ``data.tracks`` (``data.eval_tracks`` for validation / test) when set, else
``world * batch_size`` (``eval_batch_size``). The processes own consecutive runs of tracks, as equal as
possible: with T = 60 on 8 processes, ranks 0-3 hold 8 tracks and ranks 4-7 hold 7 (Transformer-XL
itself split its 60 tracks unevenly over its GPUs, 4 + 19 + 19 + 18). Every track has the same length,
so every process reads the same number of segments. Segment ``i`` is the ``tgt_len`` tokens at
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


def rank_tracks(n_tracks: int, rank: int = 0, world: int = 1) -> range:
    """The tracks process ``rank`` of ``world`` owns: a consecutive run, the first ``n_tracks % world`` ranks one more."""
    if n_tracks < world:
        raise DataError(f"{n_tracks} tracks cannot be shared by {world} processes (each needs at least one); set "
                        f"data.tracks / data.eval_tracks to at least {world} or run fewer processes.")
    base, extra = divmod(n_tracks, world)
    first = rank * base + min(rank, extra)
    return range(first, first + base + (rank < extra))


def batchify(stream: torch.Tensor, n_tracks: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, int]:
    """(this rank's tracks, rows x L, tokens dropped at the end of the stream).

    The stream is cut into ``n_tracks`` contiguous tracks of equal length L; the rows of the result are the
    tracks :func:`rank_tracks` gives this rank, in order.
    """
    own = rank_tracks(n_tracks, rank, world)
    length = stream.numel() // n_tracks
    if length < 2:
        raise DataError(f"A stream of {stream.numel()} tokens cannot be split into {n_tracks} tracks of at least "
                        f"2 tokens; use fewer tracks (data.tracks / data.batch_size, or the eval_ ones) or more text.")
    tracks = stream[: length * n_tracks].view(n_tracks, length)
    return tracks[own.start:own.stop].contiguous(), stream.numel() - length * n_tracks


class SegmentDataset(Dataset):
    """Segment i of the tracks: ``{"input": B x t, "target": B x t, "segment": i, "weight": w}`` (t = tgt_len, the
    last may be shorter).

    Inputs are track positions ``[i*tgt_len, i*tgt_len + t)``, targets the next tokens; every token
    but each track's first is a target exactly once. ``weight`` = (this process's tracks x processes) / all
    tracks, 1 when the processes hold equally many: the training loss is scaled by it, so that DDP's mean of
    the processes' gradients is the gradient of the mean over every track's tokens.
    """

    def __init__(self, tracks: torch.Tensor, tgt_len: int, weight: float = 1.0):
        if tgt_len < 1:
            raise DataError(f"data.tgt_len must be at least 1, got {tgt_len}.")
        self.tracks, self.tgt_len, self.weight = tracks, int(tgt_len), float(weight)
        self.n = -(-(tracks.shape[1] - 1) // self.tgt_len)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, item: Any) -> dict[str, Any]:
        i = int(item[0]) if isinstance(item, tuple) else int(item)
        if not 0 <= i < self.n:
            raise IndexError(i)
        start = i * self.tgt_len
        end = min(start + self.tgt_len, self.tracks.shape[1] - 1)
        return {"input": self.tracks[:, start:end], "target": self.tracks[:, start + 1:end + 1], "segment": i,
                "weight": self.weight}


def _single(items: list[dict[str, Any]]) -> dict[str, Any]:
    return items[0]


class WikiTextDataModule(ResumableDataModuleMixin, pl.LightningDataModule):
    """WikiText in its released layout as in-order segment batches (see the module docstring).

    Args:
        root: folder with ``wiki.{train,valid,test}.tokens``.
        batch_size / eval_batch_size: tracks per process for training / evaluation (used when ``tracks`` /
            ``eval_tracks`` is not set; ``eval_batch_size`` defaults to ``batch_size``).
        tracks / eval_tracks: tracks over all processes for training / evaluation (Transformer-XL's
            ``batch_size``), dealt to the processes as evenly as possible; they keep the batch the same on any
            number of processes. ``eval_tracks`` defaults to ``eval_batch_size`` per process, else ``tracks``.
        tgt_len / eval_tgt_len: segment length for training / evaluation.
        num_workers, pin_memory: DataLoader options.
        seed: unused for the order (segments are never shuffled); kept for the framework's signature.
    """

    def __init__(self, root: str | None = None, batch_size: int | None = 60, eval_batch_size: int | None = 10,
                 tgt_len: int = 150, eval_tgt_len: int | None = None, num_workers: int = 0,
                 pin_memory: bool = True, seed: int = 0, tracks: int | None = None, eval_tracks: int | None = None):
        super().__init__()
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("tracks", tracks),
                           ("eval_tracks", eval_tracks)):
            if value is not None and int(value) < 1:
                raise DataError(f"data.{key} must be at least 1 (or null), got {value}.")
        if tracks is None and batch_size is None:
            raise DataError("Set data.tracks (tracks over all processes) or data.batch_size (tracks per process).")
        self.root = root
        self.batch_size = None if batch_size is None else int(batch_size)
        self.tracks = None if tracks is None else int(tracks)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else self.batch_size
        self.eval_tracks = None if eval_tracks is None else int(eval_tracks)
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


    def n_tracks(self, split: str, world: int = 1) -> int:
        """Tracks of ``split`` over all ``world`` processes."""
        if split == "train":
            return self.tracks if self.tracks is not None else self.batch_size * world  # type: ignore[operator]
        if self.eval_tracks is not None:
            return self.eval_tracks
        return self.eval_batch_size * world if self.eval_batch_size is not None else self.n_tracks("train", world)

    def dataset(self, split: str) -> SegmentDataset:
        """This process's segments of ``split`` (tracks by rank, see :func:`batchify`)."""
        self.setup()
        rank, world = rank_world(getattr(self, "trainer", None))
        train = split == "train"
        n = self.n_tracks(split, world)
        tracks, dropped = batchify(self.streams[split], n, rank, world)
        if dropped:
            log.info("%s: the last %d tokens do not fill a track and are not used", split, dropped)
        if n % world:
            log.info("%s: %d tracks over %d processes: this one (rank %d) holds %d", split, n, world, rank,
                     tracks.shape[0])
        return SegmentDataset(tracks, self.tgt_len if train else self.eval_tgt_len, tracks.shape[0] * world / n)

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
