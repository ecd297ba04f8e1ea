"""The GRC layer: parity with the released module, cache rules, causal and padding behaviour, sync."""
from __future__ import annotations

import copy
import dataclasses
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.checkpoint import checkpoint

from cached_transformers import (GRCAttention, GRCConfig, SelfAttention, SRAttention, convert_reference_state_dict,
                                 copy_caches, grc_layers, mixing_weights, reset_caches)
from cached_transformers.grc.reference import RefGRC

torch.manual_seed(0)


def make_pvt_layer(dim=64, heads=2, sr=2, grid=(8, 8), prefix=0, config=None):
    cfg = config or GRCConfig.make()
    dm = int(dim * cfg.ratio)
    return GRCAttention(dim, heads, SRAttention(dim, heads, qkv_bias=True, sr_ratio=sr),
                        cache_len=prefix + grid[0] * grid[1], config=cfg,
                        mem_attn=SRAttention(dm, heads, qkv_bias=True, sr_ratio=sr if cfg.mem_reduce else 1),
                        cache_grid=grid, num_prefix_tokens=prefix)


def ref_and_converted(dim=64, heads=2, sr=2, grid=(8, 8), prefix=0):
    ref = RefGRC(dim, heads, sr, prefix + grid[0] * grid[1], cls_dim=prefix)
    with torch.no_grad():
        for p in ref.parameters():  # move every parameter off its init so all paths are exercised
            p.add_(torch.randn_like(p) * 0.05)
        ref.gr_cache.normal_()
    sd = {f"blk.attn.{k}": v for k, v in ref.state_dict().items()}
    ours = make_pvt_layer(dim, heads, sr, grid, prefix)
    ours.load_state_dict({k[len("blk.attn."):]: v for k, v in convert_reference_state_dict(sd).items()}, strict=True)
    return ref, ours


def use_path(path, monkeypatch):
    """"native": the fused CPU kernels (grc/fused.py); "pytorch": the composite code GPUs and bf16 run."""
    from cached_transformers.grc import native

    if path == "pytorch":
        monkeypatch.setattr(native, "_state", {"ok": False})
    assert native.load() == (path == "native")


@pytest.mark.parametrize("path", ["native", "pytorch"])
@pytest.mark.parametrize("prefix,sr", [(0, 2), (1, 1)])
def test_reference_parity_train_and_eval(prefix, sr, path, monkeypatch):
    use_path(path, monkeypatch)
    ref, ours = ref_and_converted(prefix=prefix, sr=sr)
    x = torch.randn(3, prefix + 64, 64)
    for mode in ("train", "train", "eval"):
        ref.train(mode == "train"), ours.train(mode == "train")
        torch.testing.assert_close(ours(x, 8, 8), ref(x, 8, 8), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.cache, ref.gr_cache, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["native", "pytorch"])
def test_reference_parity_gradients(path, monkeypatch):
    use_path(path, monkeypatch)
    ref, ours = ref_and_converted()
    x = torch.randn(2, 64, 64)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(x_ref, 8, 8).square().sum().backward()
    ours(x_ours, 8, 8).square().sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    g_ref = torch.cat([ref.linear_reset.weight.grad, ref.linear_update.weight.grad])
    torch.testing.assert_close(ours.gate.weight.grad, g_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.self_attn.q.weight.grad, ref.attn_self_func.q.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.lam.grad, ref.lam.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.pos_conv.weight.grad, ref.pos_emb.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.pos_conv.bias.grad, ref.pos_emb.bias.grad, rtol=1e-4, atol=1e-4)


def test_cache_is_buffer_from_construction_and_round_trips():
    layer = make_pvt_layer()
    assert "cache" in dict(layer.named_buffers()) and layer.cache.shape == (1, 64, 32)
    layer.train()(torch.randn(2, 64, 64), 8, 8)
    fresh = make_pvt_layer()
    fresh.load_state_dict(layer.state_dict(), strict=True)
    assert torch.equal(fresh.cache, layer.cache) and layer.cache.abs().sum() > 0
    reset_caches(layer)
    assert layer.cache.abs().sum() == 0


