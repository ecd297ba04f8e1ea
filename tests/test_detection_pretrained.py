"""Detection backbone initialisation from an ImageNet classification checkpoint (``model.pretrained``)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch

import cached_transformers  # noqa: F401  (registers the models)
from tasks.common.errors import UserError
from tasks.detection.models import build_backbone

GRC = {"enabled": True, "preset": "reference", "ratio": 0.5, "sync": "mean"}


def _imagenet_ckpt(tmp_path: Path, name: str, **kwargs) -> tuple[Path, dict[str, torch.Tensor]]:
    """A Lightning checkpoint of an ImageNet run (keys ``model.*``), with non-zero GRC caches."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, img_size=64, **kwargs)
    sd = model.state_dict()
    for k, v in sd.items():
        if k.endswith(".cache"):
            v.normal_()
    path = tmp_path / f"{name}.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "global_step": 10}, path)
    return path, sd


def test_backbone_loads_classification_checkpoint_strictly_and_zeroes_caches(tmp_path: Path, caplog) -> None:
    path, source = _imagenet_ckpt(tmp_path, "pvt_tiny_grc", grc=GRC)
    with caplog.at_level(logging.INFO):
        net = build_backbone({"name": "pvt_tiny_grc", "img_size": 64, "pretrained": str(path)}, GRC)
    state = net.state_dict()
    caches = [k for k in state if k.endswith(".cache")]
    assert caches and all(float(state[k].abs().sum()) == 0 for k in caches)  # the paper's rule
    for k, v in state.items():
        if not k.endswith(".cache"):
            assert torch.equal(v, source[k.removeprefix("model.")]), k  # every backbone tensor from the file
    assert not any(k.startswith(("model.head", "model.norm", "model.cls_token")) for k in state)  # pruned
    # stage 4 without the class token (PVT's detection backbone): its caches hold the 2 x 2 grid's slots only
    assert state["model.block4.0.attn.cache"].shape[1] == 4 == source["block4.0.attn.cache"].shape[1] - 1
    assert "Detection backbone initialised from" in caplog.text and "caches zero in" in caplog.text


def test_cached_backbone_from_baseline_weights_is_logged(tmp_path: Path, caplog) -> None:
    path, source = _imagenet_ckpt(tmp_path, "pvt_tiny")
    with caplog.at_level(logging.INFO):
        net = build_backbone({"name": "pvt_tiny_grc", "img_size": 64, "pretrained": str(path)}, GRC)
    state = net.state_dict()
    key = "model.block1.0.attn.self_attn.q.weight"
    assert torch.equal(state[key], source["block1.0.attn.q.weight"])
    assert "GRC tensors" in caplog.text and "initialisation" in caplog.text


def test_mismatched_checkpoint_is_one_sentence_naming_the_file(tmp_path: Path) -> None:
    path, _ = _imagenet_ckpt(tmp_path, "pvt_tiny", embed_dims=(32, 64, 160, 256))  # another width
    with pytest.raises(UserError) as err:
        build_backbone({"name": "pvt_tiny", "img_size": 64, "pretrained": str(path)}, None)
    assert str(path) in str(err.value) or path.name in str(err.value)
    small, _ = _imagenet_ckpt(tmp_path, "pvt_small")  # deeper stages: extra blocks must not be dropped silently
    with pytest.raises(UserError, match=r"pvt_small\.ckpt does not fit pvt_tiny: 140 of its tensors are not in "
                                        r"the model .*Build the backbone from the model the file was saved from"):
        build_backbone({"name": "pvt_tiny", "img_size": 64, "pretrained": str(small)}, None)
    with pytest.raises(UserError, match="missing.ckpt"):
        build_backbone({"name": "pvt_tiny", "img_size": 64, "pretrained": str(tmp_path / "missing.ckpt")}, None)
