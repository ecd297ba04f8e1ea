"""One-GPU check of speed and mixed precision, printed as one table (about 8 minutes on one GPU).

    bash scripts/gpu_check.sh                      # on a GPU machine: bf16, full sizes
    bash scripts/gpu_check.sh --device cpu --tiny  # anywhere: the same code paths at toy sizes

Three parts, each a row group of the table:

1. ``benchmark``: ``scripts/benchmark.py``'s vision suite in bf16 autocast for PVT-Tiny and ViT-S,
   baseline / cached / floor / released (PVT-Tiny), eager and ``torch.compile`` (inductor), timed
   interleaved; ratios of compiled variants are against the compiled baseline.
2. ``table9``: the paper's Table 9 throughput layout (``tasks.paper.throughput``) in bf16, with the
   paper's V100 ratio next to the measured one.
3. ``train``: a short bf16-mixed training of ``pvt_tiny_grc`` on the stand-in data (``train.py
   data=standin``, made first if missing), in a fresh output folder: steps, last training loss, wall time.
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def benchmark_rows(args) -> list[list[str]]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bargs = argparse.Namespace(img_size=args.img_size, batch_size=args.batch_size, warmup=args.warmup,
                               iters=args.iters, amp="bf16", reference=True, floor=True, compile=True,
                               compile_backend=args.compile_backend)
    rows = bench.vision_suite(bargs, torch.device(args.device))
    out = [["benchmark", r["model"], r["variant"], f"{r['train'][1]:.1f}", f"{r['infer'][1]:.1f}",
            f"{r['train_ratio']:.3f}", f"{r['infer_ratio']:.3f}", f"MAC ratio {r['mac_ratio']:.3f}"] for r in rows]
    for line in bench.compile_verdicts(rows):
        out.append(["benchmark", "", "verdict", "", "", "", "", line.lstrip("- ")])
    return out


def table9_rows(args) -> list[list[str]]:
    from tasks.paper.throughput import PAPER_PAIRS, throughput_table

    pairs = PAPER_PAIRS[:1] if args.tiny else PAPER_PAIRS
    rows = throughput_table(pairs, batch_size=args.batch_size, img_size=args.img_size, device=args.device,
                            warmup=args.warmup, iters=args.iters, amp="bf16")
    time_ratio = lambda v: "-" if not v else f"{1.0 / v:.3f}"  # the rows hold img/s ratios cached / baseline
    return [["table9", r["model"], "cached vs baseline", f"{r['train_img_s'][0]:.1f} -> {r['train_img_s'][1]:.1f}",
             f"{r['test_img_s'][0]:.1f} -> {r['test_img_s'][1]:.1f}", time_ratio(r["train_ratio"]),
             time_ratio(r["test_ratio"]), f"paper V100 time ratios {time_ratio(r['paper_train_ratio'])} train, "
             f"{time_ratio(r['paper_test_ratio'])} infer"] for r in rows]


def train_rows(args) -> list[list[str]]:
    standin = ROOT / "data" / "standin"
    if not standin.is_dir():
        subprocess.run([sys.executable, "scripts/make_standin_imagenet.py", "--out", str(standin)], cwd=ROOT,
                       check=True)
    out_dir = Path(tempfile.mkdtemp(prefix="gpu_check_train_"))
    accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    cmd = [sys.executable, "train.py", "data=standin", "model=pvt_tiny_grc", f"paths.output_dir={out_dir}",
           "run_name=gpu_check", f"trainer.accelerator={accelerator}", "trainer.devices=1",
           "trainer.precision=bf16-mixed", f"trainer.max_steps={args.train_steps}", "trainer.max_epochs=1000",
           f"data.batch_size={args.train_batch_size}", f"data.img_size={args.train_img_size}",
           "trainer.log_every_n_steps=1", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return [["train", "pvt_tiny_grc", "bf16-mixed", "", "", "", "", f"FAILED: {tail[0][:200]}"]]
    losses = []
    for metrics in out_dir.rglob("metrics.csv"):
        with open(metrics) as f:
            losses += [float(r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]
    first, last = (f"{losses[0]:.3f}", f"{losses[-1]:.3f}") if losses else ("-", "-")
    return [["train", "pvt_tiny_grc", "bf16-mixed", "", "", "", "",
             f"{args.train_steps} steps, batch {args.train_batch_size}, {args.train_img_size}px: loss {first} -> "
             f"{last}, {wall:.0f} s wall (incl. start-up); run in {out_dir}"]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy sizes (checks that every part runs, e.g. on CPU)")
    p.add_argument("--parts", default="benchmark,table9,train")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no GPU is visible; run on a GPU machine, or check the code paths with --device cpu --tiny.")
    sizes = (dict(img_size=32, batch_size=2, warmup=1, iters=1, compile_backend="eager", train_steps=2,
                  train_batch_size=4, train_img_size=32) if args.tiny else
             dict(img_size=224, batch_size=64, warmup=3, iters=10, compile_backend="inductor", train_steps=200,
                  train_batch_size=64, train_img_size=224))
    for k, v in sizes.items():
        setattr(args, k, v)
    parts = {"benchmark": benchmark_rows, "table9": table9_rows, "train": train_rows}
    rows: list[list[str]] = []
    start = time.perf_counter()
    for part in [s.strip() for s in args.parts.split(",") if s.strip()]:
        if part not in parts:
            p.error(f"unknown part {part!r}; choose from {sorted(parts)}.")
        rows += parts[part](args)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n### GPU check: {name}, bf16, batch {args.batch_size}, {args.img_size}px, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.perf_counter() - start:.0f} s\n")
    print("| part | model | variant | train img/s (cached) | infer img/s (cached) | train time ratio | infer time ratio | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
