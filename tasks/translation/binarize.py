"""Write a data folder in fairseq's data-bin layout from tokenized (and BPE-split) parallel text:
``dict.<lang>.txt`` (fairseq's counting, padded to a multiple of 8 with ``madeupword`` entries) and
``<split>.<src>-<tgt>.<lang>.{idx,bin}`` in the mmap format, so fairseq and this project read it alike.
Dictionaries are built on the training split only (fairseq-preprocess's default)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

from tasks.common.errors import DataError

from .dictionary import Dictionary
from .indexed import write_mmap

log = logging.getLogger(__name__)


def check_parallel(src: Sequence[str], tgt: Sequence[str], src_name: str, tgt_name: str) -> None:
    """Equal line counts and no empty lines, or one clear error naming the file."""
    if len(src) != len(tgt):
        raise DataError(f"{src_name} has {len(src)} lines but {tgt_name} has {len(tgt)}: the parallel files are "
                        f"misaligned; fix them so that line i of one translates line i of the other.")
    for name, lines in ((src_name, src), (tgt_name, tgt)):
        for n, line in enumerate(lines, 1):
            if not line.strip():
                raise DataError(f"{name} line {n} is empty; remove the pair (both files) or clean the corpus first.")


def write_data_bin(out: str | Path, splits: Mapping[str, tuple[Sequence[str], Sequence[str]]], src_lang: str,
                   tgt_lang: str, joined: bool = False, threshold: int = 0) -> tuple[Dictionary, Dictionary]:
    """``splits``: {name: (source lines, target lines)}; must contain ``train``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, (src, tgt) in splits.items():
        check_parallel(src, tgt, f"{name}.{src_lang}", f"{name}.{tgt_lang}")
    train_src, train_tgt = splits["train"]
    if joined:
        src_dict = tgt_dict = Dictionary.build(list(train_src) + list(train_tgt), threshold)
    else:
        src_dict, tgt_dict = Dictionary.build(train_src, threshold), Dictionary.build(train_tgt, threshold)
    src_dict.save(out / f"dict.{src_lang}.txt")
    tgt_dict.save(out / f"dict.{tgt_lang}.txt")
    for name, (src, tgt) in splits.items():
        for lang, lines, d in ((src_lang, src, src_dict), (tgt_lang, tgt, tgt_dict)):
            write_mmap(out / f"{name}.{src_lang}-{tgt_lang}.{lang}", (d.encode_line(s) for s in lines), len(d))
        log.info("%s: %d pairs written", name, len(src))
    return src_dict, tgt_dict
