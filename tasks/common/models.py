"""Building timm models by name, with the GRC mapping passed only to ``*_grc`` models."""
from __future__ import annotations

import difflib
import logging
from typing import Any, Mapping

from torch import nn

from .errors import ConfigError

log = logging.getLogger(__name__)


def registered_models() -> list[str]:
    """Every model name timm knows after ``import cached_transformers`` (which registers the paper's)."""
    import timm

    import cached_transformers  # noqa: F401  (registers the GRC models with timm)

    return timm.list_models()


def create_model(name: str, *, num_classes: int, img_size: int | None = None,
                 grc: Mapping[str, Any] | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, num_classes=..., img_size=..., [grc=...], **kwargs)``.

    ``grc`` (a mapping, see ``cached_transformers.GRCConfig``) is passed only when ``name`` ends with
    ``_grc``, so a cached model and its baseline differ by the model name alone. ``img_size`` is
    dropped for models whose constructor has no such argument (timm's PVTv2 works at any size).
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
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        if "img_size" in kwargs and "img_size" in str(exc):
            kwargs.pop("img_size")
            log.info("model %s takes no img_size argument; building it without", name)
            return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
        raise
