"""Preparing IWSLT and WMT14 from the archives a user downloads, as fairseq's scripts do, into the
data-bin layout the data module reads (:mod:`.binarize`).

IWSLT14 De-En follows fairseq's ``examples/translation/prepare-iwslt14.sh`` step by step:

1. training text ``train.tags.de-en.{de,en}``: drop lines containing ``<url>``, ``<talkid>``,
   ``<keywords>``; remove the ``<title>``/``</title>``/``<description>``/``</description>`` tags;
   Moses-tokenize (sacremoses, the Perl tokenizer's defaults: escaping on, no aggressive dash split);
2. Moses ``clean-corpus-n.perl -ratio 1.5 ... 1 175`` (pipes removed, whitespace squeezed, both sides
   1-175 tokens, length ratio <= 1.5), then lowercase;
3. dev/test ``IWSLT14.TED*.{de,en}.xml``: the ``<seg id=...>`` lines, ``’`` -> ``'``, tokenize, lowercase;
4. valid = every 23rd line of the cleaned training text, train = the rest; test = dev2010 + TEDX.dev2012
   + tst2010 + tst2011 + tst2012 in that order;
5. joint BPE (subword-nmt, 10,000 merges, min frequency 2) learned on train.de + train.en, applied to
   every split; separate dictionaries (fairseq-preprocess's defaults).

The other IWSLT tracks use the same steps on their WIT3 archives (test = every ``IWSLT<yy>.TED*.xml`` of
the pair, sorted by name); IWSLT15 En-Vi uses the Stanford release as it is (already tokenized, cased).
WMT14 En-De follows fairseq's ``prepare-wmt14en2de.sh`` (punctuation normalisation, non-printing
characters removed, aggressive dash split, clean 1-250 ratio 1.5, cased, joint BPE 40,000, joined
dictionary) with newstest2013 as valid and newstest2014 as test.
"""
from __future__ import annotations

import logging
import re
import tarfile
import unicodedata
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Callable, Sequence

from tasks.common.errors import DataError

from .binarize import write_data_bin

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Track:
    key: str
    src: str
    tgt: str
    kind: str                          # "wit3" | "stanford" | "wmt"
    year: str = "14"
    archive: str = ""                  # the archive a user downloads
    where: str = ""                    # where to get it
    test_files: tuple[str, ...] = ()   # explicit test composition (fairseq's list for IWSLT14 De-En)
    bpe_merges: int = 10000
    lowercase: bool = True
    joined: bool = False
    max_len: int = 175
    sizes: dict = field(default_factory=dict)


WIT3 = "the WIT3 IWSLT {y} release (https://wit3.fbk.eu/20{y}-01, texts/{a}/{b}/{a}-{b}.tgz)"
TRACKS = {t.key: t for t in [
    Track("iwslt14_de_en", "de", "en", "wit3", "14", "de-en.tgz", WIT3.format(y="14", a="de", b="en"),
          ("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010", "IWSLT14.TED.tst2011",
           "IWSLT14.TED.tst2012"), sizes={"train": 160239, "valid": 7283, "test": 6750}),
    Track("iwslt14_es_en", "es", "en", "wit3", "14", "es-en.tgz", WIT3.format(y="14", a="es", b="en")),
    Track("iwslt14_en_fr", "en", "fr", "wit3", "14", "en-fr.tgz", WIT3.format(y="14", a="en", b="fr")),
    Track("iwslt15_de_en", "de", "en", "wit3", "15", "de-en.tgz", WIT3.format(y="15", a="de", b="en")),
    Track("iwslt15_cs_en", "cs", "en", "wit3", "15", "cs-en.tgz", WIT3.format(y="15", a="cs", b="en")),
    Track("iwslt15_en_vi", "en", "vi", "stanford", "15", "train.en, train.vi, tst2012.{en,vi}, tst2013.{en,vi}",
          "the Stanford NMT release (https://nlp.stanford.edu/projects/nmt/, IWSLT'15 English-Vietnamese)",
          lowercase=False, sizes={"train": 133317, "valid": 1553, "test": 1268}),
    Track("wmt14_en_de", "en", "de", "wmt", "14",
          "europarl-v7.de-en, commoncrawl.de-en, news-commentary-v9.de-en (.en/.de), newstest2013.{en,de}, "
          "newstest2014-deen-{src,ref}.{en,de}.sgm",
          "https://www.statmt.org/wmt14/translation-task.html (training-parallel-europarl-v7.tgz, "
          "training-parallel-commoncrawl.tgz, training-parallel-nc-v9.tgz, dev.tgz, test-full.tgz; extract them)",
          bpe_merges=40000, lowercase=False, joined=True, max_len=250),
]}


