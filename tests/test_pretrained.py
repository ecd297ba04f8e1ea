"""Starting from weights: ``cached_transformers.load_pretrained``, timm's ``pretrained=True`` path for every
cached family, and ``model.pretrained`` in the training framework (ImageNet and ListOps).

Files are written here: baselines by timm itself, Lightning checkpoints by short training runs, and the
official PVT v1 / PVTv2 release layouts by :func:`official_pvt_v1` / :func:`official_pvt_v2`, which spell
out the key names and shapes of whai362/PVT ``classification/pvt.py`` and ``pvt_v2.py``.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf

import cached_transformers as ct
from cached_transformers.models import BASELINES
from conftest import CONFIG_DIR, REPO, compose_config, tiny_overrides

LOGGER = "cached_transformers.models.pretrained"


# ---------------------------------------------------------------------- helpers
def grc_added(model: torch.nn.Module) -> set[str]:
    """Keys of the tensors GRC adds: everything of a GRC layer except its kept self branch."""
    out = set()
    for name in ct.grc_layers(model):
        for key in model.state_dict():
            if key.startswith(name + ".") and not key.startswith(name + ".self_attn."):
                out.add(key)
    return out


def as_cached_key(key: str) -> str:
    """The documented mapping: the baseline's ``.attn.`` tensors sit under ``.attn.self_attn.``."""
    return key.replace(".attn.", ".attn.self_attn.", 1)


def assert_started_from(cached: torch.nn.Module, baseline_sd: dict, at_init: torch.nn.Module,
                        skip_head: bool = False) -> None:
    """Every baseline tensor is in ``cached`` (mapped); every GRC tensor equals ``at_init``'s (same seed)."""
    own = cached.state_dict()
    shared = 0
    for key, value in baseline_sd.items():
        if skip_head and key.startswith("head"):
            continue
        target = key if key in own and ".attn." not in key else as_cached_key(key)
        if target not in own:  # non-persistent buffers saved by older timm versions
            continue
        assert torch.equal(own[target], value), target
        shared += 1
    assert shared > 0.9 * len(baseline_sd)
    init = at_init.state_dict()
    added = grc_added(cached)
    assert added
    for key in added:
        assert torch.equal(own[key], init[key]), key
    for layer in ct.grc_layers(cached).values():
        assert not layer.cache.any()


def official_pvt_v1(depths: tuple[int, ...], num_classes: int = 1000, img: int = 224) -> dict[str, torch.Tensor]:
    """A state_dict in the official PVT v1 release layout (whai362/PVT classification/pvt.py)."""
    dims, mlp, srs = (64, 128, 320, 512), (8, 8, 4, 4), (8, 4, 2, 1)
    g = torch.Generator().manual_seed(1)
    sd: dict[str, torch.Tensor] = {}

    def put(key: str, *shape: int) -> None:
        sd[key] = torch.randn(*shape, generator=g)

    in_ch, size = 3, img
    for i, d in enumerate(dims):
        p, s = 4 if i == 0 else 2, f"{i + 1}"
        put(f"patch_embed{s}.proj.weight", d, in_ch, p, p), put(f"patch_embed{s}.proj.bias", d)
        put(f"patch_embed{s}.norm.weight", d), put(f"patch_embed{s}.norm.bias", d)
        size //= p
        put(f"pos_embed{s}", 1, size * size + (1 if i == 3 else 0), d)
        for j in range(depths[i]):
            b, h = f"block{s}.{j}.", mlp[i] * d
            put(b + "norm1.weight", d), put(b + "norm1.bias", d)
            put(b + "attn.q.weight", d, d), put(b + "attn.q.bias", d)
            put(b + "attn.kv.weight", 2 * d, d), put(b + "attn.kv.bias", 2 * d)
            put(b + "attn.proj.weight", d, d), put(b + "attn.proj.bias", d)
            if srs[i] > 1:
                put(b + "attn.sr.weight", d, d, srs[i], srs[i]), put(b + "attn.sr.bias", d)
                put(b + "attn.norm.weight", d), put(b + "attn.norm.bias", d)
            put(b + "norm2.weight", d), put(b + "norm2.bias", d)
            put(b + "mlp.fc1.weight", h, d), put(b + "mlp.fc1.bias", h)
            put(b + "mlp.fc2.weight", d, h), put(b + "mlp.fc2.bias", d)
        in_ch = d
    put("norm.weight", 512), put("norm.bias", 512), put("cls_token", 1, 1, 512)
    put("head.weight", num_classes, 512), put("head.bias", num_classes)
    return sd


