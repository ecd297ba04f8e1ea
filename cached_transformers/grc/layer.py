"""The Gated Recurrent Cache attention layer (method.md sections 1 and 3).

``GRCAttention`` wraps any host attention (the *self branch*) and adds the memory branch, the three
gates, the per-head lambda mix and the positional conv. One stored cache ``cache`` of shape
1 x T_m x D_m lives in the layer as a persistent buffer from construction on.

When is the stored cache written?  Exactly once per training forward of the layer:
``self.training and torch.is_grad_enabled()`` and not while autograd's engine is running a backward
pass (that is where non-reentrant activation checkpointing recomputes forwards; the recomputation
reads the cache value the original forward saw, so the gradients are those of that forward).
Evaluation mode and ``torch.no_grad()`` never write it. Gradient accumulation therefore writes it
once per micro-batch, which is the released module's behaviour. Reentrant checkpointing (whose
first forward runs under ``no_grad``) could never write it, so its recomputation raises a clear error.
A write binds a new tensor to the ``cache`` buffer (never an in-place copy), so the graph of the
forward that read the old tensor, and any recomputation of it, keep that value: this is what lets
``torch.compile`` trace the write without graph breaks and still recompute checkpoints exactly.
The layer never communicates across processes: ``sync_caches`` (``sync.py``) averages all caches of a
model in one collective once per optimisation step.

Causal mode (``config.causal``, language modelling): the memory branch may not see the current batch
(a position would see later tokens through the cache), so it reads the cache of the previous step, and
the gates get their gradient the way recurrent memories do, by truncated back-propagation over one
step. The layer keeps two float32 buffers, ``cache`` = C_{t-2} and ``pending`` = the batch-mean summary
of the previous training forward; forward t computes C_{t-1} = GRC(C_{t-2}, pending) *inside its own
graph* (so the loss of step t trains the gates and the candidate), attends to it, and writes
``cache <- C_{t-1}`` and ``pending <- mean_b X_t`` (both detached): still one write per training
forward, none in eval / ``no_grad`` / recomputation, and no position ever sees its own batch. The
first forward reads C_1 = GRC(0, 0) (a learned initial cache), so every parameter takes part in every
step (DDP needs no ``find_unused_parameters``). Eval reads GRC(cache, pending), the cache the next
training step would read. The summary is averaged over the batch *before* the update (the
non-causal mode averages the updated caches): then the whole state is two 1 x T_m x D_m tensors,
which ``sync_caches`` averages across ranks exactly (equal per-rank batches give the single-process
state of the global batch) and which checkpoints hold at a fixed shape.

Speed: the reset and update gates are one fused ``Linear(2 D_m -> 2 D_m)``; the cache-side half of
the gate projections is computed once per step on the 1 x T_m stored cache rather than per sample;
the summary-side projections of the three gates share one GEMM. On CPU in float32 / float64 the rest
runs as two fused native kernels: the gated update (``update.py``) and the output, i.e. the lambda mix
added in the positional conv's own pass (``output.py``); elsewhere the composite code they replace
(sigmoids, one GEMM, GELU, LayerNorm, one ``torch.lerp``; a per-channel scale plus an in-place
``addcmul_`` into each head's first D_m/H channels, no zero padding; the positional conv as two depthwise
convs, ``posconv.py``). The positional conv reads the tokens as a channels-last view (no copy). All of this
is exact algebra of the released computation, equal to float32 round-off. What remains above the MAC cost
on CPU is measured by ``scripts/benchmark.py --floor`` (docs/library.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from .attention import SRAttention
from .config import GRCConfig
from . import output, update
from .posconv import pair_grouped_conv3x3


def _recomputing() -> bool:
    """True while autograd's engine runs a backward pass, where activation checkpointing recomputes forwards.

    Only eager code can run a layer's Python forward inside a backward pass: a compiled model's
    recomputation is part of its compiled backward graph and never re-runs the forward, so under
    ``torch.compile`` this is the constant False and Dynamo traces no call into autograd's state.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


