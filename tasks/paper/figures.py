"""The paper's analysis figures from a checkpoint.

* :func:`plot_lambda` (paper Fig. 5): sigma(lambda) of every head of every GRC layer, read straight
  from the state_dict (every ``...lam`` tensor; no model is built), as a layers x heads heatmap
  next to the per-layer mean.
* :func:`plot_branches` (paper Fig. 4): the self-attention output o_self and the cached-attention
  output o_mem of one GRC layer for given images. The model is created with timm, the checkpoint's
  weights loaded, ``record_branches`` set on the chosen layer and one eval forward run; each map is
  the mean over all channels (heads and channels) per token, class tokens dropped, min-max
  normalised per image and laid out on the layer's token grid (14 x 14 for ViT-S at 224).

Checkpoints may be Lightning ``.ckpt`` files (weights under ``state_dict``, keys prefixed by the
LightningModule's attribute, e.g. ``model.``) or plain state_dicts.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

_PREFIXES = ("", "model.", "net.", "module.", "model.module.", "_orig_mod.", "model._orig_mod.", "backbone.")


class FigureError(ValueError):
    """A user-fixable problem with a figure request (wrong checkpoint, unknown layer, ...)."""


def load_checkpoint_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensor state_dict, hyper-parameters or {}) of a Lightning checkpoint or a plain state_dict."""
    path = Path(path)
    if not path.is_file():
        raise FigureError(f"Checkpoint {path} does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - Lightning hparams may hold objects weights_only refuses
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001
            raise FigureError(f"Cannot read checkpoint {path}: {type(err).__name__}: {err}") from None
    if not isinstance(obj, Mapping):
        raise FigureError(f"{path} holds a {type(obj).__name__}, not a checkpoint or state_dict.")
    hparams = dict(obj.get("hyper_parameters") or {}) if isinstance(obj.get("hyper_parameters"), Mapping) else {}
    sd: Any = obj
    for key in ("state_dict", "model", "state_dict_ema", "model_state"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            sd = inner
            break
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise FigureError(f"{path} contains no tensors.")
    return tensors, hparams


def _strip(name: str) -> str:
    for p in ("model.", "module.", "_orig_mod.", "net."):
        while name.startswith(p):
            name = name[len(p):]
    return name


def mixing_weights_from_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{GRC layer name: sigma(lambda) per head} from every ``...lam`` tensor, in state_dict order.

    EMA copies (keys containing ``ema``) are used only when the checkpoint has nothing else.
    """
    lam = {k: v for k, v in sd.items() if (k == "lam" or k.endswith(".lam")) and v.dim() <= 1}
    plain = {k: v for k, v in lam.items() if "ema" not in k.lower()}
    chosen = plain or lam
    out: dict[str, torch.Tensor] = {}
    for k, v in chosen.items():
        out[_strip(k[: -len(".lam")] if k.endswith(".lam") else "")] = torch.sigmoid(v.detach().float().reshape(-1))
    return out


def plot_lambda(ckpt: str | os.PathLike | Mapping[str, torch.Tensor], out: str | os.PathLike,
                title: str | None = None) -> dict[str, torch.Tensor]:
    """Paper Fig. 5: heatmap of sigma(lambda) (layers x heads) and the per-layer mean; writes ``out``.

    Layers with fewer heads than the widest (PVT stages have 1, 2, 5, 8) leave blank cells.
    Returns the mixing weights. Raises :class:`FigureError` for checkpoints without GRC layers.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sd = ckpt if isinstance(ckpt, Mapping) else load_checkpoint_file(ckpt)[0]
    weights = mixing_weights_from_state_dict(sd)
    if not weights:
        where = "" if isinstance(ckpt, Mapping) else f" {ckpt}"
        raise FigureError(f"No GRC mixing weights (`*.lam` tensors) in the checkpoint{where}: it is not a cached "
                          "(GRC) model. Use the checkpoint of a *_grc model.")
    names = list(weights)
    heads = max(w.numel() for w in weights.values())
    grid = np.full((len(names), heads), np.nan)
    for i, w in enumerate(weights.values()):
        grid[i, : w.numel()] = w.numpy()
    means = np.nanmean(grid, axis=1)

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, max(3.0, 0.32 * len(names) + 1.2)),
                                  gridspec_kw={"width_ratios": [max(2, heads), 4]})
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xticks(range(heads), [str(h) for h in range(heads)], fontsize=7)
    ax.set_xlabel("head")
    ax.set_title("σ(λ) per layer and head", fontsize=10)
    if len(names) * heads <= 200:
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax2.plot(means, range(len(names)), marker="o")
    ax2.axvline(0.5, color="grey", linestyle="--", linewidth=0.8)
    ax2.set_xlim(0, 1)
    ax2.set_ylim(len(names) - 0.5, -0.5)
    ax2.set_yticks(range(len(names)), [str(i) for i in range(len(names))], fontsize=7)
    ax2.set_xlabel("mean σ(λ) over heads")
    ax2.set_ylabel("layer index")
    ax2.set_title(f"{int((means > 0.5).sum())}/{len(names)} layers with mean σ(λ) > 0.5", fontsize=10)
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return weights


