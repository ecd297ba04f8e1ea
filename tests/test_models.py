"""The vision backbones: registration, GRC wiring, cache rules inside whole models, loading, features.

Fast CPU tests: behaviour is checked on small inputs (64 x 64, 10 classes) for one model per family;
the big models (PVT medium/large, PVTv2 B3-B5) are only built on the meta device (names, counts).
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import use_reentrant_ckpt

import cached_transformers  # noqa: F401  (registers the models)
from cached_transformers import GRCConfig, grc_layers
from cached_transformers.models import (BASELINES, MODEL_NAMES, available_models, baseline_key_to_grc,
                                        create_model, load_checkpoint)

torch.manual_seed(0)

SWIN = "swin_tiny_patch4_window7_224_grc"
# small, fast build arguments per model (64 x 64 inputs, 10 classes)
SMALL = {
    "pvt_tiny": dict(img_size=64),
    "pvt_tiny_grc": dict(img_size=64),
    "vit_small_patch16_224_grc": dict(img_size=64, depth=4),
    "pvt_v2_b0_grc": dict(img_size=64),
    SWIN: dict(img_size=64, window_size=4, embed_dim=48, depths=(2, 2, 2, 2)),
}
FAST = list(SMALL)
CACHED_FAST = [n for n in FAST if n.endswith("_grc")]
BIG = {"pvt_medium", "pvt_large", "pvt_medium_grc", "pvt_large_grc", "pvt_v2_b3_grc", "pvt_v2_b4_grc", "pvt_v2_b5_grc"}


def build(name: str, **kw) -> torch.nn.Module:
    args = dict(SMALL.get(name, {}), num_classes=10)
    args.update(kw)
    return timm.create_model(name, pretrained=False, **args)


def images(n: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def on_meta(name: str, **kw) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kw)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def caches(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.cache.clone() for k, v in grc_layers(model).items()}


def train_step(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


# ---------------------------------------------------------------------- registry
def test_registered_names():
    expected = {f"pvt_{s}{g}" for s in ("tiny", "small", "medium", "large") for g in ("", "_grc")}
    expected |= {f"pvt_v2_b{i}_grc" for i in range(6)} | {SWIN, "vit_small_patch16_224_grc"}
    assert set(MODEL_NAMES) == expected and len(MODEL_NAMES) == len(expected)
    assert all(timm.is_model(n) for n in MODEL_NAMES)
    assert set(BASELINES) == {n for n in MODEL_NAMES if n.endswith("_grc")}
    assert all(timm.is_model(b) for b in BASELINES.values())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_builds_and_grc_off_is_baseline(name):
    """Every registered model builds; GRC models have GRC layers, and with GRC off equal their baseline."""
    kw = dict(depths=(1, 1, 1, 1)) if name in BIG else {}  # same wiring, fewer blocks, for speed
    model = on_meta(name, **kw)
    layers = grc_layers(model)
    assert bool(layers) == name.endswith("_grc")
    if not name.endswith("_grc"):
        return
    assert all(".self_attn" not in k for k in layers)
    off, base = on_meta(name, grc=False, **kw), on_meta(BASELINES[name], **kw)
    off_dict = on_meta(name, grc=dict(enabled=False), **kw)
    base_names = [k for k, _ in base.named_parameters()]
    for m in (off, off_dict):
        assert type(m) is type(base) and not grc_layers(m)
        assert [k for k, _ in m.named_parameters()] == base_names
        assert list(m.state_dict()) == list(base.state_dict())
        assert n_params(m) == n_params(base)
    # baseline keys map 1:1 into the cached model with ".self_attn." inserted
    cached_keys = set(model.state_dict())
    mapped = {baseline_key_to_grc(k) for k in base.state_dict()}
    assert mapped <= cached_keys
    assert all(".attn." in k for k in cached_keys - mapped)


# ---------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("size,base,cached", [("tiny", 13.23, 15.67), ("small", 24.49, 29.36),
                                              ("medium", 44.21, 53.48)])
def test_pvt_param_counts_at_224(size, base, cached):
    assert round(n_params(on_meta(f"pvt_{size}")) / 1e6, 2) == base
    assert round(n_params(on_meta(f"pvt_{size}_grc")) / 1e6, 2) == cached


def test_pvt_official_layout_and_cache_lengths():
    model = on_meta("pvt_tiny_grc")
    lens = {k: v.cache_len for k, v in grc_layers(model).items()}
    assert [lens[f"block{i}.0.attn"] for i in range(1, 5)] == [3136, 784, 196, 50]
    assert grc_layers(model)["block4.1.attn"].num_prefix_tokens == 1
    keys = set(on_meta("pvt_tiny").state_dict())
    for k in ("pos_embed1", "pos_embed4", "cls_token", "patch_embed1.proj.weight", "patch_embed4.norm.bias",
              "block1.0.attn.q.weight", "block1.0.attn.kv.bias", "block1.0.attn.sr.weight",
              "block1.0.attn.norm.weight", "block1.0.mlp.fc1.weight", "block4.1.mlp.fc2.bias", "norm.weight",
              "head.weight"):
        assert k in keys, k
    assert "block4.0.attn.sr.weight" not in keys
    assert on_meta("pvt_tiny").pos_embed4.shape == (1, 50, 512)
    assert {v.cache_len for v in grc_layers(on_meta("vit_small_patch16_224_grc")).values()} == {197}
    assert {v.cache_len for v in grc_layers(on_meta(SWIN)).values()} == {49}


# ---------------------------------------------------------------------- behaviour (small models)
@pytest.mark.parametrize("name", FAST)
def test_forward_backward(name):
    model = build(name)
    out = model(images())
    assert out.shape == (2, 10)
    out.square().mean().backward()
    missing = [k for k, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", CACHED_FAST)
def test_cache_written_in_train_only(name):
    model = build(name)
    before = caches(model)
    assert all(c.abs().sum() == 0 for c in before.values())
    model.train()
    with torch.no_grad():  # validation inside training
        model(images())
    assert all(torch.equal(before[k], c) for k, c in caches(model).items())
    model.eval()
    model(images())
    assert all(torch.equal(before[k], c) for k, c in caches(model).items())
    train_step(model, images())
    after = caches(model)
    assert all(not torch.equal(before[k], c) for k, c in after.items())


@pytest.mark.parametrize("name", CACHED_FAST)
def test_state_dict_round_trip_and_eval_determinism(name):
    model = build(name)
    train_step(model, images(seed=2))
    model.eval()
    x = images(seed=3)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(ref, model(x))  # eval is deterministic and leaves the cache alone
    torch.manual_seed(123)
    fresh = build(name)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    for k, c in caches(model).items():
        assert torch.equal(c, grc_layers(fresh)[k].cache)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", CACHED_FAST)
def test_activation_checkpointing_writes_cache_once(name):
    assert not use_reentrant_ckpt()  # timm's blocks checkpoint non-reentrantly (PVT v1 always does)
    plain = build(name)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    writes: dict[str, int] = {}

    class CountingBuffers(dict):  # the layer writes its cache by binding a new tensor to the buffer
        def __setitem__(self, key, value, _writes=writes):
            if key == "cache":
                _writes[self.layer_name] = _writes.get(self.layer_name, 0) + 1
            super().__setitem__(key, value)
    for k, layer in grc_layers(ckpt).items():
        layer._buffers = CountingBuffers(layer._buffers)
        layer._buffers.layer_name = k
    x = images(seed=4)
    torch.manual_seed(5)  # same stochastic-depth draws in both runs (Swin defaults to drop_path_rate 0.1)
    train_step(plain, x)
    torch.manual_seed(5)
    train_step(ckpt, x)
    assert writes == {k: 1 for k in grc_layers(ckpt)}
    for k, c in caches(plain).items():
        torch.testing.assert_close(grc_layers(ckpt)[k].cache, c)
    grads = dict(ckpt.named_parameters())
    for k, p in plain.named_parameters():
        torch.testing.assert_close(grads[k].grad, p.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["vit_small_patch16_224_grc", "pvt_tiny_grc"])
def test_timm_reentrant_checkpointing_is_refused_or_works(name):
    """timm's reentrant checkpointing (set_reentrant_ckpt(True) / TIMM_REENTRANT_CKPT=1) would leave every
    cache unwritten: timm's models stop with the layer's message; PVT v1 (written here) always checkpoints
    non-reentrantly, so it trains and writes its caches."""
    from timm.layers import set_reentrant_ckpt

    model = build(name)
    model.set_grad_checkpointing(True)
    before = caches(model)
    set_reentrant_ckpt(True)
    try:
        if name.startswith("vit"):
            with pytest.raises(RuntimeError, match="reentrant activation checkpointing"):
                train_step(model, images())
        else:
            train_step(model, images())
            assert all(not torch.equal(c, before[k]) for k, c in caches(model).items())
    finally:
        set_reentrant_ckpt(False)


def test_pvt_other_input_size_and_baseline_weights():
    """Other resolutions work (pos embeds and summaries resized); baseline weights load into the cached model."""
    model = build("pvt_tiny_grc")
    model.eval()
    assert model(images(1, size=96)).shape == (1, 10)
    base = build("pvt_tiny")
    sd = {baseline_key_to_grc(k): v for k, v in base.state_dict().items()}
    result = model.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys
    assert all(".attn." in k for k in result.missing_keys)
    torch.testing.assert_close(model.block1[0].attn.self_attn.q.weight, base.block1[0].attn.q.weight)
    # GRC off: the baseline checkpoint loads strictly and gives the baseline's outputs
    off = build("pvt_tiny_grc", grc=False)
    off.load_state_dict(base.state_dict(), strict=True)
    off.eval(), base.eval()
    with torch.no_grad():
        torch.testing.assert_close(off(images()), base(images()), rtol=0, atol=0)


# ---------------------------------------------------------------------- features
@pytest.mark.parametrize("name", FAST)
def test_features_only(name):
    model = build(name, features_only=True, out_indices=(0, 1, 2, 3) if "vit" not in name else (1, 2, 3))
    feats = model(images())
    if "vit" in name:
        assert [tuple(f.shape) for f in feats] == [(2, 384, 4, 4)] * 3
        return
    chans = model.feature_info.channels()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    for i, (f, c) in enumerate(zip(feats, chans)):
        side = 64 // 2 ** (i + 2)
        expected = (2, side, side, c) if name == SWIN else (2, c, side, side)  # timm's Swin features are NHWC
        assert tuple(f.shape) == expected
    if name.endswith("_grc"):
        assert grc_layers(model)


def test_pvt_pyramid_feeds_torchvision_fpn():
    torchvision = pytest.importorskip("torchvision")
    from collections import OrderedDict
    backbone = build("pvt_tiny_grc")
    feats = backbone.forward_features_pyramid(images())
    assert [tuple(f.shape) for f in feats] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 320, 4, 4), (2, 512, 2, 2)]
    fpn = torchvision.ops.FeaturePyramidNetwork([64, 128, 320, 512], 32)
    out = fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
    assert [v.shape[1] for v in out.values()] == [32] * 4
    sum(v.sum() for v in out.values()).backward()
    assert backbone.block1[0].attn.gate.weight.grad is not None
    # the timm features_only wrapper gives the same stage 1-3 maps from the same weights (stage 4 has no
    # class token there: test_pvt_features_stage4_has_no_class_token)
    wrapped = build("pvt_tiny_grc", features_only=True)
    load_checkpoint(wrapped.model, {k: v for k, v in backbone.state_dict().items()
                                    if not k.startswith(("head.", "norm.", "cls_token"))})
    wrapped.eval(), backbone.eval()
    with torch.no_grad():
        for a, b in zip(wrapped(images())[:3], backbone.forward_features_pyramid(images())[:3]):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["pvt_tiny", "pvt_tiny_grc"])
def test_pvt_features_stage4_has_no_class_token(name):
    """features_only PVT is PVT's detection backbone: stage 4 runs on its grid tokens with pos_embed4[:, 1:]."""
    classifier = build(name)
    cached = name.endswith("_grc")
    if cached:
        classifier.block4[0].attn.cache.normal_()
    net = build(name, features_only=True)
    load_checkpoint(net.model, {k: v for k, v in classifier.state_dict().items()
                                if not k.startswith(("head.", "norm.", "cls_token"))})
    assert not hasattr(net.model, "cls_token") and "model.cls_token" not in net.state_dict()
    assert net.model.num_prefix_tokens == 0
    assert net.model.pos_embed4.shape == classifier.pos_embed4.shape  # the class slot is kept, unused
    x = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(3))  # 3 x 2 stage-4 grid
    net.eval()
    with torch.no_grad():
        feats = net(x)
        # direct computation: stage 4 on the 6 grid tokens only, position embedding without the class slot
        m = net.model
        tokens, (h, w) = m.patch_embed4(feats[2])
        pos = torch.nn.functional.interpolate(m.pos_embed4[:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2),
                                              size=(h, w), mode="bilinear")
        tokens = tokens + pos.flatten(2).transpose(1, 2)
        for blk in m.block4:
            tokens = blk(tokens, h, w)
        torch.testing.assert_close(feats[3], tokens.reshape(2, h, w, -1).permute(0, 3, 1, 2), rtol=0, atol=0)
        # the class slot of pos_embed4 is not read
        m.pos_embed4[:, 0] += 1.0
        torch.testing.assert_close(net(x)[3], feats[3], rtol=0, atol=0)
    if cached:
        layer = grc_layers(net)["model.block4.0.attn"]
        assert layer.num_prefix_tokens == 0 and layer.cache_len == 4  # the 2 x 2 grid at img_size 64
        # a classification file's cache: the class token's slot 0 is dropped, the grid's slots kept
        torch.testing.assert_close(layer.cache, classifier.block4[0].attn.cache[:, 1:], rtol=0, atol=0)
        net.train()
        net(x)[3].sum().backward()
        assert layer.cache.shape == (1, 4, layer.mem_dim) and layer.cache.abs().sum() > 0  # written, grid only
        assert float(m.pos_embed4.grad[0, 0].abs().sum()) == 0 and float(m.pos_embed4.grad[0, 1:].abs().sum()) > 0
    # classification is unchanged: the classifier still reads its class token
    if cached:
        assert classifier.block4[0].attn.num_prefix_tokens == 1 and classifier.block4[0].attn.cache_len == 5
    with torch.no_grad():
        classifier.eval()
        before = classifier(images())
        classifier.cls_token += 1.0
        assert not torch.equal(classifier(images()), before)