def official_pvt_v2(depths: tuple[int, ...], dims: tuple[int, ...], mlp: tuple[int, ...],
                    num_classes: int = 1000) -> dict[str, torch.Tensor]:
    """A state_dict in the official PVTv2 release layout (whai362/PVT classification/pvt_v2.py)."""
    srs = (8, 4, 2, 1)
    g = torch.Generator().manual_seed(2)
    sd: dict[str, torch.Tensor] = {}

    def put(key: str, *shape: int) -> None:
        sd[key] = torch.randn(*shape, generator=g)

    in_ch = 3
    for i, d in enumerate(dims):
        k, s = 7 if i == 0 else 3, f"{i + 1}"
        put(f"patch_embed{s}.proj.weight", d, in_ch, k, k), put(f"patch_embed{s}.proj.bias", d)
        put(f"patch_embed{s}.norm.weight", d), put(f"patch_embed{s}.norm.bias", d)
        for j in range(depths[i]):
            b, h = f"block{s}.{j}.", mlp[i] * d
            put(b + "norm1.weight", d), put(b + "norm1.bias", d)
            put(b + "attn.q.weight", d, d), put(b + "attn.q.bias", d)
            put(b + "attn.kv.weight", 2 * d, d), put(b + "attn.kv.bias", 2 * d)
            put(b + "attn.proj.weight", d, d), put(b + "attn.proj.bias", d)
            if srs[i] > 1:
                put(b + "attn.sr.weight", d, d, srs[i], srs[i]), put(b + "attn.sr.bias", d)
                put(b + "attn.norm.weight", d), put(b + "attn.norm.bias", d)
            put(b + "norm2.weight", d), put(b + "norm2.bias", d)
            put(b + "mlp.fc1.weight", h, d), put(b + "mlp.fc1.bias", h)
            put(b + "mlp.dwconv.dwconv.weight", h, 1, 3, 3), put(b + "mlp.dwconv.dwconv.bias", h)
            put(b + "mlp.fc2.weight", d, h), put(b + "mlp.fc2.bias", d)
        put(f"norm{s}.weight", d), put(f"norm{s}.bias", d)
        in_ch = d
    put("head.weight", num_classes, dims[3]), put("head.bias", num_classes)
    return sd


def assert_holds_every_tensor(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Every tensor of ``sd`` (distinct random values) is somewhere in ``model``: a mapping-free check."""
    own = list(model.state_dict().values())
    for key, value in sd.items():
        assert any(t.shape == value.shape and torch.equal(t, value) for t in own), key


# ---------------------------------------------------------------------- library: formats
def test_cached_pvt_from_official_pvt_v1_release(tmp_path, caplog):
    official = official_pvt_v1(depths=(2, 2, 2, 2))
    bare, wrapped = tmp_path / "pvt_tiny.pth", tmp_path / "checkpoint.pth"
    torch.save(official, bare)
    torch.save({"model": official, "epoch": 299}, wrapped)  # what the release's main.py writes

    base = timm.create_model("pvt_tiny")
    report = ct.load_pretrained(base, bare)
    assert sorted(report.loaded) == sorted(official) and not report.grc_initialised
    assert all(torch.equal(base.state_dict()[k], v) for k, v in official.items())

    torch.manual_seed(0)
    at_init = timm.create_model("pvt_tiny_grc")
    torch.manual_seed(0)
    cached = timm.create_model("pvt_tiny_grc")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        report = ct.load_pretrained(cached, wrapped)
    assert report.entry == "model"
    assert_started_from(cached, official, at_init)
    n = len(grc_added(cached))
    assert len(report.grc_initialised) == n
    lines = [r.getMessage() for r in caplog.records if "GRC tensors" in r.getMessage()]
    assert lines == [f"pvt_tiny_grc: {n} GRC tensors of 8 GRC layers are not in {wrapped} (a baseline checkpoint): "
                     f"they stay at their initialisation, caches zero."]


@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_v2_b0_grc"])
def test_official_pvt_v2_release(name, tmp_path):
    official = official_pvt_v2(depths=(2, 2, 2, 2), dims=(32, 64, 160, 256), mlp=(8, 8, 4, 4))
    path = tmp_path / "pvt_v2_b0.pth"
    torch.save(official, path)
    model = timm.create_model(name)
    report = ct.load_pretrained(model, path)
    assert report.layout == "the original release's" and len(report.loaded) == len(official)
    assert_holds_every_tensor(model, official)
    own = model.state_dict()
    prefix = "stages.0.blocks.0.attn." + ("self_attn." if name.endswith("_grc") else "")
    assert torch.equal(own[prefix + "q.weight"], official["block1.0.attn.q.weight"])
    assert torch.equal(own["stages.3.norm.weight"], official["norm4.weight"])
    assert bool(report.grc_initialised) == name.endswith("_grc")


def test_plain_state_dict_formats_and_wrappers(tmp_path):
    """.pth with DDP's ``module.`` prefix, .safetensors, and a trusted file holding other Python objects."""
    from safetensors.torch import save_file

    src = timm.create_model("pvt_v2_b0", num_classes=10)
    sd = src.state_dict()
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "ddp.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-3)}, tmp_path / "deit_style.pth")
    for file in ("ddp.pt", "w.safetensors"):
        model = timm.create_model("pvt_v2_b0", num_classes=10)
        ct.load_pretrained(model, tmp_path / file)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items()), file
    with pytest.raises(ct.CheckpointMismatchError, match="weights_only=False"):
        ct.load_pretrained(timm.create_model("pvt_v2_b0", num_classes=10), tmp_path / "deit_style.pth")
    model = timm.create_model("pvt_v2_b0", num_classes=10)
    ct.load_pretrained(model, tmp_path / "deit_style.pth", weights_only=False)
    assert torch.equal(model.head.weight, sd["head.weight"])


