"""LRA encoders: padding invariance, GRC cache rules, BigBird sparsity, Reformer hashing, schedule, benchmark."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cached_transformers import GRCAttention, grc_layers
from tasks.lra.attention import (BlockSparseAttention, BlockSparseCrossAttention, LSHCrossAttention, LSHSelfAttention,
                                 masked_softmax, query_padding)
from tasks.lra.models import LRAClassifier
from tasks.lra.module import rsqrt_schedule

SMALL = dict(emb_dim=32, mlp_dim=64, num_heads=4, num_layers=2, max_length=64,
             bigbird=dict(block_size=4), reformer=dict(chunk_len=4, n_buckets=8))
MODELS = [(a, g) for a in ("full", "bigbird", "reformer") for g in (False, True)]


def _tokens(lengths, total, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(1, 16, (len(lengths), total), generator=g)
    for i, n in enumerate(lengths):
        tok[i, n:] = 0
    return tok


def _dense_attention(q, k, v, key_pad=None):
    """Reference multi-head attention: q B x H x T x d, k/v B x H x S x d."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_pad is not None:
        logits = logits.masked_fill(key_pad[:, None, None, :], float("-inf"))
    return logits.softmax(-1) @ v


@pytest.mark.parametrize("attention, cached", MODELS)
def test_padding_does_not_change_predictions(attention, cached):
    torch.manual_seed(0)
    model = LRAClassifier(attention=attention, grc={"enabled": cached}, **SMALL).eval()
    lengths = [64, 23, 41]
    tok = _tokens(lengths, 64)
    with torch.no_grad():
        ref = model(tok)
        more = model(torch.cat([tok, torch.zeros(3, 37, dtype=torch.long)], 1))    # pad beyond max_length
        trimmed = model(tok[1:, :41])
        alone = torch.cat([model(tok[i:i + 1, :n]) for i, n in enumerate(lengths)])
    assert torch.allclose(ref, more, atol=1e-5)
    assert torch.allclose(ref[1:], trimmed, atol=1e-5)
    assert torch.allclose(ref, alone, atol=1e-5)
    assert len(grc_layers(model)) == (2 if cached else 0)


@pytest.mark.parametrize("cached", [False, True])
def test_multi_round_reformer_is_padding_invariant(cached):
    torch.manual_seed(0)
    kw = dict(SMALL, reformer=dict(chunk_len=4, n_buckets=8, n_hashes=3))
    model = LRAClassifier(attention="reformer", grc={"enabled": cached}, **kw).eval()
    tok = _tokens([64, 23, 41], 64)
    with torch.no_grad():
        ref = model(tok)
        more = model(torch.cat([tok, torch.zeros(3, 37, dtype=torch.long)], 1))
        alone = torch.cat([model(tok[i:i + 1, :n]) for i, n in enumerate([64, 23, 41])])
    assert torch.allclose(ref, more, atol=1e-5) and torch.allclose(ref, alone, atol=1e-5)


@pytest.mark.parametrize("attention", ["full", "bigbird", "reformer"])
def test_grc_cache_changes_in_training_only(attention):
    torch.manual_seed(0)
    model = LRAClassifier(attention=attention, grc={"enabled": True}, **SMALL)
    layers = list(grc_layers(model).values())
    assert all(layer.cache_len == 65 for layer in layers)                   # T_m = max_length + CLS
    assert all(layer.config.padding == "valid" and layer.pos_conv is None for layer in layers)
    tok = _tokens([64, 30], 64)
    model.eval()
    with torch.no_grad():
        model(tok)
    assert all(float(layer.cache.abs().sum()) == 0 for layer in layers)
    model.train()
    model(tok).sum().backward()
    after = [layer.cache.clone() for layer in layers]
    assert all(float(c.abs().sum()) > 0 for c in after)
    model.eval()
    with torch.no_grad():
        model(tok)
    assert all(torch.equal(a, layer.cache) for a, layer in zip(after, layers))
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_memory_branch_choice():
    assert isinstance(LRAClassifier("bigbird", grc={"enabled": True}, **SMALL).blocks[0].attn.mem_attn,
                      BlockSparseCrossAttention)
    assert isinstance(LRAClassifier("reformer", grc={"enabled": True}, **SMALL).blocks[0].attn.mem_attn,
                      LSHCrossAttention)
    dense = LRAClassifier("reformer", grc={"enabled": True}, memory="dense", **SMALL).blocks[0].attn
    assert isinstance(dense, GRCAttention) and type(dense.mem_attn).__name__ == "SRAttention"
    assert isinstance(LRAClassifier("reformer", **SMALL).blocks[0].attn, LSHSelfAttention)


