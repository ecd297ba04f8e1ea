"""ListOps generator, tokenizer and data module (fast CPU tests).

Labels are recomputed by a stack evaluator written here from the token stream, independently of the
generator's recursive construction.
"""
from __future__ import annotations

import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from tasks.common.errors import DataError
from tasks.lra.data import (ListOpsDataModule, ListOpsFormatError, ListOpsNotFoundError, find_data_dir, load_split,
                            read_tsv)
from tasks.lra.listops_gen import ListOpsSpec, generate, prepare, sample_tree
from tasks.lra.tokenizer import PAD_ID, VOCAB, detokenize, to_lra_source, tokenize

SMALL = dict(num_train=300, num_val=40, num_test=40, min_length=10, max_length=60, max_depth=4, max_args=5, seed=3)


def stack_eval(source: str) -> tuple[int, int]:
    """(value, length) of an LRA source by a token stack: parentheses ignored, ``]`` closes an operator."""
    stack: list[list] = [["ROOT"]]
    length = 0
    for tok in source.split():
        if tok in ("(", ")"):
            continue
        length += 1
        if tok.startswith("["):
            stack.append([tok])
        elif tok == "]":
            op, *args = stack.pop()
            assert len(args) >= 2, source
            if op == "[MIN":
                v = min(args)
            elif op == "[MAX":
                v = max(args)
            elif op == "[SM":
                v = sum(args) % 10
            else:  # [MED: numpy-style median of the arguments, truncated to int
                s = sorted(args)
                mid = len(s) // 2
                v = s[mid] if len(s) % 2 else int(statistics.mean(s[mid - 1: mid + 1]))
            stack[-1].append(v)
        else:
            stack[-1].append(int(tok))
    assert len(stack) == 1 and len(stack[0]) == 2, source
    return stack[0][1], length


def depth(source: str) -> int:
    """Tree depth: 1 for a single value, 1 + the deepest operator nesting otherwise."""
    d = best = 0
    for tok in source.split():
        if tok.startswith("["):
            d += 1
            best = max(best, d)
        elif tok == "]":
            d -= 1
    return best + 1 if best else 1


@pytest.fixture(scope="module")
def splits():
    return generate(ListOpsSpec(**SMALL), workers=1)


def test_labels_lengths_depth_and_args(splits):
    spec = ListOpsSpec(**SMALL)
    for rows in splits.values():
        for text, label in rows:
            value, length = stack_eval(text)
            assert value == label
            assert spec.min_length < length < spec.max_length
            assert depth(text) <= spec.max_depth
            assert to_lra_source(tokenize(text)) == text
    ops = {t for rows in splits.values() for text, _ in rows for t in text.split() if t.startswith("[")}
    assert ops == {"[MIN", "[MAX", "[MED", "[SM"}


def test_sizes_dedup_disjoint(splits):
    assert [len(splits[k]) for k in ("train", "val", "test")] == [300, 40, 40]
    texts = [t for rows in splits.values() for t, _ in rows]
    assert len(set(texts)) == len(texts)


def test_seeded_and_independent_of_workers(splits):
    again = generate(ListOpsSpec(**SMALL), workers=2, shard_size=50)
    # shard size changes the stream; same shard size must give identical output for any worker count
    a = generate(ListOpsSpec(**SMALL), workers=1, shard_size=50)
    assert a == again
    assert generate(ListOpsSpec(**SMALL), workers=1) == splits
    other = generate(ListOpsSpec(**{**SMALL, "seed": 4}), workers=1)
    assert other["train"] != splits["train"]


def test_leaf_probability_and_argument_counts():
    rng = random.Random(0)
    trees = [sample_tree(rng, 10, 10, max_length=2000) for _ in range(3000)]
    leaf_roots = sum(t is not None and t[2] == 1 for t in trees) / len(trees)
    assert 0.72 < leaf_roots < 0.78  # a node below max depth is a leaf with probability 0.75
    trees = [t for t in trees if t is not None]
    def root_args(text: str) -> int:  # "( " * (n + 1) + op ...
        toks = text.split()
        return next(i for i, t in enumerate(toks) if t != "(") - 1

    narg = [root_args(t[0]) for t in trees if t[2] > 1]
    assert min(narg) >= 2 and max(narg) <= 10


def test_sample_tree_abandons_long_trees():
    rng = random.Random(1)
    for _ in range(500):
        t = sample_tree(rng, 10, 10, max_length=30)
        assert t is None or t[2] < 30


