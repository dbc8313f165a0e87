"""A small instance-segmentation data set of real photographs, in genuine COCO format, built
deterministically from a seed: objects cut out of photographs through random smooth shapes,
pasted at random sizes and places onto a mosaic of other photographs.

The photographs come from an ImageFolder-style folder (by default the repository's
``../shared/data/tiny-imagenet-10``): ``source/train/<class>/*`` and ``source/val/<class>/*``, and
optionally ``source/classes.txt`` ("<folder>\\t<name>" lines) for the category names. One category
per class folder. The objects and backgrounds of the train split come from ``source/train``, those
of the val split from ``source/val``, so validation objects are photographs never seen in training.

What is written (COCO's layout, read by :class:`mabn.detection.coco.CocoDetection`)::

    out/annotations/instances_train.json   out/train/000000000001.png ...
    out/annotations/instances_val.json     out/val/000000000001.png ...

Each annotation's ``segmentation`` is the compressed RLE of exactly the object's visible pixels
(later objects occlude earlier ones), ``bbox`` the tight box of that mask and ``area`` its pixel
count. An extra key ``source`` records the photograph, its pasted size and its offset, and each
image's ``source`` the background tiles, so that the images can be recomputed (extra keys are
legal COCO). The images are PNG (lossless), so the pixels under a mask are the photograph's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from mabn.detection.coco import DatasetError
from mabn.engine.files import atomic_write

__all__ = ["default_source", "read_source", "SourcePhotos", "random_shape", "object_photo",
           "build_detection_dataset", "RESAMPLE", "SPLITS"]

RESAMPLE = Image.Resampling.BILINEAR  # how a photograph is resized to its pasted size
SPLITS = ("train", "val")
PHOTO_SUFFIXES = (".jpeg", ".jpg", ".png")
MIN_VISIBLE_FRACTION = 0.25  # an object whose visible part is less of its shape is dropped
MIN_VISIBLE_PIXELS = 64  # ... and so is one with fewer visible pixels than this
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_source() -> str:
    """The default photographs: ``../shared/data/tiny-imagenet-10`` beside the repository."""
    return os.path.normpath(os.path.join(_REPO, "..", "shared", "data", "tiny-imagenet-10"))


@dataclass
class SourcePhotos:
    """The photographs of a source folder: ``folders`` (the class folders, sorted), ``names``
    (the category name of each) and ``photos[split][c]`` (the files of class c, sorted, relative
    to ``root``)."""
    root: str
    folders: list[str]
    names: list[str]
    photos: dict[str, list[list[str]]]


def _class_names(root: str, folders: list[str]) -> list[str]:
    """The category name of each class folder, from ``classes.txt`` when there is one."""
    names = {}
    path = os.path.join(root, "classes.txt")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                folder, _, name = line.rstrip("\n").partition("\t")
                if name.strip():
                    names[folder.strip()] = name.strip()
    return [names.get(folder, folder) for folder in folders]


def read_source(root: str) -> SourcePhotos:
    """List the photographs of the source folder ``root`` (DatasetError naming what is missing:
    a split folder, a class folder of train absent from val, or a class without photographs)."""
    split_dirs = {split: os.path.join(root, split) for split in SPLITS}
    for split, path in split_dirs.items():
        if not os.path.isdir(path):
            raise DatasetError(f"source {root}: no {split} folder ({path})")
    folders = sorted(d.name for d in os.scandir(split_dirs["train"]) if d.is_dir())
    if not folders:
        raise DatasetError(f"source {root}: no class folders in {split_dirs['train']}")
    photos: dict[str, list[list[str]]] = {}
    for split, path in split_dirs.items():
        photos[split] = []
        for folder in folders:
            class_dir = os.path.join(path, folder)
            files = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(PHOTO_SUFFIXES)) \
                if os.path.isdir(class_dir) else []
            if not files:
                raise DatasetError(f"source {root}: no photographs in {class_dir}")
            photos[split].append([os.path.join(split, folder, f) for f in files])
    return SourcePhotos(root, folders, _class_names(root, folders), photos)


class _PhotoCache:
    """Decoded photographs (uint8 RGB arrays) by relative path, each read once."""

    def __init__(self, root: str):
        self.root, self.arrays = root, {}

    def get(self, relative: str, size: tuple[int, int]) -> np.ndarray:
        """The photograph resized to ``size`` = (width, height) as uint8 [H, W, 3]."""
        image = self.arrays.get(relative)
        if image is None:
            with Image.open(os.path.join(self.root, relative)) as img:
                image = self.arrays[relative] = img.convert("RGB")
        return object_photo(image, size)


def object_photo(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """An RGB photograph resized to ``size`` = (width, height) with :data:`RESAMPLE`, as uint8
    [H, W, 3] (what is pasted; its own size is kept as it is)."""
    if image.size != tuple(size):
        image = image.resize(tuple(size), RESAMPLE)
    return np.asarray(image)


def random_shape(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A random smooth star-shaped blob filling a ``height`` x ``width`` box (bool [H, W]): its
    radius around a jittered centre is 1 + a random sum of angular harmonics 2..5 (lobes and
    dents, never box-like), scaled so that the shape spans most of the box."""
    harmonics = np.arange(2, 6)
    amplitudes = rng.uniform(0.0, 0.35, size=4) / harmonics ** 0.5
    phases = rng.uniform(0.0, 2 * np.pi, size=4)
    centre = rng.uniform(0.42, 0.58, size=2)
    ys, xs = np.mgrid[0:height, 0:width]
    dx = (xs + 0.5) / width - centre[0]
    dy = (ys + 0.5) / height - centre[1]
    angle = np.arctan2(dy, dx)
    radius = 1.0 + (amplitudes * np.cos(harmonics * angle[..., None] + phases)).sum(-1)
    radius *= 0.5 / (1.0 + amplitudes.sum())  # the largest lobe reaches the box's edge
    return dx ** 2 + dy ** 2 <= radius ** 2


