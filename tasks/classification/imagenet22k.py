"""ImageNet-22k (paper Table 8 pre-training) as a folder: ``<root>/train/<wnid>/*.JPEG``, ``val/`` optional.

The processed full releases (fall11: 21,841 synsets; winter21: 19,167) unpack to one folder per wnid;
put those folders under ``train/``. The class count is whatever ``train/`` holds. Without ``val/``, a
fixed number of images per class is held out of ``train/`` for validation (the same images for every
run and seed), so pre-training still logs ``val/acc1``.

14 million paths as Python strings would cost each data-loader worker gigabytes (every touch of a
string copies its page after the fork), so the samples live in two numpy arrays (:class:`PackedSamples`).
Transforms, loaders, samplers and error handling are the ImageNet-1k ones (:mod:`.data`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from omegaconf import DictConfig

from tasks.common.errors import DataError

from .data import ImageNetDataModule, _is_image, list_classes

log = logging.getLogger(__name__)

HOW_TO = ("pass data.root=/path/to/imagenet22k, a folder with train/<wnid>/*.JPEG (the unpacked fall11 or winter21 "
          "release, one folder per synset) and optionally val/<wnid>/*.JPEG")


class PackedSamples(Sequence):
    """``(path, label)`` pairs stored as one fixed-width byte array of relative paths and an int32 array."""

    def __init__(self, root: Path, relpaths: np.ndarray, labels: np.ndarray):
        self.root, self.relpaths, self.labels = str(root), relpaths, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[str, int]:  # type: ignore[override]
        return os.path.join(self.root, self.relpaths[i].decode()), int(self.labels[i])

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return (self[i] for i in range(len(self)))

    def take(self, index: np.ndarray) -> "PackedSamples":
        return PackedSamples(Path(self.root), self.relpaths[index], self.labels[index])


def scan_packed(split_dir: Path, class_to_idx: dict[str, int]) -> tuple[PackedSamples, np.ndarray]:
    """All images of ``split_dir/<class>/`` (sorted) and the start offset of each class in them."""
    names: list[str] = []
    labels: list[int] = []
    for c in list_classes(split_dir, HOW_TO):
        if c not in class_to_idx:
            raise DataError(f"{split_dir} has class folder {c} that train/ does not have; both splits must use the "
                            f"same class names.")
        with os.scandir(split_dir / c) as it:
            files = sorted(e.name for e in it if e.is_file() and _is_image(e.name))
        names.extend(f"{c}/{f}" for f in files)
        labels.extend([class_to_idx[c]] * len(files))
    if not names:
        raise DataError(f"{split_dir} has class folders but no images; {HOW_TO}.")
    label_arr = np.asarray(labels, dtype=np.int32)
    return PackedSamples(split_dir, np.asarray(names, dtype=np.bytes_), label_arr), label_arr


def hold_out(samples: PackedSamples, per_class: int, seed: int = 0) -> tuple[PackedSamples, PackedSamples]:
    """Split off ``per_class`` images of every class (at most all but one), chosen by ``seed`` only."""
    rng = np.random.default_rng(seed)
    val_mask = np.zeros(len(samples), dtype=bool)
    labels = samples.labels
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    ends = np.r_[starts[1:], len(labels)]
    for s, e in zip(starts, ends):
        k = min(per_class, e - s - 1)
        if k > 0:
            val_mask[s + rng.choice(e - s, size=k, replace=False)] = True
    return samples.take(np.flatnonzero(~val_mask)), samples.take(np.flatnonzero(val_mask))


class ImageNet22kDataModule(ImageNetDataModule):
    """ImageNet-22k folder with the ImageNet-1k data module's transforms, samplers and loaders.

    ``num_classes``: None takes the number of ``train/`` folders; a number must match it.
    ``val_per_class``: images per class held out of ``train/`` when there is no ``val/`` folder.
    """

    how_to = HOW_TO

    def __init__(self, root: str | None, *, val_per_class: int = 10, holdout_seed: int = 0, **kwargs: Any):
        super().__init__(root, **kwargs)
        self.val_per_class, self.holdout_seed = int(val_per_class), int(holdout_seed)

    def check(self, stage: str = "fit") -> None:
        if self.val_samples is not None and (self.train_samples is not None or stage != "fit"):
            return
        self.check_root()
        train_dir, val_dir = self.root / "train", self.root / "val"  # type: ignore[operator]
        if self.class_to_idx is None:
            self.class_to_idx = {c: i for i, c in enumerate(list_classes(train_dir, HOW_TO))}
        found = len(self.class_to_idx)
        if self.num_classes is not None and int(self.num_classes) != found:
            raise DataError(f"'{self.root}' has {found} classes in train/ but data.num_classes={self.num_classes}; "
                            f"set data.num_classes=null (count the folders) or {found}.")
        self.num_classes = found
        if val_dir.is_dir():
            self.val_samples, _ = scan_packed(val_dir, self.class_to_idx)
            if stage == "fit":
                self.train_samples, _ = scan_packed(train_dir, self.class_to_idx)
        else:
            if self.val_per_class < 1:
                raise DataError(f"'{self.root}' has no val/ folder and data.val_per_class={self.val_per_class}; "
                                f"set data.val_per_class to the images per class to hold out of train/ (e.g. 10).")
            everything, _ = scan_packed(train_dir, self.class_to_idx)
            self.train_samples, self.val_samples = hold_out(everything, self.val_per_class, self.holdout_seed)
            if len(self.val_samples) == 0:
                raise DataError(f"'{self.root}' has no val/ folder and no class of train/ has two images to hold one "
                                f"out; add a val/ folder or more images.")
        log.info("%s: %s train / %d val images (%s), %d classes", self.root,
                 len(self.train_samples) if self.train_samples is not None else "(not scanned)",
                 len(self.val_samples), "val/" if val_dir.is_dir() else f"{self.val_per_class} per class held out",
                 found)


def build_task(cfg: DictConfig, stage: str = "fit"):
    """The classifier and :class:`ImageNet22kDataModule` (``task.builder`` of ``configs/task/imagenet22k.yaml``)."""
    from . import build_task as build_classification_task

    return build_classification_task(cfg, stage, datamodule_cls=ImageNet22kDataModule)