def test_pvt_features_cache_length_at_224():
    """The grid-only stage 4 at the nominal 224: a 7 x 7 grid, so 49 cache slots (the classifier: 50)."""
    with torch.device("meta"):
        net = timm.create_model("pvt_tiny_grc", features_only=True)
    lens = {k: v.cache_len for k, v in grc_layers(net).items()}
    assert [lens[f"model.block{i}.0.attn"] for i in range(1, 5)] == [3136, 784, 196, 49]


# ---------------------------------------------------------------------- loading with other cache lengths
def test_cache_length_mismatch_error_and_resize():
    src = on_meta("pvt_tiny_grc", num_classes=10).to_empty(device="cpu")  # nominal 224: 3136 ... 50
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in src.state_dict().items()}
    dst = build("pvt_tiny_grc", img_size=112)  # 784 / 196 / 49 / 17
    with pytest.raises(ValueError, match=r"cache length 3136 in the checkpoint but 784 in the model for "
                                         r"block1\.0\.attn\.cache; pass resize_cache=True to resize"):
        load_checkpoint(dst, sd)
    with pytest.raises(ValueError, match=r"position embedding pos_embed1 has 3136 tokens in the checkpoint but 784"):
        load_checkpoint(dst, sd, resize_cache=True)
    load_checkpoint(dst, sd, resize_cache=True, resize_pos_embed=True)
    with torch.no_grad():
        assert dst(images(1, size=112)).shape == (1, 10)
    layer = grc_layers(dst)["block1.0.attn"]
    assert layer.cache.shape == (1, 784, 32)
    expected = torch.nn.functional.interpolate(sd["block1.0.attn.cache"].transpose(1, 2), size=784,
                                               mode="nearest").transpose(1, 2)
    torch.testing.assert_close(layer.cache, expected)
    torch.testing.assert_close(dst.head.weight, sd["head.weight"])
    # equal lengths load as usual, wrapped checkpoints too
    again = build("pvt_tiny_grc", img_size=112)
    load_checkpoint(again, {"state_dict": dst.state_dict()})
    torch.testing.assert_close(grc_layers(again)["block1.0.attn"].cache, layer.cache)
    # another ratio: a clear error, not resizable
    other = build("pvt_tiny_grc", img_size=112, grc_ratio=0.25)
    with pytest.raises(ValueError, match="another GRC ratio"):
        load_checkpoint(other, dst.state_dict())