# ---------------------------------------------------------------------------------------- Fig. 4
def _find(hparams: Any, keys: Sequence[str]) -> Any:
    """First value under any of ``keys`` anywhere in a nested mapping (breadth first)."""
    queue = [hparams]
    while queue:
        node = queue.pop(0)
        if isinstance(node, Mapping):
            for k in keys:
                if k in node and node[k] is not None and not isinstance(node[k], Mapping):
                    return node[k]
            queue.extend(v for v in node.values() if isinstance(v, (Mapping, list, tuple)))
        elif isinstance(node, (list, tuple)):
            queue.extend(v for v in node if isinstance(v, (Mapping, list, tuple)))
    return None


def _model_state_dict(sd: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The part of ``sd`` that belongs to ``model``: the key prefix with the most matches is removed."""
    want = set(model.state_dict())
    best, best_hits = "", -1
    for p in _PREFIXES:
        hits = sum(1 for k in sd if k.startswith(p) and k[len(p):] in want)
        if hits > best_hits:
            best, best_hits = p, hits
    return {k[len(best):]: v for k, v in sd.items() if k.startswith(best) and "ema" not in k[: len(best) + 4].lower()}


def build_model_from_checkpoint(ckpt: str | os.PathLike, model_name: str | None = None, img_size: int | None = None,
                                grc: Mapping[str, Any] | None = None) -> tuple[torch.nn.Module, int]:
    """Create the model with timm and load the checkpoint's weights. Returns (model, img_size).

    ``model_name`` defaults to the checkpoint's ``cfg.model.name`` (this project's Lightning
    checkpoints store their config); ``num_classes`` comes from the checkpoint's head; ``img_size``
    and the GRC options from the arguments, else the checkpoint's hyper-parameters
    (``img_size``/``grc``), else 224 / the defaults; a cache length that does not fit the size is
    used to infer it.
    """
    import timm

    import cached_transformers  # noqa: F401  (registers the models with timm)
    from cached_transformers import grc_layers
    from cached_transformers.models import load_checkpoint

    sd, hparams = load_checkpoint_file(ckpt)
    if not any(k == "lam" or k.endswith(".lam") for k in sd):
        raise FigureError(f"{ckpt} has no GRC layers (no `*.lam` tensors): the branch maps need the checkpoint "
                          "of a cached (*_grc) model.")
    stored_model = _find_mapping(hparams, "model") or {}
    if model_name is None:
        model_name = stored_model.get("name")
        if not model_name:
            raise FigureError(f"{ckpt} does not say which model it holds: pass --model (e.g. vit_small_patch16_224_grc).")
    model_name = str(model_name)
    if not timm.is_model(model_name):
        raise FigureError(f"Unknown model {model_name!r}; cached models: "
                          f"{', '.join(n for n in timm.list_models('*_grc'))}.")
    head = [k for k, v in sd.items() if v.dim() == 2 and (k.endswith("head.weight") or k.endswith("head.fc.weight"))]
    kwargs: dict[str, Any] = {}
    if stored_model.get("name") == model_name:
        kwargs.update({k: v for k, v in dict(stored_model.get("kwargs") or {}).items() if v is not None})
    if head:
        kwargs["num_classes"] = int(sd[head[-1]].shape[0])
    size = img_size or _find(hparams, ("img_size", "image_size", "input_size")) or 224
    if isinstance(size, (list, tuple)):
        size = size[-1]
    size = int(size)
    grc_cfg = dict(grc) if grc is not None else None
    if grc_cfg is None:
        found = _find_mapping(hparams, "grc")
        grc_cfg = {k: v for k, v in found.items() if not isinstance(v, Mapping) and not str(k).startswith("_")} \
            if found else None
    if grc_cfg:
        kwargs["grc"] = grc_cfg
    model = _create(model_name, size, kwargs)
    if not grc_layers(model):
        raise FigureError(f"{model_name} has no GRC layers: pass the cached model's name (e.g. {model_name}_grc).")
    part = _model_state_dict(sd, model)
    if img_size is None:  # no size given: infer it from the first cache when the guess does not fit
        guess = _size_from_cache(model, part, size)
        if guess is not None and guess != size:
            size = guess
            model = _create(model_name, size, kwargs)
            part = _model_state_dict(sd, model)
    try:
        result = load_checkpoint(model, part, strict=False)
    except ValueError as err:
        raise FigureError(f"{err} (checkpoint {ckpt}; pass --img-size to build the model at the training size)") from None
    except RuntimeError as err:
        raise FigureError(f"The checkpoint {ckpt} does not fit {model_name}: {' '.join(str(err).split())[:300]} "
                          "(wrong --model, or another GRC ratio/preset: pass --grc ratio=...)") from None
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing:
        raise FigureError(f"The checkpoint {ckpt} does not fit {model_name}: {len(missing)} weights are missing, "
                          f"e.g. {missing[:3]} (wrong --model?).")
    return model.eval(), size


def _create(model_name: str, size: int, kwargs: dict[str, Any]) -> torch.nn.Module:
    import timm

    try:
        return timm.create_model(model_name, pretrained=False, img_size=size, **kwargs)
    except TypeError as err:
        if "img_size" in str(err):  # e.g. timm's PVTv2 works at any size and takes no img_size
            return timm.create_model(model_name, pretrained=False, **kwargs)
        raise FigureError(f"Cannot build {model_name} with {kwargs} at img_size {size}: {err}") from None


def _size_from_cache(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], size: int) -> int | None:
    """The input size whose token grid gives the checkpoint's first cache length (None if unknown)."""
    from cached_transformers import grc_layers

    for name, layer in grc_layers(model).items():
        saved = sd.get(f"{name}.cache")
        if saved is None or saved.dim() != 3:
            continue
        p = layer.num_prefix_tokens
        ratio = (saved.shape[1] - p) / max(1, layer.cache_len - p)
        new = size * math.sqrt(ratio) if ratio > 0 else 0
        return int(round(new)) if new >= 1 and abs(new - round(new)) < 1e-6 else None
    return None


