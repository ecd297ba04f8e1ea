"""Translation through the framework: the documented command on a fairseq data-bin folder, the demo
learning end to end (BLEU rises) with the beam-search test, and checkpoint averaging."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from conftest import compose_config
from test_translation_data import make_bin

REPO = Path(__file__).resolve().parents[1]


def _metric(run_dir: Path, name: str) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(r[name]) for r in csv.DictReader(f) if r.get(name) not in ("", None)]


def test_documented_command_trains_on_a_data_bin_folder(tmp_path):
    from tasks.common.runner import train

    make_bin(tmp_path / "bin", n=48)
    cfg = compose_config([
        "task=translation", "data=iwslt14_de_en", "model=transformer_iwslt_grc", f"data.root={tmp_path / 'bin'}",
        "model.embed_dim=16", "model.ffn_dim=32", "model.encoder_layers=1", "model.decoder_layers=1",
        "model.cache_len=8", "data.max_tokens=128", "data.num_workers=0", "trainer=cpu", "trainer.max_steps=3",
        "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=1", f"paths.output_dir={tmp_path}/out", f"paths.run_dir={tmp_path}/run"])
    result = train(cfg)
    assert result["global_step"] == 3
    run = Path(result["run_dir"])
    assert len(_metric(run, "train/loss")) == 3 and _metric(run, "val/bleu_tok")
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    cache = state["model.encoder_layers.0.self_attn.cache"]
    assert cache.abs().sum() > 0  # training forwards wrote the GRC cache, and it is saved

    # python eval.py ckpt_path=<last.ckpt>: the task comes from the checkpoint, beam search on the test split
    from tasks.common.runner import evaluate

    ckpt = run / "checkpoints" / "last.ckpt"
    ecfg = compose_config([f"ckpt_path={ckpt}", "trainer=cpu", "trainer.enable_progress_bar=false",
                           f"paths.output_dir={tmp_path}/out"], config_name="eval")
    result = evaluate(ecfg, [f"ckpt_path={ckpt}", "trainer=cpu"])
    assert result["splits"] == ["val", "test"]
    assert {"val/bleu_tok", "test/bleu_tok", "test/sacrebleu"} <= set(result["metrics"])
    hyps = (Path(result["eval_dir"]) / "generate-test.txt").read_text().splitlines()
    assert hyps  # the hypotheses of the test split are written next to the metrics
    after = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(after["model.encoder_layers.0.self_attn.cache"], cache)  # evaluation wrote nothing back

    # model.pretrained=<that checkpoint> starts a new model from its weights (caches included)
    from tasks.translation.module import build_model

    stored = torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]["cfg"]
    model = build_model({**stored["model"], "pretrained": str(ckpt)}, stored.get("grc"),
                        after["model.encoder_embed.weight"].shape[0], after["model.decoder_embed.weight"].shape[0])
    loaded = model.state_dict()
    assert loaded.keys() == {k[len("model."):] for k in after if k.startswith("model.")}
    assert all(torch.equal(v, after[f"model.{k}"]) for k, v in loaded.items())


def _ckpt(path: Path, w: float, cache: float, step: int) -> None:
    torch.save({"state_dict": {"model.w": torch.full((2, 2), w), "model.encoder_layers.0.self_attn.cache":
                               torch.full((1, 3, 2), cache), "model.count": torch.tensor(step)},
                "optimizer_states": [{"x": 1}], "global_step": step, "hyper_parameters": {"cfg": {}}}, path)


def test_average_checkpoints_means_weights_and_keeps_the_newest_cache(tmp_path):
    from scripts.average_checkpoints import main

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for e, (w, c) in enumerate([(1.0, 10.0), (2.0, 20.0), (4.0, 30.0), (8.0, 40.0)]):
        _ckpt(tmp_path / "run" / "checkpoints" / f"epoch={e:03d}.ckpt", w, c, e)
    out = tmp_path / "avg.ckpt"
    assert main(["--run-dir", str(tmp_path / "run"), "--last", "3", "--out", str(out)]) == 0
    avg = torch.load(out, weights_only=False)
    assert torch.allclose(avg["state_dict"]["model.w"], torch.full((2, 2), 14.0 / 3))
    assert torch.equal(avg["state_dict"]["model.encoder_layers.0.self_attn.cache"], torch.full((1, 3, 2), 40.0))
    assert int(avg["state_dict"]["model.count"]) == 3 and avg["global_step"] == 3
    assert "optimizer_states" not in avg and len(avg["averaged_from"]) == 3
    assert main(["--run-dir", str(tmp_path / "run"), "--last", "3", "--out", str(out)]) == 2  # never overwrites
    assert main(["--run-dir", str(tmp_path / "run"), "--last", "9", "--out", str(tmp_path / "b.ckpt")]) == 2


@pytest.mark.slow
def test_demo_learns_and_beam_search_tests(tmp_path):
    """The generated demo: val/bleu_tok rises over 4 epochs; the beam-search test writes both BLEU
    figures and the hypotheses; the average of the epoch checkpoints loads into the model."""
    import lightning.pytorch as pl

    from scripts.average_checkpoints import main as average
    from tasks.common.runner import train
    from tasks.translation import build_task

    cfg = compose_config([
        "experiment=translation_demo", f"paths.data_dir={tmp_path}/data", f"paths.output_dir={tmp_path}/out",
        f"paths.run_dir={tmp_path}/run", "trainer.max_epochs=4", "task.valid_bleu.sentences=100",
        "data.generate.num_test=60"])
    result = train(cfg)
    run = Path(result["run_dir"])
    bleu = _metric(run, "val/bleu_tok")
    assert len(bleu) == 4 and bleu[-1] > bleu[0] + 10, bleu
    assert _metric(run, "test/bleu_tok")[-1] > 10 and _metric(run, "test/sacrebleu")  # final epoch, beam 4
    assert (run / "generate-test.txt").is_file()

    module, dm = build_task(cfg, stage="validate")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path / "eval"))
    metrics = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert metrics["test/bleu_tok"] > 10 and metrics["test/sacrebleu"] > 10
    lines = (tmp_path / "eval" / "generate-test.txt").read_text().splitlines()
    assert sum(line.startswith("H-") for line in lines) == 60 and "nrefs:1" in lines[-1]

    assert average(["--run-dir", str(run), "--last", "3", "--out", str(tmp_path / "avg.ckpt")]) == 0
    module.load_state_dict(torch.load(tmp_path / "avg.ckpt", weights_only=False)["state_dict"], strict=True)


TABLE7 = sorted(p.stem for p in (REPO / "configs" / "experiment" / "paper").glob("table7_*.yaml"))


def test_table7_and_wmt_experiments_compose():
    from omegaconf import OmegaConf

    assert len(TABLE7) == 12
    for name in TABLE7:
        cfg = compose_config([f"experiment=paper/{name}"])
        assert cfg.task.name == "translation" and cfg.paper.table == 7
        assert cfg.model.name.endswith("_grc") == name.endswith("_cached")
        assert cfg.data.source_lang in name and cfg.data.target_lang in name
        assert cfg.task.test_at_end.average_last == 10 and cfg.callbacks.epoch_checkpoints.save_top_k == 10
        assert list(cfg.paper.metrics) == ["test/bleu_tok"]
    for variant in ("baseline", "cached"):
        cfg = compose_config([f"experiment=wmt14_en_de_base_{variant}"])
        OmegaConf.resolve(cfg.task)
        assert cfg.model.share_all_embeddings and cfg.data.joined_dictionary and cfg.task.generation.lenpen == 0.6


@pytest.mark.slow
def test_table7_runs_are_compared_with_the_paper(tmp_path):
    """Two tiny Table 7 runs (IWSLT14 De-En baseline and cached) log test/bleu_tok; compare.py reads them."""
    from tasks.common.runner import train
    from tasks.paper.compare import compare_paths, to_markdown

    make_bin(tmp_path / "bin", n=32)
    for variant in ("baseline", "cached"):
        train(compose_config([
            f"experiment=paper/table7_iwslt14_de_en_{variant}", f"data.root={tmp_path / 'bin'}", "trainer=cpu",
            "model.embed_dim=16", "model.ffn_dim=32", "model.encoder_layers=1", "model.decoder_layers=1",
            "model.cache_len=8", "data.max_tokens=256", "data.num_workers=0", "trainer.max_epochs=2",
            "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "task.generation.max_len_b=5",
            "trainer.enable_model_summary=false", f"paths.output_dir={tmp_path}/out",
            f"paths.run_dir={tmp_path}/multirun/table7/{variant}"]))
    text = to_markdown(compare_paths([str(tmp_path / "multirun" / "table7")]))
    line = next(ln for ln in text.splitlines() if ln.startswith("| IWSLT14 De-En | test/bleu_tok |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "35.50" and cells[4] == "36.00" and "(n=1)" in cells[3] and "(n=1)" in cells[5], line


def test_resume_mid_epoch_continues_with_the_same_batches(tmp_path):
    """Stopping after 3 steps and resuming with ckpt_path=last gives the losses of an uninterrupted run."""
    from tasks.common.runner import train

    make_bin(tmp_path / "bin", n=64)

    def run(name: str, steps: int, ckpt: str | None = None) -> list[float]:
        ov = ["task=translation", "model=transformer_iwslt_grc", f"data.root={tmp_path / 'bin'}",
              "data.source_lang=de", "data.target_lang=en", "model.embed_dim=16", "model.ffn_dim=32",
              "model.encoder_layers=1", "model.decoder_layers=1", "model.cache_len=8", "data.max_tokens=96",
              "data.num_workers=0", "trainer=cpu", f"trainer.max_steps={steps}", "trainer.num_sanity_val_steps=0",
              "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "task.test_at_end.enabled=false",
              "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1", "task.scheduler.warmup_updates=2",
              f"paths.output_dir={tmp_path}/out", f"paths.run_dir={tmp_path}/{name}"]
        if ckpt:  # the resumed run extends max_steps, a recipe key: allowed explicitly
            ov += [f"ckpt_path={ckpt}", "resume_mismatch=allow"]
        train(compose_config(ov))
        return _metric(tmp_path / name, "train/loss")

    full = run("full", 6)
    assert len(full) == 6
    run("part", 3)
    resumed = run("part", 6, "last")
    assert resumed[-3:] == pytest.approx(full[3:], rel=1e-5)
