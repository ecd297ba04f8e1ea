"""The translation LightningModule: fairseq's loss and optimiser, validation loss + ``val/bleu_tok``,
beam-search test with ``test/bleu_tok`` and ``test/sacrebleu``.

Metrics: ``train/loss`` and ``train/nll_loss`` (nats per target token), ``train/lr``, ``val/loss``,
``val/nll_loss``, ``val/ppl``, ``val/bleu_tok`` (greedy or beam on the first ``task.valid_bleu.sentences``
pairs of the valid split, BPE removed, tokenized BLEU), ``test/bleu_tok``, ``test/sacrebleu`` (beam search,
``task.generation``). The test writes ``generate-<split>.txt`` (fairseq's S/T/H/D lines, by pair id) to
the trainer's root directory and logs the sacreBLEU signature.

Loss normalisation: each micro-batch's summed loss is divided by its own number of target tokens;
fairseq divides the sum over all GPUs and accumulated batches by their total token count (a
different weighting of batches of unequal size; documented in docs/translation.md).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only

from tasks.common.errors import ConfigError
from tasks.common.models import load_pretrained
from tasks.common.module import TaskModule

from .bleu import bleu_tok, sacrebleu_detok
from .dictionary import Dictionary
from .generate import beam_search, greedy
from .model import TransformerModel

log = logging.getLogger(__name__)

MODEL_KEYS = {"embed_dim", "ffn_dim", "heads", "encoder_layers", "decoder_layers", "dropout", "attention_dropout",
              "activation_dropout", "max_positions", "share_decoder_input_output_embed", "share_all_embeddings",
              "cache_len"}


def build_model(model_cfg: dict[str, Any], grc_cfg: dict[str, Any] | None, src_vocab: int,
                tgt_vocab: int) -> TransformerModel:
    """The model of ``model_cfg``; ``model.pretrained`` (a translation checkpoint of this project or a
    state_dict with the same dictionaries) is loaded with :func:`tasks.common.models.load_pretrained`."""
    cfg = dict(model_cfg)
    name = str(cfg.pop("name", ""))
    pretrained = cfg.pop("pretrained", None)  # model.pretrained: weights to start from
    unknown = sorted(set(cfg) - MODEL_KEYS)
    if unknown:
        raise ConfigError(f"Unknown translation model option(s) {unknown} in model '{name}'; "
                          f"valid: {sorted(MODEL_KEYS)}.")
    grc = dict(grc_cfg or {}) if name.endswith("_grc") else None
    if grc is not None:
        grc.setdefault("enabled", True)
    model = TransformerModel(src_vocab, tgt_vocab, grc=grc, **cfg)
    load_pretrained(model, pretrained)
    return model


def _gather(obj: Any, trainer: Any) -> list[Any]:
    if trainer is None or trainer.world_size <= 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(out, obj)
    return out


class TranslationModule(TaskModule):
    """``cfg``: the resolved run config; ``src_dict``/``tgt_dict``: the data folder's dictionaries."""

    def __init__(self, cfg: dict[str, Any], src_dict: Dictionary, tgt_dict: Dictionary):
        super().__init__(cfg)
        self.src_dict, self.tgt_dict = src_dict, tgt_dict
        self.model = build_model(cfg["model"], cfg.get("grc"), len(src_dict), len(tgt_dict))
        self.eps = float(self.task_cfg.get("label_smoothing", 0.1))
        self.target_lang = str(cfg["data"].get("target_lang", "en"))
        self._val: dict[str, Any] = {}
        self._test: list[tuple[int, str, str, str, float]] = []

    def forward(self, src_tokens: torch.Tensor, prev_output_tokens: torch.Tensor) -> torch.Tensor:
        return self.model(src_tokens, prev_output_tokens)

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(label-smoothed loss, nll), both summed over the batch's target tokens."""
        from .criterion import label_smoothed_nll_loss

        logits = self(batch["src_tokens"], batch["prev_output_tokens"])
        lprobs = F.log_softmax(logits.float(), dim=-1)
        return label_smoothed_nll_loss(lprobs, batch["target"], self.eps)

    # ------------------------------------------------------------------ optimiser (every parameter decays)
    def total_batch_size(self) -> int:
        return int(self.cfg["data"]["max_tokens"]) * self.trainer.world_size * int(self.trainer.accumulate_grad_batches)

    def configure_optimizers(self) -> Any:
        opt_cfg = dict(self.task_cfg["optimizer"])
        lr = float(opt_cfg.pop("lr"))
        optimizer = instantiate(opt_cfg, _convert_="all")(self.model.parameters(), lr=lr)
        self.lr_info = {"lr": lr, "max_tokens_per_update": self.total_batch_size()}
        sched = dict(self.task_cfg.get("scheduler") or {})
        if not sched:
            return optimizer
        scheduler = instantiate(sched, _convert_="all")(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, nll = self.loss(batch)
        n = max(int(batch["ntokens"]), 1)
        loss, nll = loss / n, nll / n
        self.check_finite(loss)
        if batch.get("dummy"):
            loss = loss * 0.0  # a padding batch of a rank with one batch fewer (fairseq's empty batch)
        bs = int(batch["target"].shape[0])
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=bs)
        self.log("train/nll_loss", nll, on_step=True, on_epoch=False, batch_size=bs)
        self.log("train/lr", self.current_lr(), on_step=True, on_epoch=False, batch_size=bs)
        return loss

    # ------------------------------------------------------------------ text
    def hypothesis_text(self, ids: list[int]) -> str:
        return self.tgt_dict.string(ids)

    def reference_text(self, target: torch.Tensor) -> str:
        return self.tgt_dict.string(target.tolist(), unk="<<unk>>")

    def _decode(self, src: torch.Tensor, settings: dict[str, Any],
                model: TransformerModel | None = None) -> list[tuple[list[int], float]]:
        model = self.model if model is None else model
        if int(settings.get("beam", 5)) <= 1 and settings.get("greedy", True):
            return [(h, float("nan")) for h in greedy(model, src, float(settings.get("max_len_a", 1.2)),
                                                       int(settings.get("max_len_b", 10)),
                                                       int(settings.get("min_len", 1)))]
        out = beam_search(model, src, beam=int(settings.get("beam", 5)),
                          max_len_a=float(settings.get("max_len_a", 0.0)),
                          max_len_b=int(settings.get("max_len_b", 200)),
                          min_len=int(settings.get("min_len", 1)), lenpen=float(settings.get("lenpen", 1.0)))
        return [(h[0].tokens, h[0].score) for h in out]

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val = {"loss": 0.0, "nll": 0.0, "ntokens": 0, "hyps": [], "refs": []}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, nll = self.loss(batch)
        v = self._val
        v["loss"] += float(loss)
        v["nll"] += float(nll)
        v["ntokens"] += int(batch["ntokens"])
        vb = dict(self.task_cfg.get("valid_bleu") or {})
        if not vb.get("enabled", True):
            return
        limit = vb.get("sentences")
        keep = torch.ones_like(batch["id"], dtype=torch.bool) if limit is None else batch["id"] < int(limit)
        if not bool(keep.any()):
            return
        hyps = self._decode(batch["src_tokens"][keep], vb)
        for (ids, _), tgt in zip(hyps, batch["target"][keep]):
            v["hyps"].append(self.hypothesis_text(ids))
            v["refs"].append(self.reference_text(tgt))

    def on_validation_epoch_end(self) -> None:
        parts = _gather(self._val, self.trainer if self._trainer is not None else None)
        ntok = max(sum(p["ntokens"] for p in parts), 1)
        loss = sum(p["loss"] for p in parts) / ntok
        nll = sum(p["nll"] for p in parts) / ntok
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/nll_loss", nll, sync_dist=False)
        self.log("val/ppl", math.exp(min(nll, 50.0)), sync_dist=False)
        hyps = [h for p in parts for h in p["hyps"]]
        if hyps:
            refs = [r for p in parts for r in p["refs"]]
            self.log("val/bleu_tok", bleu_tok(hyps, refs), prog_bar=True, sync_dist=False)

    # ------------------------------------------------------------------ test (beam search)
    def on_test_epoch_start(self) -> None:
        self._test = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._test.extend(self.generate_rows(batch))

    def generate_rows(self, batch: dict[str, Any], model: TransformerModel | None = None) -> list[tuple]:
        """Beam search (``task.generation``) on one batch -> (id, source, reference, hypothesis, score) rows."""
        gen = dict(self.task_cfg.get("generation") or {})
        out = self._decode(batch["src_tokens"], {**gen, "greedy": False}, model)
        return [(i, self.src_dict.string(src.tolist()), self.reference_text(tgt), self.hypothesis_text(ids), score)
                for i, (ids, score), src, tgt in zip(batch["id"].tolist(), out, batch["src_tokens"], batch["target"])]

    def score_rows(self, rows: list[tuple]) -> tuple[list[tuple], float, float, str]:
        rows = sorted((r for part in _gather(rows, self.trainer) for r in part), key=lambda r: r[0])
        hyps, refs = [r[3] for r in rows], [r[2] for r in rows]
        detok, signature = sacrebleu_detok(hyps, refs, self.target_lang)
        return rows, bleu_tok(hyps, refs), detok, signature

    def on_test_epoch_end(self) -> None:
        rows, tok, detok, signature = self.score_rows(self._test)
        self.log("test/bleu_tok", tok, sync_dist=False)
        self.log("test/sacrebleu", detok, sync_dist=False)
        self._write_hypotheses(rows, tok, detok, signature, Path(self.trainer.default_root_dir))

    # ------------------------------------------------------------------ test at the end of training
    def on_train_end(self) -> None:
        """``task.test_at_end``: average the newest ``average_last`` epoch checkpoints (the paper's last-10
        averaging; GRC caches from the newest), beam-search the test split and log ``test/bleu_tok`` and
        ``test/sacrebleu`` into the run's metrics, so scripts/compare.py reads them from the run directory."""
        cfg = dict(self.task_cfg.get("test_at_end") or {})
        dm = self.trainer.datamodule
        if not cfg.get("enabled", False) or dm is None or not dm.has_split("test"):
            return
        if self.stopped_by_signal:
            log.info("Stopped by a signal: the test runs when the resumed run finishes.")
            return
        import copy

        from .averaging import average_checkpoints, epoch_checkpoints

        run_dir = Path(self.cfg["paths"]["run_dir"])
        n = int(cfg.get("average_last", 10))
        avail = len(list((run_dir / "checkpoints").glob("epoch=*.ckpt")))
        paths = epoch_checkpoints(run_dir, min(n, avail)) if avail else []
        model = copy.deepcopy(self.model)
        if paths:
            state = average_checkpoints(paths)["state_dict"]
            model.load_state_dict({k[len("model."):]: v.to(self.device) for k, v in state.items()
                                   if k.startswith("model.")})
        else:
            log.warning("No epoch checkpoints: testing the final weights.")
        model.eval()
        rows = []
        with self.trainer.precision_plugin.forward_context():
            for batch in dm.test_dataloader():
                batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                rows.extend(self.generate_rows(batch, model))
        del model
        rows, tok, detok, signature = self.score_rows(rows)
        self.trainer.callback_metrics["test/bleu_tok"] = torch.tensor(tok)
        self.trainer.callback_metrics["test/sacrebleu"] = torch.tensor(detok)
        what = f"average of {len(paths)} epoch checkpoints ({paths[0].name} .. {paths[-1].name})" if paths \
            else "final weights"
        self._report_test(tok, detok, what)
        self._write_hypotheses(rows, tok, detok, signature, run_dir)

    @rank_zero_only
    def _report_test(self, tok: float, detok: float, what: str) -> None:
        for logger in self.trainer.loggers:
            logger.log_metrics({"test/bleu_tok": tok, "test/sacrebleu": detok}, step=self.trainer.global_step)
            logger.save()
        log.info("test with the %s", what)

    @rank_zero_only
    def _write_hypotheses(self, rows: list, tok: float, detok: float, signature: str, where: Path) -> None:
        split = str((self.cfg.get("data") or {}).get("test_subset", "test"))
        path = where / f"generate-{split}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for i, src, ref, hyp, score in rows:
                f.write(f"S-{i}\t{src}\nT-{i}\t{ref}\nH-{i}\t{score:.6f}\t{hyp}\n")
            f.write(f"# test/bleu_tok {tok:.2f} (tokenized, BPE removed); test/sacrebleu {detok:.2f} {signature}\n")
        msg = (f"{len(rows)} test sentences: test/bleu_tok = {tok:.2f}, test/sacrebleu = {detok:.2f} "
               f"({signature}); hypotheses in {path}")
        log.info(msg)
        print(msg, flush=True)
