"""ListOps tokenizer with LRA's rules and a fixed vocabulary.

LRA's input pipeline drops ``(`` and ``)`` and renames ``]`` to ``X``. The vocabulary here is fixed
(LRA built its own from the data, so its ids depend on the files):

    0 <pad>   1 [MIN   2 [MAX   3 [MED   4 [SM   5 X   6..15 the digits 0..9

``to_lra_source`` rebuilds the parenthesised LRA text from ids, so ``to_lra_source(tokenize(s)) == s``
for every well-formed LRA source (the parentheses are implied by the tree).
"""
from __future__ import annotations

from typing import Iterable, Sequence

PAD = "<pad>"
OPERATOR_TOKENS = ("[MIN", "[MAX", "[MED", "[SM")
VOCAB: tuple[str, ...] = (PAD, *OPERATOR_TOKENS, "X", *(str(d) for d in range(10)))
TOKEN_TO_ID = {t: i for i, t in enumerate(VOCAB)}
PAD_ID = 0
END_ID = TOKEN_TO_ID["X"]
VOCAB_SIZE = len(VOCAB)
NUM_CLASSES = 10
_DROP = frozenset(("(", ")"))
_RENAME = {"]": "X"}


class TokenError(ValueError):
    """A source holds a token outside the ListOps vocabulary."""


def tokenize(source: str) -> list[int]:
    """LRA text -> token ids (parentheses dropped, ``]`` -> ``X``). Raises TokenError on unknown tokens."""
    ids = []
    for tok in source.split():
        if tok in _DROP:
            continue
        try:
            ids.append(TOKEN_TO_ID[_RENAME.get(tok, tok)])
        except KeyError:
            raise TokenError(f"unknown token {tok!r}") from None
        if ids[-1] == PAD_ID:
            raise TokenError(f"unknown token {tok!r}")
    return ids


def detokenize(ids: Iterable[int]) -> list[str]:
    """Token ids -> token strings, padding dropped."""
    return [VOCAB[i] for i in ids if i != PAD_ID]


def to_lra_source(ids: Sequence[int]) -> str:
    """Rebuild LRA's parenthesised text from ids (inverse of :func:`tokenize` on well-formed trees)."""
    toks = detokenize(ids)
    pos = 0

    def node() -> str:
        nonlocal pos
        if pos >= len(toks):
            raise TokenError("truncated expression")
        tok = toks[pos]
        pos += 1
        if tok.isdigit():
            return tok
        if tok not in OPERATOR_TOKENS:
            raise TokenError(f"unexpected token {tok!r}")
        children = []
        while pos < len(toks) and toks[pos] != "X":
            children.append(node())
        if pos >= len(toks):
            raise TokenError("operator without closing bracket")
        pos += 1
        return "( " * (len(children) + 1) + tok + " " + " ) ".join(children) + " ) ] )"

    text = node()
    if pos != len(toks):
        raise TokenError("trailing tokens after the expression")
    return text
