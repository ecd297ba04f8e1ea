"""A small word-level corpus of real English text in WikiText layout, for CPU demos and tests.

The text is the WordNet glosses that timm (a dependency of this project) ships for its ImageNet-22k
label information (``timm/data/_info/imagenet_synset_to_definition.txt``, about 21.8k definitions,
276k words), read from the installed package at run time. It is tokenised the WikiText way
(punctuation split off, hyphens as ``@-@``, words seen fewer than ``min_count`` times in the
corpus replaced by ``<unk>``), one definition per line, and cut in order into train/valid/test
(90/5/5 % of the lines) as ``wiki.{train,valid,test}.tokens``.
"""
from __future__ import annotations

import re
from collections import Counter
from importlib import resources
from pathlib import Path

from tasks.common.errors import DataError

from .data import SPLIT_FILES

_PUNCT = re.compile(r"([,;:()\"!?'])")


def demo_lines(max_lines: int | None = None) -> list[str]:
    """Tokenised lines of the corpus (definitions in file order), WikiText style, before ``<unk>`` mapping."""
    text = resources.files("timm.data").joinpath("_info/imagenet_synset_to_definition.txt").read_text(encoding="utf-8")
    lines = []
    for row in text.splitlines():
        gloss = row.split("\t", 1)[-1].strip()
        if not gloss:
            continue
        gloss = _PUNCT.sub(r" \1 ", gloss.replace("-", " @-@ "))
        gloss = re.sub(r"\.(\s|$)", r" . ", gloss)
        lines.append(" ".join(gloss.split()) + " .")
        if max_lines is not None and len(lines) >= max_lines:
            break
    return lines


def write_demo_corpus(root: str | Path, max_lines: int | None = None, min_count: int = 3) -> Path:
    """Write the corpus into ``root`` (unless its three files already exist) and return ``root``."""
    root = Path(root).expanduser()
    if all((root / f).is_file() for f in SPLIT_FILES.values()):
        return root
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"Cannot create the demo corpus folder {root} ({exc}); set data.root to a writable folder.") from exc
    lines = demo_lines(max_lines)
    counts = Counter(w for line in lines for w in line.split())
    lines = [" ".join(w if counts[w] >= min_count else "<unk>" for w in line.split()) for line in lines]
    n = len(lines)
    a, b = int(n * 0.9), int(n * 0.95)
    for split, part in (("train", lines[:a]), ("val", lines[a:b]), ("test", lines[b:])):
        (root / SPLIT_FILES[split]).write_text("".join(f" {line} \n" for line in part), encoding="utf-8")
    return root
