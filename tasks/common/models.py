"""Building timm models by name, with the GRC mapping passed only to ``*_grc`` models, and
``model.pretrained`` (start from weights) for every task."""
from __future__ import annotations

import difflib
import logging
from typing import Any, Mapping

from torch import nn

from .errors import ConfigError, UserError

log = logging.getLogger(__name__)


def registered_models() -> list[str]:
    """Every model name timm knows after ``import cached_transformers`` (which registers the paper's)."""
    import timm

    import cached_transformers  # noqa: F401  (registers the GRC models with timm)

    return timm.list_models()


_PRETRAINED_OPTIONS = {"path", "ema", "drop_head", "strict", "reset_cache", "ignore", "weights_only"}


def load_pretrained(model: nn.Module, pretrained: str | Mapping[str, Any] | None) -> Any:
    """Apply ``model.pretrained`` to ``model`` with ``cached_transformers.load_pretrained``.

    ``pretrained``: None (nothing), a path, or a mapping ``{path: ..., ema: true, drop_head: null,
    strict: true, reset_cache: false, ignore: [], weights_only: true}`` (the library's options).
    Returns the library's report (None when nothing was loaded). Every problem with the file is a
    :class:`UserError` naming it.
    """
    from cached_transformers import CheckpointMismatchError
    from cached_transformers import load_pretrained as load

    if pretrained is None or pretrained == "":
        return None
    options = dict(pretrained) if isinstance(pretrained, Mapping) else {"path": pretrained}
    unknown = sorted(set(options) - _PRETRAINED_OPTIONS)
    if unknown or not options.get("path"):
        raise ConfigError(f"model.pretrained must be a path or a mapping with 'path' and any of "
                          f"{sorted(_PRETRAINED_OPTIONS - {'path'})}; got {dict(options)}.")
    path = str(options.pop("path"))
    if "ignore" in options:
        options["ignore"] = list(options["ignore"] or [])
    try:
        return load(model, path, **options)
    except (FileNotFoundError, CheckpointMismatchError) as exc:
        raise UserError(f"model.pretrained: {exc}") from exc


def create_model(name: str, *, num_classes: int, img_size: int | None = None,
                 grc: Mapping[str, Any] | None = None, pretrained: str | Mapping[str, Any] | None = None,
                 **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, num_classes=..., img_size=..., [grc=...], **kwargs)``.

    ``grc`` (a mapping, see ``cached_transformers.GRCConfig``) is passed only when ``name`` ends with
    ``_grc``, so a cached model and its baseline differ by the model name alone. ``img_size`` is
    dropped for models whose constructor has no such argument (timm's PVTv2 works at any size).
    ``pretrained`` (``model.pretrained``): weights to start from, see :func:`load_pretrained`.
    An unknown name raises :class:`ConfigError` listing close matches.
    """
    import timm

    names = registered_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ConfigError(f"Unknown model name '{name}': timm has no such model after "
                          f"`import cached_transformers`.{hint}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if name.endswith("_grc"):
        kwargs["grc"] = dict(grc) if grc is not None else None
    elif grc is not None:
        log.debug("model %s is not a *_grc model: the grc config is not used", name)
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        if not ("img_size" in kwargs and "img_size" in str(exc)):
            raise
        kwargs.pop("img_size")
        log.info("model %s takes no img_size argument; building it without", name)
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    load_pretrained(model, pretrained)
    return model
