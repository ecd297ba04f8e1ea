"""Detection task end to end on generated shapes (tiny images, CPU): both detectors x baseline/cached,
training steps, resume exactness, evaluation of a checkpoint, DDP with each image evaluated once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, compose_config
from tasks.detection.shapes import generate


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("coco_shapes")
    generate(root, num_train=10, num_val=5, seed=2)
    return root


def det_overrides(task: str, model: str, root: Path, out: Path, steps: int | None = 2) -> list[str]:
    """CPU, 64-96 px inputs, GRC caches at 64 px, small proposal counts (the heads dominate the CPU time)."""
    ov = [f"task={task}", f"model={model}", "data=coco_shapes", f"data.root={root}", "data.min_size=64",
          "data.max_size=96", "data.batch_size=2", "data.val_batch_size=2", "+model.img_size=64", "trainer=cpu",
          "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
          "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1", f"paths.output_dir={out}/outputs",
          f"paths.run_dir={out}/run", "callbacks.grc_monitor.every_n_steps=1", "task.scheduler.warmup_steps=2"]
    if task == "coco_maskrcnn":
        ov += ["task.detector.rpn_pre_nms_top_n_train=200", "task.detector.rpn_post_nms_top_n_train=50",
               "task.detector.rpn_pre_nms_top_n_test=100", "task.detector.rpn_post_nms_top_n_test=30",
               "task.detector.box_batch_size_per_image=32", "task.detector.detections_per_img=20"]
    else:
        ov += ["task.detector.topk_candidates=100", "task.detector.detections_per_img=20"]
    if steps is not None:
        ov.append(f"trainer.max_steps={steps}")
    return ov


def _cfg(overrides: list[str]):
    from tasks.common.runner import finalize_config

    cfg = compose_config(overrides)
    return finalize_config(cfg, Path(str(cfg.paths.run_dir)))


@pytest.mark.parametrize("task", ["coco_maskrcnn", "coco_retinanet"])
@pytest.mark.parametrize("model", ["pvt_tiny", "pvt_tiny_grc"])
def test_forward_backward_and_step(shapes_root: Path, tmp_path: Path, task: str, model: str) -> None:
    from tasks.detection import build_task

    module, dm = build_task(_cfg(det_overrides(task, model, shapes_root, tmp_path)))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module.train()
    images, targets = module._prepare(batch)
    losses = module.model(images, targets)
    expected = ({"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
                if task == "coco_maskrcnn" else {"classification", "bbox_regression"})
    assert set(losses) == expected and all(torch.isfinite(v) for v in losses.values())
    opt = torch.optim.AdamW(module.model.parameters(), lr=1e-3)
    before = {k: v.detach().clone() for k, v in module.model.backbone.body.state_dict().items()}
    sum(losses.values()).backward()
    stem = module.model.backbone.body.model.patch_embed1.proj.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    opt.step()
    after = module.model.backbone.body.state_dict()
    assert not torch.equal(before["model.patch_embed1.proj.weight"], after["model.patch_embed1.proj.weight"])
    caches = [k for k in after if k.endswith(".cache")]
    assert bool(caches) == model.endswith("_grc")
    for k in caches:  # written by the training forward, at the cache length of the 64 px ImageNet grid
        assert after[k].abs().sum() > 0 and after[k].shape == before[k].shape
    module.eval()
    with torch.no_grad():
        outputs = module(images)
    for img, out in zip(images, outputs):
        assert out["boxes"].shape[1] == 4 and len(out["boxes"]) <= 20
        if len(out["boxes"]):
            assert float(out["boxes"][:, 2].max()) <= img.shape[-1] + 1e-3  # original-image coordinates
            assert set(out["labels"].tolist()) <= {1, 2, 3, 4}
        if task == "coco_maskrcnn":
            assert out["masks"].shape[-2:] == img.shape[-2:]


def test_fpn_levels_match_pvt_configs(shapes_root: Path, tmp_path: Path) -> None:
    from tasks.detection import build_task

    for task, names, strides in (("coco_maskrcnn", ["0", "1", "2", "3", "pool"], [4, 8, 16, 32, 64]),
                                 ("coco_retinanet", ["0", "1", "2", "p6", "p7"], [8, 16, 32, 64, 128])):
        module, _ = build_task(_cfg(det_overrides(task, "pvt_tiny", shapes_root, tmp_path)))
        feats = module.model.backbone(torch.zeros(1, 3, 128, 256))
        assert list(feats) == names
        assert [256 // f.shape[-1] for f in feats.values()] == strides
        assert all(f.shape[1] == 256 for f in feats.values())
    retina = module.model
    sizes = retina.anchor_generator.sizes
    assert sizes[0] == pytest.approx((32.0, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)))
    # mmdetection's anchors, not rounded: ratio 0.5 at size 32 is 45.25 x 22.63 (w = s / sqrt(r), h = s * sqrt(r))
    cell = retina.anchor_generator.cell_anchors[0]
    assert cell[0].tolist() == pytest.approx([-16 * 2 ** 0.5, -8 * 2 ** 0.5, 16 * 2 ** 0.5, 8 * 2 ** 0.5])
    assert retina.detections_per_img == 20 and not any(isinstance(m, torch.nn.ReLU) for m in retina.backbone.fpn.modules())


def test_resume_is_exact_and_checkpoint_evaluates(shapes_root: Path, tmp_path: Path) -> None:
    """4 steps == 2 steps + resume to 4 (weights, GRC caches, optimizer, schedule); then eval.py's path."""
    from tasks.common.runner import evaluate, train

    def run(name: str, steps: int, *extra: str):
        ov = det_overrides("coco_maskrcnn", "pvt_tiny_grc", shapes_root, tmp_path / name, steps=steps)
        return train(compose_config([*ov, "trainer.deterministic=true", "callbacks.model_checkpoint=null",
                                     "callbacks.last_checkpoint.every_n_train_steps=null", *extra]))

    full = run("full", 4)
    assert full["metrics"]["val/bbox_mAP"] >= 0 and "val/segm_mAP_75" in full["metrics"]
    run("split", 2)
    # the same command resumes: the label map the task derives from the data is not part of the recipe
    assert run("split", 2, "ckpt_path=last")["resumed_from"].endswith("last.ckpt")
    resumed = run("split", 4, "ckpt_path=last", "resume_mismatch=allow")  # extends max_steps, a recipe key
    assert resumed["global_step"] == 4 and resumed["resumed_from"].endswith("last.ckpt")
    a = torch.load(tmp_path / "full" / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "split" / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 4
    # PVT's recipe: weight decay 1e-4 on every parameter group, norms and biases included
    assert [g["weight_decay"] for g in a["optimizer_states"][0]["param_groups"]] == [1e-4, 1e-4]

    results_json = tmp_path / "results.json"
    ov = [o for o in det_overrides("coco_maskrcnn", "pvt_tiny", shapes_root, tmp_path / "eval", steps=None)
          if not o.startswith(("task=", "model=", "+model.", "paths.run_dir", "callbacks."))]
    cfg = compose_config(["task=coco_maskrcnn", *ov, f"ckpt_path={tmp_path / 'full' / 'run' / 'checkpoints' / 'last.ckpt'}",
                          f"task.results_json={results_json}"], config_name="eval")
    result = evaluate(cfg, ["task=coco_maskrcnn", *ov])
    assert result["metrics"]["val/bbox_mAP"] == pytest.approx(full["metrics"]["val/bbox_mAP"], abs=1e-6)
    detections = json.loads(results_json.read_text())
    assert all({"image_id", "category_id", "bbox", "score", "segmentation"} <= set(d) for d in detections)
    assert {d["category_id"] for d in detections} <= {1, 3, 5, 8}  # COCO ids, not labels


@pytest.mark.slow
def test_ddp_two_processes_evaluate_each_image_once(shapes_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    ov = [o for o in det_overrides("coco_retinanet", "pvt_tiny_grc", shapes_root, out, steps=2)
          if not o.startswith(("trainer=", "paths.run_dir"))]
    cmd = [sys.executable, "train.py", *ov, "trainer=ddp_sim", "run_name=ddp", "data.val_batch_size=1",
           f"task.results_json={out / 'coco_results.json'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "outputs" / "coco_retinanet" / "ddp" / "results.json").read_text())
    assert result["metrics"]["val/num_images"] == 5  # 3 + 2 images on the two ranks, each counted once
    detections = json.loads((out / "coco_results.json").read_text())
    assert {d["image_id"] for d in detections} <= set(range(1, 6))


def test_non_pyramid_backbone_is_one_sentence() -> None:
    from tasks.common.errors import ConfigError
    from tasks.detection.models import build_backbone

    with pytest.raises(ConfigError, match="strides 4/8/16/32"):
        build_backbone({"name": "vit_small_patch16_224", "img_size": 32}, None)
    with pytest.raises(ConfigError, match="Unknown model"):
        build_backbone({"name": "pvt_tinyy"}, None)


def test_checkpoint_categories_must_match_the_annotation_file(shapes_root: Path, tmp_path: Path) -> None:
    from tasks.common.errors import DataError
    from tasks.detection import build_task

    ov = det_overrides("coco_retinanet", "pvt_tiny", shapes_root, tmp_path)
    with pytest.raises(DataError, match="instances_val2017.json has categories"):
        build_task(_cfg([*ov, "task.label_to_cat={1: 1, 2: 2}"]), stage="validate")
    module, _ = build_task(_cfg([*ov, "task.label_to_cat={1: 1, 2: 3, 3: 5, 4: 8}"]), stage="validate")
    assert module.label_to_cat == {1: 1, 2: 3, 3: 5, 4: 8}


def test_1x_schedule_warmup_and_steps() -> None:
    from tasks.detection.module import warmup_multistep_schedule

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    sched = warmup_multistep_schedule(opt, total_steps=1200, steps_per_epoch=100, warmup_steps=500)
    f = sched.lr_lambdas[0]
    assert f(0) == pytest.approx(0.001) and f(250) == pytest.approx(0.5005) and f(500) == 1.0
    assert f(799) == 1.0 and f(800) == pytest.approx(0.1) and f(1099) == pytest.approx(0.1)
    assert f(1100) == pytest.approx(0.01)
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-7)


def test_demo_reads_every_validation_of_a_run(tmp_path: Path) -> None:
    """The demo's table: first and last validation of a Lightning CSV log (train rows have no val/ values)."""
    from tasks.detection.demo import validations

    log = tmp_path / "metrics.csv"
    log.write_text("epoch,step,train/loss,val/bbox_mAP,val/segm_mAP\n"
                   "0,9,3.1,,\n1,45,,2.5,4.0\n2,50,1.9,,\n3,91,,17.0,21.5\n")
    vals = validations(log)
    assert [v["step"] for v in vals] == [45, 91]
    assert vals[0]["val/bbox_mAP"] == 2.5 and vals[-1]["val/segm_mAP"] == 21.5 and "train/loss" not in vals[0]
