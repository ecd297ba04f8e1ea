"""A procedurally generated translation task for the CPU demo and the end-to-end test.

The source language is drawn from a small grammar (determiner, optional adjectives, noun, verb, object
noun phrase, optional prepositional phrase; numbers); the target language translates word by word
through a fixed random lexicon and reorders like German does to English: adjectives follow the noun,
the verb moves to the end of the clause, the prepositional phrase moves to the front. A model must learn
the lexicon and the reordering; BLEU measures both. Deterministic given the seed.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from .binarize import write_data_bin

LETTERS = "bcdfghklmnprstvz"
VOWELS = "aeiou"


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(LETTERS) + rng.choice(VOWELS) for _ in range(syllables))


def _lexicon(rng: random.Random, n: int, seen: set[str]) -> list[tuple[str, str]]:
    out = []
    while len(out) < n:
        a, b = _word(rng, rng.randint(1, 3)), _word(rng, rng.randint(1, 3)) + "x"
        if a not in seen and b not in seen:
            seen.update((a, b))
            out.append((a, b))
    return out


def generate(num_train: int = 6000, num_valid: int = 300, num_test: int = 300, vocab: int = 24,
             seed: int = 0) -> dict[str, tuple[list[str], list[str]]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    lex = {k: _lexicon(rng, vocab, seen) for k in ("det", "adj", "noun", "verb", "prep")}
    lex["det"], lex["prep"] = lex["det"][:4], lex["prep"][:5]

    def phrase() -> tuple[list[str], list[str]]:
        d, n = rng.choice(lex["det"]), rng.choice(lex["noun"])
        adjs = [rng.choice(lex["adj"]) for _ in range(rng.choice((0, 0, 1, 2)))]
        return [d[0]] + [a[0] for a in adjs] + [n[0]], [d[1], n[1]] + [a[1] for a in adjs]

    def sentence() -> tuple[str, str]:
        (s_src, s_tgt), (o_src, o_tgt) = phrase(), phrase()
        v = rng.choice(lex["verb"])
        src, tgt = s_src + [v[0]] + o_src, s_tgt + o_tgt + [v[1]]
        if rng.random() < 0.4:
            p = rng.choice(lex["prep"])
            pp_src, pp_tgt = phrase()
            src, tgt = src + [p[0]] + pp_src, [p[1]] + pp_tgt + [","] + tgt
        return " ".join(src) + " .", " ".join(tgt) + " ."

    out = {}
    for name, n in (("train", num_train), ("valid", num_valid), ("test", num_test)):
        pairs = [sentence() for _ in range(n)]
        out[name] = ([p[0] for p in pairs], [p[1] for p in pairs])
    return out


def prepare_demo(root: str | Path, spec: dict[str, Any], source_lang: str = "src", target_lang: str = "tgt") -> Path:
    """Generate and binarize the demo corpus into ``root`` unless it is already there.

    ``spec``: :func:`generate`'s arguments, or ``{source: django, lang: de, bpe_merges: 500}`` for the
    corpus read from the installed Django package (:mod:`.django_corpus`)."""
    root = Path(root)
    if (root / f"test.{source_lang}-{target_lang}.{target_lang}.idx").is_file():
        return root
    spec = dict(spec)
    if spec.pop("source", "generated") == "django":
        from .django_corpus import prepare_django

        return prepare_django(root, source_lang=source_lang, target_lang=target_lang, **spec)
    splits = generate(**spec)
    write_data_bin(root, splits, source_lang, target_lang)
    return root
