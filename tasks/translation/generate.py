"""Beam search and greedy decoding with fairseq's ``SequenceGenerator`` rules, on the incremental decoder.

Rules (fairseq v0.12.2): outputs start from ``</s>``; ``max_len = min(int(a * src_len + b), max_positions - 1)``
with ``src_len`` the longest source of the batch (``</s>`` included); at step ``max_len`` only ``</s>`` may
be produced, before ``min_len`` steps it may not, ``<pad>`` never. Each step takes the 2 x beam best
continuations of all live hypotheses (at step 0 of the first beam only); a ``</s>`` among the top
``beam`` candidates finishes a hypothesis with score ``sum(log p) / len ** lenpen`` (len counts the
``</s>``); the next live beam is the best ``beam`` candidates that are not ``</s>``. A sentence is done
when it has ``beam`` finished hypotheses. Decoding runs in eval mode without gradients, so the GRC
encoder caches are never written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dictionary import EOS_ID, PAD_ID
from .model import TransformerModel


@dataclass
class Hypothesis:
    tokens: list[int]       # generated ids, ending with </s>
    score: float            # length-normalised log-probability


def max_length(src_tokens: torch.Tensor, model: TransformerModel, a: float, b: int) -> int:
    src_len = int(src_tokens.ne(PAD_ID).sum(1).max())
    return min(int(a * src_len + b), model.max_positions - 1)


def _step_lprobs(model: TransformerModel, tokens: torch.Tensor, state, step: int, max_len: int,
                 min_len: int) -> torch.Tensor:
    lprobs = F.log_softmax(model.decode_step(tokens, state).float(), dim=-1)
    lprobs[:, PAD_ID] = -math.inf
    if step >= max_len:
        eos = lprobs[:, EOS_ID].clone()
        lprobs.fill_(-math.inf)
        lprobs[:, EOS_ID] = eos
    elif step < min_len:
        lprobs[:, EOS_ID] = -math.inf
    return lprobs


@torch.no_grad()
def beam_search(model: TransformerModel, src_tokens: torch.Tensor, beam: int = 5, max_len_a: float = 0.0,
                max_len_b: int = 200, min_len: int = 1, lenpen: float = 1.0) -> list[list[Hypothesis]]:
    """Per sentence, its finished hypotheses, best first."""
    was_training = model.training
    model.eval()
    try:
        return _beam_search(model, src_tokens, beam, max_len_a, max_len_b, min_len, lenpen)
    finally:
        model.train(was_training)


def _beam_search(model, src_tokens, beam, max_len_a, max_len_b, min_len, lenpen):
    bsz, k = src_tokens.shape[0], int(beam)
    max_len = max_length(src_tokens, model, max_len_a, max_len_b)
    enc = model.encode(src_tokens)
    enc = type(enc)(enc.x.repeat_interleave(k, 0), enc.pad.repeat_interleave(k, 0))
    state = model.init_state(enc, max_len + 1)
    n = bsz * k
    dev = src_tokens.device
    tokens = torch.full((n, max_len + 2), PAD_ID, dtype=torch.long, device=dev)
    tokens[:, 0] = EOS_ID
    scores = torch.zeros(n, max_len + 1, device=dev)
    offsets = (torch.arange(bsz, device=dev) * k)[:, None]
    finalized: list[list[Hypothesis]] = [[] for _ in range(bsz)]
    done = torch.zeros(bsz, dtype=torch.bool, device=dev)
    for step in range(max_len + 1):
        lprobs = _step_lprobs(model, tokens[:, step], state, step, max_len, min_len)
        vocab = lprobs.shape[-1]
        lprobs = lprobs.view(bsz, k, vocab)
        if step == 0:
            cand = lprobs[:, :1]
        else:
            cand = lprobs + scores.view(bsz, k, -1)[:, :, step - 1:step]
        cand = cand.masked_fill(done[:, None, None], -math.inf).reshape(bsz, -1)
        cand_scores, cand_idx = cand.topk(min(2 * k, cand.shape[1] - 1), dim=1)
        if cand_scores.shape[1] < k:  # a beam wider than the vocabulary: dead (-inf) fillers
            fill = k - cand_scores.shape[1]
            cand_scores = F.pad(cand_scores, (0, fill), value=-math.inf)
            cand_idx = F.pad(cand_idx, (0, fill), value=0)
        cand_beams, cand_tokens = cand_idx // vocab, cand_idx % vocab
        cand_bbsz = cand_beams + offsets
        eos_mask = cand_tokens.eq(EOS_ID) & cand_scores.ne(-math.inf)

        for b, j in eos_mask[:, :k].nonzero().tolist():   # finalize, best candidates first
            if len(finalized[b]) < k:
                h = int(cand_bbsz[b, j])
                toks = tokens[h, 1:step + 1].tolist() + [EOS_ID]
                finalized[b].append(Hypothesis(toks, float(cand_scores[b, j]) / (step + 1) ** lenpen))
        for b in range(bsz):
            if not done[b] and (len(finalized[b]) >= k or step == max_len):
                done[b] = True
        if bool(done.all()):
            break

        rank = eos_mask.long() * cand_scores.shape[1] + torch.arange(cand_scores.shape[1], device=dev)
        active = rank.topk(k, dim=1, largest=False).indices
        active_bbsz = cand_bbsz.gather(1, active).view(-1)
        tokens[:, :step + 1] = tokens[active_bbsz, :step + 1]
        tokens[:, step + 1] = cand_tokens.gather(1, active).view(-1)
        scores[:, :step] = scores[active_bbsz, :step]
        scores[:, step] = cand_scores.gather(1, active).view(-1)
        state.reorder(active_bbsz)
    return [sorted(f, key=lambda h: -h.score) for f in finalized]


@torch.no_grad()
def greedy(model: TransformerModel, src_tokens: torch.Tensor, max_len_a: float = 1.2, max_len_b: int = 10,
           min_len: int = 1) -> list[list[int]]:
    """Arg-max decoding under the same length rules; per sentence its ids ending with ``</s>``."""
    was_training = model.training
    model.eval()
    try:
        bsz = src_tokens.shape[0]
        max_len = max_length(src_tokens, model, max_len_a, max_len_b)
        state = model.init_state(model.encode(src_tokens), max_len + 1)
        last = torch.full((bsz,), EOS_ID, dtype=torch.long, device=src_tokens.device)
        out = torch.full((bsz, max_len + 1), PAD_ID, dtype=torch.long, device=src_tokens.device)
        finished = torch.zeros(bsz, dtype=torch.bool, device=src_tokens.device)
        for step in range(max_len + 1):
            last = _step_lprobs(model, last, state, step, max_len, min_len).argmax(-1)
            out[:, step] = last.masked_fill(finished, PAD_ID)
            finished |= last.eq(EOS_ID)
            if bool(finished.all()):
                break
        return [[t for t in row.tolist() if t != PAD_ID] for row in out]
    finally:
        model.train(was_training)