def _find_mapping(hparams: Any, key: str) -> Mapping[str, Any] | None:
    queue = [hparams]
    while queue:
        node = queue.pop(0)
        if isinstance(node, Mapping):
            if isinstance(node.get(key), Mapping):
                return node[key]
            queue.extend(v for v in node.values() if isinstance(v, Mapping))
    return None


def select_layer(model: torch.nn.Module, layer: str | int = "middle") -> tuple[str, Any]:
    """(name, GRC layer): ``first``, ``middle`` (index n // 2), ``last``, an index or a module name."""
    from cached_transformers import grc_layers

    layers = list(grc_layers(model).items())
    if not layers:
        raise FigureError("The model has no GRC layers.")
    spec = str(layer)
    named = dict(layers)
    if spec in named:
        return spec, named[spec]
    index = {"first": 0, "middle": len(layers) // 2, "last": len(layers) - 1}.get(spec)
    if index is None:
        try:
            index = int(spec)
        except ValueError:
            raise FigureError(f"Unknown GRC layer {spec!r}: use first, middle, last, an index 0..{len(layers) - 1} "
                              f"or a name such as {layers[0][0]!r}.") from None
    if not -len(layers) <= index < len(layers):
        raise FigureError(f"GRC layer index {index} out of range 0..{len(layers) - 1}.")
    return layers[index]


def _grid(layer: Any, tokens: int) -> tuple[int, int]:
    if layer.cache_grid is not None and layer.cache_grid[0] * layer.cache_grid[1] == tokens:
        return tuple(layer.cache_grid)  # type: ignore[return-value]
    side = int(round(math.sqrt(tokens)))
    if side * side != tokens:
        raise FigureError(f"{tokens} tokens do not form a square grid; use a square input size.")
    return side, side


@torch.no_grad()
def branch_maps(model: torch.nn.Module, images: torch.Tensor, layer: str | int = "middle"
                ) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(layer name, o_self maps, o_mem maps) for ``images`` (B x 3 x S x S, normalised).

    Maps are B x h x w: mean over all channels per token, class tokens dropped, min-max normalised
    per image. The model is put in eval mode (the stored caches are not changed).
    """
    name, grc = select_layer(model, layer)
    model.eval()
    grc.record_branches = True
    try:
        model(images)
        if grc.last_branches is None:
            raise FigureError(f"GRC layer {name} did not run in the forward pass.")
        o_self, o_mem = grc.last_branches
    finally:
        grc.record_branches = False
        grc.last_branches = None
    maps = []
    p = grc.num_prefix_tokens
    for o in (o_self, o_mem):
        m = o[:, p:].float().mean(-1)                                   # B x N
        lo, hi = m.amin(1, keepdim=True), m.amax(1, keepdim=True)
        m = (m - lo) / (hi - lo).clamp_min(1e-12)
        maps.append(m.reshape(m.shape[0], *_grid(grc, m.shape[1])))
    return name, maps[0], maps[1]


def load_images(paths: Sequence[str | os.PathLike], model: torch.nn.Module, img_size: int) -> tuple[torch.Tensor, list]:
    """Images -> (normalised batch B x 3 x S x S, display crops as H x W x 3 floats in [0, 1])."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({"input_size": (3, img_size, img_size)}, model=model)
    tf = create_transform(**cfg, is_training=False)
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    batch, shown = [], []
    for p in paths:
        try:
            img = Image.open(p).convert("RGB")
        except (OSError, ValueError) as err:
            raise FigureError(f"Cannot read image {p}: {err}") from None
        x = tf(img)
        batch.append(x)
        shown.append((x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())
    if not batch:
        raise FigureError("Give at least one image (--images a.jpg b.jpg).")
    return torch.stack(batch), shown


def plot_branches(ckpt: str | os.PathLike, model_name: str | None, images: Sequence[str | os.PathLike],
                  out: str | os.PathLike, layer: str | int = "middle", img_size: int | None = None,
                  grc: Mapping[str, Any] | None = None, title: str | None = None) -> str:
    """Paper Fig. 4: one row per image with image | o_self | o_mem. Returns the layer's name."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, size = build_model_from_checkpoint(ckpt, model_name, img_size=img_size, grc=grc)
    batch, shown = load_images(images, model, size)
    name, o_self, o_mem = branch_maps(model, batch, layer)
    model_name = model_name or (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    n = len(shown)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.6 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(shown[i])
        axes[i, 1].imshow(o_self[i].numpy(), cmap="jet", vmin=0, vmax=1, interpolation="nearest")
        axes[i, 2].imshow(o_mem[i].numpy(), cmap="jet", vmin=0, vmax=1, interpolation="nearest")
        axes[i, 0].set_ylabel(Path(images[i]).name, fontsize=7)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    h, w = o_self.shape[1:]
    axes[0, 0].set_title("image", fontsize=9)
    axes[0, 1].set_title(f"o_self ({h}x{w})", fontsize=9)
    axes[0, 2].set_title(f"o_mem ({h}x{w})", fontsize=9)
    fig.suptitle(title or f"{model_name}: GRC layer {name}", fontsize=10)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return name
