"""Start a model from weights: this project's checkpoints, plain state_dicts, the official PVT releases.

:func:`load_pretrained` reads

* a Lightning ``.ckpt`` of this project's runs (``state_dict`` with keys prefixed ``model.``; the EMA
  weights ``ema_state_dict`` when the file has them and ``ema=True``),
* a plain state_dict (``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors``), also wrapped under ``model``,
  ``state_dict``, ``state_dict_ema`` or ``model_ema`` (timm / DeiT training scripts), with DDP's
  ``module.`` or ``torch.compile``'s ``_orig_mod.`` prefixes,
* the official PVT v1 release (whai362/PVT ``pvt_tiny.pth`` ...: the names of :mod:`.pvt`, bare or
  under ``model``) and the PVTv2 release (``pvt_v2_b2.pth`` ...: ``patch_embed1`` / ``block1.0`` /
  ``norm1`` names, mapped by timm's own ``pvt_v2.checkpoint_filter_fn``), Swin's original layout
  (timm's ``swin_transformer.checkpoint_filter_fn``), and the authors' released GRC code
  (:func:`cached_transformers.convert_reference_state_dict`),

and fits it to the model:

* baseline -> cached: a baseline's attention keys map onto the GRC layer's kept self branch
  (``blocks.0.attn.qkv.weight`` -> ``blocks.0.attn.self_attn.qkv.weight``); the tensors GRC adds
  (memory branch, gates, lambda, positional conv, the zero cache) stay at their initialisation, and one
  log line says how many. A file that holds *some* GRC tensors but not all (another GRC configuration)
  is an error, not a silent partial load;
* classifier heads whose class count differs (an ImageNet-22k or -1k head in a model for another
  class count, or a head the model does not have) are dropped and logged (``drop_head``);
* GRC caches and absolute position embeddings of another input size are resized (the steps of
  :func:`~cached_transformers.models.load_checkpoint`);
* a timm ``features_only`` model (detection backbones) takes the classification file as it is: its
  wrapper's ``model.`` prefix and flattened names (``stages_0``) are matched, the tensors of the parts
  it pruned (final norm, head, PVT v1's class token, stages after the last feature stage: top-level
  parts the feature model has no tensor of) are left out and logged. A file tensor inside a part the
  feature model keeps (e.g. the extra blocks of a deeper model's file) is an error like any other.

Anything else that does not fit raises :class:`CheckpointMismatchError` naming the file, the first
offending keys and what to do. :func:`grc_checkpoint_filter` is the same fitting step as a timm
``pretrained_filter_fn``, so ``timm.create_model("<x>_grc", pretrained=True,
pretrained_cfg_overlay=dict(file=BASELINE_FILE))`` starts a cached model from its baseline's file.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..convert import convert_reference_state_dict
from ..grc import grc_layers, reset_caches
from ._common import baseline_key_to_grc
from ._loading import CheckpointMismatchError, resize_caches, resize_pos_embeds

__all__ = ["CheckpointMismatchError", "PretrainedReport", "fit_state_dict", "grc_checkpoint_filter",
           "load_pretrained", "read_state_dict"]

log = logging.getLogger(__name__)

_EMA_ENTRIES = ("ema_state_dict", "state_dict_ema", "model_ema")  # this project, timm train.py, DeiT
_ENTRIES = ("state_dict", "model", "module")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile (not in place)
_SHOWN = 4  # offending keys named in an error


@dataclass
class PretrainedReport:
    """What :func:`load_pretrained` did. ``entry``: the file's entry used (``""``: a bare state_dict)."""

    source: str
    entry: str = ""
    layout: str = "this project's"
    loaded: list[str] = field(default_factory=list)
    grc_initialised: list[str] = field(default_factory=list)
    grc_layers_initialised: int = 0
    head_dropped: list[str] = field(default_factory=list)
    head_initialised: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # strict=False only: tensors that did not fit
    unused: list[str] = field(default_factory=list)  # tensors a features_only model does not have
    caches_reset: int = 0

    @property
    def ema(self) -> bool:
        return self.entry in _EMA_ENTRIES