# ---------------------------------------------------------------------- library: heads and mismatches
def test_head_of_another_class_count_is_dropped(tmp_path, caplog):
    base = timm.create_model("vit_small_patch16_224", num_classes=1000)
    path = tmp_path / "vit_1k.pth"
    torch.save(base.state_dict(), path)
    torch.manual_seed(0)
    at_init = timm.create_model("vit_small_patch16_224_grc", num_classes=37)
    torch.manual_seed(0)
    cached = timm.create_model("vit_small_patch16_224_grc", num_classes=37)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        report = ct.load_pretrained(cached, path)
    assert report.head_dropped == ["head.weight", "head.bias"]
    assert torch.equal(cached.head.weight, at_init.head.weight)
    assert_started_from(cached, base.state_dict(), at_init, skip_head=True)
    assert any("classifier head.weight, head.bias dropped" in r.getMessage() for r in caplog.records)
    with pytest.raises(ct.CheckpointMismatchError, match=r"head.weight \(1000, 384\) vs \(37, 384\)"):
        ct.load_pretrained(timm.create_model("vit_small_patch16_224_grc", num_classes=37), path, drop_head=False)
    # the same class count with drop_head=True: a fresh head on a new label set
    model = timm.create_model("vit_small_patch16_224", num_classes=1000)
    fresh = model.head.weight.clone()
    assert ct.load_pretrained(model, path, drop_head=True).head_dropped == ["head.weight", "head.bias"]
    assert torch.equal(model.head.weight, fresh) and torch.equal(model.blocks[0].attn.qkv.weight,
                                                                 base.blocks[0].attn.qkv.weight)


def test_headless_files_and_models_ignore_and_reset_cache(tmp_path):
    headless = timm.create_model("pvt_v2_b0", num_classes=0)
    torch.save(headless.state_dict(), tmp_path / "headless.pth")
    model = timm.create_model("pvt_v2_b0", num_classes=10)
    fresh = model.head.weight.clone()
    report = ct.load_pretrained(model, tmp_path / "headless.pth")
    assert report.head_initialised == ["head.weight", "head.bias"] and torch.equal(model.head.weight, fresh)
    torch.save(model.state_dict(), tmp_path / "with_head.pth")
    backbone = timm.create_model("pvt_v2_b0", num_classes=0)  # e.g. a detection backbone
    assert ct.load_pretrained(backbone, tmp_path / "with_head.pth").head_dropped == ["head.weight", "head.bias"]
    cached = timm.create_model("pvt_v2_b0_grc", num_classes=10)
    for layer in ct.grc_layers(cached).values():
        layer.cache.fill_(1.0)
    torch.save(cached.state_dict(), tmp_path / "cached.pth")
    other = timm.create_model("pvt_v2_b0_grc", num_classes=10)
    norm = other.stages[3].norm.weight.clone()
    report = ct.load_pretrained(other, tmp_path / "cached.pth", reset_cache=True, ignore=["stages.3.norm.*"])
    assert report.caches_reset == 8 and report.ignored == ["stages.3.norm.weight", "stages.3.norm.bias"]
    assert all(not layer.cache.any() for layer in ct.grc_layers(other).values())
    assert torch.equal(other.stages[3].norm.weight, norm)
    assert torch.equal(other.head.weight, cached.head.weight)


