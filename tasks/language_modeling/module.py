"""The language-model LightningModule: stream training with the memory carried, perplexity over whole streams.

Metrics: ``train/loss`` (mean NLL per token, nats), ``train/lr``, ``val/loss``, ``val/ppl``,
``test/loss``, ``test/ppl``. Perplexity is exp(total NLL / total target tokens) over the whole split,
summed over processes, with the memory carried from segment to segment (Transformer-XL's evaluation);
every evaluation starts from an empty memory and leaves the training memory untouched. At the end of
fit ``test/ppl`` is computed with the best ``val/ppl`` weights (``task.test_with_best``).

The training memory (XL memories or GRC caches and pending summaries, per track) is saved in
checkpoints (``lm_memory``), so a run resumed mid-epoch continues exactly where it stopped; it is
reset whenever a stream starts again (segment 0).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import torch
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics import SumMetric

from tasks.common.data import rank_world
from tasks.common.errors import ConfigError
from tasks.common.models import load_pretrained
from tasks.common.module import TaskModule

from .models import PRESETS, TransformerXL, detach_state, map_state

log = logging.getLogger(__name__)

_MODEL_KEYS = {"preset", "memory", "n_layer", "d_model", "n_head", "d_head", "d_inner", "dropout", "dropatt",
               "d_embed", "cutoffs", "div_val", "mem_len", "clamp_len", "eval_mem_len", "same_length",
               "grc_ratio", "grc_lambda_init"}


def build_model(model_cfg: Mapping[str, Any], n_token: int) -> TransformerXL:
    """A :class:`TransformerXL` from the ``model`` section (``preset`` base/large, then explicit keys)."""
    cfg = dict(model_cfg)
    name = str(cfg.pop("name", ""))
    pretrained = cfg.pop("pretrained", None)
    unknown = sorted(set(cfg) - _MODEL_KEYS)
    if unknown:
        raise ConfigError(f"Unknown Transformer-XL option(s) {unknown} in model '{name}'; valid: {sorted(_MODEL_KEYS)}.")
    preset = cfg.pop("preset", "base")
    if preset not in PRESETS:
        raise ConfigError(f"model.preset must be one of {sorted(PRESETS)}, got {preset!r}.")
    kwargs = dict(PRESETS[preset])
    kwargs.update({k: v for k, v in cfg.items() if v is not None})
    try:
        model = TransformerXL(n_token, **kwargs)
    except ValueError as exc:
        raise ConfigError(f"model '{name}': {exc}") from exc
    load_pretrained(model, pretrained)
    return model


@torch.no_grad()
def stream_nll(model: TransformerXL, batches: Any, device: torch.device | str = "cpu") -> tuple[float, int]:
    """(total NLL in nats, target tokens) of ``model`` in eval mode over in-order segment ``batches``,
    the memory carried from segment to segment and reset at segment 0 (Transformer-XL's evaluation)."""
    model.eval()
    state, total, count = None, 0.0, 0
    for batch in batches:
        if int(batch["segment"]) == 0:
            state = None
        nll, state = model(batch["input"].to(device), batch["target"].to(device), state)
        total += float(nll.double().sum())
        count += nll.numel()
    return total, count


def _first_tensor(state: Any) -> torch.Tensor:
    if isinstance(state, torch.Tensor):
        return state
    return next(_first_tensor(s) for s in state if s is not None)


def pack_memory(state: Any, world: int, all_gather: Any) -> tuple[Any, list[int] | None]:
    """The training memory for a checkpoint: (detached CPU tensors, stacked over processes when ``world > 1``; the
    tracks (rows) each process holds, None for one process). Processes may hold different numbers of tracks: the
    rows are padded to the largest for the gather (every rank runs this, ``all_gather`` is collective)."""
    if state is None:
        return None, None
    if world == 1:
        return map_state(state, lambda t: t.detach().cpu()), None
    mine = _first_tensor(state).shape[0]
    rows = [int(r) for r in all_gather(torch.tensor([mine], device=_first_tensor(state).device)).view(-1)]
    top = max(rows)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return t if t.shape[0] == top else torch.cat([t, t.new_zeros(top - t.shape[0], *t.shape[1:])])

    return map_state(state, lambda t: all_gather(pad(t.contiguous())).detach().cpu()), rows  # world x top x ...


def unpack_memory(state: Any, saved_world: int, world: int, rank: int, rows: list[int] | None = None) -> Any:
    """This process's memory from a checkpoint (its ``rows[rank]`` tracks); ``None`` (an empty memory, logged) when
    the process count changed (the tracks are cut differently then)."""
    if state is None:
        return None
    if saved_world != world:
        log.warning("The checkpoint's language-model memory was saved by %d process(es) and this run has %d: the "
                    "tracks differ, so training continues with an empty memory.", saved_world, world)
        return None
    if world == 1:
        return state
    n = rows[rank] if rows is not None else None
    return map_state(state, lambda t: t[rank][:n])


class LanguageModel(TaskModule):
    """``cfg``: the resolved run config; ``n_token``: the vocabulary size of the data."""

    def __init__(self, cfg: dict[str, Any], n_token: int):
        super().__init__(cfg)
        self.model = build_model(cfg["model"], n_token)
        self.train_state: Any = None
        self._eval_state: Any = None
        self.nll_sum = {s: SumMetric() for s in ("val", "test")}
        self.tok_sum = {s: SumMetric() for s in ("val", "test")}
        for s in ("val", "test"):
            self.add_module(f"{s}_nll", self.nll_sum[s])
            self.add_module(f"{s}_tokens", self.tok_sum[s])
        self.test_result: dict[str, float] = {}

    def forward(self, input: torch.Tensor, target: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        return self.model(input, target, state)

    def total_batch_size(self) -> int:
        """Tracks per optimizer step over all processes: ``data.tracks``, else batch_size x world; x accumulation."""
        tracks = self.cfg["data"].get("tracks")
        if tracks is None:
            return super().total_batch_size()
        return int(tracks) * int(self.trainer.accumulate_grad_batches)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if int(batch["segment"]) == 0:
            self.train_state = None  # a new pass over the stream starts with an empty memory
        state = map_state(self.train_state, lambda t: t.to(self.device))
        nll, self.train_state = self(batch["input"], batch["target"], state)
        self.train_state = detach_state(self.train_state)
        loss = nll.float().mean()
        self.check_finite(loss)
        n = int(batch["target"].numel())
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        self.log("train/lr", self.current_lr(), on_step=True, on_epoch=False, batch_size=n)
        # processes holding unequal numbers of tracks (data.tracks): DDP averages the gradients of the processes,
        # the weight (tracks here x processes / all tracks) makes that the gradient of the mean over all tokens
        return loss * float(batch.get("weight", 1.0))

    # ------------------------------------------------------------------ evaluation over whole streams
    def _eval_step(self, split: str, batch: dict[str, Any]) -> None:
        if int(batch["segment"]) == 0:
            self._eval_state = None
        nll, self._eval_state = self(batch["input"], batch["target"], self._eval_state)
        self.nll_sum[split].update(nll.double().sum())
        self.tok_sum[split].update(torch.tensor(float(nll.numel()), dtype=torch.float64, device=nll.device))

    def _eval_end(self, split: str) -> dict[str, float]:
        total, count = float(self.nll_sum[split].compute()), float(self.tok_sum[split].compute())
        self.nll_sum[split].reset()
        self.tok_sum[split].reset()
        self._eval_state = None
        loss = total / max(count, 1.0)
        out = {f"{split}/loss": loss, f"{split}/ppl": math.exp(min(loss, 700.0))}
        for k, v in out.items():
            self.log(k, v, prog_bar=k.endswith("ppl"), sync_dist=False)
        return out

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    @torch.no_grad()
    def evaluate_stream(self, model: TransformerXL, loader: Any) -> tuple[float, int]:
        """(mean NLL per token, tokens) of ``model`` over ``loader``'s stream, memory carried, summed over processes."""
        with self.trainer.precision_plugin.forward_context():
            total, count = stream_nll(model, loader, self.device)
        stats = torch.tensor([total, count], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        return float(stats[0]) / max(float(stats[1]), 1.0), int(stats[1])

    # ------------------------------------------------------------------ checkpoints: the training memory

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        rank, world = rank_world(self._trainer)
        # every process holds its own tracks' memory: gather them (every rank runs this hook)
        checkpoint["lm_memory"], checkpoint["lm_memory_rows"] = pack_memory(self.train_state, world, self.all_gather)
        checkpoint["lm_memory_world"] = world

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        rank, world = rank_world(self._trainer)
        self.train_state = unpack_memory(checkpoint.get("lm_memory"), int(checkpoint.get("lm_memory_world", 1)),
                                         world, rank, checkpoint.get("lm_memory_rows"))

    # ------------------------------------------------------------------ test with the best weights
    def on_train_end(self) -> None:
        if not self.task_cfg.get("test_with_best", True) or self.trainer.datamodule is None:
            return
        if self.stopped_by_signal:
            log.info("Stopped by a signal: test/ppl is computed when the resumed run finishes.")
            return
        model, path, _ = self.best_weights("val/ppl")
        loss, n = self.evaluate_stream(model, self.trainer.datamodule.test_dataloader())
        del model
        ppl = math.exp(min(loss, 700.0))
        self.test_result = {"test/loss": loss, "test/ppl": ppl}
        for k, v in self.test_result.items():
            self.trainer.callback_metrics[k] = torch.tensor(v)
        self._report(n, path)

    @rank_zero_only
    def _report(self, n: int, path: str | None) -> None:
        for logger in self.trainer.loggers:
            logger.log_metrics(self.test_result, step=self.trainer.global_step)
            logger.save()
        where = f"best checkpoint {path}" if path else "final weights"
        msg = f"test/ppl = {self.test_result['test/ppl']:.2f} over {n} test tokens with the {where}"
        log.info(msg)
        print(msg, flush=True)