def test_cache_changes_in_train_not_in_eval_or_no_grad():
    layer = make_pvt_layer()
    x = torch.randn(2, 64, 64)
    before = layer.cache.clone()
    layer.train()(x, 8, 8)
    after_train = layer.cache.clone()
    assert not torch.equal(before, after_train)
    with torch.no_grad():
        layer(x, 8, 8)  # validation inside training: still train mode, but no_grad
    layer.eval()(x, 8, 8)
    assert torch.equal(layer.cache, after_train)


def test_eval_is_deterministic_and_any_input_length_works():
    layer = make_pvt_layer().eval()
    x = torch.randn(2, 64, 64)
    assert torch.equal(layer(x, 8, 8), layer(x, 8, 8))
    y = layer(torch.randn(2, 6 * 10, 64), 6, 10)  # non-square, other size: resized to T_m
    assert y.shape == (2, 60, 64)


def test_single_update_under_activation_checkpointing():
    torch.manual_seed(1)
    layer = make_pvt_layer()
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 64, 64, requires_grad=True)
    xt = x.detach().clone().requires_grad_(True)
    layer.train(), twin.train()
    out = checkpoint(layer, x, 8, 8, use_reentrant=False)
    out.square().sum().backward()
    twin(xt, 8, 8).square().sum().backward()
    torch.testing.assert_close(layer.cache, twin.cache)  # updated once, with the same value
    torch.testing.assert_close(x.grad, xt.grad)
    torch.testing.assert_close(layer.gate.weight.grad, twin.gate.weight.grad)


def test_reentrant_checkpointing_fails_with_one_clear_message():
    """Reentrant checkpointing runs the first forward under no_grad (no cache write): refuse it."""
    layer = make_pvt_layer().train()
    x = torch.randn(2, 64, 64, requires_grad=True)
    out = checkpoint(layer, x, 8, 8, use_reentrant=True)
    with pytest.raises(RuntimeError, match="reentrant activation checkpointing.*use_reentrant=False"):
        out.square().sum().backward()
    # after a proper step (and its backward) a later reentrant step is still refused
    layer(x, 8, 8).sum().backward()
    out = checkpoint(layer, x, 8, 8, use_reentrant=True)
    with pytest.raises(RuntimeError, match="reentrant"):
        out.sum().backward()