@dataclass
class _Object:
    """One object to paste: class index, photograph, pasted size (w, h), offset (x, y), shape."""
    label: int
    photo: str
    size: tuple[int, int]
    offset: tuple[int, int]
    shape: np.ndarray


def _sample_objects(rng: np.random.Generator, photos: list[list[str]], count: int,
                    image_size: int, min_size: int, max_size: int) -> list[_Object]:
    """``count`` random objects: a random class and photograph, a size from [min_size,
    max_size] with an aspect ratio in [3/4, 4/3], a random place inside the canvas, a shape."""
    objects = []
    for _ in range(count):
        label = int(rng.integers(len(photos)))
        photo = photos[label][int(rng.integers(len(photos[label])))]
        side, aspect = rng.uniform(min_size, max_size), np.exp(rng.uniform(np.log(0.75), np.log(4 / 3)))
        width = int(np.clip(round(side * aspect ** 0.5), min_size, min(max_size, image_size)))
        height = int(np.clip(round(side / aspect ** 0.5), min_size, min(max_size, image_size)))
        offset = (int(rng.integers(image_size - width + 1)), int(rng.integers(image_size - height + 1)))
        objects.append(_Object(label, photo, (width, height), offset, random_shape(rng, width, height)))
    return objects


def _owners(objects: list[_Object], image_size: int) -> np.ndarray:
    """For each pixel, the index of the last object whose shape covers it (-1: background)."""
    owner = np.full((image_size, image_size), -1, np.int64)
    for k, obj in enumerate(objects):
        (x, y), (w, h) = obj.offset, obj.size
        owner[y:y + h, x:x + w][obj.shape] = k
    return owner


def _visible_objects(objects: list[_Object], image_size: int) -> tuple[list[_Object], np.ndarray]:
    """Drop the objects occluded below :data:`MIN_VISIBLE_FRACTION` of their shape or
    :data:`MIN_VISIBLE_PIXELS`, until none is (dropping one uncovers the others); returns the
    kept objects and their pixel owners (see :func:`_owners`). The last object is never occluded."""
    while True:
        owner = _owners(objects, image_size)
        visible = np.bincount(owner.ravel() + 1, minlength=len(objects) + 1)[1:]
        keep = [k for k, obj in enumerate(objects)
                if visible[k] >= max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * obj.shape.sum())]
        if len(keep) == len(objects):
            return objects, owner
        objects = [objects[k] for k in keep]