def _is_state_dict(obj: Mapping) -> bool:
    return any(isinstance(v, torch.Tensor) for v in obj.values())


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _read_file(path: Path, weights_only: bool) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"Pretrained weights {path} do not exist; pass the path of a .ckpt, .pth, .pt, "
                                f".bin or .safetensors file.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # noqa: BLE001  (any reader error becomes one sentence)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        hint = (" If the file holds other Python objects (e.g. argparse.Namespace) and you trust it, pass "
                "weights_only=False." if weights_only and "weights_only" in str(exc) else "")
        raise CheckpointMismatchError(f"Pretrained weights {path} cannot be read ({type(exc).__name__}: {first})."
                                      f"{hint}") from exc


def _select(obj: Any, ema: bool, label: str) -> tuple[dict[str, torch.Tensor], str]:
    """The state_dict inside a checkpoint object, and the entry it came from."""
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"{label} holds a {type(obj).__name__}, not a state_dict or checkpoint dict; "
                                      f"save model.state_dict() instead of the model object.")
    if _is_state_dict(obj):
        return dict(obj), ""
    if ema:
        for key in _EMA_ENTRIES:
            if isinstance(obj.get(key), Mapping) and _is_state_dict(obj[key]):
                return dict(obj[key]), key
    for key in _ENTRIES:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            sd, sub = _select(inner, ema, label)
            return sd, f"{key}.{sub}" if sub else key
    raise CheckpointMismatchError(f"{label} holds no state_dict (entries: {sorted(map(str, obj))[:8]}); pass a "
                                  f"Lightning .ckpt, a state_dict or a file with one under 'model' or 'state_dict'.")


def read_state_dict(source: str | os.PathLike | Mapping[str, Any], *, ema: bool = True,
                    weights_only: bool = True) -> tuple[dict[str, torch.Tensor], str, str]:
    """``(state_dict, entry, label)`` from a path or an in-memory checkpoint (see :func:`load_pretrained`).

    Wrapper prefixes (``module.``, ``_orig_mod.``) are removed; a LightningModule's ``model.`` prefix too
    (in a Lightning checkpoint, keys outside ``model.`` belong to the LightningModule, not the model, and
    are left out).
    """
    if isinstance(source, Mapping):
        obj, label = source, "the given state_dict"
    else:
        path = Path(source).expanduser()
        obj, label = _read_file(path, weights_only), str(path)
    sd, entry = _select(obj, ema, label)
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for prefix in _WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    lightning = entry == "state_dict" and "pytorch-lightning_version" in obj
    if lightning or (sd and all(k.startswith("model.") for k in sd)):  # a LightningModule's state_dict
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    return sd, entry, label


def _family_filter(model: nn.Module) -> Callable | None:
    """timm's own converter from the original release layout, for the timm families that have one."""
    from timm.models import pvt_v2, swin_transformer

    if isinstance(model, pvt_v2.PyramidVisionTransformerV2):
        return pvt_v2.checkpoint_filter_fn
    if isinstance(model, swin_transformer.SwinTransformer):
        return swin_transformer.checkpoint_filter_fn
    return None


_FLAT = re.compile(r"^([A-Za-z_]\w*)\.(\d+)\.")  # timm's flatten_sequential feature nets: stages.0. -> stages_0.


def _wrapper_prefix(sd: Mapping[str, Any], model_keys: Mapping[str, Any]) -> str:
    """The prefix a wrapped model adds to every key (timm's ``FeatureGetterNet``: ``model.``), or ``""``."""
    if any(k in model_keys or baseline_key_to_grc(k) in model_keys for k in sd):
        return ""
    firsts = {k.split(".", 1)[0] for k in model_keys}
    if len(firsts) == 1:
        pre = firsts.pop() + "."
        if any(pre + k in model_keys or pre + baseline_key_to_grc(k) in model_keys for k in sd):
            return pre
    return ""


