"""Transformer-XL (Dai et al. 2019) for word-level language modelling, with its segment memory or GRC.

Architecture as Transformer-XL's PyTorch WikiText-103 code: adaptive input embeddings scaled by
sqrt(d_model), dropout, ``n_layer`` post-norm blocks ``LN(x + Drop(RelAttn(x, mem)))`` then
``LN(x + Drop(W2 Drop(ReLU(W1 x))))``, dropout, the tied adaptive softmax. Relative positional
attention: score(i, j) = (q_i + u) . k_j + (q_i + v) . W_r R(i - j) with sinusoidal R, the biases
u / v shared by all layers, distances clamped at ``clamp_len`` (when > 0).

Memory (``memory``):

* ``"xl"``: Transformer-XL's segment recurrence. Each layer's keys/values are its input over the last
  ``mem_len`` positions of the previous segments (detached) followed by the current segment; ``mem_len``
  may be longer than a segment (the memory then spans several previous segments). ``same_length``
  (evaluation only, as Transformer-XL's WikiText-103 scripts use it): every query attends to the same
  number of keys, itself and the ``eval_mem_len - 1`` positions before it (fewer only where the stream
  has fewer), instead of the whole memory plus the segment up to itself.
* ``"grc"``: GRC replaces the segment memory (the paper's Table 5 setting). The relative attention sees
  the current segment only (causal); a memory branch (``cached_transformers.SRAttention`` at width
  D_m = n_head * int(ratio * d_head)) attends from ``x[..., :D_m]`` to the layer's cache of
  ``mem_len`` slots, and the two mix per head with sigmoid(lambda) as in GRC-Attention (method.md
  section 1: reset/update gates and the LayerNorm(GELU) candidate over ``[cache, summary]``, the
  summary being the first D_m channels of the self-branch output, nearest-resized to ``mem_len``).
  Every track (batch row) has its own cache, and the cache a segment reads was built from earlier
  segments only, so no position sees a later token.

  Gradient to the gates (truncated BPTT over one step): the state of a layer is the cache C_{t-2}
  (detached) plus the previous segment's summary X_{t-1} (detached). Segment t first computes
  C_{t-1} = GRC(C_{t-2}, X_{t-1}) *inside its own graph*, attends to it, and hands on (C_{t-1}
  detached, X_t detached). The loss of segment t therefore trains the gates and the candidate through
  C_{t-1}; nothing crosses more than one step, and each forward performs exactly one cache update.
  The first segment of a stream reads C_0 = GRC(0, 0) (the update of a zero cache by an empty
  summary), so every parameter takes part in every step and DDP needs no ``find_unused_parameters``.

The forward is functional in the memory: ``forward(input, target, state) -> (nll B x t, new_state)``,
``state`` being ``None`` (start of a stream) or what the previous call returned.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cached_transformers import SRAttention

from .adaptive import AdaptiveEmbedding, AdaptiveSoftmax

MEMORIES = ("xl", "grc")


def sinusoid(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-XL's relative position embedding: [sin(p f), cos(p f)] for positions ``pos`` (K) -> K x dim."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0.0, dim, 2.0, device=pos.device) / dim))
    ang = pos.float()[:, None] * inv_freq[None]
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """B x H x q x k scores against positions ordered k-1 ... 0 -> scores against distance (k - q) + i - j.

    Entry (i, j) of the result is entry (i, j + q - 1 - i) of the input (Transformer-XL's pad-and-reshape
    trick); entries with j > i + k - q are garbage and must be masked by the caller.
    """
    b, h, q, k = x.shape
    padded = torch.cat([x.new_zeros(b, h, q, 1), x], dim=-1).view(b, h, k + 1, q)
    return padded[:, :, 1:].reshape(b, h, q, k)


class RelMultiHeadAttn(nn.Module):
    """Transformer-XL's relative multi-head attention (``RelPartialLearnableMultiHeadAttn``), batch first.

    forward(x: B x q x D, mem: B x m x D | None, pos: (k) x D embeddings of distances k-1 ... 0, u, v: H x d,
    mask: q x k bool (True = masked)) -> B x q x D (after ``o_net``; dropout and the residual are the block's).
    """

    def __init__(self, d_model: int, n_head: int, d_head: int, dropatt: float = 0.0):
        super().__init__()
        self.n_head, self.d_head, self.scale = n_head, d_head, 1.0 / math.sqrt(d_head)
        self.qkv_net = nn.Linear(d_model, 3 * n_head * d_head, bias=False)
        self.r_net = nn.Linear(d_model, n_head * d_head, bias=False)
        self.o_net = nn.Linear(n_head * d_head, d_model, bias=False)
        self.dropatt = nn.Dropout(dropatt)

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None, pos: torch.Tensor, u: torch.Tensor,
                v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, q, _ = x.shape
        h, d = self.n_head, self.d_head
        cat = x if mem is None or mem.shape[1] == 0 else torch.cat([mem, x], dim=1)
        k = cat.shape[1]
        heads = self.qkv_net(cat).view(b, k, 3, h, d)
        wq = heads[:, -q:, 0].transpose(1, 2)                      # B x H x q x d
        wk, wv = heads[:, :, 1].transpose(1, 2), heads[:, :, 2].transpose(1, 2)
        r = self.r_net(pos).view(k, h, d).permute(1, 2, 0)          # H x d x k
        ac = torch.matmul(wq + u[:, None], wk.transpose(-1, -2))    # B x H x q x k
        bd = rel_shift(torch.matmul(wq + v[:, None], r))
        score = (ac + bd) * self.scale
        score = score.float().masked_fill(mask, float("-inf"))
        prob = self.dropatt(torch.softmax(score, dim=-1).to(wv.dtype))
        out = torch.matmul(prob, wv).transpose(1, 2).reshape(b, q, h * d)
        return self.o_net(out)


class GRCMemory(nn.Module):
    """The GRC pieces of one layer: memory attention, gates, candidate, per-head lambda (task-side, per track).

    ``update(prev B x M x D_m, summary B x M x D_m) -> B x M x D_m`` is one gated recurrence step;
    ``mix(s B x q x D, x B x q x D, cache B x M x D_m) -> B x q x D`` is the memory branch plus the mix.
    """

    def __init__(self, d_model: int, n_head: int, d_head: int, mem_len: int, ratio: float = 0.5,
                 lambda_init: float = -1.0):
        super().__init__()
        per_head = int(ratio * d_head)
        if per_head < 1:
            raise ValueError(f"GRC ratio {ratio} leaves no memory channels per head (d_head {d_head}).")
        self.mem_dim, self.n_head, self.d_head, self.mem_len = n_head * per_head, n_head, d_head, mem_len
        dm = self.mem_dim
        self.mem_attn = SRAttention(dm, n_head, qkv_bias=True)
        self.gate = nn.Linear(2 * dm, 2 * dm)   # [reset; update] over [cache, summary]
        self.cand = nn.Linear(2 * dm, dm)
        self.cand_norm = nn.LayerNorm(dm)
        self.lam = nn.Parameter(torch.full((n_head,), float(lambda_init)))

    def summary(self, s: torch.Tensor) -> torch.Tensor:
        """First D_m channels of the self-branch output, nearest-resized along tokens to ``mem_len``."""
        u = s[..., : self.mem_dim]
        if u.shape[1] == self.mem_len:
            return u
        return F.interpolate(u.transpose(1, 2), size=self.mem_len, mode="nearest").transpose(1, 2)

    def update(self, prev: torch.Tensor, xu: torch.Tensor) -> torch.Tensor:
        reset, upd = torch.sigmoid(self.gate(torch.cat([prev, xu], -1))).chunk(2, dim=-1)
        cand = self.cand_norm(F.gelu(self.cand(torch.cat([reset * prev, xu], -1))))
        dt = cand.dtype  # under autocast: the activations' dtype (the carried state stays float32)
        return torch.lerp(prev.to(dt), cand, upd.to(dt))

    def mix(self, s: torch.Tensor, x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        b, q, dmodel = s.shape
        m = self.mem_attn(x[..., : self.mem_dim], kv=cache.to(x.dtype))
        alpha = torch.sigmoid(self.lam).to(s.dtype)
        hd = dmodel // self.n_head
        s_h = s.view(b, q, self.n_head, hd) * (1 - alpha)[:, None]
        m_h = m.view(b, q, self.n_head, -1) * alpha[:, None]
        out = torch.cat([s_h[..., : m_h.shape[-1]] + m_h, s_h[..., m_h.shape[-1]:]], dim=-1)
        return out.reshape(b, q, dmodel)


class XLBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, d_head: int, d_inner: int, dropout: float, dropatt: float,
                 grc: GRCMemory | None = None):
        super().__init__()
        self.attn = RelMultiHeadAttn(d_model, n_head, d_head, dropatt)
        self.norm1 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_inner), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                nn.Linear(d_inner, d_model), nn.Dropout(dropout))
        self.norm2 = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        self.grc = grc

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None, pos: torch.Tensor, u: torch.Tensor,
                v: torch.Tensor, mask: torch.Tensor, cache: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (block output, GRC summary of this segment or None)."""
        s = self.attn(x, mem, pos, u, v, mask)
        xu = None
        if self.grc is not None:
            xu = self.grc.summary(s)
            s = self.grc.mix(s, x, cache)
        x = self.norm1(x + self.drop(s))
        return self.norm2(x + self.ff(x)), xu


class TransformerXL(nn.Module):
    """Transformer-XL language model with ``memory`` = ``"xl"`` (segment recurrence) or ``"grc"`` (see module doc).

    Args follow Transformer-XL's flags: n_token, n_layer, d_model, n_head, d_head, d_inner, dropout,
    dropatt, d_embed (default d_model), cutoffs, div_val, mem_len, clamp_len (<= 0: no clamp),
    eval_mem_len (XL only: memory length in evaluation, default mem_len), same_length (XL only, evaluation
    only: every query sees exactly the last ``eval_mem_len`` positions, itself included; see
    :meth:`attention_mask`); GRC: grc_ratio, grc_lambda_init.
    """

    def __init__(self, n_token: int, n_layer: int = 16, d_model: int = 410, n_head: int = 10, d_head: int = 41,
                 d_inner: int = 2100, dropout: float = 0.1, dropatt: float = 0.0, d_embed: int | None = None,
                 cutoffs: Sequence[int] = (20000, 40000, 200000), div_val: int = 1, mem_len: int = 150,
                 clamp_len: int = -1, eval_mem_len: int | None = None, memory: str = "xl",
                 grc_ratio: float = 0.5, grc_lambda_init: float = -1.0, same_length: bool = False):
        super().__init__()
        if memory not in MEMORIES:
            raise ValueError(f"memory must be one of {MEMORIES}, got {memory!r}.")
        if mem_len < 0 or (memory == "grc" and mem_len < 1):
            raise ValueError(f"mem_len must be >= {1 if memory == 'grc' else 0} for memory={memory!r}, got {mem_len} "
                             f"(the GRC cache holds mem_len slots).")
        self.memory, self.n_layer, self.d_model = memory, n_layer, d_model
        self.mem_len, self.clamp_len = int(mem_len), int(clamp_len)
        self.eval_mem_len = int(eval_mem_len if eval_mem_len is not None else mem_len)
        if same_length and memory != "xl":
            raise ValueError("same_length applies to the Transformer-XL memory only (with memory='grc' the "
                             "self-attention sees just the current segment); set same_length to false.")
        if same_length and self.eval_mem_len < 1:
            raise ValueError(f"same_length makes every query attend to the last eval_mem_len positions, so it needs "
                             f"eval_mem_len >= 1 (got {self.eval_mem_len}); set a memory or same_length to false.")
        self.same_length = bool(same_length)
        self.word_emb = AdaptiveEmbedding(n_token, d_embed or d_model, d_model, list(cutoffs), div_val)
        self.crit = AdaptiveSoftmax(self.word_emb)
        self.drop = nn.Dropout(dropout)
        self.r_w_bias = nn.Parameter(torch.empty(n_head, d_head))   # u, shared by the layers
        self.r_r_bias = nn.Parameter(torch.empty(n_head, d_head))   # v
        self.layers = nn.ModuleList(
            XLBlock(d_model, n_head, d_head, d_inner, dropout, dropatt,
                    GRCMemory(d_model, n_head, d_head, mem_len, grc_ratio, grc_lambda_init) if memory == "grc" else None)
            for _ in range(n_layer))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Transformer-XL's init (``init_std`` 0.02, ``proj_init_std`` 0.01): N(0, .02) weights, embedding tables
        and u/v, N(0, .01) the adaptive projections, zero biases, LayerNorm weights N(1, .02); GRC's lambda keeps
        its init."""
        for name, p in self.named_parameters():
            if name.endswith("lam"):
                continue
            if name.startswith("word_emb.projs.") or name == "crit.head_proj":
                nn.init.normal_(p, 0.0, 0.01)
            elif "norm" in name and name.endswith("weight"):
                nn.init.normal_(p, 1.0, 0.02)
            elif name.endswith("bias") and p.dim() == 1 or "biases" in name or name.endswith("cluster_bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, 0.02)

    # ------------------------------------------------------------------ memory state
    def _mem_len(self) -> int:
        return self.mem_len if self.training else self.eval_mem_len

    def attention_mask(self, q: int, m: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """q x (m + q) bool, True = hidden: query i (stream position m + i among the keys) never sees a later key;
        with ``same_length`` in evaluation it also does not see keys ``eval_mem_len`` or more positions back, so
        every query attends to the same ``eval_mem_len`` keys (itself included) once the stream is that long
        (Transformer-XL's ``same_length`` mask)."""
        dist = torch.arange(m, m + q, device=device)[:, None] - torch.arange(m + q, device=device)[None]
        mask = dist < 0
        if self.same_length and not self.training:
            mask |= dist >= self.eval_mem_len
        return mask

    def _positions(self, k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        pos = torch.arange(k - 1, -1, -1.0, device=device)
        if self.clamp_len > 0:
            pos = pos.clamp(max=self.clamp_len)
        return self.drop(sinusoid(pos, self.d_model).to(dtype))

    def forward(self, input: torch.Tensor, target: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """input, target: B x t token ids -> (per-token NLL B x t in nats, new memory state)."""
        b, q = input.shape
        x = self.drop(self.word_emb(input))
        dev, dt = x.device, x.dtype
        new_state: list[Any] = []
        if self.memory == "xl":
            mems = state if state is not None else [None] * (self.n_layer + 1)
            m = 0 if mems[0] is None else mems[0].shape[1]
            mask = self.attention_mask(q, m, dev)
            pos = self._positions(q + m, dev, dt)
            hids = [x]
            for i, layer in enumerate(self.layers):
                x, _ = layer(x, mems[i], pos, self.r_w_bias, self.r_r_bias, mask)
                hids.append(x)
            keep = self._mem_len()
            with torch.no_grad():
                for i, h in enumerate(hids):
                    cat = h if mems[i] is None else torch.cat([mems[i], h], dim=1)
                    new_state.append(cat[:, max(cat.shape[1] - keep, 0):].detach())
        else:
            mask = torch.ones(q, q, dtype=torch.bool, device=dev).triu(1)
            pos = self._positions(q, dev, dt)
            for i, layer in enumerate(self.layers):
                grc = layer.grc
                if state is None:  # start of a stream: C_0 = GRC(0, empty summary), a learned initial cache
                    prev = pending = x.new_zeros(b, self.mem_len, grc.mem_dim, dtype=torch.float32)
                else:
                    prev, pending = state[i]
                # the one cache update of this step, inside this step's graph (gates get a gradient)
                cache = grc.update(prev, pending)
                x, xu = layer(x, None, pos, self.r_w_bias, self.r_r_bias, mask, cache)
                new_state.append((cache.detach().float(), xu.detach().float()))
        x = self.drop(x)
        nll = self.crit(x.reshape(b * q, -1), target.reshape(-1)).view(b, q)
        return nll, new_state


PRESETS: dict[str, dict[str, Any]] = {
    # Transformer-XL's run_wt103_base.sh / run_wt103_large.sh
    "base": dict(n_layer=16, d_model=410, n_head=10, d_head=41, d_inner=2100, dropout=0.1, dropatt=0.0,
                 cutoffs=[20000, 40000, 200000], div_val=1, mem_len=150),
    "large": dict(n_layer=18, d_model=1024, n_head=16, d_head=64, d_inner=4096, dropout=0.2, dropatt=0.2,
                  cutoffs=[20000, 40000, 200000], div_val=4, mem_len=384),
}


def detach_state(state: Any) -> Any:
    """A memory state with every tensor detached (for checkpoints and hand-over between phases)."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, (list, tuple)):
        return type(state)(detach_state(s) for s in state)
    return state


def map_state(state: Any, fn) -> Any:
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, (list, tuple)):
        return type(state)(map_state(s, fn) for s in state)
    return state
