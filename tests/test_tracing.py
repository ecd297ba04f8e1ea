"""Every registered model traces: timm's FX forward/backward (as timm's own test_model_forward_fx /
test_model_backward_fx do it, through torchvision's ``create_feature_extractor`` with timm's leaf modules
and wrapped functions) and ``torch.export`` in eval, at 64 x 64 px (the largest sizes with one block per
stage).

The GRC layer and the spatial-reduction attention are FX leaf modules (their grid handling depends on
shapes): a traced cached model still writes its caches in training and never in eval.
"""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models._features_fx import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import cached_transformers  # noqa: F401  (registers the models)
from cached_transformers import grc_layers
from cached_transformers.models import MODEL_NAMES

pytestmark = pytest.mark.slow
SWIN_SMALL = dict(window_size=4, embed_dim=48, depths=(2, 2, 2, 2))


# the larger sizes repeat the small ones' blocks: one block per stage keeps the test short
SHALLOW = {"pvt_medium", "pvt_large", "pvt_medium_grc", "pvt_large_grc", "pvt_v2_b3_grc", "pvt_v2_b4_grc",
           "pvt_v2_b5_grc"}


def build(name: str) -> torch.nn.Module:
    extra = SWIN_SMALL if name.startswith("swin") else dict(depths=(1, 1, 1, 1)) if name in SHALLOW else {}
    return timm.create_model(name, pretrained=False, num_classes=10, img_size=64, **extra)


def fx_model(model: torch.nn.Module, train: bool) -> torch.fx.GraphModule:
    """timm's ``_create_fx_model``: the last node of the train and eval graphs, timm's leaves and wraps."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    fx = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                  suppress_diff_warning=True, tracer_kwargs=tracer_kwargs)
    return fx.train(train)


def single(out):
    return next(iter(out.values())) if isinstance(out, dict) else out


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fx_forward_backward_and_export(name):
    torch.manual_seed(0)
    model = build(name).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        caches = {k: v.cache.clone() for k, v in grc_layers(model).items()}
        torch.testing.assert_close(single(fx_model(model, train=False)(x)), expected, rtol=1e-5, atol=1e-5)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), expected, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v.cache, caches[k]) for k, v in grc_layers(model).items())  # eval: no writes

    model.train()
    traced = fx_model(model, train=True)
    single(traced(x)).float().mean().backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert len(with_grad) == len(list(model.parameters())), "every parameter gets a gradient through FX"
    for k, layer in grc_layers(model).items():  # the traced training forward wrote every cache once
        assert not torch.equal(layer.cache, caches[k]), k