def _to_model_names(sd: dict[str, torch.Tensor], model_keys: Mapping[str, Any],
                    prefix: str = "") -> dict[str, torch.Tensor]:
    """Keys the model does not have -> the model's name for them, where it has one: baseline attention keys
    onto the GRC layer's self branch (``blocks.0.attn.qkv.weight`` -> ``blocks.0.attn.self_attn.qkv.weight``),
    a wrapper's ``prefix``, timm's flattened feature-net names (``stages.0.`` -> ``stages_0.``)."""
    out = {}
    for key, value in sd.items():
        if key not in model_keys:
            flat = _FLAT.sub(r"\1_\2.", key, count=1)
            for cand in (key, baseline_key_to_grc(key), flat, baseline_key_to_grc(flat)):
                if prefix + cand in model_keys:
                    key = prefix + cand
                    break
        out[key] = value
    return out


def _grc_added_keys(model: nn.Module, model_keys: Iterable[str]) -> tuple[set[str], int]:
    """Model keys of the tensors GRC adds (everything of a GRC layer but its kept ``self_attn``)."""
    prefixes = [f"{name}." if name else "" for name in grc_layers(model)]
    added = set()
    for key in model_keys:
        for pre in prefixes:
            if key.startswith(pre) and not key[len(pre):].startswith("self_attn."):
                added.add(key)
                break
    return added, len(prefixes)


def _is_feature_net(model: nn.Module) -> bool:
    """timm's ``features_only`` wrappers, which prune the parts after the last feature stage."""
    from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet

    return isinstance(model, (FeatureDictNet, FeatureGetterNet, FeatureHookNet))  # FeatureListNet: a FeatureDictNet


def _pruned_part(key: str, model_keys: Iterable[str], prefix: str) -> bool:
    """Whether ``key`` belongs to a top-level part a ``features_only`` model pruned (no tensor of it is left).

    ``head.weight``, ``norm.weight``, ``cls_token``, ``stages.3.*`` without ``stages_3``: pruned;
    ``block1.2.*`` (a deeper model's block) while the model has ``block1.0.*``: not pruned.
    """
    tops = {k[len(prefix):].split(".", 1)[0] for k in model_keys if k.startswith(prefix)}
    flat = _FLAT.sub(r"\1_\2.", key, count=1)
    return key.split(".", 1)[0] not in tops and flat.split(".", 1)[0] not in tops


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or "head"
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(dict.fromkeys((*names, "head")))


