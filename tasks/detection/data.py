"""The COCO data module: PVT's training filter and flip, grouped batches under DDP, sharded evaluation.

``data.root`` holds ``annotations/instances_{train,val}2017.json``, ``train2017/`` and ``val2017/``
(override each with ``data.train_ann`` / ``data.val_ann`` / ``data.train_images`` / ``data.val_images``).
Images leave the loader at their original size as uint8; the detector's ``GeneralizedRCNNTransform``
resizes them to fit ``data.min_size`` x ``data.max_size`` (800 x 1333), normalises and pads to 32.

Training: images without annotations and with a short side under ``data.min_image_size`` (32) are
dropped, crowd boxes and boxes under 1 px ignored, flip with ``data.flip_prob`` (0.5), batches of one
aspect group (:mod:`tasks.detection.sampler`), resumable mid-epoch. Validation: every image of the
annotation file, sharded over ranks without padding (each image evaluated once).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from tasks.common.data import ResumableDataModuleMixin, ShardSampler, rank_world
from tasks.common.errors import DataError

from .coco import CocoDetection, CocoSplit, collate
from .sampler import GroupedBatchLoader, GroupedBatchSampler

log = logging.getLogger(__name__)

HOW_TO = ("pass data.root=/path/to/coco (annotations/instances_{train,val}2017.json, train2017/, val2017/), or "
          "try the generated shapes: `python -m tasks.detection.shapes --out data/coco_shapes` then "
          "data.root=data/coco_shapes")


class CocoDataModule(ResumableDataModuleMixin, pl.LightningDataModule):
    def __init__(self, root: str | None, *, with_masks: bool = True, batch_size: int = 2, val_batch_size: int = 1,
                 num_workers: int = 2, min_size: int = 800, max_size: int = 1333, flip_prob: float = 0.5,
                 min_image_size: int = 32, group_by_aspect: bool = True, train_ann: str | None = None,
                 val_ann: str | None = None, train_images: str | None = None, val_images: str | None = None,
                 pin_memory: bool = True, persistent_workers: bool = True, seed: int = 0, **_: Any):
        super().__init__()
        if root in (None, "", "None", "???"):
            raise DataError(f"No dataset given: {HOW_TO}.")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"The dataset root '{self.root}' does not exist or is not a folder; {HOW_TO}.")
        self.paths = {
            "train": (Path(train_ann) if train_ann else self.root / "annotations" / "instances_train2017.json",
                      Path(train_images) if train_images else self.root / "train2017"),
            "val": (Path(val_ann) if val_ann else self.root / "annotations" / "instances_val2017.json",
                    Path(val_images) if val_images else self.root / "val2017"),
        }
        self.with_masks = bool(with_masks)
        self.batch_size, self.val_batch_size = int(batch_size), int(val_batch_size or 1)
        self.num_workers, self.pin_memory, self.persistent_workers = int(num_workers), pin_memory, persistent_workers
        self.min_size, self.max_size = int(min_size), int(max_size)
        self.flip_prob, self.min_image_size = float(flip_prob), int(min_image_size)
        self.group_by_aspect, self.seed = bool(group_by_aspect), int(seed)
        self.splits: dict[str, CocoSplit] = {}

    # ------------------------------------------------------------------ checks
    def check(self, stage: str = "fit") -> None:
        """Load and check the annotation files ``stage`` needs (fit: train and val; otherwise val)."""
        for name in (("train", "val") if stage == "fit" else ("val",)):
            if name not in self.splits:
                ann, images = self.paths[name]
                self.splits[name] = CocoSplit(ann, images)
        if "train" in self.splits and self.splits["train"].cat_ids != self.splits["val"].cat_ids:
            raise DataError(f"{self.paths['train'][0]} and {self.paths['val'][0]} list different category ids; "
                            f"both splits must use the same categories.")
        if "train" in self.splits and not self.train_ids():
            raise DataError(f"{self.paths['train'][0]} has no image with annotations and a short side of at least "
                            f"{self.min_image_size} px, so there is nothing to train on; {HOW_TO}.")

    @property
    def val_split(self) -> CocoSplit:
        self.check("validate")
        return self.splits["val"]

    @property
    def num_classes(self) -> int:
        return self.val_split.num_classes

    def train_ids(self) -> list[int]:
        return self.splits["train"].image_ids(train_filter=True, min_size=self.min_image_size)

    def setup(self, stage: str | None = None) -> None:
        self.check("fit" if stage in (None, "fit") else "validate")

    # ------------------------------------------------------------------ loaders

    def _loader_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"num_workers": self.num_workers, "collate_fn": collate,
                              "pin_memory": bool(self.pin_memory) and torch.cuda.is_available()}
        if self.num_workers > 0:
            kw["persistent_workers"] = bool(self.persistent_workers)
        return kw

    def train_dataloader(self) -> GroupedBatchLoader:
        split = self.splits["train"]
        ids = self.train_ids()
        rank, world = rank_world(getattr(self, "trainer", None))
        groups = split.aspect_groups(ids) if self.group_by_aspect else [0] * len(ids)
        sampler = GroupedBatchSampler(groups, self.batch_size, seed=self.seed, rank=rank, world=world)
        dataset = CocoDetection(split, ids, with_masks=self.with_masks, flip_prob=self.flip_prob)
        return self.track_train_loader(GroupedBatchLoader(dataset, batch_sampler=sampler, **self._loader_kwargs()))

    def val_dataloader(self) -> DataLoader:
        split = self.val_split
        ids = split.image_ids(train_filter=False)
        rank, world = rank_world(getattr(self, "trainer", None))
        dataset = CocoDetection(split, ids, with_masks=False, flip_prob=0.0)
        return DataLoader(dataset, sampler=ShardSampler(len(ids), rank, world), batch_size=self.val_batch_size,
                          drop_last=False, **self._loader_kwargs())