def test_features_only_backbones(tmp_path, caplog):
    """Detection backbones: timm's ``features_only`` wrappers (``model.`` prefix, flattened stage names)."""
    base = timm.create_model("pvt_tiny", img_size=64)
    torch.save(base.state_dict(), tmp_path / "pvt_tiny.pth")
    getter = timm.create_model("pvt_tiny_grc", features_only=True, img_size=64)  # FeatureGetterNet
    with caplog.at_level(logging.INFO, logger=LOGGER):
        report = ct.load_pretrained(getter, tmp_path / "pvt_tiny.pth", reset_cache=True)
    assert torch.equal(getter.model.block1[0].attn.self_attn.q.weight, base.block1[0].attn.q.weight)
    assert len(report.grc_initialised) == 152
    assert report.head_dropped == ["head.weight", "head.bias"]
    assert report.unused == ["cls_token", "norm.weight", "norm.bias"]  # no class token in a feature extractor
    assert any("the model has no classifier" in r.getMessage() for r in caplog.records)
    assert any("not used by the feature extractor" in r.getMessage() for r in caplog.records)
    # a deeper model's file: its extra blocks are not "pruned by features_only", they do not fit
    torch.save(timm.create_model("pvt_small", img_size=64).state_dict(), tmp_path / "pvt_small.pth")
    tiny = timm.create_model("pvt_tiny", features_only=True, img_size=64)
    with pytest.raises(ct.CheckpointMismatchError, match=r"pvt_small\.pth does not fit pvt_tiny: 140 of its tensors "
                                                          r"are not in the model \(first: block1\.2\.norm1\.weight"):
        ct.load_pretrained(tiny, tmp_path / "pvt_small.pth")
    # a classification file of the cached model: stage 4's cache loses the class token's slot, nothing else
    cached = timm.create_model("pvt_tiny_grc", img_size=64)
    cached.block4[1].attn.cache.normal_()
    torch.save(cached.state_dict(), tmp_path / "pvt_tiny_grc.pth")
    getter = timm.create_model("pvt_tiny_grc", features_only=True, img_size=64)
    report = ct.load_pretrained(getter, tmp_path / "pvt_tiny_grc.pth")
    assert torch.equal(getter.model.block4[1].attn.cache, cached.block4[1].attn.cache[:, 1:])
    assert not report.grc_initialised and report.unused == ["cls_token", "norm.weight", "norm.bias"]
    base2 = timm.create_model("pvt_v2_b0")
    torch.save(base2.state_dict(), tmp_path / "pvt_v2_b0.pth")
    stages = timm.create_model("pvt_v2_b0_grc", features_only=True)  # FeatureListNet: stages_0, ...
    report = ct.load_pretrained(stages, tmp_path / "pvt_v2_b0.pth")
    assert torch.equal(stages.stages_3.blocks[1].attn.self_attn.kv.weight, base2.stages[3].blocks[1].attn.kv.weight)
    assert len(report.loaded) == len(base2.state_dict()) - 2 and report.grc_initialised
    # pruned stages are left out (stages_3 is not in a 3-stage feature net), a deeper file's blocks are not
    three = timm.create_model("pvt_v2_b0_grc", features_only=True, out_indices=(0, 1, 2))
    report = ct.load_pretrained(three, tmp_path / "pvt_v2_b0.pth")
    assert any(k.startswith("stages.3.") for k in report.unused)
    deeper = {k: v for k, v in base2.state_dict().items()}
    deeper.update({k.replace("blocks.1.", "blocks.2."): v for k, v in deeper.items() if ".blocks.1." in k})
    with pytest.raises(ct.CheckpointMismatchError, match=r"not in the model \(first: stages\.0\.blocks\.2\."):
        ct.load_pretrained(stages, deeper)