def test_cli_writes_lra_tsv(tmp_path):
    out = tmp_path / "lo"
    cmd = [sys.executable, str(REPO / "scripts" / "prepare_listops.py"), "--out", str(out), "--quiet",
           "--num-train", "30", "--num-val", "5", "--num-test", "5", "--min-length", "5", "--max-length", "30",
           "--max-depth", "3", "--max-args", "4", "--seed", "7", "--workers", "1"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    lines = (out / "basic_train.tsv").read_text().splitlines()
    assert lines[0] == "Source\tTarget" and len(lines) == 31
    for line in lines[1:]:
        src, tgt = line.split("\t")
        assert stack_eval(src)[0] == int(tgt)
    assert {p.name for p in out.iterdir()} == {"basic_train.tsv", "basic_val.tsv", "basic_test.tsv"}
    bad = subprocess.run([*cmd[:4], "--min-length", "10", "--max-length", "11"], cwd=REPO, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "no length fits" in bad.stderr


# ---------------------------------------------------------------------- tokenizer
def test_tokenizer_lra_rules_and_round_trip():
    src = "( ( ( ( [MAX 2 ) 9 ) 4 ) ] )"
    ids = tokenize(src)
    assert detokenize(ids) == ["[MAX", "2", "9", "4", "X"]
    assert VOCAB[:6] == ("<pad>", "[MIN", "[MAX", "[MED", "[SM", "X") and len(VOCAB) == 16 and PAD_ID == 0
    assert ids == [2, 8, 15, 10, 5]
    assert to_lra_source(ids + [0, 0]) == src
    nested = "( ( ( [SM ( ( ( [MIN 3 ) 4 ) ] ) ) 5 ) ] )"
    assert to_lra_source(tokenize(nested)) == nested and stack_eval(nested)[0] == 8


# ---------------------------------------------------------------------- data module
def _write(path: Path, rows: list[str], header: bool = True) -> None:
    path.write_text(("Source\tTarget\n" if header else "") + "".join(r + "\n" for r in rows))


def _folder(tmp_path: Path, rows: list[str] | None = None) -> Path:
    rows = rows or ["( ( ( [MAX 2 ) 9 ) ] )\t9", "( ( ( [MIN 2 ) 9 ) ] )\t2", "7\t7"]
    for split in ("train", "val", "test"):
        _write(tmp_path / f"basic_{split}.tsv", rows)
    return tmp_path


def test_datamodule_batches_masks_and_cache(tmp_path):
    root = _folder(tmp_path)
    dm = ListOpsDataModule(str(root), max_length=8, batch_size=3)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert batch["tokens"].shape == (3, 8) and batch["tokens"].dtype == torch.long
    assert batch["tokens"][0].tolist() == [2, 8, 15, 5, 0, 0, 0, 0]
    assert torch.equal(batch["padding_mask"], batch["tokens"] == 0)
    assert batch["label"].tolist() == [9, 2, 7]
    assert (root / "cache" / "val_8.pt").is_file()
    # a changed file invalidates its cache
    _write(root / "basic_val.tsv", ["( ( ( [SM 2 ) 9 ) ] )\t1"])
    tokens, labels = load_split(root, "val", 8)
    assert labels.tolist() == [1]
    # truncation to max_length and trimming of batches
    dm2 = ListOpsDataModule(str(root), max_length=3, batch_size=3, trim_padding=True, cache=False)
    dm2.setup()
    b2 = next(iter(dm2.test_dataloader()))
    assert b2["tokens"].shape == (3, 3)
    assert dm2.majority_rate("test") == pytest.approx(100 / 3)


def test_lra_release_layouts(tmp_path):
    lra = tmp_path / "lra_release" / "listops-1000"
    lra.mkdir(parents=True)
    _folder(lra)
    assert find_data_dir(tmp_path) == lra
    assert find_data_dir(lra) == lra


def test_missing_root_says_how_to_generate(tmp_path):
    with pytest.raises(ListOpsNotFoundError, match=r"python scripts/prepare_listops.py --out .*nowhere") as e:
        ListOpsDataModule(str(tmp_path / "nowhere")).check()
    assert isinstance(e.value, DataError) and isinstance(e.value, FileNotFoundError)
    with pytest.raises(ListOpsNotFoundError, match="data.root"):
        find_data_dir(None)


@pytest.mark.parametrize("row, problem", [
    ("( ( ( [MAX 2 ) 9 ) ] )", "expected 2 tab-separated columns"),
    ("( ( ( [MAX 2 ) 9 ) ] )\t9\textra", "found 3"),
    ("( ( ( [MAX 2 ) 11 ) ] )\t9", "unknown token '11'"),
    ("( ( ( [FIRST 2 ) 9 ) ] )\t9", "unknown token '[FIRST'"),
    ("( ( ( [MAX 2 ) 9 ) ] )\t10", "label '10' is not an integer in 0-9"),
    ("( ( ( [MAX 2 ) 9 ) ] )\tx", "label 'x'"),
    ("\t3", "empty source"),
])
def test_malformed_rows_name_file_and_line(tmp_path, row, problem):
    path = tmp_path / "basic_train.tsv"
    _write(path, ["7\t7", row, "8\t8"])
    with pytest.raises(ListOpsFormatError) as e:
        read_tsv(path, 16)
    msg = str(e.value)
    assert f"{path}:3: " in msg and problem in msg and msg.count("\n") == 1
    assert isinstance(e.value, DataError)


def test_many_bad_rows_one_error(tmp_path):
    path = tmp_path / "basic_train.tsv"
    _write(path, ["7\t12"] * 9)
    with pytest.raises(ListOpsFormatError, match=r"9 malformed row\(s\)[\s\S]*and 4 more"):
        read_tsv(path, 16)


def test_generate_on_demand(tmp_path):
    dm = ListOpsDataModule(str(tmp_path / "gen"), max_length=40, batch_size=4,
                           generate=dict(num_train=20, num_val=4, num_test=4, min_length=5, max_length=40,
                                         max_depth=3, max_args=4, seed=1))
    dm.check()
    assert len(dm.datasets["train"]) == 20 and (tmp_path / "gen" / "basic_test.tsv").is_file()
    assert len(prepare(tmp_path / "gen2", ListOpsSpec(**SMALL), workers=1, show_progress=False)) == 3
