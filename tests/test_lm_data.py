"""WikiText layout reader, vocabulary, stream batching into tracks and the resumable segment loader."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tasks.common.errors import DataError
from tasks.language_modeling.data import SegmentDataset, Vocab, WikiTextDataModule, batchify, read_words


def _write(root, train="a b c\n\nb c d\n", valid="a x b\n", test="z z\n"):
    root.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (root / f"wiki.{name}.tokens").write_text(text)
    return root


def test_vocabulary_from_train_eos_per_line_and_unknown_words_counted(tmp_path, caplog):
    dm = WikiTextDataModule(_write(tmp_path / "w"), batch_size=1, eval_batch_size=1, tgt_len=2)
    with caplog.at_level("WARNING"):
        dm.setup()
    v = dm.vocab
    assert v.itos[:2] == ["<unk>", "<eos>"] and set(v.itos) == {"<unk>", "<eos>", "a", "b", "c", "d"}
    assert v.itos[2:4] == ["b", "c"]  # by train frequency (3 <eos> then b, c twice)
    assert dm.streams["train"].tolist() == [v.stoi[w] for w in "a b c <eos> <eos> b c d <eos>".split()]
    assert dm.unknown == {"train": 0, "val": 1, "test": 2}
    assert dm.streams["test"].tolist() == [0, 0, 1]
    assert "1 of 4 tokens are not in the train vocabulary" in caplog.text


@pytest.mark.parametrize("problem", ["missing", "empty", "no_root"])
def test_missing_or_empty_split_is_one_clear_error(tmp_path, problem):
    root = _write(tmp_path / "w")
    if problem == "missing":
        (root / "wiki.valid.tokens").unlink()
        match = "wiki.valid.tokens does not exist"
    elif problem == "empty":
        (root / "wiki.test.tokens").write_text("\n \n")
        match = "wiki.test.tokens is empty"
    else:
        root, match = None, "set data.root"
    with pytest.raises(DataError, match=match):
        WikiTextDataModule(root).setup()


def test_tracks_cover_the_stream_once_and_ranks_own_their_tracks():
    stream = torch.arange(103)
    tracks, dropped = batchify(stream, 4)
    assert dropped == 3 and tracks.shape == (4, 25)
    assert tracks.flatten().tolist() == list(range(100))  # contiguous tracks, in order, each token once
    parts = [batchify(stream, 4, rank=r, world=2)[0] for r in range(2)]
    assert torch.equal(torch.cat(parts), tracks)  # rank r holds tracks 2r, 2r + 1 of the same cut
    with pytest.raises(DataError, match="use fewer tracks"):
        batchify(torch.arange(5), 4)


def _rank_datasets(root, world, split="train", **kw):
    out = []
    for rank in range(world):
        dm = WikiTextDataModule(root, tgt_len=5, eval_tgt_len=5, **kw)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)
        out.append(dm.dataset(split))
    return out


def test_tracks_in_all_keep_transformer_xl_batch_on_any_number_of_processes(tmp_path):
    """data.tracks=60 (run_wt103_base.sh's batch) on 8 processes: ranks hold 8,8,8,8,7,7,7,7 consecutive tracks of
    the one-process cut, read equally many segments, and the loss weights make DDP's mean of the processes'
    gradients the mean over every token (as on one process)."""
    words = " ".join(f"w{i % 23}" for i in range(1000))
    root = _write(tmp_path / "w", train=words + "\n", valid=words[:400] + "\n", test="w1 w2\n")
    one = _rank_datasets(root, 1, tracks=60, batch_size=None)[0]
    eight = _rank_datasets(root, 8, tracks=60, batch_size=None)
    assert [d.tracks.shape[0] for d in eight] == [8, 8, 8, 8, 7, 7, 7, 7] and one.tracks.shape[0] == 60
    assert torch.equal(torch.cat([d.tracks for d in eight]), one.tracks)
    assert {len(d) for d in eight} == {len(one)}
    nll = torch.rand(60, 5)  # per-token losses of one segment, rows = tracks
    rows = torch.tensor([0] + [d.tracks.shape[0] for d in eight]).cumsum(0)
    weighted = [nll[rows[r]:rows[r + 1]].mean() * eight[r][0]["weight"] for r in range(8)]
    assert torch.stack(weighted).mean().item() == pytest.approx(nll.mean().item(), rel=1e-6)
    assert one[0]["weight"] == 1.0
    # evaluation: Transformer-XL's 10 tracks on 8 processes
    val = _rank_datasets(root, 8, "val", tracks=60, eval_tracks=10, batch_size=None)
    assert [d.tracks.shape[0] for d in val] == [2, 2, 1, 1, 1, 1, 1, 1]
    # per-process sizes (no data.tracks) are unchanged: world x batch_size tracks, equal shares, weight 1
    per = _rank_datasets(root, 2, batch_size=3)
    assert [d.tracks.shape[0] for d in per] == [3, 3] and per[1][0]["weight"] == 1.0


def test_too_few_tracks_or_no_batch_is_one_clear_error(tmp_path):
    root = _write(tmp_path / "w", train=" ".join(["a"] * 50) + "\n")
    with pytest.raises(DataError, match="5 tracks cannot be shared by 8 processes"):
        _rank_datasets(root, 8, tracks=5)
    with pytest.raises(DataError, match="Set data.tracks"):
        WikiTextDataModule(root, batch_size=None)
    with pytest.raises(DataError, match="data.eval_tracks must be at least 1"):
        WikiTextDataModule(root, eval_tracks=0)


def test_segments_are_in_order_contiguous_and_target_every_token_once():
    tracks = torch.arange(60).view(3, 20)
    ds = SegmentDataset(tracks, tgt_len=6)
    batches = [ds[i] for i in range(len(ds))]
    assert [b["segment"] for b in batches] == [0, 1, 2, 3] and batches[-1]["input"].shape == (3, 1)
    inputs = torch.cat([b["input"] for b in batches], 1)
    targets = torch.cat([b["target"] for b in batches], 1)
    assert torch.equal(inputs, tracks[:, :-1]) and torch.equal(targets, tracks[:, 1:])


def test_train_loader_resumes_mid_epoch_at_the_next_segment(tmp_path):
    words = " ".join(f"w{i % 17}" for i in range(400))
    root = _write(tmp_path / "w", train=words + "\n", valid="w1 w2\n", test="w3 w4\n")
    dm = WikiTextDataModule(root, batch_size=3, tgt_len=7)
    full = [b["input"] for b in dm.train_dataloader()]
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(5):
        next(it)
    saved = dm.state_dict()
    dm2 = WikiTextDataModule(root, batch_size=3, tgt_len=7)
    dm2.load_state_dict(saved)
    rest = list(dm2.train_dataloader())
    assert rest[0]["segment"] == 5 and len(rest) == len(full) - 5
    assert all(torch.equal(a["input"], b) for a, b in zip(rest, full[5:]))


def test_read_words_appends_eos(tmp_path):
    p = tmp_path / "f"
    p.write_text(" = Title = \n\nx\n")
    assert list(read_words(p)) == [["=", "Title", "=", "<eos>"], ["<eos>"], ["x", "<eos>"]]
    assert Vocab.build(read_words(p)).itos[:2] == ["<unk>", "<eos>"]