# ---------------------------------------------------------------------- BigBird
def test_bigbird_is_block_sparse():
    torch.manual_seed(0)
    attn = BlockSparseAttention(16, 2, block_size=4, num_global_blocks=1, num_window_blocks=3,
                                num_random_blocks=2).eval()
    t, bs = 64, 4
    x = torch.randn(1, t, 16)
    blocks, ok = attn.key_blocks(torch.tensor([t]), t)
    qblock = 8                                                     # query tokens 32..35
    used = set(blocks[0, qblock - 1][ok[0, qblock - 1]].tolist())
    assert {0, 7, 8, 9} <= used and len(used) == 1 + 3 + 2         # global, window, 2 random
    far = next(b for b in range(16) if b not in used)
    y = attn(x)
    x2 = x.clone()
    x2[0, far * bs + 1] += 5.0                                     # a token no query of block 8 sees
    y2 = attn(x2)
    q = slice(qblock * bs, qblock * bs + bs)
    assert torch.allclose(y[0, q], y2[0, q], atol=1e-6)
    assert not torch.allclose(y[0, 0], y2[0, 0])                   # the global block sees everything
    x3 = x.clone()
    x3[0, 9 * bs] += 5.0                                           # a token in the window
    assert not torch.allclose(y[0, q], attn(x3)[0, q])
    # the gradient of one query reaches exactly its key blocks
    xg = x.clone().requires_grad_()
    attn(xg)[0, qblock * bs].sum().backward()
    touched = {int(i) // bs for i in torch.nonzero(xg.grad[0].abs().sum(-1)).flatten()}
    assert touched == used


def test_bigbird_equals_dense_when_the_window_covers_everything():
    torch.manual_seed(0)
    attn = BlockSparseAttention(16, 2, block_size=4, num_global_blocks=1, num_window_blocks=31,
                                num_random_blocks=0).eval()
    x = torch.randn(2, 22, 16)
    pad = torch.zeros(2, 22, dtype=torch.bool)
    pad[1, 15:] = True
    q, k, v = attn.qkv(x).view(2, 22, 3, 2, 8).permute(2, 0, 3, 1, 4)
    ref = attn.proj(_dense_attention(q, k, v, pad).transpose(1, 2).reshape(2, 22, 16))
    out = attn(x, key_padding_mask=pad)
    assert torch.allclose(out[0], ref[0], atol=1e-5) and torch.allclose(out[1, :15], ref[1, :15], atol=1e-5)


def test_bigbird_cross_attention():
    torch.manual_seed(0)
    attn = BlockSparseCrossAttention(16, 2, block_size=4, num_global_blocks=1, num_window_blocks=3,
                                     num_random_blocks=1).eval()
    x, kv = torch.randn(1, 40, 16), torch.randn(1, 41, 16)
    blocks, ok = attn.key_blocks(torch.tensor([40]), 40, 41)
    used = set(blocks[0, 4][ok[0, 4]].tolist())                    # query block 5 (tokens 20..23)
    assert len(used) <= 5 and 0 in used and 5 in used              # global + window aligned at 20/40 * 41
    far = next(b for b in range(11) if b not in used)
    kv2 = kv.clone()
    kv2[0, far * 4] += 5.0
    assert torch.allclose(attn(x, kv)[0, 20:24], attn(x, kv2)[0, 20:24], atol=1e-6)
    # alignment is relative to the valid length: a sample of length 20 centres query block 2 on cache block 5
    with query_padding(attn, torch.arange(40)[None] >= 20):
        blocks, ok = attn.key_blocks(torch.tensor([20]), 40, 41)
    assert 5 in set(blocks[0, 1][ok[0, 1]].tolist())
    # a window covering everything is dense cross attention
    dense = BlockSparseCrossAttention(16, 2, block_size=4, num_global_blocks=1, num_window_blocks=41,
                                      num_random_blocks=0).eval()
    q = dense.q(x).view(1, 40, 2, 8).transpose(1, 2)
    k, v = dense.kv(kv).view(1, 41, 2, 2, 8).permute(2, 0, 3, 1, 4)
    ref = dense.proj(_dense_attention(q, k, v).transpose(1, 2).reshape(1, 40, 16))
    assert torch.allclose(dense(x, kv), ref, atol=1e-5)


# ---------------------------------------------------------------------- Reformer
def test_lsh_attends_to_a_hashed_subset():
    torch.manual_seed(0)
    attn = LSHSelfAttention(16, 2, chunk_len=4, n_hashes=1, n_buckets=8).eval()
    attn.keep_sort = True
    t = 64
    x = torch.randn(1, t, 16, requires_grad=True)
    attn(x)[0, 37].sum().backward()
    touched = set(torch.nonzero(x.grad[0].abs().sum(-1)).flatten().tolist())
    # the attended set: own chunk + previous chunk of the bucket-sorted order (both heads)
    expected = set()
    for h in range(2):
        order = attn.last_sort[0, h, 0].tolist()
        pos = order.index(37)
        chunk = pos // 4
        expected |= set(order[max(chunk - 1, 0) * 4: chunk * 4 + 4])
    assert touched == expected and len(touched) <= 2 * 2 * 4 < t
    # sorted order groups equal buckets: bucket ids along the order never decrease
    qk = attn.qk(x.detach()).view(1, t, 2, 8).transpose(1, 2)
    buckets = attn.hash(qk)[0, 0, 0]
    assert (buckets[attn.last_sort[0, 0, 0]].diff() >= 0).all()


@pytest.mark.parametrize("n_hashes", [1, 2])
def test_lsh_equals_dense_shared_qk_attention_with_one_chunk(n_hashes):
    torch.manual_seed(0)
    attn = LSHSelfAttention(16, 2, chunk_len=32, n_hashes=n_hashes, n_buckets=4).eval()
    x = torch.randn(2, 20, 16)
    pad = torch.zeros(2, 20, dtype=torch.bool)
    pad[1, 12:] = True
    qk = attn.qk(x).view(2, 20, 2, 8).transpose(1, 2)
    v = attn.v(x).view(2, 20, 2, 8).transpose(1, 2)
    k = qk * torch.rsqrt(qk.pow(2).mean(-1, keepdim=True) + 1e-6)
    logits = qk @ k.transpose(-1, -2) / math.sqrt(8)
    logits = logits.masked_fill(torch.eye(20, dtype=torch.bool), -1e5).masked_fill(pad[:, None, None], float("-inf"))
    ref = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 20, 16))
    out = attn(x, key_padding_mask=pad)
    assert torch.allclose(out[0], ref[0], atol=1e-5) and torch.allclose(out[1, :12], ref[1, :12], atol=1e-5)