def _background(rng: np.random.Generator, photos: list[list[str]], cache: _PhotoCache,
                image_size: int) -> tuple[np.ndarray, list[str]]:
    """A mosaic of random photographs (any class), g x g tiles with g = round(image_size / 64)
    (at least 1), each photograph resized to its tile; returns it and the tiles' files."""
    grid = max(1, round(image_size / 64))
    edges = np.linspace(0, image_size, grid + 1).round().astype(int)
    canvas = np.empty((image_size, image_size, 3), np.uint8)
    tiles = []
    for row in range(grid):
        for col in range(grid):
            label = int(rng.integers(len(photos)))
            tile = photos[label][int(rng.integers(len(photos[label])))]
            size = (edges[col + 1] - edges[col], edges[row + 1] - edges[row])
            canvas[edges[row]:edges[row + 1], edges[col]:edges[col + 1]] = cache.get(tile, size)
            tiles.append(tile)
    return canvas, tiles


def _annotation(obj: _Object, visible: np.ndarray, ann_id: int, image_id: int) -> dict:
    """The COCO annotation of one object from its visible mask (bool [H, W])."""
    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
    ys, xs = np.nonzero(visible)
    x0, y0 = int(xs.min()), int(ys.min())
    bbox = [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]
    return {"id": ann_id, "image_id": image_id, "category_id": obj.label + 1,
            "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
            "area": int(visible.sum()), "bbox": bbox, "iscrowd": 0,
            "source": {"photo": obj.photo, "size": list(obj.size), "offset": list(obj.offset)}}


def _compose(objects: list[_Object], owner: np.ndarray, background: np.ndarray,
             cache: _PhotoCache) -> np.ndarray:
    """The image: the background with each object's visible pixels from its photograph."""
    image = background.copy()
    for k, obj in enumerate(objects):
        (x, y), (w, h) = obj.offset, obj.size
        region, mine = image[y:y + h, x:x + w], owner[y:y + h, x:x + w] == k
        region[mine] = cache.get(obj.photo, obj.size)[mine]
    return image


@dataclass
class _Layout:
    """How images are made: canvas side, objects per image, object sizes, empty fraction."""
    image_size: int
    max_objects: int
    min_object_size: int
    max_object_size: int
    empty_fraction: float


def _make_image(rng: np.random.Generator, photos: list[list[str]], cache: _PhotoCache,
                layout: _Layout) -> tuple[np.ndarray, list[tuple[_Object, np.ndarray]], list[str]]:
    """One image: its pixels, its (object, visible mask) pairs in paste order, its tiles."""
    empty = rng.random() < layout.empty_fraction
    count = 0 if empty else int(rng.integers(1, layout.max_objects + 1))
    background, tiles = _background(rng, photos, cache, layout.image_size)
    objects = _sample_objects(rng, photos, count, layout.image_size,
                              layout.min_object_size, layout.max_object_size)
    objects, owner = _visible_objects(objects, layout.image_size)
    image = _compose(objects, owner, background, cache)
    return image, [(obj, owner == k) for k, obj in enumerate(objects)], tiles


