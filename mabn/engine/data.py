"""Data: ImageFolder and synthetic datasets, fb.resnet.torch augmentation, resumable loading.

Reproducibility and exact resume do not depend on worker processes: every training sample is
augmented under its own seed, a function of (run seed, epoch, dataset index), so the same sample
gets the same crop whatever worker or resume point loads it. The position in the sample stream is
(epoch, batches consumed in that epoch), saved in checkpoints by :class:`TrainStream`.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.util  # registers multiprocessing's exit hook before ours (atexit runs last-in first)
import os
import signal
import time
import warnings
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import datasets, io, transforms
from torchvision.transforms import v2

from .config import ConfigError

__all__ = ["Lighting", "PILColorJitter", "ToFloat", "read_image", "pil_read_image", "image_loader", "CachedResizedLoader",
           "CropFlipDraws", "CropFlipBatch", "train_transform", "val_transform", "SyntheticImages", "RobustImageFolder", "SeededSamples",
           "ResumableDistributedSampler", "ShardSampler", "build_datasets", "TrainStream", "build_val_loader"]

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


class PILColorJitter:
    """transforms.ColorJitter(brightness, contrast, saturation) for a 3 x H x W uint8 RGB tensor that
    computes what ColorJitter computes on a PIL image (data.decoder=tensor).

    The parameters are drawn by ``transforms.ColorJitter.get_params``, so the same random numbers
    give the same order and factors. Each step is PIL's ``ImageEnhance``: ``Image.blend(degenerate,
    image, factor)``, i.e. ``degenerate + factor * (image - degenerate)`` in float32, clipped to
    [0, 255] and truncated to an integer, with degenerate = 0 (brightness), the mean of the
    luminance rounded to an integer (contrast) or the luminance itself (saturation); luminance is
    PIL's ``convert("L")``, (19595 R + 38470 G + 7471 B + 2^15) >> 16. Every intermediate value is
    an integer below 2^24, exact in float32, so the result equals PIL's (tests/test_data_pipeline.py).
    Torchvision's own tensor ColorJitter differs: it keeps fractions on float images (+1.3 levels
    of 255 on average against PIL) and floors the luminance on uint8 ones.

    Returns float32 holding the integer levels 0..255 (converting back to uint8 would cost more
    than the jitter); :class:`ToFloat` takes either.
    """

    _WEIGHTS = torch.tensor([[19595.0, 38470.0, 7471.0]])

    def __init__(self, brightness: float, contrast: float, saturation: float):
        self.ref = transforms.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation)

    @classmethod
    def luminance(cls, img: torch.Tensor) -> torch.Tensor:
        """PIL's convert("L") of float levels: 1 x H x W (the 3-term sums are exact in float32)."""
        lum = torch.mm(cls._WEIGHTS, img.reshape(3, -1))
        return lum.add_(32768).mul_(1 / 65536).floor_().view(1, *img.shape[1:])

    @staticmethod
    def _blend(degenerate, img: torch.Tensor, factor: float) -> torch.Tensor:
        return img.sub(degenerate).mul_(factor).add_(degenerate).clamp_(0, 255).floor_()

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] != 3:
            raise TypeError(f"PILColorJitter takes a 3 x H x W uint8 RGB tensor, got {img.dtype} {tuple(img.shape)}")
        r = self.ref
        order, b, c, s, _ = r.get_params(r.brightness, r.contrast, r.saturation, r.hue)
        x = img.float()
        for fn in order.tolist():
            if fn == 0 and b is not None:  # degenerate 0: blend = factor * image
                x = x.mul_(b).clamp_(0, 255).floor_()
            elif fn == 1 and c is not None:
                lum = self.luminance(x)
                mean = int(lum.sum().item() / lum.numel() + 0.5)  # PIL: ImageStat mean, rounded
                x = self._blend(float(mean), x, c)
            elif fn == 2 and s is not None:
                x = self._blend(self.luminance(x), x, s)
        return x

    def __repr__(self) -> str:
        r = self.ref
        return f"PILColorJitter(brightness={r.brightness}, contrast={r.contrast}, saturation={r.saturation})"


