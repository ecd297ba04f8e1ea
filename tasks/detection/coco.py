"""COCO-layout annotations: loading with clear errors, category maps, PVT's training filter, the dataset.

Layout: ``<root>/annotations/instances_{train,val}2017.json`` and ``<root>/{train,val}2017/``.
:class:`CocoSplit` parses one annotation file with pycocotools and checks it once (keys, category ids,
boxes inside the image); :class:`CocoDetection` returns ``(uint8 image C x H x W, target)`` at the
original resolution with an optional horizontal flip. Resizing to fit (min_size, max_size), the
ImageNet normalisation and the padding to a multiple of 32 happen in the detector's
``GeneralizedRCNNTransform`` (on the accelerator, and predictions come back in original-image
coordinates, which is what COCO evaluation needs).

Labels: COCO category ids (sorted) map to contiguous labels 1..C (0 is the background of Mask R-CNN);
``CocoSplit.label_to_cat`` maps them back for evaluation.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from tasks.common.errors import DataError
from tasks.common.seeding import seeded

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("images", "annotations", "categories")
BOX_TOLERANCE = 1.0  # pixels a box may reach past the image border (rounding in the annotation tools)


def load_coco(path: Path):
    """``pycocotools.coco.COCO`` of ``path``, with one-sentence errors for a missing or non-COCO file."""
    from pycocotools.coco import COCO

    path = Path(path)
    if not path.is_file():
        raise DataError(f"The annotation file {path} does not exist; point data.root at a COCO-layout folder "
                        f"(annotations/instances_train2017.json, train2017/, val2017/) or set data.train_ann / "
                        f"data.val_ann.")
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"The annotation file {path} is not valid JSON ({type(exc).__name__}: {exc}); "
                        f"replace it with a COCO instances file.") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise DataError(f"The annotation file {path} is not a COCO instances file: it has no "
                        f"{', '.join(repr(k) for k in missing)} key; pass a file with images, annotations and categories.")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoSplit:
    """One checked annotation file: image ids, category maps, per-image annotations.

    Checks (``DataError`` naming the file): category ids of annotations must be listed in
    ``categories``; boxes must lie in the image (up to ``BOX_TOLERANCE`` pixels, then clipped);
    images need ``width``/``height``/``file_name``.
    """

    def __init__(self, ann_file: str | Path, image_dir: str | Path):
        self.ann_file, self.image_dir = Path(ann_file), Path(image_dir)
        if not self.image_dir.is_dir():
            raise DataError(f"The image folder {self.image_dir} does not exist; put the images of "
                            f"{self.ann_file.name} there or set data.train_images / data.val_images.")
        self.coco = load_coco(self.ann_file)
        cats = sorted(int(c["id"]) for c in self.coco.dataset["categories"])
        if not cats:
            raise DataError(f"The annotation file {self.ann_file} lists no categories; pass a COCO instances file.")
        self.cat_ids = cats
        self.cat_to_label = {c: i + 1 for i, c in enumerate(cats)}
        self.label_to_cat = {i + 1: c for i, c in enumerate(cats)}
        self.category_names = {int(c["id"]): str(c.get("name", c["id"])) for c in self.coco.dataset["categories"]}
        self._check()

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def _check(self) -> None:
        imgs = self.coco.imgs
        for img in imgs.values():
            if not all(k in img for k in ("id", "width", "height", "file_name")):
                raise DataError(f"Image entry {img.get('id', '?')} of {self.ann_file} lacks id/width/height/file_name; "
                                f"fix the annotation file.")
        anns = self.coco.dataset["annotations"]
        if not anns:
            return
        known = set(self.cat_to_label)
        bad = next((a for a in anns if int(a.get("category_id", -1)) not in known), None)
        if bad is not None:
            raise DataError(f"Annotation {bad.get('id')} in {self.ann_file} has category_id {bad.get('category_id')}, "
                            f"which is not in its 'categories' list; add the category or remove the annotation.")
        orphan = next((a for a in anns if a.get("image_id") not in imgs), None)
        if orphan is not None:
            raise DataError(f"Annotation {orphan.get('id')} in {self.ann_file} refers to image_id "
                            f"{orphan.get('image_id')}, which is not in 'images'; fix the annotation file.")
        try:
            boxes = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        except (KeyError, ValueError, TypeError):
            raise DataError(f"{self.ann_file} has annotations without a 4-number 'bbox' [x, y, w, h]; "
                            f"fix the annotation file.") from None
        size = np.asarray([(imgs[a["image_id"]]["width"], imgs[a["image_id"]]["height"]) for a in anns], dtype=np.float64)
        t = BOX_TOLERANCE
        outside = (~np.isfinite(boxes).all(1) | (boxes[:, 0] < -t) | (boxes[:, 1] < -t) | (boxes[:, 2] < 0)
                   | (boxes[:, 3] < 0) | (boxes[:, 0] + boxes[:, 2] > size[:, 0] + t)
                   | (boxes[:, 1] + boxes[:, 3] > size[:, 1] + t))
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            a = anns[i]
            raise DataError(f"Annotation {a.get('id')} in {self.ann_file} has bbox {list(a['bbox'])} outside its image "
                            f"{a['image_id']} ({int(size[i, 0])}x{int(size[i, 1])}); fix or remove the annotation.")

    # ------------------------------------------------------------------ views
    def image_ids(self, train_filter: bool, min_size: int = 32) -> list[int]:
        """All image ids (sorted); with ``train_filter`` PVT/mmdetection's rule: drop images without any
        annotation (crowd included, as mmdetection counts them) and images whose short side < ``min_size``."""
        ids = sorted(self.coco.imgs)
        if not train_filter:
            return ids
        with_ann = {a["image_id"] for a in self.coco.dataset["annotations"]}
        return [i for i in ids if i in with_ann
                and min(self.coco.imgs[i]["width"], self.coco.imgs[i]["height"]) >= min_size]

    def aspect_groups(self, ids: Sequence[int]) -> list[int]:
        """mmdetection's flag per image: 1 when width / height > 1, else 0."""
        return [int(self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] > 1) for i in ids]

    def path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def target(self, image_id: int, with_masks: bool) -> dict[str, torch.Tensor]:
        """Training target: crowd annotations and boxes under 1 px dropped, boxes clipped, xyxy float32."""
        info = self.coco.imgs[image_id]
        w, h = int(info["width"]), int(info["height"])
        boxes, labels, masks = [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)
            if bw < 1 or bh < 1 or x2 - x1 <= 0 or y2 - y1 <= 0:
                continue
            boxes.append((x1, y1, x2, y2))
            labels.append(self.cat_to_label[int(ann["category_id"])])
            if with_masks:
                masks.append(self._mask(ann, h, w))
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor(labels, dtype=torch.int64),
                  "image_id": torch.tensor(image_id, dtype=torch.int64)}
        if with_masks:
            target["masks"] = (torch.from_numpy(np.stack(masks)) if masks
                               else torch.zeros((0, h, w), dtype=torch.uint8))
        return target

    def _mask(self, ann: dict[str, Any], h: int, w: int) -> np.ndarray:
        seg = ann.get("segmentation")
        if not seg:  # a box without a polygon: its rectangle
            m = np.zeros((h, w), dtype=np.uint8)
            x, y, bw, bh = (int(round(v)) for v in ann["bbox"])
            m[max(y, 0):y + bh, max(x, 0):x + bw] = 1
            return m
        return self.coco.annToMask(ann).astype(np.uint8)


