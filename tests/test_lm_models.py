"""Transformer-XL and its GRC memory: relative attention, adaptive softmax, memory carry, causality, gradients."""
from __future__ import annotations

import math

import pytest
import torch

from tasks.language_modeling.adaptive import AdaptiveEmbedding, AdaptiveSoftmax
from tasks.language_modeling.data import SegmentDataset
from tasks.common.errors import ConfigError
from tasks.language_modeling.models import PRESETS, RelMultiHeadAttn, TransformerXL, sinusoid
from tasks.language_modeling.module import build_model, stream_nll

V = 60


def _model(memory="xl", mem_len=8, **kw):
    torch.manual_seed(0)
    args = dict(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.0, cutoffs=[10, 30], div_val=2,
                mem_len=mem_len, memory=memory)
    args.update(kw)
    return TransformerXL(V, **args).eval()


def test_relative_attention_matches_the_direct_quadratic_formula():
    torch.manual_seed(0)
    d, h, dh, b, q, m = 12, 3, 4, 2, 5, 4
    attn = RelMultiHeadAttn(d, h, dh).eval()
    x, mem = torch.randn(b, q, d), torch.randn(b, m, d)
    u, v = torch.randn(h, dh), torch.randn(h, dh)
    k = q + m
    pos = sinusoid(torch.arange(k - 1, -1, -1.0), d)
    mask = torch.ones(q, k, dtype=torch.bool).triu(1 + m)
    out = attn(x, mem, pos, u, v, mask)

    cat = torch.cat([mem, x], 1)
    wq, wk, wv = attn.qkv_net(cat).view(b, k, 3, h, dh).unbind(2)
    ref = torch.zeros(b, q, h, dh)
    for bi in range(b):
        for hi in range(h):
            for i in range(q):
                scores = []
                for j in range(m + i + 1):  # keys up to the query's own position
                    r = attn.r_net(sinusoid(torch.tensor([float(m + i - j)]), d))[0].view(h, dh)[hi]
                    qi = wq[bi, m + i, hi]
                    scores.append(((qi + u[hi]) @ wk[bi, j, hi] + (qi + v[hi]) @ r) / math.sqrt(dh))
                p = torch.softmax(torch.stack(scores), 0)
                ref[bi, i, hi] = p @ wv[bi, : m + i + 1, hi]
    assert torch.allclose(out, attn.o_net(ref.reshape(b, q, h * dh)), atol=1e-5)


def test_adaptive_softmax_is_a_normalised_distribution_tied_to_the_input_embedding():
    torch.manual_seed(0)
    emb = AdaptiveEmbedding(V, 16, 8, [10, 30], div_val=2)
    for p in emb.parameters():
        torch.nn.init.normal_(p)
    sm = AdaptiveSoftmax(emb)
    torch.nn.init.normal_(sm.cluster_weight)
    h = torch.randn(3, 8)
    nll = torch.stack([sm(h, torch.full((3,), w)) for w in range(V)], 1)  # 3 x V
    assert torch.allclose(torch.exp(-nll).sum(1), torch.ones(3), atol=1e-5)
    assert not any(p is q for p in sm.parameters() for q in emb.parameters())  # tables shared, not duplicated
    assert sm.emb[0] is emb


@pytest.mark.parametrize("preset,count", [("base", 151_107_538), ("large", 285_170_506)])
def test_wikitext103_presets_count_what_transformer_xl_code_builds(preset, count):
    """Counts of Transformer-XL's code for run_wt103_{base,large}.sh (HuggingFace's port, untie_r=False, builds the
    same; docs/language_modeling.md). Counted on the meta device: no memory, no time."""
    with torch.device("meta"):
        model = TransformerXL(267_735, **PRESETS[preset])
    assert sum(p.numel() for p in model.parameters()) == count


def test_div_val_projects_every_cluster_and_the_softmax_ties_only_the_tail_projections():
    """Transformer-XL with div_val > 1: a projection per cluster, the first (already d_proj wide) included; the
    softmax shares the tail clusters' projections (tie_projs [False, True, ...]) and has its own for the head."""
    torch.manual_seed(0)
    emb = AdaptiveEmbedding(V, 16, 16, [10, 30], div_val=2)
    sm = AdaptiveSoftmax(emb)
    assert [tuple(emb.proj(i).shape) for i in range(3)] == [(16, 16), (16, 8), (16, 4)]
    assert sm.head_proj.shape == (16, 16) and not any(sm.head_proj is p for p in emb.parameters())
    for p in emb.parameters():
        torch.nn.init.normal_(p)
    h, head, tail = torch.randn(4, 16), torch.tensor([1, 2, 3, 4]), torch.tensor([40, 45, 50, 59])
    before = sm(h, head), sm(h, tail)
    with torch.no_grad():
        emb.projs[0].add_(1.0)   # the input side of the head cluster: the softmax does not read it
    assert torch.equal(sm(h, head), before[0]) and torch.equal(sm(h, tail), before[1])
    with torch.no_grad():
        emb.projs[2].add_(1.0)   # tied: the last cluster's words move, the head's words keep their logits
    assert not torch.allclose(sm(h, tail), before[1]) and torch.equal(sm(h, head), before[0])
    # div_val 1 (one table in Transformer-XL): one shared projection, only when d_embed != d_proj
    assert len(AdaptiveEmbedding(V, 16, 16, [10, 30]).projs) == 0
    one = AdaptiveEmbedding(V, 12, 16, [10, 30])
    assert len(one.projs) == 1 and all(one.proj(i) is one.projs[0] for i in range(3))
    assert AdaptiveSoftmax(one).head_proj.shape == (16, 12)


