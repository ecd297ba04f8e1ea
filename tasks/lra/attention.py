"""Sub-quadratic attentions for the LRA baselines and their GRC memory branches.

* :class:`BlockSparseAttention` -- BigBird's block-sparse attention (Zaheer et al. 2020): the
  sequence is cut into blocks of ``block_size`` tokens; the first ``num_global_blocks`` blocks are
  global (they attend to everything and everything attends to them), every other query block attends
  to its ``num_window_blocks`` neighbouring blocks and ``num_random_blocks`` random blocks.
  Cost O(T * (g + w + r) * b). The global tokens are the *leading* blocks (ETC-style, the CLS token
  is in block 0) rather than ITC's first + last block: with right-padded batches the last block is
  padding, and leading globals keep the model exactly padding-invariant. Random blocks are drawn per
  layer from a fixed hash of (seed, query block, slot) over the sample's valid blocks, as in
  BigBird's original code where the random pattern is fixed per layer.
* :class:`BlockSparseCrossAttention` -- the same pattern from a query sequence onto the GRC cache
  (T_m tokens). Query block i's window is centred on the cache block that summarises the same
  *relative* position (the cache is a resize of each sample's valid tokens to T_m), so it needs the
  query padding mask, given through :func:`query_padding`.
* :class:`LSHSelfAttention` -- Reformer's LSH attention (Kitaev et al. 2020): shared query/key
  projection, keys length-normalised, angular LSH with random rotations (``n_hashes`` rounds,
  ``n_buckets`` buckets), tokens sorted by (bucket, position), cut into chunks of ``chunk_len``, each
  chunk attends to itself and the previous chunk, a token does not attend to itself unless nothing
  else is there, rounds combined by their log-sum-exp. Cost O(n_hashes * T * 2 * chunk_len) plus a
  sort. Padding tokens get their own last bucket, so they never move a valid token's chunk; the
  rotations are resampled at every training forward (Reformer) and fixed (a seeded buffer) in eval.
* :class:`LSHCrossAttention` -- LSH from queries onto the GRC cache: queries and cache keys are hashed
  with the same rotations (one draw per training forward), sorted jointly by (bucket, relative position) and chunked; a query attends
  to the cache keys in its chunk and the previous one. Queries with no key there get zero output.

All modules take ``key_padding_mask`` (B x T bool, True = pad) the GRC layer passes to its host.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_EXP_FLOOR = -30.0  # see masked_softmax


def _neg(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


def masked_value(dtype: torch.dtype) -> float:
    """Additive mask value for SDPA in ``dtype``: -1e9, or half the most negative number where -1e9 does not
    fit (float16: -32752). Finite, so a row with nothing to attend to never gives NaN; half the range, so
    adding :func:`self_mask_value` (a quarter of it) cannot overflow to -inf."""
    return max(-1e9, torch.finfo(dtype).min / 2)


def self_mask_value(dtype: torch.dtype) -> float:
    """Reformer's penalty on a token attending to itself (it does only when nothing else is in its window):
    -1e5, or a quarter of the most negative ``dtype`` number where -1e5 does not fit (float16: -16376).
    Always far below any real logit and far above :func:`masked_value`."""
    return max(-1e5, torch.finfo(dtype).min / 4)


def additive_mask(ok: torch.Tensor, dtype: torch.dtype, extra: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``ok`` (True = attend) -> additive float mask for SDPA (0 / :func:`masked_value`), plus ``extra``."""
    mask = torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill(~ok, masked_value(dtype))
    return mask if extra is None else mask + extra


