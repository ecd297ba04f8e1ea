"""COCO data: annotation checks, category maps, training filter, crowd/empty targets, flip, grouped DDP batches."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.common.errors import DataError
from tasks.detection.coco import CocoDetection, CocoSplit, hflip
from tasks.detection.data import CocoDataModule
from tasks.detection.sampler import GroupedBatchLoader, GroupedBatchSampler
from tasks.detection.shapes import generate


def _write(root: Path, images: list[dict], anns: list[dict], cats: list[dict], split: str = "val") -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    folder = root / f"{split}2017"
    folder.mkdir(exist_ok=True)
    for img in images:
        Image.new("RGB", (img["width"], img["height"]), (90, 90, 90)).save(folder / img["file_name"])
    path = root / "annotations" / f"instances_{split}2017.json"
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": anns, "categories": cats}))
    return path


def _ann(i: int, image_id: int, cat: int, box: list[float], crowd: int = 0) -> dict:
    x, y, w, h = box
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": box, "area": w * h, "iscrowd": crowd,
            "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}


@pytest.fixture
def small_coco(tmp_path: Path) -> Path:
    """Non-contiguous categories (2, 7, 90); image 1: two objects + a crowd box; image 2: only a crowd box;
    image 3: no annotation; image 4: too small (20 px); image 5: wide."""
    images = [{"id": 1, "file_name": "a.png", "width": 64, "height": 80},
              {"id": 2, "file_name": "b.png", "width": 64, "height": 64},
              {"id": 3, "file_name": "c.png", "width": 64, "height": 64},
              {"id": 4, "file_name": "d.png", "width": 20, "height": 40},
              {"id": 5, "file_name": "e.png", "width": 96, "height": 48}]
    cats = [{"id": 90, "name": "z"}, {"id": 2, "name": "a"}, {"id": 7, "name": "m"}]
    anns = [_ann(1, 1, 7, [4, 4, 20, 30]), _ann(2, 1, 90, [30, 40, 30, 30]), _ann(3, 1, 2, [0, 0, 64, 80], crowd=1),
            _ann(4, 2, 2, [5, 5, 20, 20], crowd=1), _ann(5, 4, 2, [1, 1, 5, 5]), _ann(6, 5, 2, [10, 10, 0.5, 20]),
            _ann(7, 5, 7, [70, 8, 26.5, 30])]
    for split in ("train", "val"):
        _write(tmp_path, images, anns, cats, split)
    return tmp_path


def test_category_maps_are_contiguous_and_invertible(small_coco: Path) -> None:
    split = CocoSplit(small_coco / "annotations" / "instances_val2017.json", small_coco / "val2017")
    assert split.cat_to_label == {2: 1, 7: 2, 90: 3}
    assert all(split.label_to_cat[split.cat_to_label[c]] == c for c in (2, 7, 90))
    assert split.num_classes == 3


def test_training_filter_crowd_and_empty_targets(small_coco: Path) -> None:
    split = CocoSplit(small_coco / "annotations" / "instances_train2017.json", small_coco / "train2017")
    # image 3 (no annotation) and image 4 (short side 20 < 32) are dropped; image 2 (crowd only) stays
    assert split.image_ids(train_filter=True) == [1, 2, 5]
    assert split.image_ids(train_filter=False) == [1, 2, 3, 4, 5]
    t1 = split.target(1, with_masks=True)
    assert t1["labels"].tolist() == [2, 3]  # the crowd box is ignored
    assert t1["boxes"].tolist() == [[4, 4, 24, 34], [30, 40, 60, 70]]
    assert t1["masks"].shape == (2, 80, 64) and t1["masks"][0, 10, 10] == 1 and t1["masks"][0, 50, 50] == 0
    t2 = split.target(2, with_masks=True)  # only a crowd box: an empty target of the right shapes
    assert t2["boxes"].shape == (0, 4) and t2["labels"].shape == (0,) and t2["masks"].shape == (0, 64, 64)
    t5 = split.target(5, with_masks=False)  # the 0.5 px wide box is dropped, the box past the border clipped
    assert t5["labels"].tolist() == [2] and t5["boxes"].tolist() == [[70, 8, 96, 38]]
    assert split.aspect_groups([1, 5]) == [0, 1]


def test_flip_mirrors_boxes_and_masks(small_coco: Path) -> None:
    split = CocoSplit(small_coco / "annotations" / "instances_train2017.json", small_coco / "train2017")
    ds = CocoDetection(split, [1], with_masks=True)
    image, target = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 80, 64)
    fimg, ft = hflip(image, target)
    assert ft["boxes"][0].tolist() == [64 - 24, 4, 64 - 4, 34]
    assert torch.equal(ft["masks"], target["masks"].flip(-1)) and torch.equal(fimg, image.flip(-1))
    flipped = CocoDetection(split, [1], with_masks=True, flip_prob=1.0)[(0, 123)][1]
    assert torch.equal(flipped["boxes"], ft["boxes"])


@pytest.mark.parametrize("case", ["missing_file", "missing_images", "not_coco", "unknown_category", "box_outside",
                                  "corrupt_image"])
def test_bad_input_names_the_file(tmp_path: Path, case: str) -> None:
    images = [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}]
    cats = [{"id": 1, "name": "a"}]
    anns = [_ann(1, 1, 1, [2, 2, 10, 10])]
    if case == "unknown_category":
        anns = [_ann(1, 1, 5, [2, 2, 10, 10])]
    if case == "box_outside":
        anns = [_ann(1, 1, 1, [20, 2, 30, 10])]
    path = _write(tmp_path, images, anns, cats)
    if case == "missing_file":
        path.unlink()
    if case == "missing_images":
        (tmp_path / "val2017" / "a.png").unlink()
        (tmp_path / "val2017").rmdir()
    if case == "not_coco":
        path.write_text(json.dumps({"images": [], "annotations": []}))
    if case == "corrupt_image":
        (tmp_path / "val2017" / "a.png").write_bytes(b"not an image")
    with pytest.raises(DataError) as err:
        split = CocoSplit(path, tmp_path / "val2017")
        CocoDetection(split, [1], with_masks=False)[0]
    msg = str(err.value)
    named = {"missing_images": "val2017", "corrupt_image": "a.png"}.get(case, "instances_val2017.json")
    assert named in msg and msg.count("\n") == 0
    expected = {"missing_file": "does not exist", "missing_images": "does not exist", "not_coco": "'categories'",
                "unknown_category": "category_id 5", "box_outside": "outside", "corrupt_image": "cannot be decoded"}
    assert expected[case] in msg


def test_grouped_batches_shard_over_ranks_deterministically() -> None:
    groups = [0] * 7 + [1] * 6
    world = 2
    samplers = [GroupedBatchSampler(groups, 2, seed=3, rank=r, world=world) for r in range(world)]
    batches = [[[i for i, _ in b] for b in s] for s in samplers]
    assert len(batches[0]) == len(batches[1]) == len(samplers[0])
    seen = [i for rank in batches for b in rank for i in b]
    assert set(seen) == set(range(13))  # every image once per epoch (plus padding repeats)
    for rank in batches:
        for b in rank:
            assert len({groups[i] for i in b}) == 1 and len(b) == 2  # one aspect group per batch
    again = [[i for i, _ in b] for b in GroupedBatchSampler(groups, 2, seed=3, rank=0, world=world)]
    assert again == batches[0]
    samplers[0].set_epoch(1)
    assert [[i for i, _ in b] for b in samplers[0]] != batches[0]


def test_train_loader_resumes_mid_epoch(tmp_path: Path) -> None:
    generate(tmp_path, num_train=14, num_val=2, seed=1)
    dm = CocoDataModule(str(tmp_path), with_masks=False, batch_size=2, num_workers=0, seed=5)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, GroupedBatchLoader)
    from lightning.fabric.utilities.data import _set_sampler_epoch

    _set_sampler_epoch(loader, 2)  # what Lightning does before each epoch
    assert loader.batch_sampler.epoch == 2
    full = [[int(t["image_id"]) for t in b[1]] for b in loader]
    it = iter(loader)
    next(it), next(it)
    state = dm.state_dict()
    assert state["train_loader"] == {"epoch": 2, "batches": 2, "num_batches": len(full)}
    dm2 = CocoDataModule(str(tmp_path), with_masks=False, batch_size=2, num_workers=0, seed=5)
    dm2.load_state_dict(state)
    dm2.setup("fit")
    rest = [[int(t["image_id"]) for t in b[1]] for b in dm2.train_dataloader()]
    assert rest == full[2:]


def test_generated_shapes_are_valid_coco(tmp_path: Path) -> None:
    generate(tmp_path, num_train=6, num_val=6, seed=0)
    data = json.loads((tmp_path / "annotations" / "instances_val2017.json").read_text())
    assert {"info", "images", "annotations", "categories"} <= set(data)
    assert min(a["id"] for a in data["annotations"]) == 1
    for a in data["annotations"]:
        assert a["iscrowd"] == 0 and a["area"] > 0 and len(a["segmentation"][0]) >= 6
    split = CocoSplit(tmp_path / "annotations" / "instances_val2017.json", tmp_path / "val2017")
    assert split.cat_ids == [1, 3, 5, 8]
    img = np.asarray(Image.open(tmp_path / "val2017" / data["images"][0]["file_name"]))
    assert img.shape == (data["images"][0]["height"], data["images"][0]["width"], 3)
