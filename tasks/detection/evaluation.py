"""COCO evaluation with pycocotools: results per batch (masks RLE-encoded at once), gathered, evaluated once.

:class:`CocoResults` collects COCO result dicts per process (``image_id``, ``category_id``, xywh ``bbox``,
``score``, and ``segmentation`` RLE for masks) plus the ids of the images seen. :meth:`CocoResults.gather`
merges all processes and keeps each image once (a padded distributed sampler repeats
images; each image's results are kept from the first rank that has it). :func:`coco_metrics` runs
``COCOeval`` on the original annotation file for exactly the evaluated images and returns
``{bbox_mAP, bbox_mAP_50, bbox_mAP_75, bbox_mAP_s, bbox_mAP_m, bbox_mAP_l}`` (and ``segm_*``) in percent.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

STAT_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")


def encode_masks(masks: torch.Tensor, threshold: float = 0.5) -> list[dict[str, Any]]:
    """N x 1 x H x W (or N x H x W) mask probabilities -> COCO RLEs (``counts`` as str, JSON-ready)."""
    import pycocotools.mask as mask_util

    if masks.ndim == 4:
        masks = masks[:, 0]
    binary = (masks > threshold).to(torch.uint8).cpu().numpy()
    rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(binary) else []
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return list(rles)


def detections_to_coco(image_id: int, output: Mapping[str, torch.Tensor], label_to_cat: Mapping[int, int]
                       ) -> list[dict[str, Any]]:
    """One image's torchvision detections (xyxy boxes in original pixels) as COCO result dicts."""
    boxes = output["boxes"].detach().float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    rles = encode_masks(output["masks"].detach()) if "masks" in output else None
    out = []
    for k, (box, score, label) in enumerate(zip(xywh, scores, labels)):
        r = {"image_id": int(image_id), "category_id": int(label_to_cat[int(label)]),
             "bbox": [round(float(v), 3) for v in box], "score": round(float(score), 5)}
        if rles is not None:
            r["segmentation"] = rles[k]
        out.append(r)
    return out


class CocoResults:
    """Per-process result accumulator (see the module docstring); an image added twice keeps its first results."""

    def __init__(self) -> None:
        self.per_image: dict[int, list[dict[str, Any]]] = {}

    def reset(self) -> None:
        self.per_image = {}

    def __len__(self) -> int:
        return len(self.per_image)

    def add(self, image_id: int, results: Iterable[dict[str, Any]]) -> None:
        self.per_image.setdefault(int(image_id), list(results))

    def gather(self, all_gather_object=None) -> tuple[list[int], list[dict[str, Any]]]:
        """(evaluated image ids, results) over all processes, each image counted once (first rank wins).

        ``all_gather_object``: a callable returning the list of every process's object (None: this process only).
        """
        parts = [self.per_image] if all_gather_object is None else all_gather_object(self.per_image)
        merged: dict[int, list[dict[str, Any]]] = {}
        for part in parts:
            for image_id, res in part.items():
                merged.setdefault(int(image_id), res)
        ids = sorted(merged)
        return ids, [r for i in ids for r in merged[i]]


def coco_metrics(gt, results: Sequence[dict[str, Any]], image_ids: Sequence[int],
                 iou_types: Sequence[str] = ("bbox",)) -> dict[str, float]:
    """``COCOeval`` of ``results`` against ``gt`` (a pycocotools ``COCO``) on ``image_ids``, in percent.

    Keys ``<iou_type>_mAP``, ``_mAP_50``, ``_mAP_75``, ``_mAP_s``, ``_mAP_m``, ``_mAP_l``. No results at
    all gives 0 (pycocotools cannot load an empty result list). COCOeval's -1 (no ground truth in an
    area range, e.g. no large objects) becomes NaN.
    """
    from pycocotools.cocoeval import COCOeval

    metrics: dict[str, float] = {}
    for iou in iou_types:
        res = [r for r in results if iou == "bbox" or "segmentation" in r]
        if not res:
            metrics.update({f"{iou}_{n}": 0.0 for n in STAT_NAMES})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes([dict(r) for r in res])
            ev = COCOeval(gt, dt, iou)
            ev.params.imgIds = sorted(int(i) for i in image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        metrics.update({f"{iou}_{n}": float(v) * 100.0 if v >= 0 else float("nan")
                        for n, v in zip(STAT_NAMES, ev.stats[:6])})
    return metrics


def write_results(path: str | Path, results: Sequence[dict[str, Any]]) -> Path:
    """The COCO results JSON (the format of the COCO evaluation server / ``COCO.loadRes``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(results)))
    return path
