"""The language-modelling task through the framework: train.py's path, logged perplexity, mid-epoch resume."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from tasks.language_modeling.demo import write_demo_corpus

    return write_demo_corpus(tmp_path_factory.mktemp("wt"), max_lines=400)


def _overrides(root: Path, out: Path, model: str, steps: int, *extra: str) -> list[str]:
    return ["task=wikitext103", f"model={model}", f"data.root={root}", "data.batch_size=4", "data.eval_batch_size=2",
            "data.tgt_len=8", "data.eval_tgt_len=16", "model.n_layer=1", "model.d_model=16", "model.n_head=2",
            "model.d_head=8", "model.d_inner=32", "model.mem_len=8", "model.cutoffs=[100]", "trainer=cpu",
            f"trainer.max_steps={steps}", "trainer.val_check_interval=4", "trainer.num_sanity_val_steps=0",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
            "callbacks.last_checkpoint.every_n_train_steps=3", f"paths.output_dir={out}", "task.optimizer.lr=1e-3",
            *extra]


def _metrics(run: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    with open(run / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if v not in ("", None) and k not in ("epoch", "step"):
                    out.setdefault(k, []).append(float(v))
    return out


@pytest.mark.parametrize("model", ["transformer_xl_grc", "transformer_xl_base"])
def test_train_logs_stream_perplexity(model, corpus, tmp_path):
    from tasks.common.runner import train

    result = train(compose_config(_overrides(corpus, tmp_path, model, 4)))
    logged = _metrics(Path(result["run_dir"]))
    assert {"train/loss", "val/loss", "val/ppl", "test/ppl"} <= set(logged)
    assert logged["val/ppl"][0] == pytest.approx(math.exp(logged["val/loss"][0]), rel=1e-4)
    assert 1 < logged["test/ppl"][0] < 10 * 2000


@pytest.mark.slow
def test_resume_mid_epoch_reproduces_the_uninterrupted_run(corpus, tmp_path):
    """3 steps, stop, resume to 6 == 6 steps straight (weights and the carried GRC state)."""
    from tasks.common.runner import train

    extra = ("trainer.val_check_interval=100", "task.test_with_best=false", "task.scheduler.total_steps=6")
    full = train(compose_config(_overrides(corpus, tmp_path / "a", "transformer_xl_grc", 6, *extra)))
    half = _overrides(corpus, tmp_path / "b", "transformer_xl_grc", 3, *extra)
    train(compose_config(half))
    # the resumed run extends max_steps, a recipe key: allowed explicitly
    resumed = train(compose_config([o.replace("max_steps=3", "max_steps=6") for o in half]
                                   + ["ckpt_path=last", "resume_mismatch=allow"]))
    a = torch.load(Path(full["run_dir"]) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(Path(resumed["run_dir"]) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 6
    for k, v in a["state_dict"].items():
        assert torch.allclose(v, b["state_dict"][k], atol=1e-6), k
    for (ca, pa), (cb, pb) in zip(a["lm_memory"], b["lm_memory"]):
        assert torch.allclose(ca, cb, atol=1e-6) and torch.allclose(pa, pb, atol=1e-6)


def test_memory_checkpoint_keeps_each_process_tracks():
    from tasks.language_modeling.module import pack_memory, unpack_memory

    # two processes holding 3 and 2 tracks (data.tracks=5): GRC-style state, one (cache, pending) pair per layer
    per_rank = [[(torch.full((n, 3), float(r)), torch.full((n, 3), 10.0 + r))] for r, n in enumerate((3, 2))]

    def all_gather(t):  # what every rank receives: the ranks' (padded) tensors stacked, in call order
        k = next(calls)
        if k == 0:
            return torch.stack([torch.tensor([s[0][0].shape[0]]) for s in per_rank])
        leaves = [[x for pair in s for x in pair][k - 1] for s in per_rank]
        return torch.stack([torch.cat([x, x.new_zeros(t.shape[0] - x.shape[0], *x.shape[1:])]) for x in leaves])

    calls = iter(range(100))
    gathered, rows = pack_memory(per_rank[1], 2, all_gather)
    assert rows == [3, 2]
    for rank in range(2):
        mine = unpack_memory(gathered, 2, 2, rank, rows)
        assert torch.equal(mine[0][0], per_rank[rank][0][0]) and torch.equal(mine[0][1], per_rank[rank][0][1])
    assert unpack_memory(gathered, 2, 1, 0, rows) is None  # another process count: other tracks, empty memory
    single, rows = pack_memory(per_rank[1], 1, None)
    assert rows is None and torch.equal(unpack_memory(single, 1, 1, 0)[0][0], per_rank[1][0][0])