# ---------------------------------------------------------------------- errors and options
def test_unknown_model_name():
    with pytest.raises(ValueError) as err:
        create_model("pvt_tinyy_grc")
    msg = str(err.value)
    assert "pvt_tinyy_grc" in msg and ", ".join(available_models()) in msg
    assert available_models() == sorted(available_models())
    assert isinstance(create_model("pvt_tiny", img_size=64, num_classes=10), torch.nn.Module)


def test_grc_options():
    with pytest.raises(ValueError, match=r"memory width D_m=int\(0.3\*64\)=19, and 19 does not divide D=64"):
        build("pvt_tiny_grc", grc_ratio=0.3)
    with pytest.raises(TypeError, match="Unknown GRC option"):
        build("pvt_tiny_grc", grc_colour="blue")
    with pytest.raises(TypeError, match="use pvt_tiny_grc"):
        build("pvt_tiny", grc_ratio=0.25)
    with pytest.raises(ValueError, match="linear attention"):
        on_meta("pvt_v2_b0_grc", linear=True)
    cfg = GRCConfig.make(preset="paper")
    for model in (on_meta("pvt_tiny_grc", grc=cfg), on_meta("pvt_tiny_grc", grc=dict(preset="paper")),
                  on_meta("pvt_tiny_grc", grc_preset="paper")):
        layer = grc_layers(model)["block1.0.attn"]
        assert layer.config.preset == "paper" and layer.mem_attn.sr_ratio == 1  # paper: no cache reduction
    quarter = grc_layers(on_meta("pvt_v2_b0_grc", grc_ratio=0.25))["stages.0.blocks.0.attn"]
    assert quarter.mem_dim == 8 and quarter.mem_attn.sr_ratio == 8


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pvt_tiny_grc", "vit_small_patch16_224_grc"])
def test_cached_model_under_torch_compile_matches_eager(name):
    """Dynamo + AOTAutograd (the tracing half of torch.compile; inductor only generates kernels) keep
    the cache rules: same outputs, caches and gradients as eager, one write per training step, none in eval."""
    eager = build(name)
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="aot_eager")  # in place: state_dict keys stay those of the eager model
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    x = images()
    for _ in range(2):
        for model in (eager, compiled):
            train_step(model, x)
        for key, cache in caches(compiled).items():
            torch.testing.assert_close(cache, caches(eager)[key], rtol=1e-5, atol=1e-6)
    assert any(c.abs().sum() > 0 for c in caches(compiled).values())
    for (n, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)
    before = caches(compiled)
    eager.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(c, before[k]) for k, c in caches(compiled).items())


