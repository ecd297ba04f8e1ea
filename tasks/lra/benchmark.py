"""Speed / memory of the LRA encoders versus sequence length, baseline and GRC-cached.

``lra_sequence_benchmark`` times one forward + backward of each encoder on random tokens (no padding)
at each length (best of ``repeats``) and measures the peak memory allocated during it:
``torch.cuda.max_memory_allocated`` on GPU, the allocation events of ``torch.profiler`` (cumulative
bytes, maximum over time) on CPU. On CPU the default clock is the process CPU time
(``time.process_time``, summed over threads), which other jobs on a shared machine do not inflate;
``timer="wall"`` uses wall time (the default on GPU, after synchronising).
It prints a table with the GRC overhead (cached / baseline) and the growth exponent between
consecutive lengths (time ~ L^k: 2 = quadratic, 1 = linear).

    python -m tasks.lra.benchmark --lengths 512 1024 2048 4096 --emb-dim 128 --num-heads 4 --num-layers 1
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Any, Iterable, Sequence

import torch

from .models import LRAClassifier

MODELS = ("transformer", "bigbird", "reformer")
_ATTN = {"transformer": "full", "bigbird": "bigbird", "reformer": "reformer"}


def _peak_cpu_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return peak


def _variants(models: Iterable[str], dense_memory_rows: bool) -> list[tuple[str, str, bool, str]]:
    rows = []
    for m in models:
        rows.append((m, m, False, "auto"))
        rows.append((m, m + "+grc", True, "auto"))
        if dense_memory_rows and m != "transformer":
            rows.append((m, m + "+grc(dense mem)", True, "dense"))
    return rows


def lra_sequence_benchmark(lengths: Sequence[int] = (512, 1024, 2048, 4096), models: Sequence[str] = MODELS,
                           batch_size: int = 1, emb_dim: int = 512, mlp_dim: int = 1024, num_heads: int = 8,
                           num_layers: int = 4, block_size: int = 64, chunk_len: int = 64, n_hashes: int = 1,
                           n_buckets: int = 32, repeats: int = 3, warmup: int = 1, device: str | None = None,
                           dense_memory_rows: bool = True, measure_memory: bool = True,
                           print_table: bool = True, seed: int = 0, timer: str | None = None) -> list[dict[str, Any]]:
    """Forward+backward time and peak memory per (model, cached, length).

    Returns rows ``{"model", "variant", "cached", "memory", "length", "time_ms", "peak_mb",
    "time_ratio", "mem_ratio"}`` (ratios: this variant / the baseline of the same model and length).
    ``dense_memory_rows`` adds the cached sparse models with a dense memory branch for comparison.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    timer = timer or ("wall" if dev.type == "cuda" else "process")
    if timer not in ("wall", "process"):
        raise ValueError(f"timer must be 'wall' or 'process', got {timer!r}.")
    clock = time.perf_counter if timer == "wall" else time.process_time
    torch.manual_seed(seed)
    rows: list[dict[str, Any]] = []
    for model_name, variant, cached, memory in _variants(models, dense_memory_rows):
        for length in lengths:
            model = LRAClassifier(attention=_ATTN[model_name], max_length=length, emb_dim=emb_dim, mlp_dim=mlp_dim,
                                  num_heads=num_heads, num_layers=num_layers, grc={"enabled": cached},
                                  memory=memory, bigbird=dict(block_size=block_size),
                                  reformer=dict(chunk_len=chunk_len, n_hashes=n_hashes, n_buckets=n_buckets)).to(dev)
            model.train()
            tokens = torch.randint(1, 16, (batch_size, length), device=dev)
            labels = torch.randint(0, 10, (batch_size,), device=dev)

            def step() -> None:
                loss = torch.nn.functional.cross_entropy(model(tokens), labels)
                loss.backward()
                model.zero_grad(set_to_none=True)

            for _ in range(warmup):
                step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times = []
            for _ in range(repeats):
                t0 = clock()
                step()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                times.append(clock() - t0)
            peak = float("nan")
            if measure_memory:
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                    base = torch.cuda.memory_allocated(dev)
                    step()
                    torch.cuda.synchronize(dev)
                    peak = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20
                else:
                    peak = _peak_cpu_bytes(step) / 2 ** 20
            rows.append(dict(model=model_name, variant=variant, cached=cached, memory=memory, length=length,
                             time_ms=1000 * min(times), peak_mb=peak))
            del model
    base = {(r["model"], r["length"]): r for r in rows if not r["cached"]}
    for r in rows:
        b = base.get((r["model"], r["length"]))
        r["time_ratio"] = r["time_ms"] / b["time_ms"] if b else float("nan")
        r["mem_ratio"] = r["peak_mb"] / b["peak_mb"] if b and b["peak_mb"] else float("nan")
    if print_table:
        settings = dict(batch_size=batch_size, emb_dim=emb_dim, mlp_dim=mlp_dim, num_heads=num_heads,
                        num_layers=num_layers, block_size=block_size, chunk_len=chunk_len, n_hashes=n_hashes)
        print(format_table(rows, f"{dev} ({timer} time, {torch.get_num_threads()} torch threads)", settings))
    return rows