def _is_head(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _first(keys: Iterable[str]) -> str:
    keys = list(keys)
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def fit_state_dict(sd: Mapping[str, torch.Tensor], model: nn.Module, *, source: str = "the checkpoint",
                   base_filter: Callable | None = None, drop_head: bool | None = None, resize_cache: bool = True,
                   resize_pos_embed: bool = True, ignore: Iterable[str] = (), strict: bool = True,
                   ) -> tuple[dict[str, torch.Tensor], PretrainedReport]:
    """Fit ``sd`` to ``model``: a complete state_dict for ``model.load_state_dict(strict=True)``.

    Tensors the model keeps at initialisation (GRC parts missing from a baseline file, dropped heads)
    are filled in from the model itself. See :func:`load_pretrained` for the arguments.
    """
    report = PretrainedReport(source=source)
    own = model.state_dict()
    if any("attn_self_func." in k for k in sd):
        sd = convert_reference_state_dict(sd)
        report.layout = "the released GRC code's"
    prefix = _wrapper_prefix(sd, own)
    sd = _to_model_names(dict(sd), own, prefix)
    if base_filter is not None:
        before = set(sd)
        sd = _to_model_names(dict(base_filter(sd, model)), own, prefix)
        if set(sd) - before:
            report.layout = "the original release's"
    patterns = tuple(ignore)
    for key in [k for k in sd if any(fnmatch.fnmatchcase(k, p) for p in patterns)]:
        del sd[key]
        report.ignored.append(key)
    try:
        report.resized = resize_caches(sd, model, resize_cache) + resize_pos_embeds(sd, model, resize_pos_embed)
    except CheckpointMismatchError as exc:
        raise CheckpointMismatchError(f"{source}: {exc}") from exc

    heads = tuple(dict.fromkeys(p + h for h in _classifier_prefixes(model) for p in (prefix, "")))
    for key in [k for k in sd if _is_head(k, heads)]:
        fits = key in own and sd[key].shape == own[key].shape
        if drop_head or (drop_head is None and not fits):
            del sd[key]
            report.head_dropped.append(key)

    added, n_layers = _grc_added_keys(model, own)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    feature_net = _is_feature_net(model)
    if unexpected and feature_net:  # the classifier's final norm etc., pruned by features_only
        report.unused = [k for k in unexpected if _pruned_part(k, own, prefix)]
        for key in report.unused:
            del sd[key]
        unexpected = [k for k in unexpected if k not in report.unused]
    shapes = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    grc_missing = [k for k in missing if k in added]
    head_missing = [k for k in missing if _is_head(k, heads)]  # dropped, or a file without a head
    if grc_missing and len(grc_missing) < len(added):  # a cached checkpoint of another GRC configuration
        problems = [f"{len(grc_missing)} of the model's {len(added)} GRC tensors are missing from it "
                    f"(first: {_first(grc_missing)}) although it holds the others"]
        grc_missing = []
    else:
        problems = []
    kept = [k for k in missing if any(fnmatch.fnmatchcase(k, p) for p in patterns)]  # ignored: stay as they are
    other_missing = [k for k in missing if k not in grc_missing and k not in head_missing and k not in kept]
    if other_missing and not problems:
        problems.append(f"{len(other_missing)} model tensors are missing from it (first: {_first(other_missing)})")
    grc_file = not added and any(".self_attn." in k for k in unexpected)
    if grc_file:  # a cached model's file into a model without GRC
        problems = [f"it holds a cached (GRC) model's weights ({_first(k for k in unexpected if '.self_attn.' in k)})"]
        todo = "Load it into the cached model (the name ending in _grc) it was saved from"
    else:
        if unexpected:
            problems.append(f"{len(unexpected)} of its tensors are not in the model (first: {_first(unexpected)})")
        if shapes:
            shown = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in shapes]
            problems.append(f"{len(shapes)} tensors have another shape, file vs model (first: {_first(shown)})")
        todo = ("Build the backbone from the model the file was saved from (same model name and grc settings)"
                if feature_net else
                "Build the model the file was saved from (same model name, grc settings and class count)")
    if problems and strict:
        raise CheckpointMismatchError(
            f"{source} does not fit {_model_name(model)}: {'; '.join(problems)}. {todo}, or pass strict=False to load "
            f"only the tensors that fit.")
    if problems:
        log.warning("%s: loading only the tensors that fit %s: %s.", source, _model_name(model), "; ".join(problems))
        report.skipped = [*unexpected, *shapes]
        for key in report.skipped:
            del sd[key]
    report.loaded = [k for k in own if k in sd]
    report.grc_initialised = grc_missing
    report.head_initialised = head_missing
    report.grc_layers_initialised = n_layers if grc_missing else 0
    for key in missing:
        sd[key] = own[key]
    return sd, report


