"""ImageNet-22k folder data module (paper Table 8 pre-training) on a generated folder, and a tiny pre-training run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import compose_config
from tasks.classification.imagenet22k import ImageNet22kDataModule, PackedSamples
from tasks.common.errors import DataError

WNIDS = [f"n{10000000 + i:08d}" for i in range(7)]


def make_folder(root: Path, per_class: int = 6, val_per_class: int = 0, size: int = 16) -> Path:
    """``root/train/<wnid>/*.JPEG`` (and ``val/``) with 7 classes of solid-colour images."""
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c, wnid in enumerate(WNIDS):
            if not count:
                continue
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new("RGB", (size, size), (30 * c, 8 * i, 100)).save(root / split / wnid / f"{wnid}_{i}.JPEG")
    return root


def module(root: Path, **kw) -> ImageNet22kDataModule:
    return ImageNet22kDataModule(str(root), img_size=16, batch_size=4, num_workers=kw.pop("num_workers", 0),
                                 num_classes=kw.pop("num_classes", None), **kw)


def test_classes_come_from_the_folder_and_validation_is_held_out(tmp_path):
    root = make_folder(tmp_path / "in22k", per_class=6)
    dm = module(root, val_per_class=2)
    dm.check("fit")
    assert dm.num_classes == len(WNIDS) and list(dm.class_to_idx) == WNIDS
    assert isinstance(dm.train_samples, PackedSamples) and isinstance(dm.train_samples.relpaths, np.ndarray)
    train, val = set(dm.train_samples), set(dm.val_samples)
    assert len(val) == 2 * len(WNIDS) and len(train) == 4 * len(WNIDS) and not train & val
    assert {label for _, label in val} == set(range(len(WNIDS)))
    path, label = dm.val_samples[0]
    assert Path(path).is_file() and Path(path).parent.name == WNIDS[label]
    # the held-out images are the same whatever the run seed
    other = module(root, val_per_class=2, seed=5)
    other.check("fit")
    assert set(other.val_samples) == val


def test_val_folder_is_used_when_present(tmp_path):
    root = make_folder(tmp_path / "in22k", per_class=3, val_per_class=1)
    dm = module(root, num_classes=len(WNIDS), num_workers=1)  # the packed samples reach a worker process
    dm.check("fit")
    assert len(dm.train_samples) == 3 * len(WNIDS) and len(dm.val_samples) == len(WNIDS)
    assert all("/val/" in p for p, _ in dm.val_samples)
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 1, 2, 3]


def test_errors_name_the_folder(tmp_path):
    nowhere = tmp_path / "nowhere"
    with pytest.raises(DataError, match=rf"'{nowhere}' does not exist; pass data.root=/path/to/imagenet22k"):
        module(tmp_path / "nowhere").check()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=rf"'{tmp_path / 'empty'}' is not an ImageNet-style folder: it has no train/"):
        module(tmp_path / "empty").check()
    root = make_folder(tmp_path / "in22k", per_class=2)
    with pytest.raises(DataError, match=r"has 7 classes in train/ but data.num_classes=21841"):
        module(root, num_classes=21841).check()


def test_tiny_pretraining_run_counts_the_classes(tmp_path):
    """task=imagenet22k trains Swin-T on the folder: the classifier head has one output per wnid folder."""
    from tasks.common.runner import train

    root = make_folder(tmp_path / "in22k", per_class=5)
    cfg = compose_config([
        "experiment=pretrain/in22k_swin_t_cached", f"data.root={root}", "data.img_size=32", "data.batch_size=4",
        "data.num_workers=0", "data.val_per_class=1", "trainer=cpu", "trainer.devices=1", "trainer.precision=32-true",
        "trainer.max_steps=2", "trainer.accumulate_grad_batches=1", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.num_sanity_val_steps=0", f"paths.output_dir={tmp_path}/out",
        f"paths.run_dir={tmp_path}/run"])
    result = train(cfg)
    assert result["global_step"] == 2 and 0 <= result["metrics"]["val/acc1"] <= 100
    import torch
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["state_dict"]["model.head.fc.weight"].shape[0] == len(WNIDS)