def decode_image(path: Path, expected: tuple[int, int] | None = None) -> torch.Tensor:
    """RGB uint8 tensor 3 x H x W; a file that cannot be decoded, or has another size than the
    annotation file says (``expected`` = (width, height)), raises ``DataError`` naming it."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
            img = img.convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise DataError(f"The image {path} cannot be decoded ({type(exc).__name__}: {exc}); replace it or remove "
                        f"it from the annotation file.") from None
    if expected is not None and img.size != tuple(expected):
        raise DataError(f"The image {path} is {img.size[0]}x{img.size[1]} but its annotation file says "
                        f"{expected[0]}x{expected[1]}; use the images the annotations were made for.")
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def hflip(image: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mirror an image and its target (boxes x1' = W - x2, masks flipped)."""
    w = image.shape[-1]
    target = dict(target)
    b = target["boxes"]
    if b.numel():
        target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


class CocoDetection(Dataset):
    """Items ``(image uint8 3 x H x W, target)`` for the ids of a :class:`CocoSplit`.

    Indexed by an int or an ``(index, sample_seed)`` pair (the grouped batch sampler's form); the seed
    makes the flip decision reproducible and independent of worker scheduling.
    """

    def __init__(self, split: CocoSplit, ids: Sequence[int], *, with_masks: bool, flip_prob: float = 0.0):
        self.split, self.ids = split, list(ids)
        self.with_masks, self.flip_prob = with_masks, float(flip_prob)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx, seed = item if isinstance(item, tuple) else (item, None)
        image_id = self.ids[idx]
        info = self.split.coco.imgs[image_id]
        image = decode_image(self.split.path(image_id), (int(info["width"]), int(info["height"])))
        target = self.split.target(image_id, self.with_masks)
        if self.flip_prob > 0:
            with seeded(seed):
                flip = bool(torch.rand(()) < self.flip_prob)
            if flip:
                image, target = hflip(image, target)
        return image, target


def collate(batch: list[Any]) -> tuple[tuple[torch.Tensor, ...], tuple[dict[str, torch.Tensor], ...]]:
    """Lists of images and targets (the detectors take lists of differently sized images)."""
    images, targets = zip(*batch)
    return tuple(images), tuple(targets)