def test_lsh_rotations_fixed_in_eval_resampled_in_training():
    torch.manual_seed(0)
    attn = LSHSelfAttention(16, 2, chunk_len=4, n_hashes=1, n_buckets=8, seed=5)
    x = torch.randn(1, 32, 16)
    attn.eval()
    assert torch.equal(attn(x), attn(x))
    assert torch.equal(LSHSelfAttention(16, 2, chunk_len=4, n_hashes=1, n_buckets=8, seed=5).rotations,
                       attn.rotations)
    attn.train()
    assert not torch.allclose(attn(x), attn(x))


@pytest.mark.parametrize("n_hashes", [1, 3])
def test_lsh_cross_attention_hashes_queries_and_keys_alike_in_training(n_hashes, monkeypatch):
    """Queries and cache keys of one forward share the rotations: identical vectors always share a bucket
    (the eval rule), and the rotations are drawn afresh at every training forward."""
    torch.manual_seed(0)
    cross = LSHCrossAttention(16, 2, chunk_len=4, n_hashes=n_hashes, n_buckets=32).train()
    with torch.no_grad():
        cross.kv.weight[:16] = cross.q.weight                  # keys = queries (up to the positive key norm)
    x = torch.randn(2, 64, 16)
    calls = []
    real_hash = cross.hash
    monkeypatch.setattr(cross, "hash", lambda vecs, *a, **kw: calls.append(real_hash(vecs, *a, **kw)) or calls[-1])
    draws = []
    for mode in ("train", "train", "eval"):
        cross.train(mode == "train")
        calls.clear()
        cross(x, x)
        qb, kb = torch.cat(calls, -1).split(64, -1)           # B x H x n_hashes x T, queries then keys
        assert torch.equal(qb, kb), f"{float((qb == kb).float().mean()):.0%} bucket agreement in {mode}"
        draws.append(qb)
    assert not torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("n_hashes", [1, 2])
