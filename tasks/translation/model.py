"""fairseq's pre-norm encoder-decoder Transformer, with the GRC cache in every encoder self-attention.

What matches fairseq v0.12.2 (``transformer_iwslt_de_en`` / ``transformer_wmt_en_de[_big]`` with
``--encoder-normalize-before --decoder-normalize-before``), see docs/translation.md:

* token embeddings N(0, d^-0.5) with the ``<pad>`` row zero, scaled by sqrt(d); sinusoidal positions
  in fairseq's variant (``[sin | cos]`` halves, frequencies ``exp(-i log(10000) / (d/2 - 1))``,
  positions from ``padding_idx + 1`` = 2, the pad row zero); dropout; no embedding LayerNorm;
* pre-norm layers ``x + drop(attn(LN(x)))``, ``x + drop(fc2(act_drop(relu(fc1(LN(x))))))`` and a final
  LayerNorm in encoder and decoder; padded encoder positions are zeroed after the embedding;
* attention: separate q/k/v projections, xavier_uniform with gain 1/sqrt(2); output projection
  xavier_uniform with zero bias; FFN linears keep PyTorch's default init (as fairseq);
* decoder output projection tied to the decoder input embedding (``share_decoder_input_output_embed``)
  and, with ``share_all_embeddings``, the encoder embedding too (needs a joined dictionary).

With ``grc`` set, every encoder self-attention is ``cached_transformers.GRCAttention`` around the
fairseq attention (T_m = ``cache_len`` = 64, r = 0.5, summary from each sentence's valid tokens via
``key_padding_mask``); the decoder is unchanged. The library writes the stored cache only in training
forwards with gradients, so validation, beam search and greedy decoding never change it.

Incremental decoding: :meth:`TransformerModel.decode_step` takes the newest target token of every
hypothesis and a :class:`DecoderState` (per layer: preallocated self-attention key/value buffers
filled one step at a time, and the encoder keys/values projected once); ``state.reorder(order)``
follows the beam.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cached_transformers import GRCAttention, GRCConfig
from cached_transformers.grc import optional_grc_config

from .dictionary import PAD_ID

GRC_DEFAULTS = dict(preset="reference", padding="valid", pos_encoding="none", ratio=0.5)


# ---------------------------------------------------------------------- positions
def sinusoidal_table(num: int, dim: int, padding_idx: int = PAD_ID) -> torch.Tensor:
    """fairseq's ``SinusoidalPositionalEmbedding.get_embedding``: rows 0..num-1, the pad row zero."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000) / (half - 1)))
    ang = torch.arange(num, dtype=torch.float)[:, None] * freq[None]
    table = torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)
    if dim % 2:
        table = torch.cat([table, torch.zeros(num, 1)], dim=1)
    table[padding_idx] = 0
    return table


def make_positions(tokens: torch.Tensor, padding_idx: int = PAD_ID) -> torch.Tensor:
    """fairseq's ``make_positions``: non-pad tokens count from padding_idx + 1, pads get padding_idx."""
    mask = tokens.ne(padding_idx).int()
    return (torch.cumsum(mask, dim=1) * mask).long() + padding_idx


class SinusoidalPositions(nn.Module):
    def __init__(self, dim: int, max_positions: int = 1024):
        super().__init__()
        self.dim = dim
        self.register_buffer("table", sinusoidal_table(max_positions + PAD_ID + 1, dim), persistent=False)

    def lookup(self, positions: torch.Tensor) -> torch.Tensor:
        if int(positions.max()) >= self.table.shape[0]:  # grow like fairseq (no hard limit)
            self.table = sinusoidal_table(int(positions.max()) + 1, self.dim).to(self.table)
        return self.table[positions]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lookup(make_positions(tokens))


