"""The two BLEU figures, named apart (translation.md section 3).

* ``bleu_tok``: tokenized BLEU as IWSLT papers quote it (fairseq's default scorer): BPE removed, on the
  Moses-tokenized (for IWSLT: lowercased) text, ``sacrebleu.BLEU(tokenize="none", smooth_method="none",
  force=True)``; the reference's unknown words are ``<<unk>>``, so they never match.
* ``sacrebleu``: detokenized BLEU: hypotheses and references Moses-detokenized (sacremoses), scored with
  sacreBLEU's default 13a tokenizer; its signature is returned for the log.
"""
from __future__ import annotations

from typing import Sequence


def bleu_tok(hyps: Sequence[str], refs: Sequence[str]) -> float:
    from sacrebleu.metrics import BLEU

    if not hyps:
        return 0.0
    return float(BLEU(tokenize="none", smooth_method="none", force=True).corpus_score(list(hyps), [list(refs)]).score)


def detokenize(lines: Sequence[str], lang: str) -> list[str]:
    from sacremoses import MosesDetokenizer

    md = MosesDetokenizer(lang=lang)
    return [md.detokenize(line.split()) for line in lines]


def sacrebleu_detok(hyps: Sequence[str], refs: Sequence[str], lang: str) -> tuple[float, str]:
    """(score, signature) of detokenized sacreBLEU."""
    from sacrebleu.metrics import BLEU

    metric = BLEU()
    score = metric.corpus_score(detokenize(hyps, lang), [detokenize(refs, lang)])
    return float(score.score), str(metric.get_signature())