def _build_split(out: str, split: str, images: int, seed: int, source: SourcePhotos,
                 cache: _PhotoCache, layout: _Layout) -> tuple[dict, dict[str, int]]:
    """Write the PNGs of one split under ``out/<split>``; return its COCO dict and counts.
    Image i is drawn from its own generator, seeded by (seed, split, i)."""
    os.makedirs(os.path.join(out, split))
    split_index = SPLITS.index(split)
    entries, annotations, empty = [], [], 0
    for image_id in range(1, images + 1):
        rng = np.random.default_rng([seed, split_index, image_id])
        pixels, objects, tiles = _make_image(rng, source.photos[split], cache, layout)
        file_name = f"{image_id:012d}.png"
        Image.fromarray(pixels).save(os.path.join(out, split, file_name))
        entries.append({"id": image_id, "file_name": file_name, "width": layout.image_size,
                        "height": layout.image_size, "source": {"background": tiles}})
        for obj, visible in objects:
            annotations.append(_annotation(obj, visible, len(annotations) + 1, image_id))
        empty += not objects
    data = {"info": {"description": f"photographs of {os.path.basename(source.root)} pasted through "
                                    f"random shapes onto photographs, {split} split, seed {seed}",
                     "version": "1.0", "seed": seed},
            "licenses": [], "images": entries, "annotations": annotations,
            "categories": [{"id": c + 1, "name": name, "supercategory": "object"}
                           for c, name in enumerate(source.names)]}
    return data, {"images": images, "objects": len(annotations), "empty_images": empty}


def _check_arguments(seed: int, images: dict[str, int], layout: _Layout) -> None:
    """ValueError naming the first bad argument of :func:`build_detection_dataset`."""
    checks = [
        (seed >= 0, f"seed must be >= 0, not {seed}"),
        (all(n >= 1 for n in images.values()), f"train_images and val_images must be >= 1, not {images}"),
        (layout.max_objects >= 1, f"max_objects must be >= 1, not {layout.max_objects}"),
        (layout.min_object_size >= 8, f"min_object_size must be >= 8, not {layout.min_object_size}"),
        (layout.min_object_size <= layout.max_object_size <= layout.image_size,
         f"need min_object_size <= max_object_size <= image_size, not {layout.min_object_size}, "
         f"{layout.max_object_size}, {layout.image_size}"),
        (0.0 <= layout.empty_fraction <= 1.0, f"empty_fraction must be in [0, 1], not {layout.empty_fraction}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def build_detection_dataset(out: str, *, seed: int = 0, source: str | None = None,
                            train_images: int = 2000, val_images: int = 250, image_size: int = 128,
                            max_objects: int = 4, min_object_size: int = 24, max_object_size: int | None = None,
                            empty_fraction: float = 0.02) -> dict:
    """Build the data set into the new (or empty) folder ``out``; the same arguments give
    byte-identical files.

    Args:
        out: the folder to create (FileExistsError if it exists and is not empty).
        seed: the data set's seed (>= 0); image i of a split depends only on (seed, split, i).
        source: the photographs (ImageFolder layout, see the module docstring); default
            :func:`default_source`.
        train_images, val_images: images per split.
        image_size: side of the square images, in pixels.
        max_objects: each image gets 1..max_objects objects (uniform), before occlusion.
        min_object_size, max_object_size: range of an object's side before its aspect ratio
            (max_object_size None: min(72, image_size)).
        empty_fraction: probability that an image has no object at all.

    Objects occluded below a quarter of their shape or 64 visible pixels are dropped (and not
    drawn: every pasted pixel belongs to an annotation). Written atomically: the data set is
    built in ``<out>.tmp.<pid>`` and renamed to ``out`` when complete.

    Returns a summary: ``{"out", "seed", "categories", "train": {"images", "objects",
    "empty_images"}, "val": {...}, "seconds"}``.
    """
    start = time.perf_counter()
    max_object_size = min(72, image_size) if max_object_size is None else max_object_size
    layout = _Layout(image_size, max_objects, min_object_size, max_object_size, empty_fraction)
    images = {"train": train_images, "val": val_images}
    _check_arguments(seed, images, layout)
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out} exists and is not an empty folder")
    photos = read_source(os.path.abspath(source or default_source()))
    staging = f"{out}.tmp.{os.getpid()}"
    summary = {"out": out, "seed": seed, "categories": len(photos.names)}
    try:
        os.makedirs(os.path.join(staging, "annotations"))
        cache, files = _PhotoCache(photos.root), {}
        for split in SPLITS:
            data, summary[split] = _build_split(staging, split, images[split], seed, photos, cache, layout)
            path = os.path.join(staging, "annotations", f"instances_{split}.json")
            files[path] = json.dumps(data, separators=(",", ":")) + "\n"
        atomic_write(files)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary
