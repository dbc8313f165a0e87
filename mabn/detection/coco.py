"""A COCO-format instance data set for torchvision's detectors (Mask R-CNN, Faster R-CNN,
RetinaNet): the real COCO layout, ``root/annotations/instances_<split>.json`` and images under
``root/<split>/<file_name>``; nothing here knows how the data were made.

Each sample is ``(image, target)``: a float32 RGB tensor [3, H, W] in [0, 1] and torchvision's
target dict (``boxes`` xyxy in pixels, ``labels`` 1..K with 0 the background, ``masks`` uint8
[N, H, W], ``image_id``, ``area``, ``iscrowd``). Boxes are clipped to the image; crowd annotations
and degenerate boxes (empty once clipped) are left out of the targets, but the pycocotools index (:attr:`CocoDetection.coco`) keeps the file's
annotations as they are, for the evaluator (:mod:`mabn.detection.coco_eval`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset

__all__ = ["DatasetError", "CocoDetection", "collate", "batch_to", "load_annotations", "annotation_file"]

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("images", "annotations", "categories")


class DatasetError(ValueError):
    """A bad data set; the message names the file and the key, annotation or image at fault."""


def annotation_file(root: str, split: str) -> str:
    """The annotation file of ``split`` under ``root`` (COCO's layout)."""
    return os.path.join(root, "annotations", f"instances_{split}.json")


def load_annotations(path: str) -> dict[str, Any]:
    """Read a COCO annotation file and check its top-level keys (DatasetError otherwise)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read the annotation file ({e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: the top level is a {type(data).__name__}, not a JSON object")
    for key in REQUIRED_KEYS:
        if not isinstance(data.get(key), list):
            what = "missing" if key not in data else "not a list"
            raise DatasetError(f"{path}: top-level key {key!r} is {what}")
    return data


def _check_unique(entries: list[dict], what: str, path: str) -> None:
    """DatasetError if two ``entries`` share an id."""
    seen: set = set()
    for entry in entries:
        if entry["id"] in seen:
            raise DatasetError(f"{path}: two {what}s have id {entry['id']!r}")
        seen.add(entry["id"])


def _check_fields(entries: list, keys: tuple[str, ...], what: str, path: str) -> None:
    """DatasetError naming the first of ``entries`` (a list of ``what``) that lacks one of ``keys``."""
    for entry in entries:
        if not isinstance(entry, dict):
            raise DatasetError(f"{path}: {what} {entry!r} is not a JSON object")
        for key in keys:
            if key not in entry:
                raise DatasetError(f"{path}: {what} {entry.get('id')!r} has no {key!r}")


def _check_entries(data: dict[str, Any], path: str, masks: bool) -> None:
    """Check the fields of every category, image and annotation that this reader uses, and that
    each annotation's image and category exist."""
    _check_fields(data["categories"], ("id",), "category", path)
    _check_fields(data["images"], ("id", "file_name", "width", "height"), "image", path)
    needed = ("id", "image_id", "category_id", "bbox") + (("segmentation",) if masks else ())
    _check_fields(data["annotations"], needed, "annotation", path)
    for key, what in (("categories", "category"), ("images", "image"), ("annotations", "annotation")):
        _check_unique(data[key], what, path)
    category_ids = {cat["id"] for cat in data["categories"]}
    image_ids = {img["id"] for img in data["images"]}
    for ann in data["annotations"]:
        if ann["category_id"] not in category_ids:
            raise DatasetError(f"{path}: annotation {ann['id']} has category_id {ann['category_id']!r}, "
                               "which is not in 'categories'")
        if ann["image_id"] not in image_ids:
            raise DatasetError(f"{path}: annotation {ann['id']} has image_id {ann['image_id']!r}, "
                               "which is not in 'images'")
        if not (isinstance(ann["bbox"], list) and len(ann["bbox"]) == 4):
            raise DatasetError(f"{path}: annotation {ann['id']} has bbox {ann['bbox']!r}, not [x, y, w, h]")


def _pycocotools_index(data: dict[str, Any]) -> COCO:
    """A pycocotools COCO object over ``data`` (its progress prints silenced)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _image_targets(anns: list[dict], width: int, height: int, label_of: dict[int, int]):
    """The training targets of one image's annotations: crowd annotations left out, boxes
    converted to xyxy and clipped to the image; returns (boxes, labels, areas, ann_ids, degenerate)
    where ``degenerate`` counts the boxes left out for an empty width or height."""
    boxes, labels, areas, ann_ids, degenerate = [], [], [], [], 0
    for ann in anns:
        if ann.get("iscrowd", 0):
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        if w <= 0 or h <= 0 or x2 <= x1 or y2 <= y1:
            degenerate += 1
            continue
        boxes.append((x1, y1, x2, y2))
        labels.append(label_of[ann["category_id"]])
        areas.append(float(ann.get("area", w * h)))
        ann_ids.append(ann["id"])
    return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
            np.asarray(areas, np.float32), ann_ids, degenerate)


def segmentation_rle(segmentation: Any, height: int, width: int) -> dict:
    """One annotation's ``segmentation`` (polygons, uncompressed or compressed RLE) as one
    compressed RLE of an image ``height`` x ``width``."""
    if isinstance(segmentation, list):  # polygons; fewer than 3 points cannot enclose a pixel
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return mask_utils.encode(np.zeros((height, width, 1), np.uint8, order="F"))[0]
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def decode_image(path: str) -> np.ndarray:
    """An image file as a uint8 RGB array [H, W, 3] (grayscale, RGBA, palette converted)."""
    with Image.open(path) as img:
        return np.array(img.convert("RGB"))  # a writable copy (torch.from_numpy)


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """DataLoader collate for detection: the images and the targets as two lists (the images
    differ in size; torchvision's detectors take lists)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def batch_to(images: list[torch.Tensor], targets: list[dict], device, non_blocking: bool = False
             ) -> tuple[list[torch.Tensor], list[dict]]:
    """A collated batch on ``device``: every image and every tensor of the targets (the other
    target entries, e.g. ``image_id``, as they are)."""
    return ([im.to(device, non_blocking=non_blocking) for im in images],
            [{k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in t.items()}
             for t in targets])


class CocoDetection(Dataset):
    """The COCO-format instance data set ``split`` under ``root``, as torchvision detection samples.

    Args:
        root: the data set folder (``annotations/`` and one image folder per split).
        split: e.g. ``"train2017"`` for COCO, ``"train"``/``"val"`` for the built data set.
        masks: decode the instance masks into ``target["masks"]`` (needs ``segmentation``).
        train: horizontal flip with probability ``hflip``, drawn from torch's global generator
            (one ``torch.rand(())`` per sample), so that a per-sample seed makes it reproducible.
        drop_empty: leave out the images without a (non-crowd, non-degenerate) annotation.
        cache: keep each decoded image (uint8) in memory, for small data sets.

    Attributes: ``coco`` (the pycocotools index of the whole file, for evaluation),
    ``categories`` (sorted by id), ``num_classes`` (K + 1, with the background),
    ``label_to_category_id`` (dict label -> category id), ``image_ids`` (sorted: the dataset order) and
    ``skipped`` (counts of degenerate boxes, unreadable images and dropped empty images, the last
    two as seen by this process: DataLoader workers keep their own counts).
    """

    def __init__(self, root: str, split: str, *, masks: bool = True, train: bool = False,
                 hflip: float = 0.5, drop_empty: bool = False, cache: bool = False):
        self.root, self.split, self.masks, self.train, self.hflip = root, split, masks, train, hflip
        self.ann_file = annotation_file(root, split)
        self.image_dir = os.path.join(root, split)
        data = load_annotations(self.ann_file)
        _check_entries(data, self.ann_file, masks)
        if not os.path.isdir(self.image_dir):
            raise DatasetError(f"{self.ann_file}: image folder {self.image_dir} not found")
        self.coco = _pycocotools_index(data)
        self.categories = sorted(data["categories"], key=lambda cat: cat["id"])
        self.num_classes = len(self.categories) + 1
        self.label_to_category_id = {i + 1: cat["id"] for i, cat in enumerate(self.categories)}
        self.skipped = {"degenerate_boxes": 0, "unreadable_images": 0, "empty_images": 0}
        self._index_targets(drop_empty)
        self._cache: dict[int, np.ndarray] | None = {} if cache else None
        self._unreadable: set[int] = set()

    def _index_targets(self, drop_empty: bool) -> None:
        """Build the per-image training targets (``image_ids`` and ``_targets``)."""
        label_of = {cat_id: label for label, cat_id in self.label_to_category_id.items()}
        self.image_ids, self._targets = [], []
        for image_id in sorted(self.coco.imgs):
            img = self.coco.imgs[image_id]
            *target, degenerate = _image_targets(self.coco.imgToAnns.get(image_id, []),
                                                 img["width"], img["height"], label_of)
            self.skipped["degenerate_boxes"] += degenerate
            if drop_empty and not len(target[0]):
                self.skipped["empty_images"] += 1
                continue
            self.image_ids.append(image_id)
            self._targets.append(tuple(target))
        if self.skipped["degenerate_boxes"]:
            log.warning("%s: skipped %d annotations with a degenerate box (width or height <= 0 "
                        "inside the image)", self.ann_file, self.skipped["degenerate_boxes"])

    def __len__(self) -> int:
        return len(self.image_ids)

    def _image(self, index: int) -> np.ndarray:
        """The decoded image of sample ``index`` (OSError/ValueError if it will not decode or its
        size is not the one the annotations give)."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        img = self.coco.imgs[self.image_ids[index]]
        pixels = decode_image(os.path.join(self.image_dir, img["file_name"]))
        if pixels.shape[:2] != (img["height"], img["width"]):
            raise ValueError(f"the image is {pixels.shape[1]}x{pixels.shape[0]}, the annotations "
                             f"say {img['width']}x{img['height']}")
        if self._cache is not None:
            self._cache[index] = pixels
        return pixels

    def _readable(self, index: int) -> tuple[int, np.ndarray]:
        """The first readable sample from ``index`` on (wrapping around) and its pixels; each
        unreadable image is warned about and counted once."""
        for attempt in range(len(self)):
            j = (index + attempt) % len(self)
            if j in self._unreadable:
                continue
            try:
                return j, self._image(j)
            except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for broken files
                path = os.path.join(self.image_dir, self.coco.imgs[self.image_ids[j]]["file_name"])
                log.warning("unreadable image %s (%s: %s); using the next image instead",
                            path, type(e).__name__, e)
                self._unreadable.add(j)
                self.skipped["unreadable_images"] += 1
        raise DatasetError(f"{self.ann_file}: no readable image in {self.image_dir}")

    def _masks(self, ann_ids: list[int], height: int, width: int) -> torch.Tensor:
        """The instance masks of ``ann_ids`` as uint8 [N, H, W]."""
        if not ann_ids:
            return torch.zeros((0, height, width), dtype=torch.uint8)
        rles = [segmentation_rle(self.coco.anns[a]["segmentation"], height, width) for a in ann_ids]
        with warnings.catch_warnings():  # pycocotools' own DeprecationWarning under numpy 2
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = mask_utils.decode(rles)  # [H, W, N], Fortran order
        return torch.from_numpy(np.ascontiguousarray(decoded.transpose(2, 0, 1)))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        index, pixels = self._readable(index)
        boxes, labels, areas, ann_ids = self._targets[index]
        height, width = pixels.shape[:2]
        image = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255)
        target = {"boxes": torch.from_numpy(boxes.copy()), "labels": torch.from_numpy(labels.copy()),
                  "image_id": int(self.image_ids[index]), "area": torch.from_numpy(areas.copy()),
                  "iscrowd": torch.zeros(len(labels), dtype=torch.int64)}
        if self.masks:
            target["masks"] = self._masks(ann_ids, height, width)
        if self.train and float(torch.rand(())) < self.hflip:
            image, target = _hflip(image, target, width)
        return image, target


def _hflip(image: torch.Tensor, target: dict[str, Any], width: int) -> tuple[torch.Tensor, dict]:
    """Flip an image and its target left-right (boxes, masks)."""
    boxes = target["boxes"].clone()
    boxes[:, 0], boxes[:, 2] = width - target["boxes"][:, 2], width - target["boxes"][:, 0]
    target = dict(target, boxes=boxes)
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target
