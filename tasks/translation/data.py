"""Parallel data: a fairseq ``data-bin`` folder (or one written by scripts/prepare_translation.py, which
uses the same layout) -> padded batches, with fairseq's token batching (:mod:`.batching`).

Folder layout (fairseq-preprocess): ``dict.<src>.txt``, ``dict.<tgt>.txt``,
``<split>.<src>-<tgt>.<lang>.{idx,bin}`` (or ``<split>.<tgt>-<src>.<lang>``) for ``train``, ``valid``,
``test``. A batch is a dict: ``src_tokens`` B x S (right-padded with ``<pad>``), ``src_lengths``,
``prev_output_tokens`` (target shifted right, ``</s>`` moved to the front), ``target`` B x T,
``ntokens`` (non-pad target tokens), ``id`` (pair indices), ``dummy`` (a padding batch: weight 0).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tasks.common.errors import DataError

from .batching import TokenBatchSampler, batch_by_size, ordered_indices
from .dictionary import EOS_ID, PAD_ID, Dictionary
from .indexed import TokenFile, open_token_file

log = logging.getLogger(__name__)


def find_pairs(root: Path) -> list[str]:
    """Language pairs ``src-tgt`` that have a training split in ``root``."""
    pairs = set()
    for p in root.glob("train.*-*.*.idx"):
        m = re.fullmatch(r"train\.([^.]+)-([^.]+)\.([^.]+)\.idx", p.name)
        if m:
            pairs.add(f"{m.group(1)}-{m.group(2)}")
    return sorted(pairs)


def split_prefix(root: Path, split: str, src: str, tgt: str, lang: str) -> Path | None:
    """fairseq's ``split_exists``: ``<split>.<src>-<tgt>.<lang>`` or the reversed pair name."""
    for a, b in ((src, tgt), (tgt, src)):
        prefix = root / f"{split}.{a}-{b}.{lang}"
        if Path(str(prefix) + ".idx").is_file():
            return prefix
    return None


class LanguagePairDataset(Dataset):
    """Aligned source/target :class:`TokenFile`; ``[i]`` -> (i, src ids, tgt ids)."""

    def __init__(self, src: TokenFile, tgt: TokenFile, name: str = ""):
        if len(src) != len(tgt):
            raise DataError(f"{src.prefix}.bin has {len(src)} sentences but {tgt.prefix}.bin has {len(tgt)}: the "
                            f"parallel files are misaligned; rebuild the folder from line-aligned text.")
        self.src, self.tgt, self.name = src, tgt, name
        self.src_sizes = np.asarray(src.sizes, dtype=np.int64)
        self.tgt_sizes = np.asarray(tgt.sizes, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, key: int | tuple[int, bool]) -> tuple[int, bool, np.ndarray, np.ndarray]:
        """``key``: an index or an ``(index, dummy)`` item of :class:`TokenBatchSampler`."""
        i, dummy = key if isinstance(key, tuple) else (key, False)
        return int(i), bool(dummy), self.src[i], self.tgt[i]

    def num_tokens(self) -> np.ndarray:
        return np.maximum(self.src_sizes, self.tgt_sizes)


def _pad(seqs: list[np.ndarray]) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), PAD_ID, dtype=torch.long)
    for row, s in zip(out, seqs):
        row[: len(s)] = torch.from_numpy(s)
    return out


