"""fairseq's dictionary file (``dict.<lang>.txt``) and the id <-> text conversions around it.

The file holds lines ``<word> <count>`` (optionally followed by ``#fairseq:overwrite``). The four special
symbols are implicit, not in the file: ``<s>`` = 0, ``<pad>`` = 1, ``</s>`` = 2, ``<unk>`` = 3; the file's
entries follow from id 4 on, in file order. ``madeupword0000``... entries (fairseq pads dictionaries to a
multiple of 8) are ordinary entries. Writing produces the same layout, so fairseq reads our folders.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from tasks.common.errors import DataError

BOS, PAD, EOS, UNK = "<s>", "<pad>", "</s>", "<unk>"
SPECIALS = (BOS, PAD, EOS, UNK)
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
BPE_MARKER = "@@ "


def remove_bpe(text: str, marker: str = BPE_MARKER) -> str:
    """fairseq's ``--remove-bpe``: ``(text + " ").replace("@@ ", "").rstrip()``."""
    return (text + " ").replace(marker, "").rstrip()


class Dictionary:
    """Symbols (list) and their ids; ``len`` counts the specials and every file entry."""

    def __init__(self, symbols: Sequence[str] = (), counts: Sequence[int] | None = None):
        self.symbols: list[str] = list(SPECIALS)
        self.counts: list[int] = [1, 1, 1, 1]
        self.index: dict[str, int] = {s: i for i, s in enumerate(self.symbols)}
        for i, s in enumerate(symbols):
            self.add(s, counts[i] if counts is not None else 1)

    pad, eos, bos, unk = PAD_ID, EOS_ID, BOS_ID, UNK_ID

    def add(self, symbol: str, count: int = 1, overwrite: bool = False) -> int:
        if symbol in self.index and not overwrite:
            self.counts[self.index[symbol]] += count
            return self.index[symbol]
        self.index[symbol] = len(self.symbols)
        self.symbols.append(symbol)
        self.counts.append(count)
        return self.index[symbol]

    def __len__(self) -> int:
        return len(self.symbols)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dictionary) and self.symbols == other.symbols

    # ------------------------------------------------------------------ files
    @classmethod
    def load(cls, path: str | Path) -> "Dictionary":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"Dictionary {path} does not exist; point data.root at a fairseq data-bin folder or "
                            f"a folder written by scripts/prepare_translation.py.")
        d = cls()
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                overwrite = line.endswith(" #fairseq:overwrite")
                if overwrite:
                    line = line[: -len(" #fairseq:overwrite")]
                word, _, count = line.rpartition(" ")
                if not word or not count.lstrip("-").isdigit():
                    raise DataError(f"{path} line {n} is not '<word> <count>' ({line[:60]!r}); the file is not a "
                                    f"fairseq dictionary: rebuild the data folder.")
                if word in d.index and not overwrite:
                    raise DataError(f"{path} line {n}: duplicate word {word!r} without '#fairseq:overwrite'; "
                                    f"the dictionary is corrupt: rebuild the data folder.")
                d.add(word, int(count), overwrite=True)
        return d

    def save(self, path: str | Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for s, c in zip(self.symbols[4:], self.counts[4:]):
                f.write(f"{s} {c}\n")

    @classmethod
    def build(cls, lines: Iterable[str], threshold: int = 0, nwords: int = -1,
              padding_factor: int = 8) -> "Dictionary":
        """Count whitespace tokens like ``fairseq-preprocess``: sort by count (desc), then word; keep words
        seen at least ``threshold`` times (``nwords`` most frequent if > 0); pad to a multiple of 8 with
        ``madeupwordNNNN`` entries."""
        counts: dict[str, int] = {}
        for line in lines:
            for w in line.split():
                counts[w] = counts.get(w, 0) + 1
        items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        items = [(w, c) for w, c in items if c >= threshold and w not in SPECIALS]
        if nwords > 0:
            items = items[:nwords]
        d = cls([w for w, _ in items], [c for _, c in items])
        i = 0
        while padding_factor > 1 and len(d) % padding_factor:
            d.add(f"madeupword{i:04d}", 0)
            i += 1
        return d

    # ------------------------------------------------------------------ conversions
    def encode_line(self, line: str, append_eos: bool = True) -> list[int]:
        ids = [self.index.get(w, UNK_ID) for w in line.split()]
        return ids + [EOS_ID] if append_eos else ids

    def string(self, ids: Iterable[int], bpe: str | None = BPE_MARKER, unk: str = UNK) -> str:
        """Ids -> text without ``<pad>``/``<s>``/``</s>``; ``bpe`` marker removed unless None."""
        words = [unk if i == UNK_ID else self.symbols[i] for i in (int(x) for x in ids)
                 if i not in (PAD_ID, EOS_ID, BOS_ID)]
        text = " ".join(words)
        return remove_bpe(text, bpe) if bpe else text
