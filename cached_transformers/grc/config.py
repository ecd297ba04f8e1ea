"""Configuration of a Gated Recurrent Cache (GRC) layer: presets and one switch per paper deviation.

The ``reference`` preset reproduces the authors' released module bit for bit (method.md section 1);
the ``paper`` preset follows the paper's text. Every row of method.md section 2 that changes what is
computed is one independent field below, so any mix can be studied:

============  =====================  ===================  ====================================
row           field                  reference            paper
============  =====================  ===================  ====================================
1 lambda      ``lambda_init``        -1.0                 0.0
2 candidate   ``candidate``          ``"ln_gelu"``        ``"linear"``
3 biases      ``gate_bias``          True                 False
4 concat      ``concat_order``       ``"cache_first"``    ``"input_first"``
5 update X    ``update_source``      ``"self_output"``    ``"input"``
6 mem query   ``mem_query``          ``"input"``          ``"update_source"``
7 resize      ``resize``             ``"nearest"``        ``"linear"``
8 mem K/V     ``mem_kv``             ``"per_sample"``     ``"batch_mean"``
9 padding     ``padding``            ``"ignore"``         ``"valid"``
10 position   ``pos_encoding``       ``"conv"``           ``"conv"`` (text gives no other form)
11 PVT mem    ``mem_reduce``         True                 False
============  =====================  ===================  ====================================

Row 9: the released module has no mask at all, so with no ``key_padding_mask`` both settings compute
the same thing; with a mask, ``"valid"`` builds the summary from each sample's valid tokens only and
``"ignore"`` resizes the whole padded sequence as the released module would. Because padded batches
only exist in the language tasks, those tasks pass ``padding="valid"`` (method.md section 3).

Fields that are not deviations: ``ratio`` (r, D_m = r * D), ``sync`` (how the stored cache is kept
equal across processes: ``"mean"`` averages it once per optimisation step in ``sync_caches``,
``"none"`` keeps per-rank caches), ``causal`` (language modelling: the memory branch reads the cache
of the previous step, GRC(C_{t-2}, previous batch-mean summary), computed in the current graph so the gates learn by one-step
truncated BPTT; no position sees its own batch; see ``layer.py``) and ``enabled`` (False
builds the plain baseline, parameter for parameter).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

PRESETS: dict[str, dict[str, Any]] = {
    "reference": dict(
        lambda_init=-1.0, candidate="ln_gelu", gate_bias=True, concat_order="cache_first",
        update_source="self_output", mem_query="input", resize="nearest", mem_kv="per_sample",
        padding="ignore", pos_encoding="conv", mem_reduce=True,
    ),
    "paper": dict(
        lambda_init=0.0, candidate="linear", gate_bias=False, concat_order="input_first",
        update_source="input", mem_query="update_source", resize="linear", mem_kv="batch_mean",
        padding="valid", pos_encoding="conv", mem_reduce=False,
    ),
}

_CHOICES: dict[str, tuple[Any, ...]] = {
    "candidate": ("ln_gelu", "linear"),
    "concat_order": ("cache_first", "input_first"),
    "update_source": ("self_output", "input"),
    "mem_query": ("input", "update_source"),
    "resize": ("nearest", "linear"),
    "mem_kv": ("per_sample", "batch_mean"),
    "padding": ("ignore", "valid"),
    "pos_encoding": ("conv", "none"),
    "sync": ("mean", "none"),
}


@dataclass
class GRCConfig:
    """All options of one GRC layer. Build with :meth:`make` to apply a preset and overrides."""

    enabled: bool = True
    ratio: float = 0.5
    preset: str = "reference"
    sync: str = "mean"
    causal: bool = False
    # one switch per row of method.md section 2 (defaults = the reference preset)
    lambda_init: float = -1.0
    candidate: str = "ln_gelu"
    gate_bias: bool = True
    concat_order: str = "cache_first"
    update_source: str = "self_output"
    mem_query: str = "input"
    resize: str = "nearest"
    mem_kv: str = "per_sample"
    padding: str = "ignore"
    pos_encoding: str = "conv"
    mem_reduce: bool = True
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"GRC option {name}={value!r} is not valid; choose one of {list(choices)}.")
        if not 0.0 < float(self.ratio) <= 1.0:
            raise ValueError(f"GRC ratio must be in (0, 1], got {self.ratio}; use enabled=False for no cache.")

    @classmethod
    def make(cls, config: "GRCConfig | Mapping[str, Any] | None" = None, **overrides: Any) -> "GRCConfig":
        """Build a config: preset values first, then ``config`` (mapping or GRCConfig), then overrides.

        Keys may carry a ``grc_`` prefix (``grc_ratio=0.25``), which is how model constructors
        receive them. ``None`` values are ignored so Hydra configs can leave fields unset.
        """
        values: dict[str, Any] = {}
        if isinstance(config, GRCConfig):
            # keep only what differs from the config's own preset, so a preset override still applies
            base = PRESETS[config.preset]
            values.update({f.name: getattr(config, f.name) for f in fields(cls)
                           if f.name != "extra" and getattr(config, f.name) != base.get(f.name, f.default)})
            values["preset"] = config.preset
        elif config is not None:
            values.update(dict(config))
        values.update(overrides)
        values = {k[4:] if k.startswith("grc_") else k: v for k, v in values.items() if v is not None}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"Unknown GRC option(s) {unknown}; valid options are {sorted(known - {'extra'})}.")
        preset = values.get("preset", "reference")
        if preset not in PRESETS:
            raise ValueError(f"Unknown GRC preset {preset!r}; choose one of {sorted(PRESETS)}.")
        merged = dict(PRESETS[preset])
        merged.update(values)
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("extra")
        return out


def optional_grc_config(grc: Any, defaults: Mapping[str, Any]) -> GRCConfig | None:
    """``grc`` (None / bool / mapping / GRCConfig) -> a :class:`GRCConfig` over ``defaults``, or None when
    GRC is off (None, False, ``enabled: false``). A mapping's ``None`` values keep the defaults; a
    GRCConfig is taken as it is. Used by hosts that carry their own defaults (the sequence tasks)."""
    if grc is None or grc is False:
        return None
    if isinstance(grc, GRCConfig):
        return grc if grc.enabled else None
    values = dict(defaults)
    if isinstance(grc, Mapping):
        values.update({k: v for k, v in grc.items() if v is not None})
    if not values.pop("enabled", True):
        return None
    return GRCConfig.make(**values)


def split_grc_kwargs(kwargs: dict[str, Any]) -> tuple[GRCConfig, dict[str, Any]]:
    """Pop GRC options from model keyword arguments.

    Accepts ``grc=<GRCConfig | mapping | bool>`` and flat ``grc_<field>=value`` keywords. Returns the
    config and the remaining keyword arguments for the host model.
    """
    grc = kwargs.pop("grc", None)
    flat = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("grc_")}
    if grc is False:
        grc = {"enabled": False}
    elif grc is True:
        grc = None
    return GRCConfig.make(grc, **flat), kwargs