@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_eval_output_of_a_sample_does_not_depend_on_its_batch(preset):
    """mem_kv=batch_mean (paper) averages over the batch in training only; in eval each sample is its own
    batch, so logits and accuracy do not change with batch size or GPU count."""
    layer = make_pvt_layer(config=GRCConfig.make(preset=preset))
    layer.train()(torch.randn(4, 64, 64), 8, 8)  # give the cache content
    layer.eval()
    batch = torch.randn(5, 64, 64)
    with torch.no_grad():
        together = layer(batch, 8, 8)
        for i in range(5):
            torch.testing.assert_close(layer(batch[i:i + 1], 8, 8), together[i:i + 1], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(layer(batch[i:i + 2], 8, 8)[:1], together[i:i + 1], rtol=1e-5, atol=1e-6)
    if preset == "paper":  # training keeps Algorithm 1's batch mean: there a sample does see its batch
        alone = copy.deepcopy(layer).train()(batch[:1], 8, 8)
        inside = copy.deepcopy(layer).train()(batch, 8, 8)[:1]
        assert not torch.allclose(alone, inside, atol=1e-4)


def lm_layer(causal=True, padding="valid", cache_len=12):
    cfg = GRCConfig.make(causal=causal, padding=padding, pos_encoding="none")
    return GRCAttention(32, 4, SelfAttention(32, 4, causal=causal), cache_len=cache_len, config=cfg)


def causal_summaries(layer, x):
    """The batch-mean summary a causal layer folds into its cache one step later (its self branch, resized)."""
    with torch.no_grad():
        _, _, xu = layer._self_branch(x, None, None, None, {})
    return xu.mean(0, keepdim=True)


def test_causal_cache_follows_the_one_step_delayed_recurrence():
    """Forward t reads R_t = GRC(R_{t-1}, P_{t-1}) (R_0 = P_0 = 0) and stores (R_t, P_t = mean_b X_t): one write."""
    torch.manual_seed(3)
    layer = lm_layer().train()
    assert {"cache", "pending"} <= dict(layer.named_buffers()).keys()
    r = torch.zeros(1, 12, layer.mem_dim)
    p = torch.zeros_like(r)
    for step in range(4):
        x = torch.randn(3, 12, 32)
        with torch.no_grad():
            expected_read = layer._gated_update(r, p)
        summary = causal_summaries(layer, x)
        layer(x).sum().backward()
        r, p = expected_read, summary
        torch.testing.assert_close(layer.cache, r, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.pending, p, rtol=1e-5, atol=1e-6)
    frozen = [t.clone() for t in (layer.cache, layer.pending)]
    with torch.no_grad():
        layer(torch.randn(3, 12, 32))
    layer.eval()(torch.randn(3, 12, 32))
    assert all(torch.equal(a, b) for a, b in zip(frozen, (layer.cache, layer.pending)))


def test_causal_gates_learn_through_the_previous_step():
    """The memory branch reads GRC(cache, pending) computed in this step's graph: gates, candidate, memory
    attention and lambda all get a gradient (the old causal mode read a detached cache: zero gradient)."""
    torch.manual_seed(4)
    layer = lm_layer().train()
    layer(torch.randn(2, 12, 32)).sum().backward()  # first step: reads GRC(0, 0), already a gradient path
    layer.zero_grad()
    out = layer(torch.randn(2, 12, 32))
    out.square().sum().backward()
    for name in ("gate.weight", "gate.bias", "cand.weight", "cand_norm.weight", "lam", "mem_attn.kv.weight"):
        grad = dict(layer.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # and the gradient is that of the one-step recurrence: a finite difference on one gate weight agrees
    with torch.no_grad():
        w = layer.gate.weight
        x = torch.randn(2, 12, 32)
        loss = lambda: copy.deepcopy(layer).eval()(x).square().sum()
    layer.eval()
    layer.zero_grad()
    layer(x).square().sum().backward()
    analytic = layer.gate.weight.grad[0, 0].item()
    eps = 1e-3
    with torch.no_grad():
        w[0, 0] += eps
        up = loss()
        w[0, 0] -= 2 * eps
        down = loss()
        w[0, 0] += eps
    assert abs((up - down).item() / (2 * eps) - analytic) <= 2e-2 * max(1.0, abs(analytic))


def test_causal_output_of_a_sample_depends_on_neither_its_batch_nor_later_tokens():
    torch.manual_seed(5)
    layer = lm_layer().train()
    layer(torch.randn(4, 12, 32))
    x = torch.randn(3, 12, 32)
    y = x.clone()
    y[1:] = torch.randn_like(y[1:])
    a, b = copy.deepcopy(layer), copy.deepcopy(layer)
    torch.testing.assert_close(a(x)[0], b(y)[0])  # in training too: the current batch only reaches `pending`


def test_causal_checkpoint_recomputation_writes_once_with_the_same_gradients():
    torch.manual_seed(6)
    layer = lm_layer().train()
    layer(torch.randn(2, 12, 32)).sum().backward()
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 12, 32, requires_grad=True)
    xt = x.detach().clone().requires_grad_(True)
    checkpoint(layer, x, use_reentrant=False).square().sum().backward()
    twin(xt).square().sum().backward()
    torch.testing.assert_close(layer.cache, twin.cache)
    torch.testing.assert_close(layer.pending, twin.pending)
    torch.testing.assert_close(layer.gate.weight.grad, twin.gate.weight.grad)
    torch.testing.assert_close(x.grad, xt.grad)


def test_causal_state_round_trips_and_resumes_exactly():
    torch.manual_seed(7)
    data = [torch.randn(2, 12, 32) for _ in range(4)]
    layer = lm_layer().train()
    for x in data[:2]:
        layer(x)
    resumed = lm_layer()
    resumed.load_state_dict(layer.state_dict(), strict=True)
    resumed.train()
    for x in data[2:]:
        torch.testing.assert_close(resumed(x), layer(x))
    torch.testing.assert_close(resumed.pending, layer.pending)
    reset_caches(resumed)
    assert resumed.cache.abs().sum() == 0 and resumed.pending.abs().sum() == 0
    other = lm_layer(causal=False)  # a non-causal layer has no pending buffer: its checkpoints are unchanged
    assert "pending" not in other.state_dict()


@pytest.mark.parametrize("training", [True, False])
def test_causal_mode_does_not_leak_future_tokens(training):
    layer = lm_layer()
    layer.train()(torch.randn(4, 12, 32))  # give the stored cache content
    x = torch.randn(2, 12, 32)
    y = x.clone()
    i = 5
    y[:, i + 1:] = torch.randn_like(y[:, i + 1:])
    a, b = copy.deepcopy(layer).train(training), copy.deepcopy(layer).train(training)
    torch.testing.assert_close(a(x)[:, : i + 1], b(y)[:, : i + 1])
    assert not torch.allclose(a(x)[:, i + 1:], b(y)[:, i + 1:])


def test_non_causal_mode_does_see_the_whole_sequence():
    layer = lm_layer(causal=False).eval()
    x = torch.randn(1, 12, 32)
    y = x.clone()
    y[:, -1] += 1.0
    assert not torch.allclose(layer(x)[:, 0], layer(y)[:, 0])


def test_padding_does_not_change_cache_or_valid_outputs():
    layer = lm_layer(causal=False, cache_len=16)
    valid = torch.randn(3, 10, 32)
    outs, caches = [], []
    for total in (10, 17, 25):
        x = torch.cat([valid, torch.randn(3, total - 10, 32) * 5], dim=1)
        mask = torch.zeros(3, total, dtype=torch.bool)
        mask[:, 10:] = True
        twin = copy.deepcopy(layer).train()
        outs.append(twin(x, key_padding_mask=mask)[:, :10])
        caches.append(twin.cache)
    for o, c in zip(outs[1:], caches[1:]):
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, caches[0], rtol=1e-5, atol=1e-5)


