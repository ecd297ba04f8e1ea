"""Machine translation (paper Table 7, WMT14): fairseq data-bin reader, token batching, pre-norm
encoder-decoder Transformer with an optionally cached (GRC) encoder, beam search, BLEU. See docs/translation.md.

Modules: ``dictionary`` (fairseq's dict.txt), ``indexed`` (mmap and TNTIDX .idx/.bin via numpy memmap),
``batching`` (fairseq's token batches, sharded, resumable), ``data`` (the data module), ``binarize``
(writing the data-bin layout), ``prepare`` (IWSLT/WMT preparation), ``demo`` / ``django_corpus`` (the demo
corpora), ``model`` (the Transformer, incremental decoding), ``generate`` (beam search, greedy),
``criterion`` (label-smoothed loss, inverse-sqrt schedule), ``bleu``, ``averaging`` (checkpoint
averaging), ``module`` (the LightningModule), ``benchmark``.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["build_task"]


def build_task(cfg: Any, stage: str = "fit") -> tuple[Any, Any]:
    """The LightningModule and data module of a resolved run config (``task.builder``).

    The data folder is opened and checked first (dictionaries and the splits the stage needs), so a
    wrong ``data.root`` fails with one clear message before the model is built.
    """
    from omegaconf import OmegaConf

    from .data import TranslationDataModule
    from .module import TranslationModule

    data: dict[str, Any] = OmegaConf.to_container(cfg.data, resolve=True)  # type: ignore[assignment]
    data.pop("seed", None)
    spec = data.pop("generate", None)
    if spec:
        from .demo import prepare_demo

        prepare_demo(data["root"], dict(spec), data["source_lang"], data["target_lang"])
    dm = TranslationDataModule(seed=int(cfg.seed), **data)
    dm.check("fit" if stage == "fit" else "validate")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    module = TranslationModule(resolved, dm.src_dict, dm.tgt_dict)  # type: ignore[arg-type]
    return module, dm