@pytest.mark.slow
@pytest.mark.parametrize("name", CACHED_FAST)
def test_no_graph_breaks_in_training_and_eval(name):
    """Dynamo traces every cached model as one graph, cache write included (training) and in eval."""
    model, x = build(name), images()
    for training in (True, False):
        model.train(training)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(lambda inp: model(inp).square().mean())(x)
        assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]
        assert explained.graph_count == 1


@pytest.mark.slow
def test_compiled_activation_checkpointing_is_one_graph_and_exact():
    """With Dynamo's switch for forward side effects under checkpointing, a checkpointed cached model is one
    graph; the recomputation reads the cache the forward read (the write binds a new tensor), so outputs,
    caches and gradients equal eager checkpointing, one write per step."""
    name = "vit_small_patch16_224_grc"
    eager = build(name)
    eager.set_grad_checkpointing(True)
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="aot_eager")
    x = images()
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(lambda inp: copy.deepcopy(eager).train()(inp).sum())(x)
        assert explained.graph_break_count == 0
        for _ in range(2):
            for model in (eager, compiled):
                train_step(model, x)
            for key, cache in caches(compiled).items():
                torch.testing.assert_close(cache, caches(eager)[key], rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", CACHED_FAST)
def test_mixed_precision_train_and_eval(name, dtype):
    """Under autocast (bf16-mixed / 16-mixed training) the layer runs in the activations' dtype while the
    stored cache stays float32; gradients are finite and close to the float32 ones."""
    model, x = build(name), images()
    reference = copy.deepcopy(model)
    torch.manual_seed(0)  # same stochastic-depth draws in both steps (Swin's default drop path is > 0)
    train_step(reference, x)
    model.train()
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
    assert out.dtype == dtype
    out.float().square().mean().backward()
    cached = caches(model)
    assert all(c.dtype == torch.float32 and c.abs().sum() > 0 for c in cached.values())
    for key, c in cached.items():  # the update is the float32 one to low-precision round-off
        torch.testing.assert_close(c, caches(reference)[key], rtol=0.1, atol=0.05)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        model(x)
    assert all(torch.equal(c, cached[k]) for k, c in caches(model).items())


def _reduced(name: str) -> dict:
    """64 x 64 inputs and one block per stage: every layer type of the model at a test's cost."""
    if name.startswith("swin"):
        return dict(img_size=64, window_size=4, embed_dim=48, depths=(1, 1, 1, 1))
    if name.startswith("vit"):
        return dict(img_size=64, depth=2)
    if name.startswith("pvt_v2") and not name.endswith("_grc"):
        return dict(depths=(1, 1, 1, 1))  # timm's PVTv2 takes any input size
    return dict(img_size=64, depths=(1, 1, 1, 1))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(MODEL_NAMES) | set(BASELINES.values())))
