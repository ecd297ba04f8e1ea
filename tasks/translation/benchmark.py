"""Speed of the translation models: training tokens/s and beam-search sentences/s of ``transformer_iwslt``
and its ``_grc`` twin (time ratio next to the MAC ratio), and beam-search time against output length.

    python -m tasks.translation.benchmark [--device cuda] [--tokens 4096] [--rounds 3]

Training: one forward + backward + AdamW step on a batch of ``--tokens`` target tokens (sentences of 32
source and 32 target tokens, vocabularies 8,848 / 6,632 as IWSLT14 De-En). Beam search: beam 5 on 16
sentences of 32 source tokens, the output length forced to L (min_len = max_len = L) so that the time of
L and 2L tokens compares the cost per generated token. The variants are interleaved and each figure is the
minimum over ``--rounds`` rounds (a shared machine disturbs single timings).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cached_transformers.profiling import count_macs

from .criterion import label_smoothed_nll_loss
from .generate import beam_search
from .model import TransformerModel

IWSLT = dict(embed_dim=512, ffn_dim=1024, heads=4, encoder_layers=6, decoder_layers=6, dropout=0.3)
SRC_V, TGT_V = 8848, 6632


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(grc: bool, device: torch.device) -> TransformerModel:
    torch.manual_seed(0)
    return TransformerModel(SRC_V, TGT_V, grc={"ratio": 0.5} if grc else None, cache_len=64, **IWSLT).to(device)


class _Forward(torch.nn.Module):  # count_macs calls model(inputs)
    def __init__(self, model: TransformerModel, prev: torch.Tensor):
        super().__init__()
        self.model, self.prev = model, prev

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        return self.model(src, self.prev)


def train_time(model: TransformerModel, src: torch.Tensor, prev: torch.Tensor, opt: torch.optim.Optimizer) -> float:
    model.train()
    _sync(src.device)
    t0 = time.perf_counter()
    lprobs = F.log_softmax(model(src, prev).float(), -1)
    loss, _ = label_smoothed_nll_loss(lprobs, prev, 0.1)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(src.device)
    return time.perf_counter() - t0


def beam_time(model: TransformerModel, src: torch.Tensor, length: int) -> float:
    _sync(src.device)
    t0 = time.perf_counter()
    beam_search(model, src, beam=5, max_len_a=0, max_len_b=length, min_len=length)
    _sync(src.device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=4096, help="target tokens per training batch")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--beam-sentences", type=int, default=16)
    ap.add_argument("--length", type=int, default=20, help="L: beam search is timed at L and 2L output tokens")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    bsz = max(args.tokens // 32, 1)
    src = torch.randint(4, SRC_V, (bsz, 32), generator=g).to(dev)
    prev = torch.randint(4, TGT_V, (bsz, 32), generator=g).to(dev)
    bsrc = src[: args.beam_sentences]
    models = {name: build(name.endswith("_grc"), dev) for name in ("transformer_iwslt", "transformer_iwslt_grc")}
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-9) for n, m in models.items()}
    macs = {n: count_macs(_Forward(m, prev[:4]), src[:4]) for n, m in models.items()}
    best: dict[tuple[str, str], float] = {}
    for n, m in models.items():  # warm-up
        train_time(m, src, prev, opts[n])
        beam_time(m, bsrc, 4)
    for _ in range(args.rounds):
        for n, m in models.items():
            for key, fn in (("train", lambda: train_time(m, src, prev, opts[n])),
                            ("beam_L", lambda: beam_time(m, bsrc, args.length)),
                            ("beam_2L", lambda: beam_time(m, bsrc, 2 * args.length))):
                t = fn()
                best[(n, key)] = min(best.get((n, key), float("inf")), t)
    base, grc = "transformer_iwslt", "transformer_iwslt_grc"
    ntok = bsz * 32
    print(f"device {dev}, {args.rounds} interleaved rounds (min), training batch {bsz} x 32 tokens, beam 5 on "
          f"{bsrc.shape[0]} sentences")
    print(f"{'model':<24}{'train tok/s':>12}{'beam sent/s (L)':>17}{'t(2L)/t(L)':>12}{'GMACs fwd/4 sent':>18}")
    for n in (base, grc):
        tr, b1, b2 = best[(n, "train")], best[(n, "beam_L")], best[(n, "beam_2L")]
        print(f"{n:<24}{ntok / tr:>12.0f}{bsrc.shape[0] / b1:>17.2f}{b2 / b1:>12.2f}{macs[n] / 1e9:>18.3f}")
    print(f"cached / baseline: training time x{best[(grc, 'train')] / best[(base, 'train')]:.3f}, beam time "
          f"x{best[(grc, 'beam_L')] / best[(base, 'beam_L')]:.3f}, MACs x{macs[grc] / macs[base]:.3f} "
          f"(L = {args.length} output tokens)")


if __name__ == "__main__":
    main()
