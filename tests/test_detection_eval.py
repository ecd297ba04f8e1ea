"""COCO evaluation path: ground truth as results gives AP 1.0, perturbed results less; gathering counts each image once."""
from __future__ import annotations

import pytest
import torch

from tasks.detection.coco import CocoSplit
from tasks.detection.evaluation import CocoResults, coco_metrics, detections_to_coco, encode_masks
from tasks.detection.shapes import generate


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> CocoSplit:
    root = tmp_path_factory.mktemp("shapes_eval")
    generate(root, num_train=1, num_val=12, seed=4)
    return CocoSplit(root / "annotations" / "instances_val2017.json", root / "val2017")


def _perfect(split: CocoSplit) -> tuple[CocoResults, list[int]]:
    """The ground truth of every val image, as the detector would output it, through detections_to_coco."""
    results = CocoResults()
    ids = split.image_ids(train_filter=False)
    for image_id in ids:
        t = split.target(image_id, with_masks=True)
        n = len(t["labels"])
        out = {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(n),
               "masks": t["masks"][:, None].float()}
        results.add(image_id, detections_to_coco(image_id, out, split.label_to_cat))
    return results, ids


def test_ground_truth_as_results_gives_ap_one(split: CocoSplit) -> None:
    results, ids = _perfect(split)
    got_ids, res = results.gather()
    assert got_ids == ids
    m = coco_metrics(split.coco, res, got_ids, ("bbox", "segm"))
    assert m["bbox_mAP"] == pytest.approx(100.0) and m["bbox_mAP_50"] == pytest.approx(100.0)
    assert m["bbox_mAP_75"] == pytest.approx(100.0) and m["segm_mAP"] == pytest.approx(100.0)


def test_perturbed_results_score_lower(split: CocoSplit) -> None:
    results, ids = _perfect(split)
    _, res = results.gather()
    shifted = [dict(r, bbox=[r["bbox"][0] + 0.3 * r["bbox"][2], *r["bbox"][1:]]) for r in res]
    m = coco_metrics(split.coco, shifted, ids, ("bbox",))
    assert 0.0 < m["bbox_mAP"] < 90.0 and m["bbox_mAP_50"] == pytest.approx(100.0)
    relabelled = [dict(r, category_id=split.cat_ids[(split.cat_ids.index(r["category_id"]) + 1) % 4]) for r in res]
    assert coco_metrics(split.coco, relabelled, ids, ("bbox",))["bbox_mAP"] < 1.0
    assert coco_metrics(split.coco, [], ids, ("bbox",))["bbox_mAP"] == 0.0


def test_gather_counts_each_image_once(split: CocoSplit) -> None:
    """Two ranks, rank 1 evaluating an image rank 0 also did (a padded sampler): the duplicate is dropped."""
    perfect, ids = _perfect(split)
    ranks = [CocoResults(), CocoResults()]
    for k, image_id in enumerate(ids):
        ranks[k % 2].add(image_id, perfect.per_image[image_id])
    ranks[1].add(ids[0], perfect.per_image[ids[0]])  # padding repeat
    got_ids, res = ranks[0].gather(lambda obj: [r.per_image for r in ranks])
    assert got_ids == ids
    assert len(res) == sum(len(v) for v in perfect.per_image.values())
    assert coco_metrics(split.coco, res, got_ids, ("bbox",))["bbox_mAP"] == pytest.approx(100.0)


def test_mask_rle_round_trip() -> None:
    import pycocotools.mask as mask_util

    masks = torch.zeros(2, 1, 10, 12)
    masks[0, 0, 2:5, 3:7] = 0.9
    masks[1, 0, 6:, :] = 0.7
    rles = encode_masks(masks)
    assert all(isinstance(r["counts"], str) for r in rles)
    back = mask_util.decode([dict(r, counts=r["counts"].encode()) for r in rles])
    assert back.shape == (10, 12, 2) and back[..., 0].sum() == 12 and back[..., 1].sum() == 48
