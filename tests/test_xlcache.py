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
