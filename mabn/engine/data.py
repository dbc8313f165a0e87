"""Data: ImageFolder and synthetic datasets, fb.resnet.torch augmentation, resumable loading.

Reproducibility and exact resume do not depend on worker processes: every training sample is
augmented under its own seed, a function of (run seed, epoch, dataset index), so the same sample
gets the same crop whatever worker or resume point loads it. The position in the sample stream is
(epoch, batches consumed in that epoch), saved in checkpoints by :class:`TrainStream`.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import datasets, transforms

from .config import ConfigError

__all__ = ["Lighting", "CachedResizedLoader", "train_transform", "val_transform", "SyntheticImages", "RobustImageFolder",
           "SeededSamples", "ResumableDistributedSampler", "ShardSampler", "build_datasets",
           "TrainStream", "build_val_loader"]

log = logging.getLogger(__name__)

# PCA of ImageNet RGB pixels (AlexNet; the constants of fb.resnet.torch's Lighting transform).
_IMAGENET_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
_IMAGENET_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009],
                                 [-0.5808, -0.0045, -0.8140],
                                 [-0.5836, -0.6948, 0.4203]])


class Lighting:
    """AlexNet-style PCA lighting noise on a [0, 1] RGB tensor (fb.resnet.torch ``Lighting``)."""

    def __init__(self, alphastd: float):
        self.alphastd = alphastd

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.alphastd == 0:
            return img
        alpha = torch.randn(3) * self.alphastd
        rgb = (_IMAGENET_EIGVEC * alpha * _IMAGENET_EIGVAL).sum(1)
        return img + rgb[:, None, None]

    def __repr__(self) -> str:
        return f"Lighting(alphastd={self.alphastd})"


def train_transform(cfg) -> transforms.Compose:
    """Training augmentation at ``cfg.image_size``.

    augment=fb: fb.resnet.torch's ImageNet augmentation (random-resized crop, colour jitter, PCA
    lighting, normalization, horizontal flip). augment=crop_flip: the CIFAR recipe (resize to
    image_size, random crop of image_size after ``crop_padding`` zero pixels on each side,
    horizontal flip, normalization).
    """
    if cfg.augment == "crop_flip":
        resize = [] if cfg.cache_images else _resize_crop(cfg.image_size, cfg.image_size)
        return transforms.Compose(resize + [
            transforms.RandomCrop(cfg.image_size, padding=cfg.crop_padding),
            transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(list(cfg.mean), list(cfg.std))])
    steps = [transforms.RandomResizedCrop(cfg.image_size, scale=(cfg.min_crop_area, 1.0))]
    if cfg.color_jitter > 0:
        j = cfg.color_jitter
        steps.append(transforms.ColorJitter(brightness=j, contrast=j, saturation=j))
    steps += [transforms.ToTensor(), Lighting(cfg.lighting),
              transforms.Normalize(list(cfg.mean), list(cfg.std)), transforms.RandomHorizontalFlip()]
    return transforms.Compose(steps)


def _resize_crop(resize: int, crop: int) -> list:
    """Shorter side to ``resize``, then the centre ``crop`` x ``crop``: the deterministic part of the
    crop_flip and validation transforms, and what :class:`CachedResizedLoader` keeps."""
    return [transforms.Resize(resize), transforms.CenterCrop(crop)]


def val_resize(cfg) -> int:
    """Shorter side before the centre crop: 256 for 224 crops, scaled for other sizes."""
    return cfg.val_resize or int(round(cfg.image_size * 256 / 224))


def val_transform(cfg) -> transforms.Compose:
    """Resize the shorter side to 256 (scaled) and centre-crop 224 (scaled); with
    data.cache_images the cached loader has already resized to image_size (= val_resize)."""
    resize = [] if cfg.cache_images else _resize_crop(val_resize(cfg), cfg.image_size)
    return transforms.Compose(resize + [transforms.ToTensor(), transforms.Normalize(list(cfg.mean), list(cfg.std))])


class SyntheticImages(Dataset):
    """Deterministic, learnable images: class pattern + per-image Gaussian noise.

    Each of ``num_classes`` classes has a fixed smooth random pattern (std 1, shared by the train
    and val splits); image i of a split is ``pattern[i % num_classes] + noise * N(0, 1)`` with the
    noise drawn from a generator seeded by (seed, split, i). Training images are randomly flipped
    (horizontal flip under the sample's augmentation seed), so augmentation is exercised too.
    """

    def __init__(self, size: int, num_classes: int, image_size: int, noise: float, split: str,
                 seed: int = 0):
        self.size, self.num_classes, self.noise, self.split = size, num_classes, noise, split
        self.seed = seed
        g = torch.Generator().manual_seed(1234567 + seed)
        coarse = torch.randn(num_classes, 3, max(2, image_size // 8), max(2, image_size // 8), generator=g)
        pat = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bilinear",
                                              align_corners=False)
        self.patterns = (pat - pat.mean(dim=(1, 2, 3), keepdim=True)) / pat.std(dim=(1, 2, 3), keepdim=True)
        self.classes = [f"class{i:03d}" for i in range(num_classes)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        label = i % self.num_classes
        g = torch.Generator().manual_seed((self.seed * 2 + (self.split == "val")) * 10_000_019 + i)
        img = self.patterns[label] + self.noise * torch.randn(self.patterns.shape[1:], generator=g)
        if self.split == "train" and torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img, label


class RobustImageFolder(datasets.ImageFolder):
    """ImageFolder that logs an unreadable image and returns the next readable one instead."""

    def __getitem__(self, index: int):
        for attempt in range(len(self.samples)):
            j = (index + attempt) % len(self.samples)
            try:
                return super().__getitem__(j)
            except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for broken files
                log.warning("unreadable image %s (%s: %s); using the next image instead",
                            self.samples[j][0], type(e).__name__, e)
        raise RuntimeError(f"no readable image in {self.root}")


class CachedResizedLoader:
    """An ImageFolder loader that decodes each file once, resizes its shorter side to ``size``,
    centre-crops ``size`` x ``size`` and keeps the result (data.cache_images). The same PIL
    operations as the uncached transform, so the samples are identical."""

    def __init__(self, size: int):
        self.size, self.cache = size, {}
        self.prepare = transforms.Compose(_resize_crop(size, size))

    def __call__(self, path: str):
        img = self.cache.get(path)
        if img is None:
            img = self.cache[path] = self.prepare(datasets.folder.default_loader(path))
        return img


class SeededSamples(Dataset):
    """Wraps a dataset so that sample i of epoch e is produced under torch seed f(seed, e, i).

    ``epoch`` is set by :class:`TrainStream` before each epoch's DataLoader iterator is created
    (workers receive a copy of this object at that moment). The caller's RNG state is preserved.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also queue a (lazy) seed for every
            # accelerator backend, formatting a stack trace each time (~0.6 ms per sample).
            torch.default_generator.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + i) % (2 ** 63))
            return self.dataset[i]


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way through (after ``start`` samples)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler):
    """Rank r gets indices r, r + world, ... : no padding, so sums over ranks count each sample once."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = list(range(rank, size, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_datasets(cfg, seed: int, train: bool = True):
    """(train dataset or None, val dataset, number of classes) for a data config."""
    if cfg.name == "synthetic":
        val = SyntheticImages(cfg.val_size, cfg.num_classes, cfg.image_size, cfg.noise, "val", seed)
        tr = SyntheticImages(cfg.train_size, cfg.num_classes, cfg.image_size, cfg.noise, "train", seed) if train else None
        return tr, val, cfg.num_classes
    val = _image_folder(cfg, "val_dir", val_transform(cfg))
    tr = None
    if train:
        tr = _image_folder(cfg, "train_dir", train_transform(cfg))
        if tr.classes != val.classes:
            only = sorted(set(tr.classes) ^ set(val.classes))
            raise ConfigError(f"data.root={cfg.root}: the class folders of {cfg.train_dir}/ and "
                              f"{cfg.val_dir}/ differ (in one only: {only[:5]})")
    return tr, val, len(val.classes)


def _image_folder(cfg, key: str, transform) -> RobustImageFolder:
    """The ImageFolder data.<key> under data.root; ConfigError if it has no class folder or a
    class folder without images."""
    kw = {"loader": CachedResizedLoader(cfg.image_size)} if cfg.cache_images else {}
    path = os.path.join(cfg.root, cfg[key])
    try:
        return RobustImageFolder(path, transform, **kw)
    except FileNotFoundError as e:  # torchvision: no class folder, or a class folder without images
        raise ConfigError(f"data.{key}={cfg[key]} ({path}): {str(e).split('. Supported')[0]}") from None


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGUSR1/SIGINT to the main process, which checkpoints and then shuts
    them down (a scheduler, or Ctrl-C in a terminal, signals the whole process group)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _loader_kwargs(cfg, device: torch.device) -> dict:
    kw = {"num_workers": cfg.workers, "pin_memory": cfg.pin_memory and device.type == "cuda"}
    if cfg.workers > 0:
        kw.update(prefetch_factor=4, worker_init_fn=_ignore_stop_signals)
    return kw


class TrainStream:
    """An endless stream of training batches with a resumable position.

    Epoch e visits a DistributedSampler permutation (seeded by the run seed and e; each rank its
    own shard) in batches of ``batch_size`` (last partial batch dropped, so every batch splits
    into normalization groups). :meth:`state_dict` is the position of the next batch.
    """

    def __init__(self, dataset: Dataset, cfg, seed: int, rank: int, world_size: int, device: torch.device):
        self.data = SeededSamples(dataset, seed)
        self.sampler = ResumableDistributedSampler(self.data, num_replicas=world_size, rank=rank,
                                                   shuffle=True, seed=seed, drop_last=True)
        self.batch_size, self.seed, self.rank = cfg.batch_size, seed, rank
        self.kwargs = _loader_kwargs(cfg, device)
        self.batches_per_epoch = self.sampler.num_samples // self.batch_size
        if self.batches_per_epoch == 0:
            raise ConfigError(f"data: {len(dataset)} training images are too few for data.batch_size="
                              f"{cfg.batch_size} x {world_size} processes")
        self.epoch, self.batch = 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def __iter__(self):
        while True:
            self.sampler.set_position(self.epoch, self.batch * self.batch_size)
            self.data.epoch = self.epoch
            # Worker base seeds come from this generator; they do not affect the samples (each is
            # seeded by SeededSamples) but are kept deterministic anyway.
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 1009 + self.rank)
            loader = DataLoader(self.data, batch_size=self.batch_size, sampler=self.sampler,
                                drop_last=True, generator=g, **self.kwargs)
            for batch in loader:
                self.batch += 1
                yield batch
            self.epoch, self.batch = self.epoch + 1, 0


def build_val_loader(dataset: Dataset, cfg, rank: int, world_size: int, device: torch.device) -> DataLoader:
    """Validation loader over this rank's shard (no padding, no shuffling)."""
    return DataLoader(dataset, batch_size=cfg.eval_batch_size or cfg.batch_size,
                      sampler=ShardSampler(len(dataset), rank, world_size), **_loader_kwargs(cfg, device))
