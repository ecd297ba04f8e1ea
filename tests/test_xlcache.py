"""Table 2's Transformer-XL-style attention cache on the vision models."""
from __future__ import annotations

import pytest
import timm
import torch

import cached_transformers  # noqa: F401  (registers the models)
from cached_transformers.xlcache import add_xl_cache, xl_cache_layers

PAIRS = [("pvt_tiny_xlcache", "pvt_tiny"), ("vit_small_patch16_224_xlcache", "vit_small_patch16_224")]
SMALL = dict(num_classes=5, img_size=64)


@pytest.mark.parametrize("name,baseline", PAIRS)
def test_parameters_and_state_dict_are_the_baselines(name, baseline):
    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL)
    base = timm.create_model(baseline, **SMALL)
    assert [(k, v.shape) for k, v in model.named_parameters()] == [(k, v.shape) for k, v in base.named_parameters()]
    model.load_state_dict(base.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    model.eval(), base.eval()
    assert torch.allclose(model(x), base(x), atol=1e-5)  # empty cache: exactly the baseline
    model.train()
    model(x)
    assert model.state_dict().keys() == base.state_dict().keys()  # the cache is never saved


@pytest.mark.parametrize("name", [n for n, _ in PAIRS])
def test_cache_written_once_per_training_forward_never_in_eval_or_no_grad(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL)
    layers = xl_cache_layers(model)
    assert layers and all(layer.xl_k is None for layer in layers)
    x = torch.randn(3, 3, 64, 64)
    model.train()
    out = model(x)
    assert all(layer.cache_writes == 1 for layer in layers)
    first = [layer.xl_k.clone() for layer in layers]
    out.sum().backward()
    assert all(layer.cache_writes == 1 for layer in layers)
    assert all(not layer.xl_k.requires_grad for layer in layers)  # no gradient across steps
    with torch.no_grad():
        model(torch.randn(3, 3, 64, 64))
    model.eval()
    y1 = model(torch.randn(2, 3, 64, 64))  # a smaller batch reads the cache cyclically
    assert all(layer.cache_writes == 1 for layer in layers)
    assert all(torch.equal(layer.xl_k, f) for layer, f in zip(layers, first))
    assert y1.shape == (2, 5)


def test_the_cache_changes_the_output_and_holds_the_previous_batch():
    torch.manual_seed(0)
    model = timm.create_model("pvt_tiny_xlcache", **SMALL).train()
    a, b = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    model.eval()
    plain = model(b)
    model.train()
    model(a)
    model.eval()
    assert not torch.allclose(model(b), plain, atol=1e-6)
    stage1 = xl_cache_layers(model)[0]
    assert stage1.xl_k.shape[0] == 2 and stage1.xl_k.shape[2] == (64 // 4 // 8) ** 2  # PVT's reduced keys


def test_unsupported_attention_is_a_clear_error():
    with pytest.raises(TypeError, match="No XL attention cache for Linear"):
        add_xl_cache(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- traceable like the GRC models (issue 11)
def small(name: str, **kw) -> torch.nn.Module:
    extra = dict(depth=2) if name.startswith("vit") else {}
    return timm.create_model(name, **SMALL, **extra, **kw)


def xl_state(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t for layer in xl_cache_layers(model) for t in (layer.xl_k, layer.xl_v)]


def step(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, _ in PAIRS])
def test_no_graph_breaks_and_compiled_equals_eager(name):
    """Dynamo traces the XL-cache models as one graph in training (cache write included) and eval, and the
    compiled model (Dynamo + AOTAutograd) gives eager's outputs, caches and gradients, no write in eval."""
    import copy

    torch.manual_seed(0)
    eager = small(name)
    x = torch.randn(2, 3, 64, 64)
    probe = copy.deepcopy(eager)
    for training in (True, False):
        probe.train(training)
        probe.train()(x) if not training else None  # eval reads a filled cache
        probe.train(training)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(lambda inp: probe(inp).square().mean())(x)
        assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="aot_eager")
    for i in range(3):  # the first step runs without a cache, the later ones with the previous batch's
        xi = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(i))
        for model in (eager, compiled):
            step(model, xi)
        for a, b in zip(xl_state(compiled), xl_state(eager)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)
    before = [t.clone() for t in xl_state(compiled)]
    eager.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(xl_state(compiled), before))


@pytest.mark.parametrize("name", [n for n, _ in PAIRS])
def test_activation_checkpointing_recomputes_with_the_cache_its_forward_read(name):
    """A non-reentrant checkpoint recomputes each block inside backward: it must read the cache the forward
    read (not the one that forward wrote) and write nothing, so gradients equal the unchekpointed model's."""
    import copy

    torch.manual_seed(0)
    plain = small(name)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    for i in range(3):
        xi = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(i))
        for model in (plain, ckpt):
            step(model, xi)
        for a, b in zip(xl_state(ckpt), xl_state(plain)):
            torch.testing.assert_close(a, b)
        for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert all(layer.cache_writes == 3 for layer in xl_cache_layers(ckpt))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, _ in PAIRS])
def test_fx_forward_backward_and_export(name):
    """timm's FX feature path and torch.export, as tests/test_tracing.py runs them for the GRC models: the
    XL-cache attention is an FX leaf, so a traced model keeps the run-time cache rules."""
    from test_tracing import fx_model, single

    torch.manual_seed(0)
    model = small(name)
    x = torch.randn(2, 3, 64, 64)
    model.train()(torch.randn(2, 3, 64, 64))  # fill the caches
    model.eval()
    with torch.no_grad():
        expected = model(x)
        before = [t.clone() for t in xl_state(model)]
        torch.testing.assert_close(single(fx_model(model, train=False)(x)), expected, rtol=1e-5, atol=1e-5)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), expected, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(xl_state(model), before))  # eval: no writes
    traced = fx_model(model, train=True)
    single(traced(x)).float().mean().backward()
    assert all(p.grad is not None for p in model.parameters()), "every parameter gets a gradient through FX"
    assert all(not torch.equal(a, b) for a, b in zip(xl_state(model), before))  # the traced training forward wrote
