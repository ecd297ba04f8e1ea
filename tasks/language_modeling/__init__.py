"""Word-level language modelling on WikiText-103 (paper Table 5): stream data, Transformer-XL with its memory or GRC.

``build_task(cfg)`` is the entry point named by ``configs/task/wikitext103.yaml`` (``task.builder``).
Modules: ``data`` (corpus reader, vocabulary, stream batching into tracks, resumable loader),
``adaptive`` (adaptive input / softmax), ``models`` (Transformer-XL, GRC memory), ``module``
(LanguageModel: training with the memory carried, perplexity over whole streams), ``demo`` (a small
real-text corpus in WikiText layout). See docs/language_modeling.md.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["build_task"]


def build_task(cfg: Any, stage: str = "fit") -> tuple[Any, Any]:
    """The LightningModule and data module for a resolved run config (the data is read first: a wrong
    ``data.root`` fails with one clear message before the model is built)."""
    from omegaconf import OmegaConf

    from .data import WikiTextDataModule
    from .module import LanguageModel

    data: dict[str, Any] = OmegaConf.to_container(cfg.data, resolve=True)  # type: ignore[assignment]
    data.pop("demo", None)
    if cfg.data.get("demo"):
        from .demo import write_demo_corpus
        write_demo_corpus(data["root"])
    datamodule = WikiTextDataModule(seed=int(cfg.seed), **{k: v for k, v in data.items() if k != "seed"})
    datamodule.setup(stage)
    module = LanguageModel(OmegaConf.to_container(cfg, resolve=True), datamodule.vocab_size)  # type: ignore[arg-type]
    return module, datamodule