# ---------------------------------------------------------------------- text steps
_TOK: dict = {}


def _tokenizer(lang: str, aggressive: bool, normalize: bool) -> Callable[[str], str]:
    from sacremoses import MosesPunctNormalizer, MosesTokenizer

    tok = MosesTokenizer(lang=lang)
    norm = MosesPunctNormalizer(lang=lang) if normalize else None

    def run(line: str) -> str:
        if norm is not None:
            line = remove_non_printing(norm.normalize(line))
        return tok.tokenize(line, aggressive_dash_splits=aggressive, return_str=True, escape=True)
    return run


def remove_non_printing(line: str) -> str:
    """Moses ``remove-non-printing-char.perl``: drop control/format characters (category C*)."""
    return "".join(c for c in line if not unicodedata.category(c).startswith("C") or c in "\t")


def _tok_chunk(args: tuple[str, bool, bool, list[str]]) -> list[str]:
    lang, aggressive, normalize, lines = args
    key = (lang, aggressive, normalize)
    if key not in _TOK:
        _TOK[key] = _tokenizer(lang, aggressive, normalize)
    return [_TOK[key](line) for line in lines]


def tokenize(lines: Sequence[str], lang: str, workers: int = 1, aggressive: bool = False,
             normalize: bool = False) -> list[str]:
    """Moses tokenization (sacremoses) of ``lines``, in ``workers`` processes."""
    chunks = [list(lines[i:i + 5000]) for i in range(0, len(lines), 5000)]
    args = [(lang, aggressive, normalize, c) for c in chunks]
    if workers > 1 and len(chunks) > 1:
        with Pool(workers) as pool:
            parts = pool.map(_tok_chunk, args)
    else:
        parts = [_tok_chunk(a) for a in args]
    return [line for part in parts for line in part]


def clean_corpus(src: Sequence[str], tgt: Sequence[str], ratio: float = 1.5, min_len: int = 1,
                 max_len: int = 175) -> tuple[list[str], list[str]]:
    """Moses ``clean-corpus-n.perl``: pipes removed, whitespace squeezed, lengths and ratio checked."""
    out_s, out_t = [], []
    for s, t in zip(src, tgt):
        s = " ".join(s.replace("|", "").split())
        t = " ".join(t.replace("|", "").split())
        ns, nt = len(s.split(" ")) if s else 0, len(t.split(" ")) if t else 0
        if not (min_len <= ns <= max_len and min_len <= nt <= max_len):
            continue
        if ns / nt > ratio or nt / ns > ratio:
            continue
        out_s.append(s)
        out_t.append(t)
    return out_s, out_t


_TRAIN_DROP = ("<url>", "<talkid>", "<keywords>")
_TRAIN_STRIP = re.compile(r"</?(title|description)>")
_SEG = re.compile(r'<seg id="[0-9]*">\s*(.*?)\s*</seg>\s*$')


def train_tags_lines(text: str) -> list[str]:
    """prepare-iwslt14.sh's filter of ``train.tags.*``."""
    return [_TRAIN_STRIP.sub("", line) for line in text.split("\n")[:-1 if text.endswith("\n") else None]
            if not any(tag in line for tag in _TRAIN_DROP)]


def xml_segments(text: str) -> list[str]:
    """The ``<seg id="N">`` lines of a WIT3 dev/test xml, with ``’`` replaced by ``'``."""
    out = []
    for line in text.split("\n"):
        if "<seg id" in line:
            m = _SEG.search(line)
            seg = m.group(1) if m else re.sub(r'<seg id="[0-9]*">\s*', "", line)
            out.append(seg.replace("\u2019", "'"))
    return out


