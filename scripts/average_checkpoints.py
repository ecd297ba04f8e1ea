#!/usr/bin/env python
"""Average the weights of several checkpoints (fairseq's scripts/average_checkpoints.py semantics).

    python scripts/average_checkpoints.py --run-dir outputs/translation/<run> --last 10 --out averaged.ckpt
    python scripts/average_checkpoints.py --inputs a.ckpt b.ckpt c.ckpt --out averaged.ckpt

``--last N`` takes the N newest ``checkpoints/epoch=*.ckpt`` of the run (by epoch number). Every
floating-point tensor of the model state is the arithmetic mean over the inputs (computed in float64,
stored in the input dtype), like fairseq's script. The GRC caches (buffers ``*.cache`` of GRC layers)
are NOT averaged: they are taken from the newest input, since a cache is a state of the recurrence, not a
weight (a mean of caches from different steps is no state the model ever saw). Integer tensors are also
taken from the newest input. The output is the newest input's Lightning checkpoint with the averaged
``state_dict`` and without optimizer/scheduler states, so ``python eval.py ckpt_path=<out>`` evaluates it.
The output is never written over an input or an existing file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402

from tasks.common.errors import UserError  # noqa: E402
from tasks.translation.averaging import average_checkpoints, epoch_checkpoints  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", nargs="+", type=Path, help="checkpoint files, oldest first")
    ap.add_argument("--run-dir", type=Path, help="a run directory with checkpoints/epoch=*.ckpt")
    ap.add_argument("--last", type=int, default=10, help="with --run-dir: the N newest epoch checkpoints")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        paths = list(args.inputs or []) if args.inputs else epoch_checkpoints(args.run_dir, args.last) \
            if args.run_dir else []
        out = args.out.expanduser().resolve()
        if out.exists() or any(out == Path(p).resolve() for p in paths):
            raise UserError(f"{out} exists; choose a new --out (existing checkpoints are never overwritten).")
        result = average_checkpoints(paths)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result, out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"averaged {len(paths)} checkpoints ({Path(paths[0]).name} ... {Path(paths[-1]).name}; GRC caches from "
          f"the newest) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