def test_every_model_and_baseline_under_fp16_and_bf16_autocast(name):
    """Every registered model and every baseline the paper compares with, at reduced depth: under fp16
    (16-mixed, what `precision: auto` picks on GPUs without bf16) and bf16 autocast the eval logits are the
    float32 ones to the dtype's rounding, and a training step is finite with float32 caches written."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **_reduced(name))
    x = images()
    train_step(model, x)  # float32 step: caches hold something for the comparison
    model.eval()
    with torch.no_grad():
        ref = model(x)
    for dtype, tol in ((torch.float16, 1e-2), (torch.bfloat16, 5e-2)):  # measured <= 1.7e-3 / 1.6e-2
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            out = model(x)
        assert out.dtype == dtype
        assert float((out.float() - ref).abs().max()) <= tol * float(ref.abs().max()), dtype
    model.train()
    for dtype in (torch.float16, torch.bfloat16):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype):
            out = model(x)
        assert bool(torch.isfinite(out).all())
        out.float().square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(bool(torch.isfinite(g).all()) for g in grads), dtype
        assert all(c.dtype == torch.float32 and c.abs().sum() > 0 for c in caches(model).values())


@pytest.mark.slow
def test_framework_compile_switch_makes_a_checkpointed_cached_model_one_graph():
    """compile.enabled with activation checkpointing: the training module sets Dynamo's switch itself."""
    from tasks.common.module import allow_cache_writes_under_checkpointing

    model, x = build("vit_small_patch16_224_grc"), images()
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=False):
        assert not allow_cache_writes_under_checkpointing(model)  # no checkpointing: nothing to change
        model.set_grad_checkpointing(True)
        torch._dynamo.reset()
        before = torch._dynamo.explain(lambda inp: copy.deepcopy(model).train()(inp).sum())(x)
        assert before.graph_break_count > 0  # Dynamo refuses the cache write inside a checkpointed block
        assert allow_cache_writes_under_checkpointing(model)
        assert torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint
        torch._dynamo.reset()
        after = torch._dynamo.explain(lambda inp: copy.deepcopy(model).train()(inp).sum())(x)
        assert after.graph_break_count == 0 and after.graph_count == 1
    baseline = timm.create_model("vit_small_patch16_224", img_size=64, depth=2)
    baseline.set_grad_checkpointing(True)
    assert not allow_cache_writes_under_checkpointing(baseline)  # no caches: Dynamo's default stays
