"""WikiText layout reader, vocabulary, stream batching into tracks and the resumable segment loader."""
from __future__ import annotations

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
    parts = [batchify(stream, 2, rank=r, world=2)[0] for r in range(2)]
    assert torch.equal(torch.cat(parts), tracks)  # rank r holds tracks 2r, 2r + 1 of the same cut
    with pytest.raises(DataError, match="lower data.batch_size"):
        batchify(torch.arange(5), 4)


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
