"""Adaptive input embeddings and the adaptive softmax with tied weights (Transformer-XL's WikiText-103 setup).

The vocabulary (ordered by train frequency) is cut at ``cutoffs`` into clusters; cluster i has
embedding width ``d_embed // div_val**i``. Projections to ``d_proj`` as in Transformer-XL's
``AdaptiveEmbedding``: with ``div_val == 1`` (one table for the whole vocabulary there) one shared
projection, only when ``d_embed != d_proj``; with ``div_val > 1`` one per cluster, the first cluster's
included even when its width is ``d_proj``.

The softmax reuses the tables (``tie_weight``) and the tail clusters' projections, but has its own
projection for the head cluster: Transformer-XL's WikiText-103 setting ``tie_projs = [False, True,
True, True]``. The head predicts the first cluster's words plus one logit per tail cluster, a tail
cluster's words are predicted within the cluster. torch's ``nn.AdaptiveLogSoftmaxWithLoss`` cannot
share its tables with an input embedding, hence this module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cluster_bounds(n_token: int, cutoffs: list[int]) -> list[int]:
    """[0, c_1, ..., c_k, n_token]; cutoffs at or above ``n_token`` are dropped (small vocabularies)."""
    cuts = [int(c) for c in cutoffs if 0 < int(c) < n_token]
    if cuts != sorted(set(cuts)):
        raise ValueError(f"adaptive cutoffs must be strictly increasing, got {cutoffs}.")
    return [0] + cuts + [n_token]


class AdaptiveEmbedding(nn.Module):
    """Token ids -> vectors of width ``d_proj``, scaled by sqrt(d_proj) (as Transformer-XL)."""

    def __init__(self, n_token: int, d_embed: int, d_proj: int, cutoffs: list[int], div_val: int = 1):
        super().__init__()
        if div_val < 1:
            raise ValueError(f"div_val must be >= 1, got {div_val}.")
        self.bounds = cluster_bounds(n_token, cutoffs)
        self.d_proj, self.div_val, self.scale = d_proj, int(div_val), d_proj ** 0.5
        self.layers = nn.ModuleList()
        self.projs = nn.ParameterList()  # div_val 1: [shared] or []; div_val > 1: one per cluster
        for i in range(len(self.bounds) - 1):
            d = d_embed // (div_val ** i)
            if d < 1:
                raise ValueError(f"div_val {div_val} leaves cluster {i} with no embedding width (d_embed {d_embed}).")
            self.layers.append(nn.Embedding(self.bounds[i + 1] - self.bounds[i], d))
            if div_val > 1 or (i == 0 and d != d_proj):
                self.projs.append(nn.Parameter(torch.empty(d_proj, d)))

    def proj(self, i: int) -> torch.Tensor | None:
        """The d_proj x d_i projection of cluster ``i`` (None: the cluster is already ``d_proj`` wide)."""
        if self.div_val > 1:
            return self.projs[i]
        return self.projs[0] if len(self.projs) else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = None
        for i, layer in enumerate(self.layers):
            lo, hi = self.bounds[i], self.bounds[i + 1]
            sel = (ids >= lo) & (ids < hi)
            emb = layer((ids - lo).clamp(0, hi - lo - 1))
            proj = self.proj(i)
            if proj is not None:
                emb = F.linear(emb, proj)
            emb = emb * sel.unsqueeze(-1).to(emb.dtype)
            out = emb if out is None else out + emb
        return out * self.scale


class AdaptiveSoftmax(nn.Module):
    """Negative log-likelihood of targets under the adaptive softmax tied to ``embedding``.

    forward(hidden: N x d_proj, target: N) -> N per-token NLL (nats).
    """

    def __init__(self, embedding: AdaptiveEmbedding):
        super().__init__()
        self.emb = [embedding]  # shared, not a submodule (its parameters are registered by the model)
        bounds = embedding.bounds
        self.n_clusters = len(bounds) - 2
        d0 = embedding.layers[0].embedding_dim
        self.cluster_weight = nn.Parameter(torch.zeros(self.n_clusters, d0))
        self.cluster_bias = nn.Parameter(torch.zeros(self.n_clusters))
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(bounds[i + 1] - bounds[i]))
                                        for i in range(len(bounds) - 1)])
        # the head cluster's projection is the softmax's own (tie_projs[0] = False); N(0, 0.01) as Transformer-XL's
        p0 = embedding.proj(0)
        self.head_proj = None if p0 is None else nn.Parameter(torch.empty_like(p0).normal_(0.0, 0.01))

    def _proj(self, hidden: torch.Tensor, i: int) -> torch.Tensor:
        proj = self.head_proj if i == 0 else self.emb[0].proj(i)
        return hidden if proj is None else hidden @ proj

    def forward(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        emb = self.emb[0]
        bounds = emb.bounds
        h0 = self._proj(hidden, 0)
        head_w = torch.cat([emb.layers[0].weight, self.cluster_weight.to(h0.dtype)], 0)
        head_b = torch.cat([self.biases[0], self.cluster_bias])
        head_logprob = F.log_softmax(F.linear(h0, head_w, head_b).float(), dim=-1)
        nll = torch.zeros_like(target, dtype=torch.float32)
        for i in range(len(bounds) - 1):
            lo, hi = bounds[i], bounds[i + 1]
            idx = ((target >= lo) & (target < hi)).nonzero(as_tuple=True)[0]
            if idx.numel() == 0:  # keep the cluster's bias in the graph (DDP expects every parameter used)
                nll = nll + 0.0 * self.biases[i].sum()
                continue
            tgt = target[idx] - lo
            if i == 0:
                lp = head_logprob[idx].gather(1, tgt[:, None]).squeeze(1)
            else:
                hi_ = self._proj(hidden[idx], i)
                tail = F.log_softmax(F.linear(hi_, emb.layers[i].weight, self.biases[i]).float(), dim=-1)
                col = bounds[1] + i - 1  # head column of tail cluster i: after the first cluster's words
                lp = head_logprob[idx, col] + tail.gather(1, tgt[:, None]).squeeze(1)
            nll = nll.index_put((idx,), -lp)
        return nll