def test_swin_original_layout(tmp_path):
    """Microsoft's Swin release: patch merging at the end of a stage and ``head.`` (timm's filter maps it)."""
    import re

    sd = timm.create_model("swin_tiny_patch4_window7_224").state_dict()
    original = {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
                .replace("head.fc.", "head."): v for k, v in sd.items()}
    assert "layers.0.downsample.reduction.weight" in original and "head.weight" in original
    torch.save({"model": original}, tmp_path / "swin_tiny_patch4_window7_224.pth")
    model = timm.create_model("swin_tiny_patch4_window7_224_grc")
    report = ct.load_pretrained(model, tmp_path / "swin_tiny_patch4_window7_224.pth")
    assert report.layout == "the original release's" and report.grc_initialised
    own = model.state_dict()
    assert torch.equal(own["layers.1.downsample.reduction.weight"], original["layers.0.downsample.reduction.weight"])
    assert torch.equal(own["head.fc.weight"], original["head.weight"])
    assert torch.equal(own["layers.0.blocks.0.attn.self_attn.qkv.weight"], sd["layers.0.blocks.0.attn.qkv.weight"])


def test_mismatches_raise_one_clear_error(tmp_path):
    path = tmp_path / "pvt_tiny.pth"
    torch.save(timm.create_model("pvt_tiny", img_size=64).state_dict(), path)
    with pytest.raises(ct.CheckpointMismatchError) as err:
        ct.load_pretrained(timm.create_model("pvt_small", img_size=64), path)
    text = str(err.value)
    assert text.startswith(f"{path} does not fit pvt_small: ") and "block1.2.norm1.weight" in text
    assert "Build the model the file was saved from" in text and "\n" not in text
    # a cached model's file into a model without GRC, and into a cached model of another GRC configuration
    grc_path = tmp_path / "pvt_tiny_grc.pth"
    torch.save(timm.create_model("pvt_tiny_grc", img_size=64).state_dict(), grc_path)
    with pytest.raises(ct.CheckpointMismatchError, match=r"cached \(GRC\) model's weights .*_grc"):
        ct.load_pretrained(timm.create_model("pvt_tiny", img_size=64), grc_path)
    with pytest.raises(ct.CheckpointMismatchError, match="pos_conv.weight"):
        ct.load_pretrained(timm.create_model("pvt_tiny_grc", img_size=64, grc_pos_encoding="none"), grc_path)
    with pytest.raises(ct.CheckpointMismatchError, match=r"another GRC ratio \(r = 0.5\)"):
        ct.load_pretrained(timm.create_model("pvt_tiny_grc", img_size=64, grc_ratio=0.25), grc_path)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        ct.load_pretrained(timm.create_model("pvt_tiny"), tmp_path / "missing.pth")
    # strict=False loads what fits; another input size is resized (caches and position embeddings)
    report = ct.load_pretrained(timm.create_model("pvt_small", img_size=64), path, strict=False)
    assert "block1.0.attn.q.weight" in report.loaded and "block1.2.attn.q.weight" not in report.loaded
    report = ct.load_pretrained(timm.create_model("pvt_tiny_grc", img_size=32), grc_path)
    assert "block1.0.attn.cache" in report.resized and "pos_embed1" in report.resized


# ---------------------------------------------------------------------- timm's own pretrained path
_SLOW = pytest.mark.slow
TIMM_FAMILIES = [
    "vit_small_patch16_224_grc", "pvt_tiny_grc", "pvt_small_grc", pytest.param("pvt_medium_grc", marks=_SLOW),
    pytest.param("pvt_large_grc", marks=_SLOW), "pvt_v2_b0_grc", "pvt_v2_b1_grc", "pvt_v2_b2_grc",
    pytest.param("pvt_v2_b3_grc", marks=_SLOW), pytest.param("pvt_v2_b4_grc", marks=_SLOW),
    pytest.param("pvt_v2_b5_grc", marks=_SLOW), "swin_tiny_patch4_window7_224_grc",
]


def test_every_cached_family_is_covered():
    listed = {p if isinstance(p, str) else p.values[0] for p in TIMM_FAMILIES}
    assert listed == set(BASELINES)


