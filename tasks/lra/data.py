"""ListOps data: LRA-format TSV files -> cached token tensors -> a LightningDataModule.

Accepted layouts of ``root`` (the first that holds ``basic_train.tsv`` wins):

* ``root/basic_{train,val,test}.tsv`` (what ``scripts/prepare_listops.py --out root`` writes, or LRA's
  ``lra_release/listops-1000`` folder itself);
* ``root/listops-1000/...``, ``root/lra_release/listops-1000/...`` (LRA's release unpacked in root).

Processed tensors are cached in ``<data folder>/cache/<split>_<max_length>.pt`` together with the
SHA-1 of the TSV they came from; a changed file is re-tokenised. A read-only data folder simply
disables the cache.

Batches are dicts: ``tokens`` (B x L int64, 0 = pad), ``padding_mask`` (B x L bool, True = pad),
``label`` (B int64, 0-9). ``L = max_length`` unless ``trim_padding`` is set, which cuts each batch to
its longest sequence (the models are padding-invariant, so only speed changes).
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tasks.common.data import EpochShuffleSampler, ResumableDataLoader, SeededSampler, ShardSampler, rank_world
from tasks.common.errors import DataError

from .tokenizer import NUM_CLASSES, PAD_ID, VOCAB, VOCAB_SIZE, TokenError, tokenize

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
LAYOUTS = ("", "listops-1000", "lra_release/listops-1000", "lra_release/lra_release/listops-1000")
CACHE_VERSION = 1
PREPARE_HINT = "python scripts/prepare_listops.py --out {root}"


class ListOpsFormatError(DataError, ValueError):
    """A ListOps TSV file has malformed rows."""


class ListOpsNotFoundError(DataError, FileNotFoundError):
    """The ListOps files are not where ``data.root`` points."""


def find_data_dir(root: str | os.PathLike | None) -> Path:
    """The folder holding ``basic_train.tsv`` under ``root`` (see the module docstring).

    Raises :class:`ListOpsNotFoundError` (a FileNotFoundError) with the command that creates the data.
    """
    if root is None or str(root) in ("", "???", "None"):
        raise ListOpsNotFoundError(
            "No ListOps data folder given: set data.root=<dir>. Create the data with "
            f"`{PREPARE_HINT.format(root='<dir>')}` (or point data.root at LRA's lra_release/listops-1000).")
    root = Path(root).expanduser()
    for sub in LAYOUTS:
        d = root / sub if sub else root
        if (d / "basic_train.tsv").is_file():
            return d
    looked = ", ".join(str((root / s) if s else root) for s in LAYOUTS)
    raise ListOpsNotFoundError(
        f"ListOps data not found: no basic_train.tsv in {looked}. Generate it with "
        f"`{PREPARE_HINT.format(root=root)}`, or set data.root to a folder holding LRA's "
        "lra_release/listops-1000.")


def read_tsv(path: str | os.PathLike, max_length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Read one LRA TSV file.

    Returns (tokens: N x max_length uint8, 0 = pad; labels: N int64; number of truncated rows).
    Malformed rows (wrong column count, unknown token, empty source, label not an integer 0-9) raise
    one :class:`ListOpsFormatError` naming the file and line numbers of the first few.
    """
    path = Path(path)
    rows: list[list[int]] = []
    labels: list[int] = []
    errors: list[str] = []
    n_bad = 0
    truncated = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\n").rstrip("\r")
            if lineno == 1 and line.split("\t") == ["Source", "Target"]:
                continue
            if not line.strip():
                continue
            cols = line.split("\t")
            problem = None
            if len(cols) != 2:
                problem = f"expected 2 tab-separated columns (Source, Target), found {len(cols)}"
            else:
                try:
                    ids = tokenize(cols[0])
                    if not ids:
                        problem = "empty source"
                except TokenError as e:
                    problem = str(e)
                label_text = cols[1].strip()
                if problem is None:
                    if not (label_text.isdigit() and 0 <= int(label_text) <= 9):
                        problem = f"label {label_text!r} is not an integer in 0-9"
            if problem is not None:
                n_bad += 1
                if len(errors) < 5:
                    errors.append(f"  {path}:{lineno}: {problem}")
                continue
            if len(ids) > max_length:
                truncated += 1
                ids = ids[:max_length]
            rows.append(ids)
            labels.append(int(label_text))
    if n_bad:
        more = f"\n  ... and {n_bad - len(errors)} more" if n_bad > len(errors) else ""
        raise ListOpsFormatError(
            f"{n_bad} malformed row(s) in {path} (expected LRA's format: header 'Source<TAB>Target', then "
            f"'<expression><TAB><label 0-9>'):\n" + "\n".join(errors) + more)
    tokens = torch.zeros(len(rows), max_length, dtype=torch.uint8)
    for i, ids in enumerate(rows):
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.uint8)
    return tokens, torch.tensor(labels, dtype=torch.long), truncated


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load_split(data_dir: str | os.PathLike, split: str, max_length: int,
               cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (N x max_length uint8) and labels (N) of ``basic_<split>.tsv``, cached on disk."""
    data_dir = Path(data_dir)
    src = data_dir / f"basic_{split}.tsv"
    if not src.is_file():
        raise ListOpsNotFoundError(f"ListOps split file {src} is missing; regenerate the data with "
                                f"`{PREPARE_HINT.format(root=data_dir)}`.")
    st = src.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    cache_file = data_dir / "cache" / f"{split}_{max_length}.pt"
    sha = None
    if cache and cache_file.is_file():
        try:
            blob = torch.load(cache_file, map_location="cpu", weights_only=True)
            ok = blob.get("version") == CACHE_VERSION and tuple(blob.get("vocab", ())) == VOCAB
            if ok and blob.get("stamp") != stamp:  # touched or replaced: compare contents
                sha = _sha1(src)
                ok = blob.get("sha1") == sha
            if ok:
                return blob["tokens"], blob["labels"]
        except Exception as e:  # unreadable cache: rebuild it
            log.warning("ignoring unreadable ListOps cache %s (%s)", cache_file, e)
    tokens, labels, truncated = read_tsv(src, max_length)
    if truncated:
        log.warning("%s: %d sequence(s) longer than max_length=%d were truncated", src, truncated, max_length)
    if cache:
        try:
            cache_file.parent.mkdir(exist_ok=True)
            tmp = cache_file.with_name(cache_file.name + f".{os.getpid()}.tmp")
            torch.save({"version": CACHE_VERSION, "vocab": list(VOCAB), "sha1": sha or _sha1(src),
                        "stamp": stamp, "tokens": tokens, "labels": labels}, tmp)
            os.replace(tmp, cache_file)
        except OSError as e:
            log.warning("could not write the ListOps cache %s (%s); continuing without it", cache_file, e)
    return tokens, labels


class ListOpsDataset(Dataset):
    """Token rows and labels: item i (or (i, seed) from a SeededSampler) -> (tokens: L int64, label)."""

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor):
        self.tokens, self.labels = tokens, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: Any) -> tuple[torch.Tensor, torch.Tensor]:
        i = item[0] if isinstance(item, tuple) else item
        return self.tokens[i].long(), self.labels[i]


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]], trim_padding: bool = False) -> dict[str, torch.Tensor]:
    """Stack items into ``{"tokens": B x L, "padding_mask": B x L (True = pad), "label": B}``."""
    tokens = torch.stack([b[0] for b in batch])
    labels = torch.stack([b[1] for b in batch])
    if trim_padding:
        longest = int((tokens != PAD_ID).sum(1).max().item()) if len(tokens) else 0
        tokens = tokens[:, : max(longest, 1)]
    return {"tokens": tokens, "padding_mask": tokens == PAD_ID, "label": labels}


class _Collate:
    def __init__(self, trim_padding: bool):
        self.trim_padding = trim_padding

    def __call__(self, batch):
        return collate(batch, self.trim_padding)


class ListOpsDataModule(pl.LightningDataModule):
    """Long ListOps from LRA-format TSV files.

    Args:
        root: data folder (``scripts/prepare_listops.py --out`` folder or LRA's release, see module doc).
        max_length: pad / truncate every sequence to this many tokens (2000 in the LRA recipe).
        batch_size: per-process batch size (32 in the recipe); eval_batch_size defaults to it.
        num_workers, pin_memory, persistent_workers: DataLoader options.
        cache: keep processed tensors in ``<data folder>/cache``.
        trim_padding: cut each batch to its longest sequence (speed only; models are padding-invariant).
        generate: if given and the data is missing, generate it into ``root`` first with these
            :class:`~tasks.lra.listops_gen.ListOpsSpec` fields (the embedded demo does this).
        seed: order of the training samples (epoch e: a permutation drawn from (seed, e)).

    Training batches come from a resumable, seeded sampler (the framework's), sharded over processes
    with DDP; validation/test are sharded without padding (every sample counted once).
    """

    num_classes = NUM_CLASSES
    vocab_size = VOCAB_SIZE

    def __init__(self, root: str | None = None, max_length: int = 2000, batch_size: int = 32,
                 eval_batch_size: int | None = None, num_workers: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = True, cache: bool = True, trim_padding: bool = False,
                 generate: Mapping[str, Any] | None = None, seed: int = 0):
        super().__init__()
        self.root, self.max_length, self.batch_size = root, int(max_length), int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.persistent_workers, self.cache = bool(persistent_workers), bool(cache)
        self.trim_padding, self.generate = bool(trim_padding), dict(generate) if generate else None
        self.seed = int(seed)
        self.datasets: dict[str, ListOpsDataset] = {}
        self.data_dir: Path | None = None

    # ------------------------------------------------------------------ data preparation
    def prepare_data(self) -> None:
        """Generate the data if ``generate`` is set and it is missing."""
        if self.generate is None:
            return
        try:
            find_data_dir(self.root)
        except ListOpsNotFoundError:
            if self.root is None or str(self.root) in ("", "???", "None"):
                raise
            from .listops_gen import ListOpsSpec, prepare
            spec = ListOpsSpec(**self.generate)
            log.info("generating ListOps %s into %s", asdict(spec), self.root)
            prepare(self.root, spec, show_progress=False)

    def check(self, stage: str = "fit") -> None:
        """Generate if configured, find the files and load the splits (clear DataError otherwise)."""
        self.prepare_data()
        self.setup(stage)

    def setup(self, stage: str | None = None) -> None:
        self.data_dir = find_data_dir(self.root)
        for split in SPLITS:
            if split not in self.datasets:
                tokens, labels = load_split(self.data_dir, split, self.max_length, cache=self.cache)
                self.datasets[split] = ListOpsDataset(tokens, labels)
        if len(self.datasets["train"]) == 0:
            raise DataError(f"{self.data_dir / 'basic_train.tsv'} has no rows; regenerate it with "
                            f"`{PREPARE_HINT.format(root=self.data_dir)}`.")

    def majority_rate(self, split: str = "test") -> float:
        """Accuracy (percent) of always predicting the most frequent label of ``split``."""
        labels = self.datasets[split].labels
        return 100.0 * torch.bincount(labels, minlength=NUM_CLASSES).max().item() / max(len(labels), 1)

    # ------------------------------------------------------------------ loaders

    def _loader_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"num_workers": self.num_workers, "collate_fn": _Collate(self.trim_padding),
                              "pin_memory": self.pin_memory and torch.cuda.is_available()}
        if self.num_workers > 0:
            kw["persistent_workers"] = self.persistent_workers
        return kw

    def train_dataloader(self) -> ResumableDataLoader:
        if not self.datasets:
            self.setup("fit")
        dataset = self.datasets["train"]
        rank, world = rank_world(getattr(self, "trainer", None))
        if world > 1:
            base = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed,
                                      drop_last=True)
        else:
            base = EpochShuffleSampler(len(dataset), seed=self.seed)
        sampler = SeededSampler(base, seed=self.seed, rank=rank, seed_samples=False)
        return ResumableDataLoader(dataset, sampler=sampler, batch_size=self.batch_size, drop_last=False,
                                   **self._loader_kwargs())

    def _eval_loader(self, split: str) -> DataLoader:
        if not self.datasets:
            self.setup("validate")
        dataset = self.datasets[split]
        rank, world = rank_world(getattr(self, "trainer", None))
        return DataLoader(dataset, sampler=ShardSampler(len(dataset), rank, world), batch_size=self.eval_batch_size,
                          drop_last=False, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