def test_padding_valid_uses_only_valid_tokens_with_left_padding_too():
    layer = lm_layer(causal=False, cache_len=8).train()
    valid = torch.randn(1, 6, 32)
    right = torch.cat([valid, torch.zeros(1, 3, 32)], 1)
    left = torch.cat([torch.zeros(1, 3, 32), valid], 1)
    m_right = torch.tensor([[False] * 6 + [True] * 3])
    m_left = torch.tensor([[True] * 3 + [False] * 6])
    xu_r = layer._summary(right, m_right)
    xu_l = layer._summary(left, m_left)
    torch.testing.assert_close(xu_r, xu_l)


SWITCHES = [dict(preset="paper"), dict(lambda_init=0.0), dict(candidate="linear"), dict(gate_bias=False),
            dict(concat_order="input_first"), dict(update_source="input"), dict(mem_query="update_source"),
            dict(resize="linear"), dict(mem_kv="batch_mean"), dict(pos_encoding="none"), dict(mem_reduce=False),
            dict(ratio=0.25), dict(sync="none")]


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_every_switch_trains(switch):
    cfg = GRCConfig.make(**switch)
    layer = make_pvt_layer(config=cfg).train()
    x = torch.randn(2, 64, 64, requires_grad=True)
    out = layer(torch.randn(2, 64, 64), 8, 8)  # first step fills the cache
    out = layer(x, 8, 8)
    out.square().mean().backward()
    assert torch.isfinite(out).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in layer.named_parameters()), "every parameter gets a gradient"


def test_presets_and_switches_differ_where_documented():
    ref, paper = GRCConfig.make(), GRCConfig.make(preset="paper")
    differing = {f.name for f in dataclasses.fields(GRCConfig)
                 if getattr(ref, f.name) != getattr(paper, f.name)}
    assert differing == {"preset", "lambda_init", "candidate", "gate_bias", "concat_order", "update_source",
                         "mem_query", "resize", "mem_kv", "padding", "mem_reduce"}
    assert GRCConfig.make(GRCConfig.make(candidate="linear"), preset="paper").candidate == "linear"
    assert GRCConfig.make(grc_ratio=0.25).ratio == 0.25


@pytest.mark.parametrize("bad,match", [(dict(ratio=0.3), "not divisible|does not split"),
                                       (dict(foo=1), "Unknown GRC option"),
                                       (dict(preset="nope"), "Unknown GRC preset"),
                                       (dict(sync="max"), "sync")])