@pytest.mark.parametrize("name", TIMM_FAMILIES)
def test_timm_pretrained_cfg_overlay_from_baseline_file(name, tmp_path, caplog):
    """``timm.create_model("<x>_grc", pretrained=True, pretrained_cfg_overlay=dict(file=BASELINE_FILE))``."""
    path = tmp_path / "baseline.pth"
    baseline_sd = timm.create_model(BASELINES[name]).state_dict()
    torch.save(baseline_sd, path)
    torch.manual_seed(0)
    at_init = timm.create_model(name)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        cached = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert_started_from(cached, baseline_sd, at_init)
    n, layers = len(grc_added(cached)), len(ct.grc_layers(cached))
    assert any(r.getMessage().startswith(f"{name}: {n} GRC tensors of {layers} GRC layers are not in {path}")
               for r in caplog.records)


def test_timm_path_drops_another_head_and_loads_cached_files(tmp_path):
    path = tmp_path / "swin_1k.pth"
    torch.save(timm.create_model("swin_tiny_patch4_window7_224").state_dict(), path)
    model = timm.create_model("swin_tiny_patch4_window7_224_grc", pretrained=True, num_classes=5,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert model.head.fc.weight.shape == (5, 768)
    cached_path = tmp_path / "swin_grc.pth"
    torch.save(model.state_dict(), cached_path)
    again = timm.create_model("swin_tiny_patch4_window7_224_grc", pretrained=True, num_classes=5,  # timm keeps a
                              pretrained_cfg_overlay=dict(file=str(cached_path), num_classes=5))  # head of cfg's count
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------- the training framework
def test_every_model_config_has_pretrained_null():
    def resolved(path: Path) -> dict:
        cfg = OmegaConf.to_container(OmegaConf.load(path))
        parent = next((d for d in cfg.pop("defaults", []) if isinstance(d, str) and d != "_self_"), None)
        return {**(resolved(path.parent / f"{parent}.yaml") if parent else {}), **cfg}

    files = sorted((CONFIG_DIR / "model").glob("*.yaml"))
    assert len(files) > 20
    for path in files:
        cfg = resolved(path)
        assert "pretrained" in cfg and cfg["pretrained"] is None, path.name


@pytest.fixture(scope="module")
def imagenet_ckpt(standin_root, tmp_path_factory) -> Path:
    """A real Lightning checkpoint of pvt_tiny (32 px, 10 classes) with EMA weights (decay 0.5)."""
    from tasks.common.runner import train

    out = tmp_path_factory.mktemp("pretrain")
    cfg = compose_config([*tiny_overrides(standin_root, out), "model=pvt_tiny", "task.ema.enabled=true",
                          "task.ema.decay=0.5"])
    result = train(cfg)
    return Path(result["run_dir"]) / "checkpoints" / "last.ckpt"


def test_lightning_checkpoint_with_and_without_ema(imagenet_ckpt):
    ckpt = torch.load(imagenet_ckpt, map_location="cpu", weights_only=True)
    ema, trained = ckpt["ema_state_dict"], {k[len("model."):]: v for k, v in ckpt["state_dict"].items()}
    assert any(not torch.equal(ema[k], trained[k]) for k in trained)
    for kwargs, want, entry in (({}, ema, "ema_state_dict"), ({"ema": False}, trained, "state_dict")):
        model = timm.create_model("pvt_tiny", img_size=32, num_classes=10)
        report = ct.load_pretrained(model, imagenet_ckpt, **kwargs)
        assert report.entry == entry
        assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items())
    del ckpt["ema_state_dict"]  # a run without EMA (in memory: a checkpoint dict works as a source too)
    model = timm.create_model("pvt_tiny", img_size=32, num_classes=10)
    assert ct.load_pretrained(model, ckpt).entry == "state_dict"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())