def learn_and_apply_bpe(train: Sequence[Sequence[str]], splits: dict[str, list[list[str]]], merges: int,
                        codes_path: Path) -> dict[str, list[list[str]]]:
    """Joint BPE (subword-nmt) learned on the concatenation of ``train``'s lists; applied to every list."""
    import io

    from subword_nmt.apply_bpe import BPE
    from subword_nmt.learn_bpe import learn_bpe

    corpus = io.StringIO("".join(line + "\n" for lines in train for line in lines))
    with open(codes_path, "w", encoding="utf-8") as out:
        learn_bpe(corpus, out, merges, min_frequency=2)
    with open(codes_path, encoding="utf-8") as f:
        bpe = BPE(f)
    return {name: [[bpe.process_line(line) for line in lines] for lines in sides] for name, sides in splits.items()}


# ---------------------------------------------------------------------- reading the downloads
def _missing(track: Track, raw: Path, what: str) -> DataError:
    return DataError(f"{what} not found under {raw}; {track.key} expects {track.archive} from {track.where} "
                     f"in that folder (the archive or its extracted contents).")


def _find(raw: Path, name: str) -> Path | None:
    hits = sorted(raw.rglob(name))
    return hits[0] if hits else None


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _extract(track: Track, raw: Path) -> Path:
    """The folder holding the pair's files: ``raw`` itself, an extracted ``<a>-<b>/`` or the archive."""
    pair = f"{track.src}-{track.tgt}" if track.kind != "wit3" else track.archive[:-4]
    if _find(raw, f"train.tags.{pair}.{track.src}") is not None:
        return raw
    archive = raw / track.archive
    if archive.is_file():
        with tarfile.open(archive) as tar:
            tar.extractall(raw / "extracted", filter="data")
        return raw / "extracted"
    raise _missing(track, raw, f"train.tags.{pair}.{track.src}")


def read_wit3(track: Track, raw: Path, workers: int) -> dict[str, tuple[list[str], list[str]]]:
    root = _extract(track, raw)
    pair = track.archive[:-4]
    langs = (track.src, track.tgt)
    tok: dict[str, list[str]] = {}
    for lang in langs:
        path = _find(root, f"train.tags.{pair}.{lang}")
        if path is None:
            raise _missing(track, raw, f"train.tags.{pair}.{lang}")
        tok[lang] = tokenize(train_tags_lines(_read(path)), lang, workers)
    if len(tok[track.src]) != len(tok[track.tgt]):
        raise DataError(f"train.tags.{pair}.{track.src} and .{track.tgt} have {len(tok[track.src])} and "
                        f"{len(tok[track.tgt])} text lines: the download is damaged; download it again.")
    src, tgt = clean_corpus(tok[track.src], tok[track.tgt], 1.5, 1, track.max_len)
    src, tgt = [s.lower() for s in src], [t.lower() for t in tgt]
    valid = ([s for i, s in enumerate(src, 1) if i % 23 == 0], [t for i, t in enumerate(tgt, 1) if i % 23 == 0])
    train = ([s for i, s in enumerate(src, 1) if i % 23], [t for i, t in enumerate(tgt, 1) if i % 23])
    names = list(track.test_files) or sorted({p.name.split(f".{pair}.")[0]
                                              for p in root.rglob(f"IWSLT{track.year}.TED*.{pair}.{track.src}.xml")})
    if not names:
        raise _missing(track, raw, f"IWSLT{track.year}.TED*.{pair}.{track.src}.xml")
    test: dict[str, list[str]] = {lang: [] for lang in langs}
    for name in names:
        for lang in langs:
            path = _find(root, f"{name}.{pair}.{lang}.xml")
            if path is None:
                raise _missing(track, raw, f"{name}.{pair}.{lang}.xml")
            test[lang] += [s.lower() for s in tokenize(xml_segments(_read(path)), lang, workers)]
    log.info("%s: test = %s", track.key, " + ".join(names))
    return {"train": train, "valid": valid, "test": (test[track.src], test[track.tgt])}


def read_stanford(track: Track, raw: Path) -> dict[str, tuple[list[str], list[str]]]:
    out = {}
    for split, name in (("train", "train"), ("valid", "tst2012"), ("test", "tst2013")):
        sides = []
        for lang in (track.src, track.tgt):
            path = _find(raw, f"{name}.{lang}")
            if path is None:
                raise _missing(track, raw, f"{name}.{lang}")
            sides.append(_read(path).rstrip("\n").split("\n"))
        out[split] = (sides[0], sides[1])
    return out