def masked_softmax(logits: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim restricted to ``ok`` (broadcastable bool); rows with no ``ok`` -> zeros.

    Returns (probs, log-sum-exp with keepdim; the dtype's minimum for empty rows). Masked entries
    are zeroed by multiplication and exponents are clamped at ``_EXP_FLOOR`` = -30: on CPU, ``exp``
    of -inf or of arguments below about -87 is ~20x slower, and tiny weights (exp(-80) = 2e-35) drive
    the backward pass into denormal numbers, which are slower still. A weight below exp(-30) = 9e-14
    of the largest one is below float32 resolution, so the clamp does not change the result.
    """
    mx = logits.masked_fill(~ok, _neg(logits.dtype)).amax(-1, keepdim=True).detach()
    e = torch.where(ok, logits - mx, 0.0).clamp(min=_EXP_FLOOR).exp() * ok
    s = e.sum(-1, keepdim=True)
    has = s > 0
    probs = e / torch.where(has, s, torch.ones_like(s))
    lse = torch.where(has, mx + torch.log(torch.where(has, s, torch.ones_like(s))), torch.full_like(s, _neg(s.dtype)))
    return probs, lse


@contextlib.contextmanager
def query_padding(module: nn.Module | None, mask: torch.Tensor | None) -> Iterator[None]:
    """Give a memory-branch module the query padding mask for one forward (no-op for others)."""
    if module is None or not hasattr(module, "query_padding_mask"):
        yield
        return
    module.query_padding_mask = mask
    try:
        yield
    finally:
        module.query_padding_mask = None


def valid_lengths(mask: torch.Tensor | None, batch: int, t: int, device: torch.device) -> torch.Tensor:
    """B: index of the last valid token + 1 (right padding), or T without a mask."""
    if mask is None:
        return torch.full((batch,), t, dtype=torch.long, device=device)
    pos = torch.arange(1, mask.shape[1] + 1, device=device)
    return (pos * (~mask.bool())).amax(1).clamp(min=1)


def hash_uniform(i: torch.Tensor, j: torch.Tensor, seed: int) -> torch.Tensor:
    """Deterministic pseudo-random floats in [0, 1) from integer tensors (31-bit integer mixing)."""
    m = 0x7FFFFFFF
    h = (i.long() * 1103515245 + j.long() * 12345 + (seed * 2654435761 + 97) % m) & m
    for mult in (1274126177, 1664525, 2246822519 % m):
        h = ((h ^ (h >> 13)) * mult) & m
    return h.double().div(m + 1).float()


# ---------------------------------------------------------------------------------------------- BigBird
def block_sparse_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, key_blocks: torch.Tensor,
                        key_ok: torch.Tensor, key_pad: torch.Tensor, global_q: int, dropout_p: float) -> torch.Tensor:
    """Block-sparse attention core.

    q: B x Tq x H x d (Tq multiple of ``block``); k, v: B x Tk x H x d (Tk multiple of ``block``);
    key_blocks, key_ok: B x (Tq/block - global_q) x m block indices into the keys and whether each is
    used; key_pad: B x Tk bool (True = pad). The first ``global_q`` query blocks attend to every key.
    Returns B x Tq x H x d.
    """
    b, tq, h, d = q.shape
    tk = k.shape[1]
    scale = d ** -0.5
    outs = []
    g = global_q * block
    if g:
        mask = additive_mask((~key_pad)[:, None, None, :], q.dtype)
        o = F.scaled_dot_product_attention(q[:, :g].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, dropout_p=dropout_p, scale=scale)
        outs.append(o.transpose(1, 2))
    nq = tq // block - global_q
    if nq > 0:
        m = key_blocks.shape[-1]
        kb = k.view(b, tk // block, block, h, d)
        vb = v.view(b, tk // block, block, h, d)
        bi = torch.arange(b, device=q.device)[:, None, None]
        kg = kb[bi, key_blocks].reshape(b, nq, m * block, h, d)            # B x nq x mb x H x d
        vg = vb[bi, key_blocks].reshape(b, nq, m * block, h, d)
        ok = key_ok[..., None] & ~key_pad.view(b, -1, block)[bi, key_blocks]  # B x nq x m x block
        qb = q[:, g:].reshape(b * nq, block, h, d).transpose(1, 2)          # B nq x H x block x d
        kg = kg.reshape(b * nq, m * block, h, d).transpose(1, 2)
        vg = vg.reshape(b * nq, m * block, h, d).transpose(1, 2)
        mask = additive_mask(ok.reshape(b * nq, 1, 1, m * block), q.dtype)
        o = F.scaled_dot_product_attention(qb, kg, vg, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        outs.append(o.transpose(1, 2).reshape(b, nq * block, h, d))
    return torch.cat(outs, 1) if len(outs) > 1 else outs[0]


def bigbird_key_blocks(n_query_blocks: int, n_key_blocks: int, centres: torch.Tensor, valid_blocks: torch.Tensor,
                       num_global: int, num_window: int, num_random: int,
                       seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key blocks of every non-global query block: global, window around ``centres``, random.

    centres: B x nq' window centre (key block index) of query blocks ``num_global..n_query_blocks-1``;
    valid_blocks: B number of key blocks holding valid tokens. Returns (indices, used), both
    B x nq' x (num_global + num_window + num_random); unused slots (outside the keys, duplicates of a
    global or window block, no candidate left) have ``used = False``.
    """
    b, nq = centres.shape
    dev = centres.device
    half = num_window // 2
    glob = torch.arange(num_global, device=dev).expand(b, nq, num_global)
    offs = torch.arange(-half, num_window - half, device=dev)
    win = centres[..., None] + offs                                               # B x nq x w
    win_ok = (win >= num_global) & (win < n_key_blocks)
    parts, oks = [glob, win.clamp(0, n_key_blocks - 1)], [torch.ones_like(glob, dtype=torch.bool), win_ok]
    if num_random:
        qi = torch.arange(num_global, num_global + nq, device=dev)[:, None]
        slot = torch.arange(num_random, device=dev)[None, :]
        u = hash_uniform(qi, slot, seed)                                          # nq x r
        cand = (valid_blocks - num_global).clamp(min=0)[:, None, None].float()    # B x 1 x 1
        # stratified draws: sorted, and distinct when there are at least num_random candidates
        rnd = num_global + ((slot + u)[None] * cand / num_random).floor().long()
        rnd_ok = (cand > 0) & (rnd < num_global + cand.long()) & (rnd < n_key_blocks)
        dup = torch.zeros_like(rnd_ok)
        dup[..., 1:] = rnd[..., 1:] == rnd[..., :-1]
        in_win = ((rnd[..., None] == win[..., None, :]) & win_ok[..., None, :]).any(-1)
        rnd_ok &= ~dup & ~in_win
        parts.append(rnd.clamp(0, n_key_blocks - 1))
        oks.append(rnd_ok)
    return torch.cat(parts, -1), torch.cat(oks, -1)


class _BlockSparseBase(nn.Module):
    def __init__(self, block_size: int, num_global_blocks: int, num_window_blocks: int, num_random_blocks: int,
                 seed: int):
        super().__init__()
        if block_size < 1 or num_global_blocks < 1 or num_window_blocks < 1 or num_random_blocks < 0:
            raise ValueError("BigBird needs block_size >= 1, >= 1 global block, >= 1 window block, >= 0 random.")
        self.block_size, self.num_global_blocks = block_size, num_global_blocks
        self.num_window_blocks, self.num_random_blocks, self.seed = num_window_blocks, num_random_blocks, seed

    @staticmethod
    def _pad_to(t: torch.Tensor, n: int) -> torch.Tensor:
        return t if t.shape[1] == n else F.pad(t, (0, 0) * (t.dim() - 2) + (0, n - t.shape[1]))

    def extra_repr(self) -> str:
        return (f"block_size={self.block_size}, global={self.num_global_blocks}, window={self.num_window_blocks}, "
                f"random={self.num_random_blocks}, seed={self.seed}")


class BlockSparseAttention(_BlockSparseBase):
    """BigBird block-sparse self-attention. forward(x: B x T x D, key_padding_mask: B x T | None) -> B x T x D."""

    def __init__(self, dim: int, num_heads: int, block_size: int = 64, num_global_blocks: int = 2,
                 num_window_blocks: int = 3, num_random_blocks: int = 3, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, seed: int = 0):
        super().__init__(block_size, num_global_blocks, num_window_blocks, num_random_blocks, seed)
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}.")
        self.dim, self.num_heads, self.attn_drop = dim, num_heads, attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def key_blocks(self, lengths: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, used) of the key blocks of query blocks g..n-1 for valid ``lengths`` (B), length t."""
        nb = -(-t // self.block_size)
        g = min(self.num_global_blocks, nb)
        centres = torch.arange(g, nb, device=lengths.device).expand(len(lengths), nb - g)
        valid = -(-lengths // self.block_size)
        return bigbird_key_blocks(nb, nb, centres, valid, g, self.num_window_blocks, self.num_random_blocks,
                                  self.seed)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, c = x.shape
        bs = self.block_size
        tp = -(-t // bs) * bs
        pad = key_padding_mask.bool() if key_padding_mask is not None else torch.zeros(b, t, dtype=torch.bool,
                                                                                       device=x.device)
        lengths = valid_lengths(key_padding_mask, b, t, x.device)
        pad = F.pad(pad, (0, tp - t), value=True)
        qkv = self._pad_to(self.qkv(x), tp).view(b, tp, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.unbind(2)
        blocks, ok = self.key_blocks(lengths, tp)
        g = min(self.num_global_blocks, tp // bs)
        out = block_sparse_attend(q, k, v, bs, blocks, ok, pad, g, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out[:, :t].reshape(b, t, c)))


class BlockSparseCrossAttention(_BlockSparseBase):
    """BigBird pattern from queries onto the GRC cache (memory branch of the cached BigBird).

    forward(x: B x T x D_m, kv: B x T_m x D_m, kv_hw=None) -> B x T x D_m. The query padding mask
    (for the relative alignment of the windows) comes through :func:`query_padding`.
    """

    def __init__(self, dim: int, num_heads: int, block_size: int = 64, num_global_blocks: int = 2,
                 num_window_blocks: int = 3, num_random_blocks: int = 3, qkv_bias: bool = False, seed: int = 0):
        super().__init__(block_size, num_global_blocks, num_window_blocks, num_random_blocks, seed)
        self.dim, self.num_heads = dim, num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.query_padding_mask: torch.Tensor | None = None

    def key_blocks(self, lengths: torch.Tensor, t: int, t_mem: int) -> tuple[torch.Tensor, torch.Tensor]:
        bs = self.block_size
        nq, nk = -(-t // bs), -(-t_mem // bs)
        g = min(self.num_global_blocks, nq)
        mid = (torch.arange(g, nq, device=lengths.device, dtype=torch.float32) + 0.5) * bs        # nq'
        centres = (mid[None] * (t_mem / lengths.float()[:, None]) / bs).floor().long().clamp(0, nk - 1)
        valid = torch.full_like(lengths, nk)
        return bigbird_key_blocks(nq, nk, centres, valid, min(self.num_global_blocks, nk), self.num_window_blocks,
                                  self.num_random_blocks, self.seed)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, kv_hw=None) -> torch.Tensor:
        b, t, c = x.shape
        tm = kv.shape[1]
        bs, h = self.block_size, self.num_heads
        tp, tmp = -(-t // bs) * bs, -(-tm // bs) * bs
        lengths = valid_lengths(self.query_padding_mask, b, t, x.device)
        q = self._pad_to(self.q(x), tp).view(b, tp, h, c // h)
        k, v = self._pad_to(self.kv(kv), tmp).view(b, tmp, 2, h, c // h).unbind(2)
        key_pad = torch.zeros(b, tmp, dtype=torch.bool, device=x.device)
        key_pad[:, tm:] = True
        blocks, ok = self.key_blocks(lengths, tp, tm)
        g = min(self.num_global_blocks, tp // bs)
        out = block_sparse_attend(q, k, v, bs, blocks, ok, key_pad, g, 0.0)
        return self.proj(out[:, :t].reshape(b, t, c))


# ---------------------------------------------------------------------------------------------- Reformer
def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: N x T x d, idx: N x R (indices into T) -> N x R x d (memory of the output only)."""
    n, t, d = x.shape
    flat = (idx + torch.arange(n, device=idx.device)[:, None] * t).reshape(-1)
    return x.reshape(n * t, d).index_select(0, flat).view(n, idx.shape[1], d)


def _look_one_back(x: torch.Tensor) -> torch.Tensor:
    """... x nc x c x ... -> ... x nc x 2c x ...: each chunk followed by the previous one (chunk 0: zeros)."""
    prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
    return torch.cat([x, prev], 2)


def _combine_rounds(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """out: N x nh x T x d, lse: N x nh x T -> N x T x d weighted by softmax over rounds of lse."""
    w = torch.softmax(lse, dim=1)
    return (out * w[..., None]).sum(1)


class _LSHBase(nn.Module):
    def __init__(self, dim: int, num_heads: int, chunk_len: int, n_hashes: int, n_buckets: int, seed: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}.")
        if n_buckets < 2 or n_buckets % 2:
            raise ValueError(f"n_buckets must be even and >= 2, got {n_buckets}.")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.chunk_len, self.n_hashes, self.n_buckets, self.seed = chunk_len, n_hashes, n_buckets, seed
        gen = torch.Generator().manual_seed(10_007 + seed)
        self.register_buffer("rotations", torch.randn(num_heads, self.head_dim, n_hashes, n_buckets // 2,
                                                      generator=gen))

    def draw_rotations(self) -> torch.Tensor:
        """The random rotations of one forward: fresh in training (Reformer), the seeded buffer in eval.

        Everything hashed in one forward (queries and keys of the cross attention) must use the same
        draw, or identical vectors land in different buckets."""
        return torch.randn_like(self.rotations) if self.training else self.rotations

    def hash(self, vecs: torch.Tensor, rotations: torch.Tensor | None = None) -> torch.Tensor:
        """vecs: B x H x T x d -> buckets B x H x n_hashes x T (angular LSH, argmax over [xR, -xR]).

        ``rotations`` from :meth:`draw_rotations` (drawn here when not given). The projection runs in
        float32 outside autocast, so mixed precision does not move vectors across bucket borders."""
        rot = self.draw_rotations() if rotations is None else rotations
        with torch.autocast(vecs.device.type, enabled=False):
            r = torch.einsum("bhtd,hdnk->bhntk", vecs.detach().float(), rot.float())
        return torch.cat([r, -r], -1).argmax(-1)

    @staticmethod
    def _key_norm(k: torch.Tensor) -> torch.Tensor:
        return k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6)

    def extra_repr(self) -> str:
        return f"chunk_len={self.chunk_len}, n_hashes={self.n_hashes}, n_buckets={self.n_buckets}, seed={self.seed}"


class LSHSelfAttention(_LSHBase):
    """Reformer LSH self-attention (shared QK). forward(x: B x T x D, key_padding_mask) -> B x T x D."""

    def __init__(self, dim: int, num_heads: int, chunk_len: int = 64, n_hashes: int = 1, n_buckets: int = 32,
                 qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0, seed: int = 0):
        super().__init__(dim, num_heads, chunk_len, n_hashes, n_buckets, seed)
        self.attn_drop = attn_drop
        self.qk = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.last_sort: torch.Tensor | None = None  # B x H x n_hashes x Tp sort order, kept for tests
        self.keep_sort = False

    def sort_order(self, qk: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """qk: B x H x T x d, pad: B x T -> permutation B x H x n_hashes x T (by bucket, then position)."""
        t = qk.shape[2]
        buckets = self.hash(qk).masked_fill(pad[:, None, None, :], self.n_buckets)  # padding: own last bucket
        keys = buckets * t + torch.arange(t, device=qk.device)
        return keys.argsort(-1)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, c = x.shape
        h, d, cl, nh = self.num_heads, self.head_dim, self.chunk_len, self.n_hashes
        tp = -(-t // cl) * cl
        pad = key_padding_mask.bool() if key_padding_mask is not None else torch.zeros(b, t, dtype=torch.bool,
                                                                                       device=x.device)
        pad = F.pad(pad, (0, tp - t), value=True)
        qk = F.pad(self.qk(x), (0, 0, 0, tp - t)).view(b, tp, h, d).transpose(1, 2)   # B x H x Tp x d
        v = F.pad(self.v(x), (0, 0, 0, tp - t)).view(b, tp, h, d).transpose(1, 2)
        perm = self.sort_order(qk, pad)                                                # B x H x nh x Tp
        if self.keep_sort:
            self.last_sort = perm
        n = b * h
        idx = perm.reshape(n, nh * tp)
        sqk = _gather_rows(qk.reshape(n, tp, d), idx).view(n * nh, tp // cl, cl, d)
        sv = _gather_rows(v.reshape(n, tp, d), idx).view(n * nh, tp // cl, cl, d)
        spad = pad[:, None].expand(b, h, tp).reshape(n, tp).gather(1, idx).view(n * nh, tp // cl, cl)
        spos = idx.view(n * nh, tp // cl, cl)

        sk = _look_one_back(self._key_norm(sqk))
        svv = _look_one_back(sv)
        kpad = _look_one_back(spad[..., None]).squeeze(-1)
        kpos = _look_one_back(spos[..., None]).squeeze(-1)
        kpad[:, 0, cl:] = True                                                         # chunk 0 has no previous chunk
        drop = self.attn_drop if self.training else 0.0
        if nh == 1:  # one round: no log-sum-exp needed, use the fused kernel
            self_bias = (spos[..., :, None] == kpos[..., None, :]).to(sqk.dtype) * self_mask_value(sqk.dtype)
            mask = additive_mask(~kpad[..., None, :], sqk.dtype, self_bias)
            so = F.scaled_dot_product_attention(sqk, sk, svv, attn_mask=mask, dropout_p=drop).reshape(n, tp, d)
            out = so.gather(1, torch.argsort(perm.reshape(n, tp), dim=-1)[..., None].expand(-1, -1, d))
            out = out.view(b, h, tp, d)[:, :, :t]
            return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, t, c)))
        logits = torch.einsum("ncqd,nckd->ncqk", sqk, sk) * d ** -0.5
        logits = logits.masked_fill(spos[..., :, None] == kpos[..., None, :], self_mask_value(logits.dtype))
        probs, lse = masked_softmax(logits, ~kpad[..., None, :])
        if drop:
            probs = F.dropout(probs, drop)
        so = torch.einsum("ncqk,nckd->ncqd", probs, svv).reshape(n, nh * tp, d)
        undo = torch.empty_like(perm).scatter_(-1, perm, torch.arange(tp, device=x.device).expand_as(perm))
        undo = (undo + torch.arange(nh, device=x.device)[:, None] * tp).reshape(n, nh * tp)
        out = _gather_rows(so, undo).view(n, nh, tp, d)
        lse = lse.reshape(n, nh * tp).gather(1, undo).view(n, nh, tp)
        out = _combine_rounds(out, lse).view(b, h, tp, d)[:, :, :t]
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, t, c)))


class LSHCrossAttention(_LSHBase):
    """LSH attention from queries onto the GRC cache (memory branch of the cached Reformer).

    forward(x: B x T x D_m, kv: B x T_m x D_m, kv_hw=None) -> B x T x D_m. Query padding comes through
    :func:`query_padding` (padded queries are hashed to a last bucket of their own).
    """

    def __init__(self, dim: int, num_heads: int, chunk_len: int = 64, n_hashes: int = 1, n_buckets: int = 32,
                 qkv_bias: bool = False, seed: int = 0):
        super().__init__(dim, num_heads, chunk_len, n_hashes, n_buckets, seed)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.query_padding_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, kv: torch.Tensor, kv_hw=None) -> torch.Tensor:
        b, t, c = x.shape
        tm = kv.shape[1]
        h, d, cl, nh = self.num_heads, self.head_dim, self.chunk_len, self.n_hashes
        qpad = self.query_padding_mask
        qpad = qpad.bool() if qpad is not None else torch.zeros(b, t, dtype=torch.bool, device=x.device)
        lengths = valid_lengths(self.query_padding_mask, b, t, x.device)
        q = self.q(x).view(b, t, h, d).transpose(1, 2)
        k, v = self.kv(kv).view(b, tm, 2, h, d).permute(2, 0, 3, 1, 4)
        k = self._key_norm(k)
        # joint sort of queries and keys by (bucket, relative position); padded queries last
        nall = t + tm
        npad = -(-nall // cl) * cl
        rot = self.draw_rotations()  # one draw for queries and keys
        qb = self.hash(q, rot).masked_fill(qpad[:, None, None, :], self.n_buckets)
        kb = self.hash(k, rot)
        qrel = (torch.arange(t, device=x.device)[None].float() + 0.5) / lengths[:, None].float()   # B x T
        krel = (torch.arange(tm, device=x.device).float() + 0.5) / tm
        rel = torch.cat([qrel, krel.expand(b, tm)], 1).clamp(max=1.0).double()
        key = torch.cat([qb, kb], -1).double() * 4.0 + rel[:, None, None, :]   # buckets spaced wider than rel
        key = F.pad(key, (0, npad - nall), value=4.0 * (self.n_buckets + 2))
        perm = key.argsort(dim=-1, stable=True)                                                # B x H x nh x Np
        n = b * h
        idx = perm.reshape(n, nh * npad)
        zq, zk = q.new_zeros(b, h, npad - t, d), q.new_zeros(b, h, t, d)
        tail = q.new_zeros(b, h, npad - nall, d)
        qcat = torch.cat([q, zq], 2).reshape(n, npad, d)
        kcat = torch.cat([zk, k, tail], 2).reshape(n, npad, d)
        vcat = torch.cat([zk, v, tail], 2).reshape(n, npad, d)
        is_key = torch.zeros(npad, dtype=torch.bool, device=x.device)
        is_key[t:nall] = True
        nc = npad // cl
        sq = _gather_rows(qcat, idx).view(n * nh, nc, cl, d)
        sk = _look_one_back(_gather_rows(kcat, idx).view(n * nh, nc, cl, d))
        sv = _look_one_back(_gather_rows(vcat, idx).view(n * nh, nc, cl, d))
        ok = _look_one_back(is_key[idx].view(n * nh, nc, cl, 1)).squeeze(-1)
        ok[:, 0, cl:] = False
        if nh == 1:  # one round: the fused kernel; a window without keys only holds zero values -> 0
            so = F.scaled_dot_product_attention(sq, sk, sv, attn_mask=additive_mask(ok[..., None, :], sq.dtype))
            undo = torch.argsort(perm.reshape(n, npad), dim=-1)[..., :t]
            out = so.reshape(n, npad, d).gather(1, undo[..., None].expand(-1, -1, d)).view(b, h, t, d)
            return self.proj(out.transpose(1, 2).reshape(b, t, c))
        logits = torch.einsum("ncqd,nckd->ncqk", sq, sk) * d ** -0.5
        probs, lse = masked_softmax(logits, ok[..., None, :])                            # no key: zeros
        so = torch.einsum("ncqk,nckd->ncqd", probs, sv).reshape(n, nh * npad, d)
        undo = torch.empty_like(perm).scatter_(-1, perm, torch.arange(npad, device=x.device).expand_as(perm))
        undo = (undo[..., :t] + torch.arange(nh, device=x.device)[:, None] * npad).reshape(n, nh * t)
        out = _gather_rows(so, undo).view(n, nh, t, d)
        lse = lse.reshape(n, nh * npad).gather(1, undo).view(n, nh, t)
        out = _combine_rounds(out, lse).view(b, h, t, d)
        return self.proj(out.transpose(1, 2).reshape(b, t, c))