# ---------------------------------------------------------------------- attention
class MultiheadAttention(nn.Module):
    """fairseq's multi-head attention (separate q/k/v, fairseq init) on ``scaled_dot_product_attention``.

    ``forward(x, key_padding_mask=None)``: self-attention (the GRC host signature);
    ``attend(q_in, k, v, mask)`` with precomputed keys/values (cross-attention and incremental decoding).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, causal: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads.")
        self.dim, self.num_heads, self.dropout, self.causal = dim, num_heads, dropout, causal
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.out_proj = nn.Linear(dim, dim)
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(lin.weight, gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def heads(self, x: torch.Tensor) -> torch.Tensor:  # B x T x D -> B x H x T x hd
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, -1).transpose(1, 2)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.k_proj(x)), self.heads(self.v_proj(x))

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
               causal: bool = False) -> torch.Tensor:
        """x: B x T x D queries; k, v: B x H x S x hd; mask: broadcastable bool (True = attend)."""
        b, t, d = x.shape
        q = self.heads(self.q_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        k, v = self.kv(x)
        mask = None if key_padding_mask is None else (~key_padding_mask)[:, None, None, :]
        if self.causal and mask is not None:
            t = x.shape[1]
            mask = mask & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        return self.attend(x, k, v, mask, causal=self.causal)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float, activation_dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act_drop, self.drop = nn.Dropout(activation_dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act_drop(F.relu(self.fc1(x)))))


# ---------------------------------------------------------------------- layers
class EncoderLayer(nn.Module):
    def __init__(self, dim: int, ffn: int, heads: int, dropout: float, attention_dropout: float,
                 activation_dropout: float, grc: GRCConfig | None, cache_len: int):
        super().__init__()
        host = MultiheadAttention(dim, heads, attention_dropout)
        self.self_attn = host if grc is None else GRCAttention(dim, heads, self_attn=host, cache_len=cache_len,
                                                              config=grc)
        self.self_attn_layer_norm, self.final_layer_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn, dropout, activation_dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop(self.self_attn(self.self_attn_layer_norm(x), key_padding_mask=pad))
        return x + self.ffn(self.final_layer_norm(x))


@dataclass
class LayerState:
    k: torch.Tensor          # N x H x L x hd (self-attention keys, preallocated)
    v: torch.Tensor
    enc_k: torch.Tensor      # N x H x S x hd (encoder keys, projected once)
    enc_v: torch.Tensor


@dataclass
class DecoderState:
    """Incremental decoder state of N hypotheses: ``step`` tokens already fed."""

    layers: list[LayerState]
    enc_mask: torch.Tensor | None  # N x 1 x 1 x S (True = attend)
    step: int = 0

    def reorder(self, order: torch.Tensor) -> None:
        """Keep hypotheses ``order`` (beam reordering: each hypothesis continues one of the same source
        sentence, so the encoder keys/values stay); only the filled prefix of the buffers is copied."""
        t = self.step
        for s in self.layers:
            s.k[:, :, :t] = s.k[order, :, :t]
            s.v[:, :, :t] = s.v[order, :, :t]


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, ffn: int, heads: int, dropout: float, attention_dropout: float,
                 activation_dropout: float):
        super().__init__()
        self.self_attn = MultiheadAttention(dim, heads, attention_dropout, causal=True)
        self.encoder_attn = MultiheadAttention(dim, heads, attention_dropout)
        self.self_attn_layer_norm, self.encoder_attn_layer_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn, dropout, activation_dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, enc_k: torch.Tensor, enc_v: torch.Tensor, enc_mask: torch.Tensor | None,
                state: LayerState | None = None, step: int = 0) -> torch.Tensor:
        h = self.self_attn_layer_norm(x)
        if state is None:  # targets are right-padded: the causal mask alone is exact for every real token
            x = x + self.drop(self.self_attn(h))
        else:  # one new token per hypothesis: write its key/value, attend to the filled prefix
            k, v = self.self_attn.kv(h)
            state.k[:, :, step:step + 1], state.v[:, :, step:step + 1] = k, v
            x = x + self.drop(self.self_attn.attend(h, state.k[:, :, :step + 1], state.v[:, :, :step + 1]))
        x = x + self.drop(self.encoder_attn.attend(self.encoder_attn_layer_norm(x), enc_k, enc_v, enc_mask))
        return x + self.ffn(self.final_layer_norm(x))


# ---------------------------------------------------------------------- the model
@dataclass
class EncoderOut:
    x: torch.Tensor                  # B x S x D (final-normed)
    pad: torch.Tensor                # B x S bool (True = pad)


class TransformerModel(nn.Module):
    """Encoder-decoder Transformer. ``forward(src_tokens, prev_output_tokens) -> logits B x T x V``."""

    def __init__(self, src_vocab: int, tgt_vocab: int, *, embed_dim: int = 512, ffn_dim: int = 1024,
                 heads: int = 4, encoder_layers: int = 6, decoder_layers: int = 6, dropout: float = 0.3,
                 attention_dropout: float = 0.0, activation_dropout: float = 0.0, max_positions: int = 1024,
                 share_decoder_input_output_embed: bool = True, share_all_embeddings: bool = False,
                 grc: Mapping[str, Any] | GRCConfig | None = None, cache_len: int = 64):
        super().__init__()
        self.embed_dim, self.max_positions = embed_dim, int(max_positions)
        self.embed_scale = math.sqrt(embed_dim)
        self.grc = grc_config(grc)
        if share_all_embeddings and src_vocab != tgt_vocab:
            raise ValueError("share_all_embeddings needs a joined dictionary (equal source and target vocabularies).")
        self.encoder_embed = self._embedding(src_vocab, embed_dim)
        self.decoder_embed = self.encoder_embed if share_all_embeddings else self._embedding(tgt_vocab, embed_dim)
        self.positions = SinusoidalPositions(embed_dim, max_positions)
        self.drop = nn.Dropout(dropout)
        args = (embed_dim, ffn_dim, heads, dropout, attention_dropout, activation_dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(*args, self.grc, cache_len) for _ in range(encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(*args) for _ in range(decoder_layers))
        self.encoder_norm, self.decoder_norm = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.output_projection = None
        if not (share_decoder_input_output_embed or share_all_embeddings):
            self.output_projection = nn.Parameter(torch.empty(tgt_vocab, embed_dim))
            nn.init.normal_(self.output_projection, mean=0.0, std=embed_dim ** -0.5)

    @staticmethod
    def _embedding(vocab: int, dim: int) -> nn.Embedding:
        emb = nn.Embedding(vocab, dim, padding_idx=PAD_ID)
        nn.init.normal_(emb.weight, mean=0.0, std=dim ** -0.5)
        nn.init.zeros_(emb.weight[PAD_ID])
        return emb

    # ------------------------------------------------------------------ encoder
    def encode(self, src_tokens: torch.Tensor) -> EncoderOut:
        pad = src_tokens.eq(PAD_ID)
        x = self.embed_scale * self.encoder_embed(src_tokens) + self.positions(src_tokens)
        x = self.drop(x)
        x = x * (~pad).unsqueeze(-1).type_as(x)
        mask = pad if bool(pad.any()) else None
        for layer in self.encoder_layers:
            x = layer(x, mask)
        return EncoderOut(self.encoder_norm(x), pad)

    # ------------------------------------------------------------------ decoder
    def output_weight(self) -> torch.Tensor:
        return self.decoder_embed.weight if self.output_projection is None else self.output_projection

    def _enc_kv(self, enc: EncoderOut) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
        mask = (~enc.pad)[:, None, None, :] if bool(enc.pad.any()) else None
        return [layer.encoder_attn.kv(enc.x) for layer in self.decoder_layers], mask

    def decode(self, prev_output_tokens: torch.Tensor, enc: EncoderOut) -> torch.Tensor:
        """Teacher-forced decoder: B x T tokens -> B x T x V logits."""
        x = self.embed_scale * self.decoder_embed(prev_output_tokens) + self.positions(prev_output_tokens)
        x = self.drop(x)
        kvs, mask = self._enc_kv(enc)
        for layer, (k, v) in zip(self.decoder_layers, kvs):
            x = layer(x, k, v, mask)
        return F.linear(self.decoder_norm(x), self.output_weight())

    def forward(self, src_tokens: torch.Tensor, prev_output_tokens: torch.Tensor) -> torch.Tensor:
        return self.decode(prev_output_tokens, self.encode(src_tokens))

    def init_state(self, enc: EncoderOut, max_len: int) -> DecoderState:
        """A decoder state for ``enc``'s N rows and outputs of up to ``max_len`` tokens."""
        kvs, mask = self._enc_kv(enc)
        n = enc.x.shape[0]
        layers = []
        for layer, (k, v) in zip(self.decoder_layers, kvs):
            h = layer.self_attn.num_heads
            buf = enc.x.new_zeros(n, h, max_len, self.embed_dim // h)
            layers.append(LayerState(buf, buf.clone(), k, v))
        return DecoderState(layers, mask)

    def decode_step(self, tokens: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """tokens: N (the newest token of each hypothesis) -> N x V logits; advances ``state``."""
        t = state.step
        pos = torch.full_like(tokens, PAD_ID + 1 + t)
        x = self.embed_scale * self.decoder_embed(tokens[:, None]) + self.positions.lookup(pos[:, None])
        x = self.drop(x)
        for layer, s in zip(self.decoder_layers, state.layers):
            x = layer(x, s.enc_k, s.enc_v, state.enc_mask, state=s, step=t)
        state.step = t + 1
        return F.linear(self.decoder_norm(x[:, 0]), self.output_weight())


def grc_config(grc: Any) -> GRCConfig | None:
    """``grc`` (None / bool / mapping / GRCConfig) -> GRCConfig over this task's ``GRC_DEFAULTS``, or None (off)."""
    return optional_grc_config(grc, GRC_DEFAULTS)