def test_lsh_cross_attention(n_hashes):
    torch.manual_seed(0)
    cross = LSHCrossAttention(16, 2, chunk_len=64, n_hashes=n_hashes, n_buckets=2).eval()
    x, kv = torch.randn(1, 10, 16), torch.randn(1, 12, 16)
    # one chunk holding everything: dense cross attention
    q = cross.q(x).view(1, 10, 2, 8).transpose(1, 2)
    k, v = cross.kv(kv).view(1, 12, 2, 2, 8).permute(2, 0, 3, 1, 4)
    k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6)
    ref = cross.proj(_dense_attention(q, k, v).transpose(1, 2).reshape(1, 10, 16))
    assert torch.allclose(cross(x, kv), ref, atol=1e-5)
    # small chunks: each query sees a bounded number of cache keys
    small = LSHCrossAttention(16, 2, chunk_len=4, n_hashes=n_hashes, n_buckets=8).eval()
    kv = torch.randn(1, 64, 16, requires_grad=True)
    small(torch.randn(1, 64, 16), kv)[0, 30].sum().backward()
    assert 0 < int((kv.grad[0].abs().sum(-1) > 0).sum()) <= n_hashes * 2 * 2 * 4


def test_masked_softmax_matches_softmax_and_handles_empty_rows():
    x = torch.randn(3, 5, 7, dtype=torch.double, requires_grad=True)
    ok = torch.rand(3, 5, 7) > 0.4
    ok[0, 0] = False
    p, lse = masked_softmax(x, ok)
    ref = x.masked_fill(~ok, float("-inf")).softmax(-1).nan_to_num(0.0)
    assert torch.allclose(p, ref) and float(p[0, 0].detach().abs().sum()) == 0
    has = ok.any(-1, keepdim=True)
    assert torch.allclose(lse[has], x.masked_fill(~ok, float("-inf")).logsumexp(-1, keepdim=True)[has])
    g = torch.randn_like(p)
    (grad,) = torch.autograd.grad((p * g).sum(), x)
    x2 = x.detach().requires_grad_()
    (grad2,) = torch.autograd.grad((x2.masked_fill(~ok, float("-inf")).softmax(-1).nan_to_num(0.0) * g).sum(), x2)
    assert torch.allclose(grad, grad2)


# ---------------------------------------------------------------------- schedule, benchmark
def test_rsqrt_schedule_matches_lra():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    sched = rsqrt_schedule(opt, total_steps=5000, steps_per_epoch=3000, warmup_steps=1000)
    lrs = []
    for _ in range(4001):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0 and lrs[500] == pytest.approx(0.05 * 0.5 / math.sqrt(1000))
    assert max(lrs) == pytest.approx(0.05 / math.sqrt(1000)) == lrs[1000] and lrs[1000] == pytest.approx(1.58e-3, 1e-2)
    assert lrs[4000] == pytest.approx(0.05 / math.sqrt(4000))


