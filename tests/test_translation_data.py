"""The data-bin reader against files in fairseq's exact byte layout (written here with ``struct``,
independently of the reader), the dictionary's implicit specials, the batching invariants and the
bad-input messages."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from tasks.common.errors import ConfigError, DataError
from tasks.translation.batching import TokenBatchSampler, batch_by_size, ordered_indices
from tasks.translation.data import TranslationDataModule, collate
from tasks.translation.dictionary import Dictionary
from tasks.translation.indexed import open_token_file, write_mmap

CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.uint16: 8, np.uint32: 9}


def fairseq_mmap(prefix: Path, sents: list[list[int]], dtype=np.uint16) -> None:
    """fairseq's MMapIndexedDatasetBuilder layout."""
    data = b"".join(np.asarray(s, dtype=dtype).tobytes() for s in sents)
    Path(f"{prefix}.bin").write_bytes(data)
    sizes = np.asarray([len(s) for s in sents], dtype=np.int32)
    item = np.dtype(dtype).itemsize
    pointers = np.concatenate([[0], np.cumsum(sizes[:-1].astype(np.int64) * item)]).astype(np.int64)
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", CODES[dtype]) + struct.pack("<Q", len(sents))
    Path(f"{prefix}.idx").write_bytes(idx + sizes.tobytes() + pointers.tobytes())


def fairseq_tnt(prefix: Path, sents: list[list[int]], dtype=np.int32) -> None:
    """fairseq's IndexedDatasetBuilder (lazy/cached) layout: ids stored + 1."""
    item = np.dtype(dtype).itemsize
    Path(f"{prefix}.bin").write_bytes(b"".join((np.asarray(s, dtype=dtype) + 1).tobytes() for s in sents))
    data_offsets = np.concatenate([[0], np.cumsum([len(s) for s in sents])]).astype(np.int64)
    dim_offsets = np.arange(len(sents) + 1, dtype=np.int64)
    sizes = np.asarray([len(s) for s in sents], dtype=np.int64)
    head = b"TNTIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<QQ", CODES[dtype], item)
    head += struct.pack("<QQ", len(sents), len(sents))
    Path(f"{prefix}.idx").write_bytes(head + dim_offsets.tobytes() + data_offsets.tobytes() + sizes.tobytes())


def write_dict(path: Path, words: list[str], pad_to: int = 8) -> None:
    lines = [f"{w} {100 - i}" for i, w in enumerate(words)]
    i = 0
    while (len(lines) + 4) % pad_to:
        lines.append(f"madeupword{i:04d} 0")
        i += 1
    path.write_text("\n".join(lines) + "\n")


def make_bin(root: Path, n: int = 40, fmt: str = "mmap", dtype=np.uint16, seed: int = 0, src="de", tgt="en",
             splits=("train", "valid", "test")) -> dict:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    write_dict(root / f"dict.{src}.txt", [f"s{i}" for i in range(9)])
    write_dict(root / f"dict.{tgt}.txt", [f"t{i}" for i in range(5)])
    out = {}
    for split in splits:
        pairs = []
        for _ in range(n):
            a = rng.integers(4, 13, rng.integers(1, 12)).tolist() + [2]
            b = rng.integers(4, 9, rng.integers(1, 12)).tolist() + [2]
            pairs.append((a, b))
        for k, lang in enumerate((src, tgt)):
            sents = [p[k] for p in pairs]
            (fairseq_mmap if fmt == "mmap" else fairseq_tnt)(root / f"{split}.{src}-{tgt}.{lang}", sents, dtype)
        out[split] = pairs
    return out