def _log(report: PretrainedReport, model: nn.Module) -> None:
    name = _model_name(model)
    entry = f" ({report.entry})" if report.entry else ""
    log.info("Loaded %d tensors of %s from %s%s in %s layout.", len(report.loaded), name, report.source, entry,
             report.layout)
    if report.grc_initialised:
        log.info("%s: %d GRC tensors of %d GRC layers are not in %s (a baseline checkpoint): they stay at their "
                 "initialisation, caches zero.", name, len(report.grc_initialised), report.grc_layers_initialised,
                 report.source)
    if report.head_dropped:
        why = ("the model's head stays at its initialisation" if report.head_initialised
               else "the model has no classifier")
        log.info("%s: the file's classifier %s dropped (another class count, or drop_head=True): %s.", name,
                 _first(report.head_dropped), why)
    elif report.head_initialised:
        log.info("%s: the file has no classifier %s: the head stays at its initialisation.", name,
                 _first(report.head_initialised))
    if report.resized:
        log.info("%s: resized to the model's input size (or a GRC cache's prefix-token slots dropped): %s.", name,
                 _first(report.resized))
    if report.ignored:
        log.info("%s: ignored as asked: %s.", name, _first(report.ignored))
    if report.unused:
        log.info("%s: %d tensors of the file are not used by the feature extractor (features_only): %s.", name,
                 len(report.unused), _first(report.unused))


def load_pretrained(model: nn.Module, source: str | os.PathLike | Mapping[str, Any], *, ema: bool = True,
                    drop_head: bool | None = None, resize_cache: bool = True, resize_pos_embed: bool = True,
                    reset_cache: bool = False, ignore: Iterable[str] = (), strict: bool = True,
                    weights_only: bool = True) -> PretrainedReport:
    """Load weights from ``source`` into ``model`` (in place) and return what was done.

    Args:
        model: the model (a timm model of this project, its baseline, or any ``nn.Module``).
        source: a path (``.ckpt``, ``.pth``, ``.pt``, ``.bin``, ``.safetensors``) or an in-memory
            checkpoint / state_dict. Layouts: see the module docstring.
        ema: use the file's EMA weights when it has them (``ema_state_dict``, ``state_dict_ema``,
            ``model_ema``); False: always the trained weights.
        drop_head: None: drop classifier tensors whose shape differs from the model's (another class
            count) or that the model lacks; True: always drop them (a new head on the same class
            count); False: never (a different head is an error).
        resize_cache, resize_pos_embed: resize GRC caches / resample absolute position embeddings of
            another input size (False: an error).
        reset_cache: zero every GRC cache after loading (the detection recipe).
        ignore: ``fnmatch`` patterns of keys to leave out (e.g. ``"cls_token"``): the file's are not loaded,
            the model's keep their values.
        strict: False loads only the tensors that fit (and logs the rest) instead of raising.
        weights_only: ``torch.load``'s safety switch; False only for files you trust.

    Returns:
        :class:`PretrainedReport`: tensors loaded, GRC tensors left at initialisation, heads dropped,
        tensors resized or ignored.

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        CheckpointMismatchError: the file cannot be read or does not fit the model (the message names
            the file, the first offending keys and what to do).
    """
    sd, entry, label = read_state_dict(source, ema=ema, weights_only=weights_only)
    sd, report = fit_state_dict(sd, model, source=label, base_filter=_family_filter(model), drop_head=drop_head,
                                resize_cache=resize_cache, resize_pos_embed=resize_pos_embed, ignore=ignore,
                                strict=strict)
    report.entry = entry
    model.load_state_dict(sd, strict=True)
    if reset_cache:
        report.caches_reset = reset_caches(model)
    _log(report, model)
    return report


def grc_checkpoint_filter(base_filter: Callable | None = None) -> Callable:
    """A timm ``pretrained_filter_fn`` that runs ``base_filter`` (the baseline's) and fits the result.

    With it, ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))`` loads a
    baseline's file into the cached model (GRC parts at init, logged), a file of the cached model
    itself, or a file with another head (kept at init); anything else raises
    :class:`CheckpointMismatchError`.
    """
    def filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
        sd, entry, _ = read_state_dict(state_dict)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        source = str(cfg.get("file") or cfg.get("url") or cfg.get("hf_hub_id") or "the pretrained weights")
        sd, report = fit_state_dict(sd, model, source=source, base_filter=base_filter)
        report.entry = entry
        _log(report, model)
        return sd

    return filter_fn