def test_benchmark_smoke(capsys):
    from tasks.lra.benchmark import growth_exponents, lra_sequence_benchmark

    rows = lra_sequence_benchmark(lengths=(32, 64), emb_dim=16, mlp_dim=32, num_heads=2, num_layers=1,
                                  block_size=8, chunk_len=8, n_buckets=4, repeats=1, warmup=0,
                                  dense_memory_rows=False, measure_memory=True, device="cpu")
    assert len(rows) == 3 * 2 * 2
    assert all(r["time_ms"] > 0 and r["peak_mb"] >= 0 for r in rows)
    assert all(r["time_ratio"] == 1.0 for r in rows if not r["cached"])
    assert set(growth_exponents(rows)) == {"transformer", "transformer+grc", "bigbird", "bigbird+grc", "reformer",
                                           "reformer+grc"}
    out = capsys.readouterr().out
    assert "growth exponent" in out and "| bigbird+grc | 64 |" in out


def test_train_step_reduces_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = LRAClassifier(attention="bigbird", grc={"enabled": True}, dropout=0.0, attn_dropout=0.0, **SMALL)
    tok, y = _tokens([64, 50, 30, 10], 64), torch.tensor([1, 2, 3, 4])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(tok), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------------- mixed precision
# every ListOps model (baseline and GRC) under both autocast dtypes: the Reformer twice, as one hash
# round runs on the fused SDPA kernel and several rounds on masked_softmax + log-sum-exp
AMP_MODELS = [(a, g, nh) for a, nh in (("full", 1), ("bigbird", 1), ("reformer", 1), ("reformer", 2))
              for g in (False, True)]
AMP_DTYPES = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
AMP_TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}  # max |logit error| / max |logit|; measured <= 1.6e-3 / 1.4e-2


def _amp_model(attention, cached, n_hashes, chunk_len=4):
    kw = dict(SMALL, reformer=dict(chunk_len=chunk_len, n_buckets=8, n_hashes=n_hashes))
    return LRAClassifier(attention=attention, grc={"enabled": cached}, **kw)


@AMP_DTYPES
@pytest.mark.parametrize("attention, cached, n_hashes", AMP_MODELS)
def test_models_train_under_autocast(attention, cached, n_hashes, dtype):
    """16-mixed (what `precision: auto` picks on GPUs without bf16, e.g. V100) and bf16-mixed: the masks
    must fit the dtype (float16 cannot hold -1e9), the step must be finite, the cache stays float32."""
    torch.manual_seed(0)
    model = _amp_model(attention, cached, n_hashes).train()
    with torch.autocast("cpu", dtype=dtype):
        logits = model(_tokens([64, 40, 17], 64))
    assert logits.dtype == dtype and bool(torch.isfinite(logits).all())
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all())
               for p in model.parameters() if p.requires_grad)
    assert all(layer.cache.dtype == torch.float32 and layer.cache.abs().sum() > 0
               for layer in grc_layers(model).values())
    assert len(grc_layers(model)) == (2 if cached else 0)


@AMP_DTYPES
@pytest.mark.parametrize("attention, cached, n_hashes", AMP_MODELS)
def test_models_under_autocast_match_float32(attention, cached, n_hashes, dtype):
    """Autocast logits are float32's up to the dtype's rounding (with a cache written in training).

    The Reformer is compared with one chunk holding every token: with small chunks a rounding can move a
    vector across a bucket border, which changes the attended set, not the precision of the computation."""
    torch.manual_seed(0)
    model = _amp_model(attention, cached, n_hashes, chunk_len=256)
    tok = _tokens([64, 40, 17], 64)
    with torch.no_grad():
        model.train()(tok)                                     # write the caches
        model.eval()
        ref = model(tok)
        with torch.autocast("cpu", dtype=dtype):
            out = model(tok)
    assert out.dtype == dtype
    assert float((out.float() - ref).abs().max()) <= AMP_TOL[dtype] * float(ref.abs().max())