# ---------------------------------------------------------------------- dictionary and files
def test_dictionary_specials_madeupwords_and_bpe_removal(tmp_path):
    write_dict(tmp_path / "dict.txt", ["hal@@", "lo", "welt"])
    d = Dictionary.load(tmp_path / "dict.txt")
    assert d.symbols[:4] == ["<s>", "<pad>", "</s>", "<unk>"] and d.index["hal@@"] == 4
    assert len(d) == 8 and d.symbols[-1] == "madeupword0000"
    assert d.encode_line("hal@@ lo welt xyz") == [4, 5, 6, 3, 2]
    assert d.string([4, 5, 6, 3, 2, 1, 1]) == "hallo welt <unk>"
    (tmp_path / "over.txt").write_text("a 3\nb 2\na 1 #fairseq:overwrite\n")
    assert Dictionary.load(tmp_path / "over.txt").index["a"] == 6
    (tmp_path / "dup.txt").write_text("a 3\na 2\n")
    with pytest.raises(DataError, match="duplicate word 'a'"):
        Dictionary.load(tmp_path / "dup.txt")


@pytest.mark.parametrize("fmt,dtype", [("mmap", np.uint16), ("mmap", np.int32), ("lazy", np.int32),
                                       ("lazy", np.uint16)])
def test_reader_matches_fairseq_layout(tmp_path, fmt, dtype):
    sents = [[5, 6, 7, 2], [2], [300, 9, 2], list(range(4, 40)) + [2]]
    (fairseq_mmap if fmt == "mmap" else fairseq_tnt)(tmp_path / "x", sents, dtype)
    f = open_token_file(tmp_path / "x")
    assert f.format == fmt and len(f) == 4 and f.sizes.tolist() == [4, 1, 3, 37]
    for i, s in enumerate(sents):
        assert f[i].tolist() == s and f[i].dtype == np.int64
    assert f.max_id() == 300
    assert isinstance(f._data, np.memmap)


def test_writer_is_fairseq_mmap_layout(tmp_path):
    sents = [[5, 6, 2], [9, 9, 9, 9, 2]]
    write_mmap(tmp_path / "ours", sents, vocab_size=100)
    fairseq_mmap(tmp_path / "ref", sents, np.uint16)
    for ext in (".idx", ".bin"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()


# ---------------------------------------------------------------------- batching
def test_batches_respect_max_tokens_and_cover_every_pair_once():
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(1, 60, 500), rng.integers(1, 60, 500)
    order = ordered_indices(src, tgt, shuffle=True, seed=3)
    key = list(zip(src[order], tgt[order]))
    assert key == sorted(key)  # by source, then target length
    ntok = np.maximum(src, tgt)
    batches = batch_by_size(order, ntok, max_tokens=256)
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))
    for b in batches:
        assert len(b) * ntok[b].max() <= 256
    multiples = [len(b) for b in batches[:-1] if len(b) >= 8]
    assert all(n % 8 == 0 for n in multiples) and multiples
    with pytest.raises(ConfigError, match="max_tokens"):
        batch_by_size(order, ntok, max_tokens=40)


def test_epochs_shuffle_batches_shards_are_disjoint_and_resume():
    batches = [np.arange(i * 4, i * 4 + 4) for i in range(11)]
    a = TokenBatchSampler(batches, shuffle=True, seed=1)
    e0 = [tuple(i for i, _ in b) for b in a]
    a.set_epoch(1)
    e1 = [tuple(i for i, _ in b) for b in a]
    assert sorted(e0) == sorted(e1) and e0 != e1
    shards = [TokenBatchSampler(batches, shuffle=True, seed=1, rank=r, world_size=3) for r in range(3)]
    for s in shards:
        s.set_epoch(1)
    got = [list(s) for s in shards]
    assert [len(g) for g in got] == [4, 4, 4]
    real = [tuple(i for i, _ in b) for g in got for b in g if not b[0][1]]
    assert sorted(real) == sorted(e1)  # disjoint and complete; one dummy batch pads the short rank
    assert sum(b[0][1] for g in got for b in g) == 1
    r = TokenBatchSampler(batches, shuffle=True, seed=1)
    r.resume(epoch=1, batches=5)
    assert [tuple(i for i, _ in b) for b in r] == e1[5:]


