"""The LightningModule pieces every task shares.

:class:`TaskModule` holds the full resolved run config (``hparams.cfg``) and provides:

* ``configure_optimizers``: parameter groups without weight decay on norms/biases/position
  embeddings/class tokens, the explicit lr scaling rule (``task.lr_scaling``), the optimizer and the
  per-step scheduler from their ``_target_`` + ``_partial_: true`` configs;
* per-step seeding (:mod:`tasks.common.seeding`), so resumed runs draw the same random numbers;
* the non-finite loss guard (all ranks agree, then stop with a clear message) and a refusal to save a
  checkpoint whose weights are not finite, so the last good checkpoint survives;
* checkpoint extras: global RNG states, the recipe fingerprint (:mod:`tasks.common.fingerprint`) and
  the EMA weights (the GRC caches are buffers of the model
  and are in ``state_dict`` already);
* optional EMA (:class:`tasks.common.ema.CacheCopyingEMA`);
* optional ``torch.compile`` of the model (``compile.enabled``), in place so checkpoints keep their keys.

A task subclass builds ``self.model`` and implements ``training_step``/``validation_step``.
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate

from .ema import CacheCopyingEMA
from .errors import ConfigError, NonFiniteLossError
from .fingerprint import RECIPE_KEY, recipe_record
from .optim import param_groups, scaled_lr
from .seeding import collect_rng_states, derive_seed, restore_rng_states, seed_globals

log = logging.getLogger(__name__)



def allow_cache_writes_under_checkpointing(model: torch.nn.Module) -> bool:
    """Before compiling a model with activation checkpointing and GRC or XL caches: let Dynamo keep the
    cache write in the checkpointed forward (``skip_fwd_side_effects_in_bwd_under_checkpoint``), which is the
    caches' own rule (write in the forward, never in the recomputation). Without it Dynamo breaks the
    graph at every checkpointed block (still exact, slower). Returns whether it was set."""
    from cached_transformers import grc_layers
    from cached_transformers.xlcache import xl_cache_layers

    checkpointing = any(getattr(m, "grad_checkpointing", False) is True for m in model.modules())
    if not checkpointing or not (grc_layers(model) or xl_cache_layers(model)):
        return False
    import torch._dynamo

    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    log.info("compile with activation checkpointing: Dynamo keeps the cache writes of checkpointed blocks "
             "in their forward (skip_fwd_side_effects_in_bwd_under_checkpoint=True), so each block is one graph.")
    return True

class TaskModule(pl.LightningModule):
    """Base LightningModule. ``cfg`` is the resolved run config as a plain dict."""

    model: torch.nn.Module

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.save_hyperparameters({"cfg": cfg})
        self.cfg = cfg
        self.task_cfg: dict[str, Any] = cfg["task"]
        self.seed = int(cfg.get("seed") or 0)
        self._ema: CacheCopyingEMA | None = None  # kept outside nn.Module: not trained, not in state_dict
        self._pending_ema_state: dict[str, Any] | None = None
        self._compiled = False  # compile.enabled applied (setup runs once per stage)
        self.last_val_step = -1  # global step of the last (non-sanity) validation
        self.lr_info: dict[str, float] = {}
        # the recipe of the run as composed, set by the runner before the task fills in values derived
        # from the data (ImageNet-22k's class count, COCO's label map); None: taken from cfg
        self.recipe: dict[str, Any] | None = None

    @property
    def stopped_by_signal(self) -> bool:
        """Whether this run is stopping on a signal (SLURM time limit, preemption): the end-of-training test
        then waits for the resumed run."""
        return any(getattr(cb, "received_signal", None) is not None for cb in self.trainer.callbacks)

    # ------------------------------------------------------------------ test with the best weights
    def best_weights(self, default_metric: str) -> tuple[torch.nn.Module, str | None, float | None]:
        """``(model, path, score)``: a copy of ``self.model`` with the weights of the best checkpoint of the
        task's monitored metric (``task.monitor.metric``, else ``default_metric``), or the final weights
        (``path`` None) when no such checkpoint was written."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        metric = (self.task_cfg.get("monitor") or {}).get("metric", default_metric)
        model = copy.deepcopy(self.model)
        for cb in self.trainer.callbacks:
            if (isinstance(cb, ModelCheckpoint) and cb.monitor == metric and cb.best_model_path
                    and Path(cb.best_model_path).is_file()):
                state = torch.load(cb.best_model_path, map_location=self.device, weights_only=False)["state_dict"]
                model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
                score = float(cb.best_model_score) if cb.best_model_score is not None else None
                return model, cb.best_model_path, score
        log.warning("No best checkpoint (no validation ran or checkpointing is off): testing the final weights.")
        return model, None, None

    # ------------------------------------------------------------------ optimizer and schedule
    def total_batch_size(self) -> int:
        """Samples per optimizer step over all processes: batch_size x world_size x accumulation."""
        per_device = int(self.cfg["data"]["batch_size"])
        trainer = self.trainer
        return per_device * trainer.world_size * int(trainer.accumulate_grad_batches)

    def configure_optimizers(self) -> Any:
        opt_cfg = dict(self.task_cfg["optimizer"])
        base_lr = float(opt_cfg.pop("lr"))
        weight_decay = float(opt_cfg.get("weight_decay", 0.0))
        scaling = dict(self.task_cfg.get("lr_scaling") or {})
        total = self.total_batch_size()
        lr = scaled_lr(base_lr, total, scaling.get("rule", "linear"), int(scaling.get("base_batch_size", 512)))
        self.lr_info = {"base_lr": base_lr, "total_batch_size": total, "lr": lr}
        log.info("lr = %g (base %g, total batch %d, rule %s / %s)", lr, base_lr, total,
                 scaling.get("rule", "linear"), scaling.get("base_batch_size", 512))
        optimizer = instantiate(opt_cfg, _convert_="all")(param_groups(self.model, weight_decay), lr=lr)

        sched_cfg = self.task_cfg.get("scheduler")
        if not sched_cfg:
            return optimizer
        sched_cfg = dict(sched_cfg)
        total_steps = sched_cfg.pop("total_steps", None)
        trainer = self.trainer
        estimated = trainer.estimated_stepping_batches  # also sets up the train loader (num_training_batches)
        batches = trainer.num_training_batches
        steps_per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches)) if math.isfinite(batches) else 1
        if total_steps is None:
            total_steps = estimated
            if not math.isfinite(total_steps):
                raise ConfigError("The lr schedule needs a finite length: set trainer.max_epochs or "
                                  "trainer.max_steps (or task.scheduler.total_steps).")
        log.info("schedule: %d steps, %d per epoch", int(total_steps), steps_per_epoch)
        scheduler = instantiate(sched_cfg, _convert_="all")(
            optimizer, total_steps=int(total_steps), steps_per_epoch=steps_per_epoch)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def current_lr(self) -> float:
        opt = self.optimizers(use_pl_optimizer=False)
        return float(opt.param_groups[0]["lr"]) if opt is not None else float("nan")

    # ------------------------------------------------------------------ determinism
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seed_globals(derive_seed(self.seed, "step", self.current_epoch, batch_idx, self.global_rank))

    def on_validation_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.last_val_step = self.global_step

    # ------------------------------------------------------------------ non-finite guard
    def check_finite(self, loss: torch.Tensor) -> None:
        """Stop (on every rank at once) when ``loss`` is NaN or infinite, before any update from it."""
        finite = bool(torch.isfinite(loss.detach()).all())
        if self.trainer.world_size > 1:
            finite = bool(self.trainer.strategy.reduce_boolean_decision(finite, all=True))
        if not finite:
            raise NonFiniteLossError(
                f"The training loss became non-finite ({float(loss.detach()):g}) at step {self.global_step} "
                f"(epoch {self.current_epoch}); no checkpoint was written from this state. Resume from the last "
                f"good checkpoint with ckpt_path=last after lowering task.optimizer.lr or setting "
                f"trainer.gradient_clip_val (e.g. 1.0).")

    # ------------------------------------------------------------------ EMA
    def setup(self, stage: str) -> None:
        ema_cfg = self.task_cfg.get("ema") or {}
        if stage == "fit" and ema_cfg.get("enabled") and self._ema is None:
            self._ema = CacheCopyingEMA(self.model, decay=float(ema_cfg.get("decay", 0.99996)),
                                        warmup=bool(ema_cfg.get("warmup", False)),
                                        every_n_steps=int(ema_cfg.get("every_n_steps", 1)),
                                        device=ema_cfg.get("device"))
            if self._pending_ema_state is not None:
                self._ema.load_state_dict(self._pending_ema_state)
                self._pending_ema_state = None
        self._maybe_compile()

    def _maybe_compile(self) -> None:
        """``compile.enabled``: ``torch.compile`` the model in place (after the EMA copy was taken).

        In place (``nn.Module.compile``), so parameter and buffer names, and therefore checkpoints,
        are those of the uncompiled model. The GRC cache rules hold under compilation (tested).
        """
        opts = dict(self.cfg.get("compile") or {})
        if not opts.pop("enabled", False) or self._compiled:
            return
        allow_cache_writes_under_checkpointing(self.model)
        self.model.compile(**{k: v for k, v in opts.items() if v is not None})
        self._compiled = True

    @property
    def ema(self) -> CacheCopyingEMA | None:
        return self._ema

    def on_fit_start(self) -> None:
        if self._ema is not None:
            self._ema.to(self.device)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA update (before any callback can checkpoint this step)."""
        super().optimizer_step(*args, **kwargs)
        if self._ema is not None:
            self._ema.update(self.model, self.global_step + 1)  # global_step counts this step only after the hook

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for name, tensor in self.model.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteLossError(
                    f"Refusing to save a checkpoint: model tensor '{name}' is not finite at step "
                    f"{self.global_step}; the previous checkpoint is kept. Resume from it with ckpt_path=last "
                    f"and a lower task.optimizer.lr or trainer.gradient_clip_val.")
        checkpoint["rng_states"] = collect_rng_states()
        checkpoint[RECIPE_KEY] = self.recipe or recipe_record(self.cfg)  # refuses resuming across recipes
        if self._ema is not None:
            checkpoint["ema_state_dict"] = self._ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            restore_rng_states(checkpoint["rng_states"])
        state = checkpoint.get("ema_state_dict")
        if state is not None:
            if self._ema is not None:
                self._ema.load_state_dict(state)
            else:
                self._pending_ema_state = state