class ToFloat:
    """uint8 tensor (or float32 integer levels from :class:`PILColorJitter`) -> float32 in [0, 1]:
    the arithmetic of transforms.ToTensor on a PIL image, ``x.to(float32).div(255)``."""

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return img.to(torch.float32).div(255)

    def __repr__(self) -> str:
        return "ToFloat()"


def pil_read_image(path: str) -> torch.Tensor:
    """The image file decoded by PIL (``datasets.folder.pil_loader``), as a 3 x H x W uint8 RGB
    tensor (a view of a copy of PIL's pixels, channels last in memory like torchvision.io's)."""
    return transforms.functional.pil_to_tensor(datasets.folder.pil_loader(path))


_DECODE_IMAGE = getattr(io, "decode_image", None)


def read_image(path: str) -> torch.Tensor:
    """data.decoder=tensor's loader: the image file as a 3 x H x W uint8 RGB tensor.

    JPEG, PNG, WebP and GIF are decoded by ``torchvision.io.decode_image`` (format taken from the
    content; for JPEG it is libjpeg-turbo as in PIL and the pixels are PIL's, bit for bit); other
    formats, files it cannot decode, and torchvision releases without it (its image decoding is
    deprecated since 0.29 in favour of TorchCodec) go through PIL (:func:`pil_read_image`), which
    raises OSError for an unreadable file as decoder=pil does. EXIF orientation is ignored, as by
    PIL's loader.
    """
    if _DECODE_IMAGE is not None:
        try:
            with open(path, "rb") as f:
                raw = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29's notice, once per call
                return _DECODE_IMAGE(raw, mode=io.ImageReadMode.RGB)
        except (RuntimeError, ValueError):
            pass  # not a format torchvision decodes (BMP, TIFF, ...), or a broken file: PIL decides
    return pil_read_image(path)


def image_loader(decoder: str):
    """The ImageFolder loader of data.decoder: PIL images (pil) or uint8 tensors (tensor)."""
    return datasets.folder.default_loader if decoder == "pil" else read_image


class CropFlipDraws:
    """augment=crop_flip on cached images, the per-sample half: the image as a uint8 tensor and
    the random draws of ``RandomCrop(size, padding)`` then ``RandomHorizontalFlip()`` (the same
    calls, so the same numbers from the same seed); :class:`CropFlipBatch` does the pixel work
    for a whole batch at once. Together they give exactly the per-sample transform's batches
    (tests/test_protocol.py), at a fraction of its cost."""

    def __init__(self, size: int, padding: int, mean, std):
        self.size, self.padding = size, padding
        self.collate = CropFlipBatch(size, padding, mean, std)  # TrainStream's collate function

    def __call__(self, img) -> tuple[torch.Tensor, int, int, bool]:
        t = img if isinstance(img, torch.Tensor) else transforms.functional.pil_to_tensor(img)
        c, h, w = t.shape
        padded = torch.zeros(()).expand(c, h + 2 * self.padding, w + 2 * self.padding)  # its size only
        top, left, _, _ = transforms.RandomCrop.get_params(padded, (self.size, self.size))
        return t, top, left, bool(torch.rand(1) < 0.5)

    def __repr__(self) -> str:
        return f"CropFlipDraws(size={self.size}, padding={self.padding})"


class CropFlipBatch:
    """The batch half of :class:`CropFlipDraws`: zero padding, the drawn crops and flips, the
    conversion to [0, 1] (ToTensor's x / 255) and the normalization (Normalize's (x - mean) /
    std), on the whole batch; returns (images, targets) as the default collate would."""

    def __init__(self, size: int, padding: int, mean, std):
        self.size, self.padding = size, padding
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, samples) -> tuple[torch.Tensor, torch.Tensor]:
        p, n = self.padding, self.size
        padded = torch.nn.functional.pad(torch.stack([draws[0] for draws, _ in samples]), (p, p, p, p))
        out = torch.empty(padded.shape[0], padded.shape[1], n, n, dtype=torch.uint8)
        for b, ((_, top, left, flip), _) in enumerate(samples):
            crop = padded[b, :, top:top + n, left:left + n]
            out[b] = crop.flip(-1) if flip else crop
        images = out.to(torch.float32).div(255).sub_(self.mean).div_(self.std)
        return images, torch.tensor([target for _, target in samples])