def _windowed_reference(model, tokens, window):
    """NLL of every token when position p sees only tokens p - window + 1 ... p: each window run on its own."""
    out = []
    with torch.no_grad():
        for p in range(tokens.shape[1] - 1):
            lo = max(0, p - window + 1)
            nll, _ = model(tokens[:, lo:p + 1], tokens[:, lo + 1:p + 2])
            out.append(nll[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("window,tgt_len", [(5, 3), (3, 5), (4, 4), (1, 3)])
def test_same_length_attends_to_exactly_the_last_eval_mem_len_positions(window, tgt_len):
    """One layer: its memory is the token embeddings, so with same_length the NLL at position p must equal the
    model run on tokens p - W + 1 ... p alone (relative attention sees the same keys at the same distances)."""
    model = _model("xl", n_layer=1, mem_len=2, eval_mem_len=window, clamp_len=3, same_length=True)
    tracks = torch.randint(0, V, (2, 14))
    ds = SegmentDataset(tracks, tgt_len)
    state, got = None, []
    with torch.no_grad():
        for i in range(len(ds)):
            nll, state = model(ds[i]["input"], ds[i]["target"], state)
            got.append(nll)
    assert torch.allclose(torch.cat(got, 1), _windowed_reference(model, tracks, window), atol=1e-5)
    # the rule itself, every row: keys up to the query, and exactly min(W, keys so far) of them
    for q, m in ((3, 0), (3, 4), (6, 2), (2, 9)):
        mask = model.attention_mask(q, m)
        for i in range(q):
            seen = [j for j in range(q + m) if not mask[i, j]]
            assert seen == list(range(max(0, m + i - window + 1), m + i + 1))


def test_same_length_is_for_evaluation_only_and_off_keeps_the_causal_mask():
    on = _model("xl", mem_len=4, eval_mem_len=6, same_length=True)
    off = _model("xl", mem_len=4, eval_mem_len=6)
    causal = torch.ones(5, 12, dtype=torch.bool).triu(1 + 7)
    assert torch.equal(off.attention_mask(5, 7), causal) and torch.equal(on.train().attention_mask(5, 7), causal)
    assert not torch.equal(on.eval().attention_mask(5, 7), causal)
    x = torch.randint(0, V, (2, 5))
    state_on = state_off = None
    for _ in range(3):  # training: same memory, same outputs
        a, state_on = on.train()(x, x, state_on)
        b, state_off = off.train()(x, x, state_off)
        assert torch.equal(a, b)


def test_same_length_needs_the_xl_memory():
    with pytest.raises(ValueError, match="same_length applies to the Transformer-XL memory only"):
        _model("grc", mem_len=4, same_length=True)
    with pytest.raises(ConfigError, match="needs eval_mem_len >= 1"):
        build_model({"name": "x", "preset": "base", "n_layer": 1, "mem_len": 0, "same_length": True}, V)


@pytest.mark.parametrize("tgt_len", [1, 3, 7])
def test_stream_perplexity_with_memory_equals_token_by_token_nll(tgt_len):
    """mem_len >= the stream: every segmentation (and memory longer than a segment) sees the full past."""
    model = _model("xl", mem_len=64)
    tracks = torch.randint(0, V, (2, 22))
    total, count = stream_nll(model, [SegmentDataset(tracks, tgt_len)[i] for i in range(len(SegmentDataset(tracks, tgt_len)))])
    with torch.no_grad():
        per_token = []
        for t in range(1, 22):  # no memory: the whole prefix as one segment, NLL of its last token
            nll, _ = model(tracks[:, :t], tracks[:, 1:t + 1])
            per_token.append(nll[:, -1])
        ref = torch.stack(per_token, 1)
    assert count == ref.numel() == 42
    assert math.exp(total / count) == pytest.approx(math.exp(ref.mean().item()), rel=1e-5)


def test_xl_memory_keeps_the_last_mem_len_hidden_states():
    model = _model("xl", mem_len=5)
    x = torch.randint(0, V, (2, 3))
    _, s1 = model(x, x)
    _, s2 = model(x, x, s1)
    assert len(s2) == 3 and all(m.shape == (2, 5, 16) and not m.requires_grad for m in s2)
    assert all(m.shape == (2, 3, 16) for m in s1)
    for old, new in zip(s1, s2):  # the last 2 positions of segment 1 followed by segment 2's 3
        assert torch.equal(new[:, :2], old[:, 1:])
    assert torch.equal(s2[0][:, 2:], s1[0])  # layer 0's input is the embedding: same tokens, same rows


def _strong_grc(model):
    """Weights at scale 0.3 (Transformer-XL's 0.02 init makes the memory's effect sub-float32 at first)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "word_emb" not in name:
                p.normal_(0.0, 0.3)
    return model


def test_grc_memory_is_causal_within_and_across_segments():
    model = _strong_grc(_model("grc", mem_len=4))
    a = torch.randint(0, V, (1, 6))
    b = torch.randint(0, V, (1, 6))
    nll1, s1 = model(a, a)
    nll2, _ = model(b, b, s1)
    a2, b2 = a.clone(), b.clone()
    a2[0, 4:] = (a2[0, 4:] + 1) % V   # change tokens after position 3 of the first segment
    nll1p, _ = model(a2, a)
    assert torch.allclose(nll1p[0, :4], nll1[0, :4], atol=1e-6) and not torch.allclose(nll1p[0, 4:], nll1[0, 4:])
    b2[0, 3:] = (b2[0, 3:] + 1) % V
    nll2p, _ = model(b2, b, s1)
    assert torch.allclose(nll2p[0, :3], nll2[0, :3], atol=1e-6)
    # the first segment influences the second through the cache only
    _, s1p = model(a2, a)
    nll2q, _ = model(b, b, s1p)
    assert (nll2q - nll2).abs().max() > 1e-3


def test_grc_cache_update_equals_the_step_by_step_recurrence_and_trains_the_gates():
    model = _model("grc", mem_len=4).train()
    segs = [torch.randint(0, V, (2, 5)) for _ in range(3)]
    state = None
    for s in segs:
        nll, state = model(s, s, state)
    grc0 = model.layers[0].grc
    # replay layer 0's recurrence by hand: C_0 = update(0, 0), C_k = update(C_{k-1}, X_k)
    with torch.no_grad():
        zeros = torch.zeros(2, 4, grc0.mem_dim)
        c = grc0.update(zeros, zeros)  # C_0: the learned initial cache
        st = None
        summaries = []
        for s in segs:
            _, st = model(s, s, st)
            summaries.append(st[0][1])
        for xu in summaries[:-1]:
            c = grc0.update(c, xu)
    assert torch.allclose(st[0][0], c, atol=1e-6)
    model.zero_grad()
    nll, _ = model(segs[0], segs[0], state)
    nll.mean().backward()
    assert grc0.gate.weight.grad.abs().sum() > 0 and grc0.cand.weight.grad.abs().sum() > 0
    assert grc0.lam.grad.abs().sum() > 0


def test_grc_needs_a_cache_and_xl_memory_may_exceed_the_segment():
    with pytest.raises(ValueError, match="mem_len must be >= 1"):
        _model("grc", mem_len=0)
    model = _model("xl", mem_len=20)
    x = torch.randint(0, V, (1, 4))
    state = None
    for _ in range(3):
        _, state = model(x, x, state)
    assert state[0].shape[1] == 12  # memory spans all three earlier segments (< mem_len so far)


@pytest.mark.parametrize("memory", ["xl", "grc"])
def test_bf16_autocast_carries_a_float32_memory(memory):
    model = _model(memory, mem_len=4).train()
    x = torch.randint(0, V, (2, 5))
    state = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            nll, state = model(x, x, state)
    nll.mean().backward()
    assert torch.isfinite(nll).all() and nll.dtype == torch.float32
    flat = [t for s in state for t in (s if isinstance(s, tuple) else (s,))]
    assert all(not t.requires_grad for t in flat)
    if memory == "grc":
        assert all(t.dtype == torch.float32 for t in flat)


@pytest.mark.parametrize("memory", ["xl", "grc"])
def test_every_parameter_is_in_the_graph_of_every_step(memory):
    """DDP (find_unused_parameters=False) needs this: the first segment of a stream and targets that miss
    adaptive-softmax clusters included."""
    model = _model(memory, mem_len=4).train()
    x = torch.randint(0, 10, (2, 5))  # first cluster only
    nll, _ = model(x, x)
    nll.mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
