"""The translation model, decoding, loss, schedule and BLEU against hand-computed / brute-force values."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from cached_transformers import GRCAttention
from tasks.translation.bleu import bleu_tok, sacrebleu_detok
from tasks.translation.criterion import inverse_sqrt_schedule, label_smoothed_nll_loss
from tasks.translation.dictionary import remove_bpe
from tasks.translation.generate import beam_search, greedy
from tasks.translation.model import TransformerModel, make_positions, sinusoidal_table


def tiny(grc=True, src_vocab=12, tgt_vocab=10, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(embed_dim=16, ffn_dim=32, heads=2, encoder_layers=2, decoder_layers=2, dropout=0.0, cache_len=8)
    args.update(kw)
    return TransformerModel(src_vocab, tgt_vocab, grc={"ratio": 0.5} if grc else None, **args).eval()


def test_positions_and_embeddings_follow_fairseq():
    t = sinusoidal_table(10, 8)
    half = 4
    freq = [math.exp(-i * math.log(10000) / (half - 1)) for i in range(half)]
    for p in (2, 7):
        want = [math.sin(p * f) for f in freq] + [math.cos(p * f) for f in freq]
        assert t[p].tolist() == pytest.approx(want, abs=1e-6)
    assert t[1].abs().sum() == 0
    tokens = torch.tensor([[5, 6, 2], [7, 2, 1]])
    assert make_positions(tokens).tolist() == [[2, 3, 4], [2, 3, 1]]
    m = tiny(grc=False, embed_dim=64, heads=4)
    assert m.encoder_embed.weight[1].abs().sum() == 0
    assert m.encoder_embed.weight[4:].std().item() == pytest.approx(64 ** -0.5, rel=0.15)
    assert m.output_weight() is m.decoder_embed.weight and m.encoder_embed is not m.decoder_embed
    attn = m.encoder_layers[0].self_attn
    assert attn.out_proj.bias.abs().sum() == 0
    bound = math.sqrt(6 / (64 + 64)) / math.sqrt(2)  # xavier_uniform with gain 1/sqrt(2)
    assert attn.q_proj.weight.abs().max() <= bound and attn.q_proj.weight.abs().max() > 0.9 * bound
    shared = TransformerModel(10, 10, embed_dim=16, ffn_dim=32, heads=2, encoder_layers=1, decoder_layers=1,
                              share_all_embeddings=True)
    assert shared.encoder_embed is shared.decoder_embed is not None
    with pytest.raises(ValueError, match="joined dictionary"):
        TransformerModel(10, 12, share_all_embeddings=True)


def test_grc_twin_places_the_cache_in_every_encoder_self_attention_only():
    m = tiny(grc=True, encoder_layers=3, decoder_layers=2)
    grc = [n for n, mod in m.named_modules() if isinstance(mod, GRCAttention)]
    assert grc == [f"encoder_layers.{i}.self_attn" for i in range(3)]
    assert m.encoder_layers[0].self_attn.cache.shape == (1, 8, 8)
    base = tiny(grc=False, encoder_layers=3)
    assert not any(isinstance(mod, GRCAttention) for mod in base.modules())


@pytest.mark.parametrize("grc", [False, True])
def test_incremental_decoding_equals_full_recomputation(grc):
    m = tiny(grc=grc)
    src = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 2, 1, 1], [4, 2, 1, 1, 1]])
    prev = torch.randint(4, 10, (3, 6))
    prev[:, 0] = 2
    full = F.log_softmax(m(src, prev), -1)
    state = m.init_state(m.encode(src), 8)
    steps = torch.stack([F.log_softmax(m.decode_step(prev[:, t], state), -1) for t in range(6)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    # reordering the state follows the hypotheses (beam search): same as recomputing the reordered prefix
    src3 = src[[0, 0, 0]]
    state = m.init_state(m.encode(src3), 8)
    for t in range(3):
        m.decode_step(prev[:, t], state)
    order = torch.tensor([2, 0, 0])
    state.reorder(order)
    new_prev = torch.cat([prev[order, :3], prev[:, 3:4]], 1)
    last = F.log_softmax(m.decode_step(new_prev[:, 3], state), -1)
    torch.testing.assert_close(last, F.log_softmax(m(src3, new_prev), -1)[:, 3], atol=1e-5, rtol=1e-5)


def exhaustive(m, src, max_len, lenpen):
    """Every output w_1..w_m </s> (1 <= m <= max_len, no <pad>/</s> inside), best first."""
    words = [t for t in range(m.decoder_embed.num_embeddings) if t not in (1, 2)]
    out = []
    for n in range(1, max_len + 1):
        for ws in itertools.product(words, repeat=n):
            seq = list(ws) + [2]
            prev = torch.tensor([[2] + seq[:-1]])
            with torch.no_grad():
                lp = F.log_softmax(m(src, prev), -1)[0]
            score = float(sum(lp[i, seq[i]] for i in range(len(seq))))
            out.append((seq, score / len(seq) ** lenpen))
    return sorted(out, key=lambda x: -x[1])


@pytest.mark.parametrize("lenpen", [1.0, 0.6])
def test_beam_search_equals_exhaustive_search(lenpen):
    m = tiny(grc=True, tgt_vocab=6, seed=3)
    src = torch.tensor([[5, 6, 7, 2]])
    best = exhaustive(m, src, 3, lenpen)
    hyps = beam_search(m, src, beam=len(best), max_len_a=0, max_len_b=3, lenpen=lenpen)[0]
    assert [h.tokens for h in hyps[:10]] == [b[0] for b in best[:10]]
    assert [h.score for h in hyps[:10]] == pytest.approx([b[1] for b in best[:10]], abs=1e-5)
    # a narrow beam still returns properly ended, length-bounded hypotheses
    for h in beam_search(m, src, beam=2, max_len_a=0, max_len_b=3)[0]:
        assert h.tokens[-1] == 2 and 2 <= len(h.tokens) <= 4 and 1 not in h.tokens and 2 not in h.tokens[:-1]


def test_greedy_equals_beam_one_and_respects_lengths():
    m = tiny(grc=True, seed=1)
    src = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 2, 1, 1]])
    g = greedy(m, src, max_len_a=0, max_len_b=7)
    b = [h[0].tokens for h in beam_search(m, src, beam=1, max_len_a=0, max_len_b=7)]
    assert g == b
    assert all(s[-1] == 2 and len(s) <= 8 for s in g)


def test_cache_untouched_by_validation_and_generation_written_by_training():
    m = tiny(grc=True)
    src = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 2, 1, 1]])
    prev = torch.tensor([[2, 4, 5], [2, 6, 1]])
    caches = lambda: [l.self_attn.cache.clone() for l in m.encoder_layers]  # noqa: E731
    before = caches()
    m.train()
    with torch.no_grad():
        m(src, prev)
    m.eval()
    m(src, prev)
    beam_search(m, src, beam=3, max_len_b=5)
    greedy(m, src, max_len_b=5)
    assert all(torch.equal(a, b) for a, b in zip(before, caches()))
    m.train()
    m(src, prev).sum().backward()
    assert all(not torch.equal(a, b) for a, b in zip(before, caches()))
    assert m.training  # decoding restores the mode it found


def test_label_smoothed_loss_matches_hand_computation():
    lprobs = F.log_softmax(torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, 0.3, 0.2, 0.1], [3.0, 0.0, 0.0, 0.0]]), -1)
    target = torch.tensor([2, 3, 1])  # the last is <pad>: ignored
    eps = 0.1
    loss, nll = label_smoothed_nll_loss(lprobs, target, eps)
    eps_i = eps / 3
    want_nll = -(lprobs[0, 2] + lprobs[1, 3])
    want = (1 - eps - eps_i) * want_nll + eps_i * -(lprobs[0].sum() + lprobs[1].sum())
    assert float(nll) == pytest.approx(float(want_nll), rel=1e-6)
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    # not torch's label smoothing (eps spread over all V classes)
    torch_ls = F.cross_entropy(lprobs[:2], target[:2], label_smoothing=eps, reduction="sum")
    assert float(torch_ls) != pytest.approx(float(loss), rel=1e-4)


def test_inverse_sqrt_schedule_matches_fairseq():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
    sched = inverse_sqrt_schedule(opt, warmup_updates=4000, warmup_init_lr=1e-7)
    got = {s: 5e-4 * sched.lr_lambdas[0](s) for s in (0, 1, 2000, 4000, 16000)}
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-7)  # the lr of the first update
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-7 + 3 * (5e-4 - 1e-7) / 4000)
    assert got[0] == pytest.approx(1e-7)
    assert got[2000] == pytest.approx(1e-7 + 2000 * (5e-4 - 1e-7) / 4000)
    assert got[4000] == pytest.approx(5e-4)
    assert got[16000] == pytest.approx(5e-4 * math.sqrt(4000 / 16000))


def test_both_bleu_figures_on_a_fixed_example():
    hyp, ref = "the cat sat on the mat", "the cat sat on a mat"
    want = 100 * math.exp(sum(math.log(p) for p in (5 / 6, 3 / 5, 2 / 4, 1 / 3)) / 4)
    assert bleu_tok([hyp], [ref]) == pytest.approx(want, abs=1e-3)
    assert bleu_tok(["a <unk> b c d"], ["a <<unk>> b c d"]) < 100  # a reference <unk> never matches
    assert remove_bpe("hal@@ lo wel@@ t") == "hallo welt"
    score, sig = sacrebleu_detok(["hello , world ! it 's me ."], ["hello , world ! it 's me ."], "en")
    assert score == pytest.approx(100.0) and "tok:13a" in sig
    # detokenization happens: the 13a-tokenized detokenized text differs from whitespace tokens
    low, _ = sacrebleu_detok(["hello , world"], ["hello world"], "en")
    assert low < 100