def growth_exponents(rows: list[dict[str, Any]], key: str = "time_ms") -> dict[str, list[float]]:
    """Per variant, log(v2/v1) / log(L2/L1) between consecutive lengths."""
    out: dict[str, list[float]] = {}
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    for variant, rs in by.items():
        rs = sorted(rs, key=lambda r: r["length"])
        out[variant] = [math.log(b[key] / a[key]) / math.log(b["length"] / a["length"])
                        if a[key] > 0 and b[key] > 0 else float("nan") for a, b in zip(rs, rs[1:])]
    return out


def format_table(rows: list[dict[str, Any]], device: torch.device | str = "", settings: dict | None = None) -> str:
    """Markdown table of the benchmark rows plus growth exponents."""
    lines = [f"device: {device}" + (f", {settings}" if settings else ""), "",
             "| variant | length | fwd+bwd ms | peak MB | time x baseline | mem x baseline |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['length']} | {r['time_ms']:.1f} | {r['peak_mb']:.1f} | "
                     f"{r['time_ratio']:.2f} | {r['mem_ratio']:.2f} |")
    lengths = sorted({r["length"] for r in rows})
    if len(lengths) > 1:
        te, me = growth_exponents(rows, "time_ms"), growth_exponents(rows, "peak_mb")
        steps = [f"{a}->{b}" for a, b in zip(lengths, lengths[1:])]
        lines += ["", "growth exponent k (value ~ L^k) between lengths:", "",
                  "| variant | " + " | ".join(f"time {s}" for s in steps) + " | "
                  + " | ".join(f"mem {s}" for s in steps) + " |",
                  "|---|" + "---:|" * (2 * len(steps))]
        for v in te:
            lines.append(f"| {v} | " + " | ".join(f"{k:.2f}" for k in te[v]) + " | "
                         + " | ".join(f"{k:.2f}" for k in me[v]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="LRA encoder speed/memory vs length, baseline and GRC.")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--emb-dim", type=int, default=512)
    p.add_argument("--mlp-dim", type=int, default=1024)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--chunk-len", type=int, default=64)
    p.add_argument("--n-hashes", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--no-dense-memory-rows", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--timer", choices=["wall", "process"], default=None,
                   help="wall clock or process CPU time (default: process on CPU, wall on GPU)")
    a = p.parse_args(argv)
    lra_sequence_benchmark(a.lengths, a.models, a.batch_size, a.emb_dim, a.mlp_dim, a.num_heads, a.num_layers,
                           a.block_size, a.chunk_len, a.n_hashes, repeats=a.repeats, device=a.device,
                           dense_memory_rows=not a.no_dense_memory_rows, measure_memory=not a.no_memory,
                           timer=a.timer)


if __name__ == "__main__":
    main()