def collate(items: list[tuple[int, bool, np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Pad one batch of ``dataset[(index, dummy)]`` items."""
    ids = [it[0] for it in items]
    src = [it[2] for it in items]
    tgt = [it[3] for it in items]
    prev = [np.concatenate([[EOS_ID], t[:-1]]) for t in tgt]
    target = _pad(tgt)
    return {
        "id": torch.tensor(ids, dtype=torch.long),
        "src_tokens": _pad(src),
        "src_lengths": torch.tensor([len(s) for s in src], dtype=torch.long),
        "prev_output_tokens": _pad(prev),
        "target": target,
        "ntokens": int(target.ne(PAD_ID).sum()),
        "dummy": bool(items[0][1]) if items else False,
    }


class BatchLoader(DataLoader):
    """A DataLoader over a :class:`TokenBatchSampler` that counts the batches it has yielded (the
    resume position; workers draw from the sampler ahead, so the sampler cannot count)."""

    def __init__(self, dataset: LanguagePairDataset, sampler: TokenBatchSampler, **kwargs: Any):
        super().__init__(dataset, batch_sampler=sampler, collate_fn=collate, **kwargs)
        self.token_sampler = sampler
        self.consumed = 0

    def __iter__(self):
        self.consumed = self.token_sampler._resume_at
        for batch in super().__iter__():
            self.consumed += 1
            yield batch

    def __len__(self) -> int:
        return len(self.token_sampler)

    def set_epoch(self, epoch: int) -> None:
        self.token_sampler.set_epoch(epoch)

    # Lightning saves and restores these too (when it builds the loader after loading a checkpoint);
    # the data module carries the same position for the other order (see TranslationDataModule).
    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.token_sampler.epoch), "batches": int(self.consumed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = self.token_sampler.resume(state["epoch"], state["batches"])


class TranslationDataModule(pl.LightningDataModule):
    """fairseq data-bin folder -> train/valid/test loaders with fairseq's token batching.

    ``max_tokens`` per batch counts padding; ``max_positions`` drops longer training pairs (fairseq would
    stop; the count is logged). ``valid_bleu_sentences`` limits validation BLEU to the first N pairs.
    """

    def __init__(self, root: str, source_lang: str, target_lang: str, max_tokens: int = 4096,
                 max_sentences: int | None = None, batch_multiple: int = 8, max_positions: int = 1024,
                 eval_max_tokens: int | None = None, num_workers: int = 1, seed: int = 0,
                 train_subset: str = "train", valid_subset: str = "valid", test_subset: str = "test",
                 joined_dictionary: bool = False, **unused: Any):
        super().__init__()
        self.root = Path(str(root)).expanduser()
        self.src_lang, self.tgt_lang = str(source_lang), str(target_lang)
        self.max_tokens, self.max_sentences = max_tokens, max_sentences
        self.batch_multiple, self.max_positions = int(batch_multiple), int(max_positions)
        self.eval_max_tokens = eval_max_tokens or max_tokens
        self.num_workers, self.seed = int(num_workers), int(seed)
        self.subsets = {"train": train_subset, "valid": valid_subset, "test": test_subset}
        self.joined = bool(joined_dictionary)
        self.datasets: dict[str, LanguagePairDataset] = {}
        self._samplers: dict[str, TokenBatchSampler] = {}
        self._train_loader: BatchLoader | None = None
        self._pending: dict[str, int] | None = None
        self.src_dict, self.tgt_dict = self.load_dictionaries()

    # ------------------------------------------------------------------ files
    def load_dictionaries(self) -> tuple[Dictionary, Dictionary]:
        if not self.root.is_dir():
            raise DataError(f"data.root {self.root} is not a folder; pass data.root=<fairseq data-bin folder> or "
                            f"prepare one with scripts/prepare_translation.py.")
        paths = [self.root / f"dict.{lang}.txt" for lang in (self.src_lang, self.tgt_lang)]
        if not all(p.is_file() for p in paths):
            pairs = find_pairs(self.root)
            if pairs and f"{self.src_lang}-{self.tgt_lang}" not in pairs and \
                    f"{self.tgt_lang}-{self.src_lang}" not in pairs:
                raise DataError(f"{self.root} holds the language pair(s) {', '.join(pairs)}, not "
                                f"{self.src_lang}-{self.tgt_lang}; set data.source_lang/data.target_lang accordingly.")
        src, tgt = (Dictionary.load(p) for p in paths)
        if self.joined and src != tgt:
            raise DataError(f"data.joined_dictionary is true but {paths[0]} and {paths[1]} differ; build the folder "
                            f"with a joined dictionary (fairseq-preprocess --joined-dictionary) or set it false.")
        return src, tgt

    def load_split(self, split: str) -> LanguagePairDataset:
        name = self.subsets[split]
        files = []
        for lang, d in ((self.src_lang, self.src_dict), (self.tgt_lang, self.tgt_dict)):
            prefix = split_prefix(self.root, name, self.src_lang, self.tgt_lang, lang)
            if prefix is None:
                pairs = find_pairs(self.root)
                if pairs and f"{self.src_lang}-{self.tgt_lang}" not in pairs and \
                        f"{self.tgt_lang}-{self.src_lang}" not in pairs:
                    raise DataError(f"{self.root} holds the language pair(s) {', '.join(pairs)}, not "
                                    f"{self.src_lang}-{self.tgt_lang}; set data.source_lang/data.target_lang.")
                raise DataError(f"{self.root / f'{name}.{self.src_lang}-{self.tgt_lang}.{lang}'}.idx does not exist: "
                                f"the folder has no '{name}' split for {lang}; binarize it or set "
                                f"data.{split}_subset to an existing split.")
            f = open_token_file(prefix)
            self.check_file(f, d, lang)
            files.append(f)
        ds = LanguagePairDataset(*files, name=name)
        log.info("%s %s-%s: %d sentence pairs, %d source and %d target tokens (incl. </s>)", name, self.src_lang,
                 self.tgt_lang, len(ds), int(ds.src_sizes.sum()), int(ds.tgt_sizes.sum()))
        return ds

    @staticmethod
    def check_file(f: TokenFile, d: Dictionary, lang: str) -> None:
        if len(f) == 0:
            return
        top = f.max_id()
        if top >= len(d) or top < 0:
            raise DataError(f"{f.prefix}.bin holds token id {top} but dict.{lang}.txt has only {len(d)} entries "
                            f"(with the 4 specials): data and dictionary do not belong together; use the dictionary "
                            f"the data was binarized with.")
        if (f.sizes <= 0).any() or (f.last_tokens() != EOS_ID).any():
            raise DataError(f"{f.prefix}.bin has sentences that do not end with </s> (id 2): it is not fairseq "
                            f"translation data or is corrupt; rebuild it.")
        empty = int((f.sizes == 1).sum())
        if empty:
            log.warning("%s.bin: %d empty sentences (only </s>)", f.prefix, empty)

    def check(self, stage: str = "fit") -> None:
        """Open and check the splits the stage needs (a clear error before the model is built)."""
        splits = ["train", "valid"] if stage == "fit" else ["valid", "test"] if stage in ("validate", "test") \
            else ["valid"]
        for s in splits:
            if s not in self.datasets:
                self.datasets[s] = self.load_split(s)

    def setup(self, stage: str | None = None) -> None:
        self.check("fit" if stage in (None, "fit") else stage)

    def has_split(self, split: str) -> bool:
        name = self.subsets[split]
        return all(split_prefix(self.root, name, self.src_lang, self.tgt_lang, lang) is not None
                   for lang in (self.src_lang, self.tgt_lang))

    # ------------------------------------------------------------------ loaders
    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def batches(self, split: str) -> list[np.ndarray]:
        ds = self.datasets[split]
        train = split == "train"
        n_tok = ds.num_tokens()
        order = ordered_indices(ds.src_sizes, ds.tgt_sizes, shuffle=train, seed=self.seed)
        if train:
            keep = (ds.src_sizes[order] <= self.max_positions) & (ds.tgt_sizes[order] <= self.max_positions)
            if not keep.all():
                log.warning("%s: %d pairs longer than data.max_positions=%d are skipped", ds.name,
                            int((~keep).sum()), self.max_positions)
            order = order[keep]
        tokens = self.max_tokens if train else self.eval_max_tokens
        return batch_by_size(order, n_tok, tokens, self.max_sentences, self.batch_multiple)

    def _loader(self, split: str) -> BatchLoader:
        if split not in self.datasets:
            self.datasets[split] = self.load_split(split)
        rank, world = self._rank()
        sampler = TokenBatchSampler(self.batches(split), shuffle=split == "train", seed=self.seed,
                                    rank=rank, world_size=world)
        self._samplers[split] = sampler
        return BatchLoader(self.datasets[split], sampler, num_workers=self.num_workers,
                           persistent_workers=False, pin_memory=False)

    def train_dataloader(self) -> BatchLoader:
        loader = self._loader("train")
        if self._pending is not None:
            loader.token_sampler.resume(self._pending["epoch"], self._pending["batches"])
            self._pending = None
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> BatchLoader:
        return self._loader("valid")

    def test_dataloader(self) -> BatchLoader:
        return self._loader("test")

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return self._train_loader.state_dict() if self._train_loader is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state)
        else:
            self._pending = dict(state)
