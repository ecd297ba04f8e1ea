#!/usr/bin/env python
"""Prepare a translation track from the archives you downloaded, as fairseq's scripts do.

    python scripts/prepare_translation.py --track iwslt14_de_en --raw downloads/ --out data/iwslt14.tokenized.de-en
    python train.py task=translation data=iwslt14_de_en model=transformer_iwslt_grc \
        data.root=data/iwslt14.tokenized.de-en

Tracks: iwslt14_de_en (fairseq's prepare-iwslt14.sh, exactly), iwslt14_es_en, iwslt14_en_fr, iwslt15_de_en,
iwslt15_cs_en (same steps on their WIT3 archives), iwslt15_en_vi (the Stanford release), wmt14_en_de
(fairseq's prepare-wmt14en2de.sh steps; newstest2013 valid, newstest2014 test). Without the expected files
the script says which ones and where to get them. The output folder holds the BPE codes (``code``), the
tokenized + BPE text (``<split>.<lang>``), the dictionaries and the binarized splits (fairseq's data-bin
layout, readable by fairseq too). Steps: tasks/translation/prepare.py.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from tasks.common.errors import UserError  # noqa: E402
from tasks.translation.prepare import TRACKS, prepare  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--track", required=True, choices=sorted(TRACKS))
    ap.add_argument("--raw", required=True, type=Path, help="folder with the downloaded archive(s) or their contents")
    ap.add_argument("--out", required=True, type=Path, help="new output folder (data.root)")
    ap.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    ap.add_argument("--bpe-merges", type=int, default=None, help="override the track's number of BPE merges (0: none)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = prepare(args.track, args.raw, args.out, workers=args.workers, bpe_merges=args.bpe_merges)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.track} prepared in {out}; train with data.root={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