def _sgm(path: Path) -> list[str]:
    found = (re.search(r"<seg[^>]*>\s*(.*?)\s*</seg>", line) for line in _read(path).split("\n"))
    return [m.group(1) for m in found if m]


def read_wmt(track: Track, raw: Path, workers: int) -> dict[str, tuple[list[str], list[str]]]:
    src_all: list[str] = []
    tgt_all: list[str] = []
    for corpus in ("europarl-v7.de-en", "commoncrawl.de-en", "news-commentary-v9.de-en"):
        paths = [_find(raw, f"{corpus}.{lang}") for lang in (track.src, track.tgt)]
        if None in paths:
            raise _missing(track, raw, f"{corpus}.{track.src}/.{track.tgt}")
        s, t = (_read(p).rstrip("\n").split("\n") for p in paths)  # type: ignore[union-attr]
        if len(s) != len(t):
            raise DataError(f"{paths[0]} has {len(s)} lines but {paths[1]} has {len(t)}: the files are misaligned; "
                            f"extract the archive again.")
        src_all += s
        tgt_all += t
    tok = lambda lines, lang: tokenize(lines, lang, workers, aggressive=True, normalize=True)  # noqa: E731
    src, tgt = clean_corpus(tok(src_all, track.src), tok(tgt_all, track.tgt), 1.5, 1, track.max_len)
    valid = []
    for lang in (track.src, track.tgt):
        path = _find(raw, f"newstest2013.{lang}")
        if path is None:
            raise _missing(track, raw, f"newstest2013.{lang}")
        valid.append(tok(_read(path).rstrip("\n").split("\n"), lang))
    test = []
    for lang, role in ((track.src, "src"), (track.tgt, "ref")):
        path = _find(raw, f"newstest2014-deen-{role}.{lang}.sgm")
        if path is None:
            raise _missing(track, raw, f"newstest2014-deen-{role}.{lang}.sgm")
        test.append(tok(_sgm(path), lang))
    return {"train": (src, tgt), "valid": (valid[0], valid[1]), "test": (test[0], test[1])}


# ---------------------------------------------------------------------- the whole recipe
def prepare(track_key: str, raw: str | Path, out: str | Path, workers: int = 1, bpe_merges: int | None = None,
            text_out: bool = True) -> Path:
    """Prepare ``track_key`` from the downloads in ``raw`` into the data-bin folder ``out``."""
    if track_key not in TRACKS:
        raise DataError(f"Unknown track {track_key!r}; choose one of {', '.join(TRACKS)}.")
    track, raw, out = TRACKS[track_key], Path(raw).expanduser(), Path(out).expanduser()
    if not raw.is_dir():
        raise DataError(f"--raw {raw} is not a folder; download {track.archive} from {track.where} into it.")
    if any(out.glob("*.idx")):
        raise DataError(f"{out} already holds binarized data; choose an empty --out folder (nothing is overwritten).")
    out.mkdir(parents=True, exist_ok=True)
    if track.kind == "wit3":
        splits = read_wit3(track, raw, workers)
    elif track.kind == "stanford":
        splits = read_stanford(track, raw)
    else:
        splits = read_wmt(track, raw, workers)
    merges = track.bpe_merges if bpe_merges is None else bpe_merges
    if merges > 0:
        names = list(splits)
        applied = learn_and_apply_bpe(splits["train"], {n: list(map(list, splits[n])) for n in names}, merges,
                                      out / "code")
        splits = {n: (applied[n][0], applied[n][1]) for n in names}
    if text_out:
        for name, (s, t) in splits.items():
            for lang, lines in ((track.src, s), (track.tgt, t)):
                (out / f"{name}.{lang}").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    src_dict, tgt_dict = write_data_bin(out, splits, track.src, track.tgt, joined=track.joined)
    sizes = {n: len(s) for n, (s, _) in splits.items()}
    log.info("%s -> %s: %s; dictionaries %s %d, %s %d entries", track.key, out,
             ", ".join(f"{k} {v}" for k, v in sizes.items()), track.src, len(src_dict), track.tgt, len(tgt_dict))
    if track.sizes and track.sizes != sizes:
        log.warning("%s: sizes %s differ from the reference recipe's %s", track.key, sizes, track.sizes)
    return out