REENTRANT_MESSAGE = (
    "GRC layer {name}: a forward is being recomputed inside backward although its original forward did not "
    "write the cache (it ran under torch.no_grad()), which is what reentrant activation checkpointing does, and "
    "it would leave every cache unwritten; use non-reentrant checkpointing (timm: unset TIMM_REENTRANT_CKPT / "
    "timm.layers.set_reentrant_ckpt(False); torch: checkpoint(..., use_reentrant=False)).")


def memory_width(dim: int, num_heads: int, ratio: float) -> int:
    """D_m = int(r * D), checked to split into the heads and to group the positional conv."""
    dm = int(dim * ratio)
    if dm <= 0 or dm % num_heads or dim % dm:
        problem = (f"{dm} is not divisible by the {num_heads} heads" if dm > 0 and dm % num_heads
                   else f"{dm} does not divide D={dim} (needed by the grouped positional conv)")
        raise ValueError(
            f"GRC ratio {ratio} gives a memory width D_m=int({ratio}*{dim})={dm}, and {problem}; "
            f"choose a ratio such as 0.5 or 0.25 for which D_m splits evenly.")
    return dm


@register_notrace_module  # FX (timm's feature path, torchvision's create_feature_extractor) keeps it a leaf
class GRCAttention(nn.Module):
    """Gated Recurrent Cache attention around a host attention module.

    Args:
        dim: model width D.
        num_heads: heads H of the host attention (the mix is per head).
        self_attn: host attention, called as ``self_attn(x, [H, W,] **host_kwargs)`` -> B x T x D
            (after its output projection). With a padding mask it also gets ``key_padding_mask=``.
        cache_len: T_m, the stored cache length (nominal token count of the host).
        config: :class:`GRCConfig`.
        mem_attn: memory branch at width D_m, called as ``mem_attn(q, kv=cache, kv_hw=grid)``;
            default: ``SRAttention(D_m, H)`` (plain attention).
        cache_grid: (h, w) grid of the cache tokens after ``num_prefix_tokens`` (spatial hosts).
        num_prefix_tokens: leading class tokens (no positional conv for them).

    forward(x: B x T x D, H=None, W=None, key_padding_mask: B x T bool (True = pad) | None,
    **host_kwargs) -> B x T x D. T may differ from T_m: the summary is resized to T_m.
    """

    def __init__(self, dim: int, num_heads: int, self_attn: nn.Module, cache_len: int,
                 config: GRCConfig | None = None, mem_attn: nn.Module | None = None,
                 cache_grid: tuple[int, int] | None = None, num_prefix_tokens: int = 0,
                 qkv_bias: bool = False):
        super().__init__()
        cfg = config or GRCConfig.make()
        self.config = cfg
        self.dim, self.num_heads = dim, num_heads
        self.mem_dim = dm = memory_width(dim, num_heads, cfg.ratio)
        self.num_prefix_tokens = num_prefix_tokens
        self.dropped_prefix_tokens = 0  # set by drop_prefix_tokens (the loader then drops them from files)
        self.cache_grid = tuple(cache_grid) if cache_grid is not None else None
        if self.cache_grid is not None and num_prefix_tokens + self.cache_grid[0] * self.cache_grid[1] != cache_len:
            raise ValueError(f"cache_len {cache_len} != {num_prefix_tokens} prefix tokens + grid {cache_grid}.")

        self.self_attn = self_attn
        self.mem_attn = mem_attn if mem_attn is not None else SRAttention(dm, num_heads, qkv_bias=qkv_bias)
        self.gate = nn.Linear(2 * dm, 2 * dm, bias=cfg.gate_bias)  # rows: [reset; update]
        self.cand = nn.Linear(2 * dm, dm, bias=cfg.gate_bias)
        self.cand_norm = nn.LayerNorm(dm) if cfg.candidate == "ln_gelu" else nn.Identity()
        self.lam = nn.Parameter(torch.full((num_heads,), float(cfg.lambda_init)))
        self.pos_conv = (nn.Conv2d(dim, dim, 3, padding=1, groups=dm)
                         if cfg.pos_encoding == "conv" else None)
        self.register_buffer("cache", torch.zeros(1, cache_len, dm))
        if cfg.causal:  # the previous training forward's batch-mean summary (see the module doc)
            self.register_buffer("pending", torch.zeros(1, cache_len, dm))
        # eager bookkeeping for checkpoint recomputation: what the last write read, and whether the last
        # forward outside backward wrote (compiled code never recomputes in Python and skips both)
        self._prev_state: tuple[torch.Tensor, ...] | None = None
        self._last_forward_wrote = False
        self.record_branches = False  # set True to keep o_self / o_mem of the last forward (Fig. 4)
        self.last_branches: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ cache management
    @property
    def cache_len(self) -> int:
        return self.cache.shape[1]

    def state_tensors(self) -> tuple[torch.Tensor, ...]:
        """The stored state: ``(cache,)``, or ``(cache, pending)`` in causal mode (what sync and EMA copy)."""
        return (self.cache, self.pending) if self.config.causal else (self.cache,)

    def reset_cache(self) -> None:
        """Zero the stored cache (e.g. before fine-tuning on another task); causal mode: the pending summary too."""
        for t in self.state_tensors():
            t.zero_()
        self._prev_state = None

    def drop_prefix_tokens(self) -> None:
        """Work on the grid tokens only from now on: the host stopped prepending its prefix (class) tokens.

        The cache keeps the grid's slots (T_m = h * w; the prefix slots, which the prefix tokens' summaries
        filled, are dropped); the positional conv already skips no token. A checkpoint of the host with
        its prefix tokens still loads (``load_checkpoint`` and ``load_pretrained`` drop the same slots).
        """
        p = self.num_prefix_tokens
        if not p:
            return
        self.cache = self.cache[:, p:].clone()
        if self.config.causal:
            self.pending = self.pending[:, p:].clone()
        self.num_prefix_tokens, self.dropped_prefix_tokens = 0, p
        self._prev_state, self._last_forward_wrote = None, False

    def _read_state(self) -> tuple[tuple[torch.Tensor, ...], bool]:
        """(the stored state this forward reads, whether this forward writes it).

        A training forward with gradients writes; a checkpoint recomputation (eager only) reads what
        the original forward read and writes nothing; everything else reads the state as it is.
        """
        state = self.state_tensors()
        if not self.training:
            return state, False
        if _recomputing():
            if not self._last_forward_wrote or self._prev_state is None:
                raise RuntimeError(REENTRANT_MESSAGE.format(name=self.extra_repr()))
            return self._prev_state, False
        write = torch.is_grad_enabled()
        if not write:
            if not torch.compiler.is_compiling():
                self._last_forward_wrote = False
            return state, False
        # the write binds new tensors: these, which the graph saved, never change
        if not torch.compiler.is_compiling():
            self._prev_state, self._last_forward_wrote = state, True
        return state, True

    # ------------------------------------------------------------------ pieces of the forward
    def _positional(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, t, c = x.shape
        p = self.num_prefix_tokens
        h, w = grid
        grid_x = x[:, p:].reshape(b, h, w, c).permute(0, 3, 1, 2)  # channels-last view, no copy
        conv = self.pos_conv
        if conv.in_channels // conv.groups == 2:
            # the native CPU kernel or two depthwise convs (grc/posconv.py), same sums: faster than
            # oneDNN's 2-channel-group kernel in training and in inference
            return pair_grouped_conv3x3(grid_x, conv.weight, conv.bias).view(b, h * w, c)
        return conv(grid_x).flatten(2).transpose(1, 2)

    def _summary(self, u: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """Resize B x T x D_m to B x T_m x D_m along tokens (valid tokens only if asked)."""
        tm = self.cache_len
        mode = "nearest" if self.config.resize == "nearest" else "linear"
        if key_padding_mask is not None and self.config.padding == "valid":
            valid = ~key_padding_mask.bool()
            lengths = valid.sum(1).clamp(min=1)                                   # B
            order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # valid first
            pos = torch.arange(tm, device=u.device, dtype=torch.float32)[None]     # 1 x T_m
            scale = lengths[:, None].float() / tm                                    # B x 1
            last = lengths[:, None] - 1
            if mode == "nearest":  # torch's "nearest": src = floor(dst * in / out)
                idx = torch.minimum((pos * scale).floor().long(), last)
                gather = torch.gather(order, 1, idx)
                return torch.gather(u, 1, gather[..., None].expand(-1, -1, u.shape[-1]))
            src = ((pos + 0.5) * scale - 0.5).clamp(min=0)  # "linear", align_corners=False
            lo = torch.minimum(src.floor().long(), last)
            hi = torch.minimum(lo + 1, last)
            frac = (src - lo.float())[..., None]
            take = lambda i: torch.gather(u, 1, torch.gather(order, 1, i)[..., None].expand(-1, -1, u.shape[-1]))
            return take(lo) * (1 - frac) + take(hi) * frac
        if u.shape[1] == tm:
            return u
        return F.interpolate(u.transpose(1, 2), size=tm, mode=mode).transpose(1, 2)

    def _columns(self) -> tuple[slice, slice]:
        """(cache columns, summary columns) of the gate and candidate weights (``concat_order``)."""
        dm = self.mem_dim
        first, second = slice(0, dm), slice(dm, 2 * dm)
        return (first, second) if self.config.concat_order == "cache_first" else (second, first)

    def _gate_logits(self, prev: torch.Tensor, xu: torch.Tensor) -> torch.Tensor:
        """B x T_m x 3 D_m pre-activations [reset | update | candidate summary side] for prev 1 x T_m x D_m.

        The stored cache is the same for every sample, so the cache side of the reset and update
        projections (with all biases) is one 1 x T_m x 3 D_m constant computed once; it enters the
        summary GEMM's accumulator (baddbmm), so no separate pass over B x T_m x 3 D_m is made.
        """
        dm = self.mem_dim
        cache_cols, x_cols = self._columns()
        wg, bg, wc, bc = self.gate.weight, self.gate.bias, self.cand.weight, self.cand.bias
        cache_side = F.linear(prev, wg[:, cache_cols], bg)                   # 1 x T_m x 2 D_m
        cand_bias = bc.expand(1, prev.shape[1], dm) if bc is not None else cache_side.new_zeros(1, prev.shape[1], dm)
        const = torch.cat([cache_side, cand_bias], dim=-1)                   # 1 x T_m x 3 D_m
        w_x = torch.cat([wg[:, x_cols], wc[:, x_cols]]).t()                   # D_m x 3 D_m
        return torch.baddbmm(const.expand(xu.shape[0], -1, -1), xu, w_x.expand(xu.shape[0], -1, -1))

    def _gated_update(self, prev: torch.Tensor, xu: torch.Tensor) -> torch.Tensor:
        """C_new = g_u * C_cand + (1 - g_u) * C_prev for prev 1 x T_m x D_m, xu B x T_m x D_m.

        The pre-activations of reset, update and candidate come from one GEMM (:meth:`_gate_logits`);
        the rest is one fused kernel on CPU, else the composite code (``update.py``).
        """
        z = self._gate_logits(prev, xu)
        wc = self.cand.weight[:, self._columns()[0]]                       # the candidate's cache side
        norm = self.cand_norm if self.config.candidate == "ln_gelu" else None
        if update.update_applicable(z, prev, wc, norm):
            return update.gated_update(z, prev, wc, norm)
        return update.update_composite(z, prev, wc, norm)

    def _output(self, x: torch.Tensor, s: torch.Tensor, m: torch.Tensor, H: int | None, W: int | None) -> torch.Tensor:
        """The lambda mix of the branches plus the positional conv (one native kernel where it applies)."""
        alpha = torch.sigmoid(self.lam).to(s.dtype)                       # H (autocast: the activations' dtype)
        conv = self.pos_conv
        grid = None if conv is None else (H, W) if H is not None else self._square_grid(x.shape[1])
        if grid is not None and x.shape[1] - self.num_prefix_tokens != grid[0] * grid[1]:
            raise ValueError(f"GRC positional conv: {x.shape[1] - self.num_prefix_tokens} tokens do not fill the "
                             f"{grid[0]}x{grid[1]} grid.")
        if output.fused_applicable(s, m, x, conv):
            return output.fused_mix_pos(s, m, alpha, x, conv, grid)
        out = output.mix(s, m, alpha)
        if conv is not None:
            out[:, self.num_prefix_tokens:] += self._positional(x, grid)
        return out

    def _self_branch(self, x: torch.Tensor, H: int | None, W: int | None,
                     key_padding_mask: torch.Tensor | None, host_kwargs: dict) -> tuple[torch.Tensor, ...]:
        """(host output s, update source, summary X_u resized to T_m)."""
        if key_padding_mask is not None:
            host_kwargs["key_padding_mask"] = key_padding_mask
        s = self.self_attn(x, H, W, **host_kwargs) if H is not None else self.self_attn(x, **host_kwargs)
        source = s if self.config.update_source == "self_output" else x
        return s, source, self._summary(source[..., : self.mem_dim], key_padding_mask)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, H: int | None = None, W: int | None = None, *,
                key_padding_mask: torch.Tensor | None = None, **host_kwargs) -> torch.Tensor:
        b, t, d = x.shape
        cfg, dm = self.config, self.mem_dim
        s, source, xu = self._self_branch(x, H, W, key_padding_mask, host_kwargs)

        state, write = self._read_state()
        if cfg.causal:  # C_{t-1} = GRC(C_{t-2}, previous summary), in this graph; this batch only reaches pending
            new = self._gated_update(*state)                               # 1 x T_m x D_m
            if write:
                self.cache = new.detach().to(self.cache.dtype)
                self.pending = xu.detach().mean(0, keepdim=True, dtype=torch.float32).to(self.pending.dtype)
        else:
            new = self._gated_update(state[0], xu)                         # B x T_m x D_m
            if write:  # across processes the caches are averaged once per step by sync_caches()
                # a new tensor, not an in-place copy: whatever read the old one (this forward's graph, a
                # compiled checkpoint's recomputation) keeps reading the value this forward saw
                self.cache = new.detach().mean(0, keepdim=True, dtype=torch.float32).to(self.cache.dtype)

        if cfg.causal:
            kv = new.expand(b, -1, -1)
        elif cfg.mem_kv == "batch_mean" and self.training:
            kv = new.mean(0, keepdim=True).expand(b, -1, -1)
        else:  # per_sample; batch_mean in eval: each sample is its own batch, so no sample sees another
            kv = new
        query = x[..., :dm] if cfg.mem_query == "input" else source[..., :dm]
        m = self.mem_attn(query, kv=kv, kv_hw=self.cache_grid)
        if self.record_branches:
            self.last_branches = (s.detach(), m.detach())

        return self._output(x, s, m, H, W)

    def _square_grid(self, t: int) -> tuple[int, int]:
        n = t - self.num_prefix_tokens
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"GRC positional conv needs the token grid: pass H and W for {n} tokens.")
        return side, side

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.num_heads}, mem_dim={self.mem_dim}, cache_len={self.cache_len}, "
                f"preset={self.config.preset}, sync={self.config.sync}, causal={self.config.causal}")