def train_transform(cfg) -> transforms.Compose | v2.Compose | CropFlipDraws:
    """Training augmentation at ``cfg.image_size``, on PIL images (data.decoder=pil) or on uint8
    tensors (data.decoder=tensor; the same random draws and the same arithmetic, up to the
    resize's rounding, see the data.decoder field).

    augment=fb: fb.resnet.torch's ImageNet augmentation (random-resized crop, colour jitter, PCA
    lighting, normalization, horizontal flip). augment=crop_flip: the CIFAR recipe (resize to
    image_size, random crop of image_size after ``crop_padding`` zero pixels on each side,
    horizontal flip, normalization); with data.cache_images the per-sample draws of it only
    (:class:`CropFlipDraws`: the batch's collate function does the rest, with the same result).
    """
    tensor = cfg.decoder == "tensor"
    T, compose = (v2, v2.Compose) if tensor else (transforms, transforms.Compose)
    to_float = ToFloat() if tensor else transforms.ToTensor()
    normalize = transforms.Normalize(list(cfg.mean), list(cfg.std))
    if cfg.augment == "crop_flip" and cfg.cache_images:
        return CropFlipDraws(cfg.image_size, cfg.crop_padding, cfg.mean, cfg.std)
    if cfg.augment == "crop_flip":
        resize = _resize_crop(cfg.image_size, cfg.image_size, cfg.decoder)
        return compose(resize + [T.RandomCrop(cfg.image_size, padding=cfg.crop_padding),
                                 T.RandomHorizontalFlip(), to_float, normalize])
    crop = (v2.RandomResizedCrop(cfg.image_size, scale=(cfg.min_crop_area, 1.0), antialias=True) if tensor
            else transforms.RandomResizedCrop(cfg.image_size, scale=(cfg.min_crop_area, 1.0)))
    steps = [crop]
    if cfg.color_jitter > 0:
        j = cfg.color_jitter
        steps.append(PILColorJitter(j, j, j) if tensor else
                     transforms.ColorJitter(brightness=j, contrast=j, saturation=j))
    steps += [to_float, Lighting(cfg.lighting), normalize, T.RandomHorizontalFlip()]
    return compose(steps)


def _resize_crop(resize: int, crop: int, decoder: str) -> list:
    """Shorter side to ``resize``, then the centre ``crop`` x ``crop``: the deterministic part of the
    crop_flip and validation transforms, and what :class:`CachedResizedLoader` keeps."""
    if decoder == "tensor":
        return [v2.Resize(resize, antialias=True), v2.CenterCrop(crop)]
    return [transforms.Resize(resize), transforms.CenterCrop(crop)]


def val_resize(cfg) -> int:
    """Shorter side before the centre crop: 256 for 224 crops, scaled for other sizes."""
    return cfg.val_resize or int(round(cfg.image_size * 256 / 224))