def test_bad_options_give_clear_errors(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make_pvt_layer(config=GRCConfig.make(**bad))


def test_converter_rejects_incomplete_state_dicts():
    ref = RefGRC(64, 2, 2, 64)
    sd = {f"blk.attn.{k}": v for k, v in ref.state_dict().items()}
    del sd["blk.attn.linear_update.weight"]
    with pytest.raises(KeyError, match="linear_update.weight"):
        convert_reference_state_dict(sd)
    with pytest.raises(KeyError, match="not a state_dict of the released GRC code"):
        convert_reference_state_dict({"head.weight": torch.zeros(1)})


def test_converter_accepts_tk_mem_and_wrapped_checkpoints():
    ref = RefGRC(64, 2, 2, 64)
    sd = {f"module.blk.attn.{k}".replace("gr_cache", "tk_mem"): v for k, v in ref.state_dict().items()}
    out = convert_reference_state_dict({"model": sd})
    assert "blk.attn.cache" in out and "blk.attn.gate.weight" in out and out["blk.attn.gate.weight"].shape == (64, 64)


def test_model_helpers_copy_and_report():
    a, b = make_pvt_layer(), make_pvt_layer()
    a.train()(torch.randn(2, 64, 64), 8, 8)
    wrapper = torch.nn.Sequential(a)
    assert len(grc_layers(wrapper)) == 1
    assert copy_caches(a, b) == 1 and torch.equal(a.cache, b.cache)
    w = mixing_weights(wrapper)
    torch.testing.assert_close(w["0"], torch.sigmoid(torch.full((2,), -1.0)))


# ---------------------------------------------------------------- multi-process sync (gloo)
def _sync_worker(rank, world, init_file, sync, out_dir, causal=False):
    import torch.distributed as dist

    from cached_transformers import sync_caches
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    calls = []
    for name in ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "broadcast",
                 "reduce_scatter_tensor"):
        if hasattr(dist, name):
            def counting(*a, _orig=getattr(dist, name), _name=name, **k):
                calls.append(_name)
                return _orig(*a, **k)
            setattr(dist, name, counting)
    torch.manual_seed(0)
    model = torch.nn.ModuleList([make_pvt_layer(config=GRCConfig.make(sync=sync, causal=causal))
                                 for _ in range(3)]).train()
    torch.manual_seed(100 + rank)  # every rank sees different data ...
    for _ in range(1 + rank):      # ... and runs a different number of forwards (micro-batches): no hang
        x = torch.randn(2, 64, 64)
        for layer in model:
            x = layer(x, 8, 8)
        x.sum().backward()
    assert not calls, f"the layers communicated inside forward/backward: {calls}"
    issued = sync_caches(model)
    torch.save({"caches": [t for layer in model for t in layer.state_tensors()], "calls": calls, "issued": issued},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("sync,identical,causal", [("mean", True, False), ("none", False, False),
                                                   ("mean", True, True)])
def test_cache_sync_is_one_collective_per_step_across_two_gloo_processes(sync, identical, causal):
    """Causal layers: the cache and the pending summary, in the same one collective."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_sync_worker, args=(2, os.path.join(d, "init"), sync, d, causal), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(d, f"rank{r}.pt")) for r in (0, 1))
    assert len(r0["caches"]) == (6 if causal else 3)
    assert all(torch.equal(a, b) is identical for a, b in zip(r0["caches"], r1["caches"]))
    expected = ["all_reduce"] if sync == "mean" else []  # one collective for all three layers
    assert r0["calls"] == r1["calls"] == expected and r0["issued"] == len(expected)
    if sync == "mean":  # the average of what each rank wrote
        assert all(c.abs().sum() > 0 for c in r0["caches"])


def _checkpoint_sync_worker(rank, world, init_file, out_dir):
    """A checkpoint inside an accumulation window: the file gets the cross-rank mean, the ranks keep their own."""
    import types

    import torch.distributed as dist

    from tasks.common.grc_sync import GRCCacheSync
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.ModuleList([make_pvt_layer(config=GRCConfig.make(causal=c)) for c in (False, True)]).train()
    torch.manual_seed(100 + rank)
    for _ in range(2):  # two micro-batches, no sync yet (a causal cache reflects the data from its second step)
        x = torch.randn(2, 64, 64)
        for layer in model:
            x = layer(x, 8, 8)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint = {"state_dict": model.state_dict()}
    GRCCacheSync().on_save_checkpoint(types.SimpleNamespace(world_size=world), model, checkpoint)
    torch.save({"own": own, "file": checkpoint["state_dict"], "live": model.state_dict()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_a_checkpoint_between_syncs_holds_the_averaged_caches_and_leaves_the_ranks_alone():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_checkpoint_sync_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(d, f"rank{r}.pt")) for r in (0, 1))
    keys = ["0.cache", "1.cache", "1.pending"]
    for key in keys:
        assert not torch.equal(r0["own"][key], r1["own"][key])  # the ranks saw different data
        mean = (r0["own"][key] + r1["own"][key]) / 2
        torch.testing.assert_close(r0["file"][key], mean)
        torch.testing.assert_close(r1["file"][key], mean)
        for r in (r0, r1):  # training goes on with each rank's own caches
            assert torch.equal(r["live"][key], r["own"][key])
    assert torch.equal(r0["file"]["0.gate.weight"], r0["own"]["0.gate.weight"])  # parameters untouched


def test_sync_caches_without_process_group_is_a_no_op():
    from cached_transformers import sync_caches
    layer = make_pvt_layer().train()
    layer(torch.randn(2, 64, 64), 8, 8)
    before = layer.cache.clone()
    assert sync_caches(layer) == 0 and torch.equal(layer.cache, before)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_valid_token_summary_equals_torch_interpolate_without_padding(mode):
    layer = GRCAttention(32, 4, SelfAttention(32, 4), cache_len=16,
                         config=GRCConfig.make(padding="valid", pos_encoding="none", resize=mode))
    u = torch.randn(2, 11, 16)
    expected = torch.nn.functional.interpolate(u.transpose(1, 2), size=16, mode=mode).transpose(1, 2)
    torch.testing.assert_close(layer._summary(u, torch.zeros(2, 11, dtype=torch.bool)), expected)


@pytest.mark.parametrize("path", ["native", "pytorch"])
@pytest.mark.parametrize("bias", [True, False])
def test_pair_grouped_conv_equals_the_grouped_conv_with_exact_gradients(bias, path, monkeypatch):
    from cached_transformers.grc import native
    from cached_transformers.grc.posconv import pair_grouped_conv3x3

    use_path(path, monkeypatch)  # "pytorch": two depthwise convs, what GPUs, bf16 and machines without a compiler run
    assert native.usable(torch.zeros(1, dtype=torch.float64)) == (path == "native")

    x = torch.randn(2, 5, 4, 8, dtype=torch.float64).permute(0, 3, 1, 2)  # channels-last view, as the layer passes it
    x.requires_grad_(True)
    w = torch.randn(8, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True) if bias else None
    expected = torch.nn.functional.conv2d(x, w, b, padding=1, groups=4).permute(0, 2, 3, 1)
    torch.testing.assert_close(pair_grouped_conv3x3(x, w, b), expected)
    inputs = (x, w, b) if bias else (x, w)
    assert torch.autograd.gradcheck(lambda *a: pair_grouped_conv3x3(a[0], a[1], a[2] if bias else None), inputs)
    with pytest.raises(ValueError, match="C x 2 x 3 x 3"):
        pair_grouped_conv3x3(x, torch.randn(8, 1, 3, 3, dtype=torch.float64), None)
    # the custom op is registered correctly for torch.compile / export (fake tensors, autograd, schema)
    from cached_transformers.grc.posconv import _pair_conv_op
    torch.library.opcheck(_pair_conv_op, (x.detach().requires_grad_(True), w, b))


@pytest.mark.parametrize("path", ["native", "pytorch"])
def test_positional_conv_is_the_grouped_conv_in_training_and_inference(path, monkeypatch):
    use_path(path, monkeypatch)
    layer = make_pvt_layer(prefix=1, sr=1)
    x = torch.randn(2, 65, 64, requires_grad=True)
    grid = x.detach()[:, 1:].reshape(2, 8, 8, 64).permute(0, 3, 1, 2)
    expected = layer.pos_conv(grid).flatten(2).transpose(1, 2)  # the released module's grouped conv
    trained = layer._positional(x, (8, 8))                   # native kernel or two depthwise convs
    with torch.no_grad():
        inferred = layer._positional(x, (8, 8))
    torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inferred, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(trained, (x, layer.pos_conv.weight, layer.pos_conv.bias), grad)
    grid_leaf = x[:, 1:].reshape(2, 8, 8, 64).permute(0, 3, 1, 2)
    want = torch.autograd.grad(layer.pos_conv(grid_leaf).flatten(2).transpose(1, 2),
                               (x, layer.pos_conv.weight, layer.pos_conv.bias), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