def test_framework_create_model_starts_cached_from_baseline_ckpt(imagenet_ckpt, standin_root, tmp_path):
    from tasks.classification import build_task
    from tasks.common.errors import UserError
    from tasks.common.models import create_model

    ema = torch.load(imagenet_ckpt, map_location="cpu", weights_only=True)["ema_state_dict"]
    overrides = [*tiny_overrides(standin_root, tmp_path), "model=pvt_tiny_grc"]
    torch.manual_seed(0)
    at_init, _ = build_task(compose_config(overrides))
    torch.manual_seed(0)
    module, _ = build_task(compose_config([*overrides, f"model.pretrained={imagenet_ckpt}"]))
    assert_started_from(module.model, ema, at_init.model)
    cfg = compose_config([*overrides, f"model.pretrained={{path: '{imagenet_ckpt}', ema: false}}"])
    assert OmegaConf.to_container(cfg.model.pretrained) == {"path": str(imagenet_ckpt), "ema": False}
    model = create_model("pvt_tiny_grc", num_classes=4, img_size=32, pretrained={"path": str(imagenet_ckpt)})
    assert torch.equal(model.block1[0].attn.self_attn.q.weight, ema["block1.0.attn.q.weight"])
    with pytest.raises(UserError, match=rf"^model.pretrained: {imagenet_ckpt} does not fit pvt_small: "):
        create_model("pvt_small", num_classes=10, img_size=32, pretrained=str(imagenet_ckpt))
    with pytest.raises(UserError, match="must be a path or a mapping"):
        create_model("pvt_tiny", num_classes=10, img_size=32, pretrained={"file": "x"})


@pytest.mark.slow
def test_train_cli_with_model_pretrained(imagenet_ckpt, standin_root, tmp_path):
    """``python train.py ... model=pvt_tiny_grc model.pretrained=PATH``; eval.py on its checkpoint needs no
    pretrained file any more."""
    from tasks.common.runner import evaluate

    start = tmp_path / "start.ckpt"
    start.write_bytes(imagenet_ckpt.read_bytes())
    out = tmp_path / "outputs"
    args = ["data=standin", f"data.root={standin_root}", "data.img_size=32", "data.batch_size=8",
            "data.num_workers=0", "trainer=cpu", "trainer.max_steps=1", "trainer.num_sanity_val_steps=0",
            "trainer.enable_progress_bar=false", f"paths.output_dir={out}", "model=pvt_tiny_grc",
            f"model.pretrained={start}"]
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert f"pvt_tiny_grc: 152 GRC tensors of 8 GRC layers are not in {start}" in text
    assert f"from {start} (ema_state_dict)" in text
    bad = subprocess.run([sys.executable, "train.py", *args, "model=pvt_small", "trainer.max_steps=0"], cwd=REPO,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert f"error: model.pretrained: {start} does not fit pvt_small: " in bad.stderr + bad.stdout
    ckpt = next(out.rglob("last.ckpt"))
    start.unlink()  # the fine-tuned run's checkpoint holds every weight
    cfg = compose_config([f"ckpt_path={ckpt}", "data=standin", f"data.root={standin_root}", "data.num_workers=0",
                          "trainer=cpu", "trainer.enable_progress_bar=false", f"paths.output_dir={out}"], "eval")
    assert "val/acc1" in evaluate(cfg, [f"ckpt_path={ckpt}", "data=standin"])["metrics"]


def test_listops_model_pretrained(tmp_path):
    """ListOps builds its models itself (tasks/lra): model.pretrained takes a checkpoint of the same task."""
    from tasks.common.errors import UserError
    from tasks.lra.module import build_model

    small = dict(attention="full", emb_dim=16, mlp_dim=32, num_heads=2, num_layers=2, dropout=0.1, attn_dropout=0.1)
    baseline = build_model({"name": "lra_transformer", **small}, None, max_length=32)
    path = tmp_path / "listops.ckpt"
    torch.save({"pytorch-lightning_version": "2", "state_dict": {f"model.{k}": v for k, v in
                                                                 baseline.state_dict().items()}}, path)
    same = build_model({"name": "lra_transformer", **small, "pretrained": str(path)}, None, max_length=32)
    assert all(torch.equal(same.state_dict()[k], v) for k, v in baseline.state_dict().items())
    torch.manual_seed(0)
    at_init = build_model({"name": "lra_transformer_grc", **small}, {}, max_length=32)
    torch.manual_seed(0)
    cached = build_model({"name": "lra_transformer_grc", **small, "pretrained": str(path)}, {}, max_length=32)
    assert_started_from(cached, baseline.state_dict(), at_init)
    with pytest.raises(UserError, match="does not fit LRAClassifier"):
        build_model({"name": "lra_transformer", **{**small, "num_layers": 3}, "pretrained": str(path)}, None, 32)