def val_transform(cfg) -> transforms.Compose | v2.Compose:
    """Resize the shorter side to 256 (scaled) and centre-crop 224 (scaled); with
    data.cache_images the cached loader has already resized to image_size (= val_resize)."""
    tensor = cfg.decoder == "tensor"
    resize = [] if cfg.cache_images else _resize_crop(val_resize(cfg), cfg.image_size, cfg.decoder)
    return (v2.Compose if tensor else transforms.Compose)(
        resize + [ToFloat() if tensor else transforms.ToTensor(), transforms.Normalize(list(cfg.mean), list(cfg.std))])


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
    centre-crops ``size`` x ``size`` and keeps the result (data.cache_images). The same operations
    (of the same data.decoder) as the uncached transform, so the samples are identical."""

    def __init__(self, size: int, decoder: str = "pil"):
        self.size, self.cache = size, {}
        self.load = image_loader(decoder)
        self.prepare = (v2.Compose if decoder == "tensor" else transforms.Compose)(_resize_crop(size, size, decoder))

    def __call__(self, path: str):
        img = self.cache.get(path)
        if img is None:
            img = self.cache[path] = self.prepare(self.load(path))
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
    loader = CachedResizedLoader(cfg.image_size, cfg.decoder) if cfg.cache_images else image_loader(cfg.decoder)
    path = os.path.join(cfg.root, cfg[key])
    try:
        return RobustImageFolder(path, transform, loader=loader)
    except FileNotFoundError as e:  # torchvision: no class folder, or a class folder without images
        raise ConfigError(f"data.{key}={cfg[key]} ({path}): {str(e).split('. Supported')[0]}") from None


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGUSR1/SIGINT to the main process, which checkpoints and then shuts
    them down (a scheduler, or Ctrl-C in a terminal, signals the whole process group)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _kill_workers_at_exit() -> None:
    """Workers ignore SIGTERM (:func:`_ignore_stop_signals`), and multiprocessing's own exit hook
    stops daemonic children (DataLoader workers are) with SIGTERM and then joins them: a loader
    still alive at interpreter exit (a stream held by a global, or by the traceback of an exception
    leaving the script) would make the process wait forever instead of exiting. This hook runs
    first and does what that one does, then kills the daemonic children still alive after 2 s."""
    children = [p for p in multiprocessing.active_children() if p.daemon]
    for p in children:
        p.terminate()
    deadline = time.monotonic() + 2.0
    for p in children:
        p.join(max(0.0, deadline - time.monotonic()))
    stuck = [p for p in children if p.is_alive()]
    if stuck and hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kills as failures
    for p in stuck:
        p.kill()
        p.join()


atexit.register(_kill_workers_at_exit)


def _loader_kwargs(cfg, device: torch.device, collate_fn=None) -> dict:
    """The DataLoader settings of a data config (workers, pinned memory, the collate function)."""
    kw = {"num_workers": cfg.workers, "pin_memory": cfg.pin_memory and device.type == "cuda"}
    if collate_fn is not None:
        kw["collate_fn"] = collate_fn
    if cfg.workers > 0:
        kw.update(prefetch_factor=4, worker_init_fn=_ignore_stop_signals)
    return kw


class TrainStream:
    """An endless stream of training batches with a resumable position.

    Epoch e visits a DistributedSampler permutation (seeded by the run seed and e; each rank its
    own shard) in batches of ``batch_size`` (last partial batch dropped, so every batch splits
    into normalization groups). :meth:`state_dict` is the position of the next batch.
    ``collate_fn``: the DataLoader's (e.g. a detector's lists of images and targets); by default
    the dataset's transform's own ``collate`` where it has one (:class:`CropFlipDraws`).
    """

    def __init__(self, dataset: Dataset, cfg, seed: int, rank: int, world_size: int, device: torch.device,
                 collate_fn=None):
        self.data = SeededSamples(dataset, seed)
        self.sampler = ResumableDistributedSampler(self.data, num_replicas=world_size, rank=rank,
                                                   shuffle=True, seed=seed, drop_last=True)
        self.batch_size, self.seed, self.rank = cfg.batch_size, seed, rank
        collate_fn = collate_fn or getattr(getattr(dataset, "transform", None), "collate", None)
        self.kwargs = _loader_kwargs(cfg, device, collate_fn)
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


def build_val_loader(dataset: Dataset, cfg, rank: int, world_size: int, device: torch.device,
                     collate_fn=None) -> DataLoader:
    """Validation loader over this rank's shard (no padding, no shuffling)."""
    return DataLoader(dataset, batch_size=cfg.eval_batch_size or cfg.batch_size,
                      sampler=ShardSampler(len(dataset), rank, world_size), **_loader_kwargs(cfg, device, collate_fn))