# ---------------------------------------------------------------------- the data module
@pytest.mark.parametrize("fmt", ["mmap", "lazy"])
def test_datamodule_batches(tmp_path, fmt, caplog):
    pairs = make_bin(tmp_path, fmt=fmt)
    dm = TranslationDataModule(str(tmp_path), "de", "en", max_tokens=64, num_workers=0)
    with caplog.at_level("INFO"):
        dm.setup("fit")
    assert "train de-en: 40 sentence pairs" in caplog.text
    seen = []
    for batch in dm.train_dataloader():
        b, t = batch["target"].shape
        assert b * max(batch["src_tokens"].shape[1], t) <= 64
        for row, i in enumerate(batch["id"].tolist()):
            src, tgt = pairs["train"][i]
            assert batch["src_tokens"][row, : len(src)].tolist() == src
            assert batch["target"][row, : len(tgt)].tolist() == tgt
            assert batch["prev_output_tokens"][row, : len(tgt)].tolist() == [2] + tgt[:-1]
            seen.append(i)
    assert sorted(seen) == list(range(40))
    assert collate([(0, False, np.array([5, 2]), np.array([6, 2]))])["ntokens"] == 2


def test_datamodule_resumes_mid_epoch(tmp_path):
    make_bin(tmp_path, n=80)
    dm = TranslationDataModule(str(tmp_path), "de", "en", max_tokens=48, num_workers=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.set_epoch(2)
    full = [b["id"].tolist() for b in loader]
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = dm.state_dict()
    assert state == {"epoch": 2, "batches": 3}
    dm2 = TranslationDataModule(str(tmp_path), "de", "en", max_tokens=48, num_workers=0)
    dm2.load_state_dict(state)
    dm2.setup("fit")
    assert [b["id"].tolist() for b in dm2.train_dataloader()] == full[3:]


# ---------------------------------------------------------------------- bad input
def test_bad_input_messages(tmp_path):
    root = tmp_path / "bin"
    make_bin(root)
    with pytest.raises(DataError, match="holds the language pair.*de-en, not fr-en"):
        TranslationDataModule(str(root), "fr", "en").setup("fit")
    (root / "valid.de-en.en.idx").unlink()
    with pytest.raises(DataError, match=r"valid\.de-en\.en\.idx does not exist.*'valid' split"):
        TranslationDataModule(str(root), "de", "en").setup("fit")
    (root / "dict.en.txt").unlink()
    with pytest.raises(DataError, match=r"dict\.en\.txt does not exist"):
        TranslationDataModule(str(root), "de", "en")


@pytest.mark.parametrize("damage", ["truncate_bin", "truncate_idx", "magic", "id", "misaligned", "no_eos"])
def test_corrupt_files(tmp_path, damage):
    make_bin(tmp_path, splits=("train", "valid"))
    bin_, idx = tmp_path / "train.de-en.en.bin", tmp_path / "train.de-en.en.idx"
    if damage == "truncate_bin":
        bin_.write_bytes(bin_.read_bytes()[:-4])
        match = r"train\.de-en\.en\.bin is corrupt or truncated"
    elif damage == "truncate_idx":
        idx.write_bytes(idx.read_bytes()[:-3])
        match = r"train\.de-en\.en\.idx is corrupt or truncated"
    elif damage == "magic":
        idx.write_bytes(b"XXXXXXXXX" + idx.read_bytes()[9:])
        match = "unknown magic"
    elif damage == "id":
        fairseq_mmap(tmp_path / "train.de-en.en", [[4, 99, 2]] * 40)
        match = "holds token id 99 but dict.en.txt has only 16 entries"
    elif damage == "misaligned":
        fairseq_mmap(tmp_path / "train.de-en.en", [[4, 2]] * 39)
        match = "has 40 sentences but .* has 39.*misaligned"
    else:
        fairseq_mmap(tmp_path / "train.de-en.en", [[4, 5]] * 40)
        match = "do not end with </s>"
    with pytest.raises(DataError, match=match):
        TranslationDataModule(str(tmp_path), "de", "en").setup("fit")
