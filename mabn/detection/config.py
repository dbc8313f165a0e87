"""Structured configuration of a detection run (scripts/train_detection.py), and its validation.

A detection run has every key of the classifier's :class:`mabn.engine.config.Config` (the same
``norm`` group and configs/norm/*.yaml presets, ``schedule``, ``optim``, ``stats``, ``debug`` and
the run keys: out_dir, seed, resume, stop_after, ...) with the same meaning; ``data`` and
``model`` are the detector's (:class:`DetectionDataConfig`, :class:`DetectorConfig`).

The paper's setting (Section 5.2, appendix B.3; the authors' det/ code): Mask R-CNN R50-FPN from
scratch on COCO, 8 GPUs x 2 images, lr 0.02, weight decay 1e-4, 2x schedule (180k iterations, lr /
10 at 120k and 160k), alpha 0.98 for BRN/MABN, m = 16 (Table 3) / 32 (Table 5), shorter side 800.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import DictConfig

from ..engine import config as base
from ..engine.config import ConfigError, StatsConfig, _at_least, _check, _one_of
from .models import ARCHS, BACKBONES

__all__ = ["DetectionDataConfig", "DetectorConfig", "DetectionConfig", "load", "validate"]


@dataclass
class DetectionDataConfig:
    """A COCO-format data set: root/annotations/instances_<split>.json and root/<split>/ images
    (real COCO: splits train2017 / val2017; scripts/make_detection_data.py writes train / val)."""

    name: str = "coco"
    """A label for logs and TensorBoard (the format is always COCO's)."""
    root: Optional[str] = None
    """Folder holding annotations/ and the image folders."""
    train_split: str = "train"
    """Training split: annotations/instances_<train_split>.json, images in <train_split>/."""
    val_split: str = "val"
    """Validation split, evaluated with the COCO evaluator (pycocotools)."""
    batch_size: int = 8
    """Images per process per iteration (the paper: 2 per GPU). On one process a step of k x 2
    images with norm.norm_batch_size=2 simulates k GPUs of 2 images (see the README)."""
    eval_batch_size: int = 1
    """Images per process per validation step (torchvision's reference: 1; images of different
    sizes are padded to a common size inside a batch)."""
    val_images: Optional[int] = None
    """Evaluate on the first N validation images only (quick checks); null = all."""
    hflip: float = 0.5
    """Probability of the horizontal flip of a training image (with its boxes and masks)."""
    drop_empty: bool = False
    """Leave out training images without annotations (torchvision's reference does)."""
    cache_images: bool = False
    """Keep decoded images in memory (small data sets; with workers=0)."""
    workers: int = 4
    """DataLoader worker processes per rank (0 = load in the main process)."""
    pin_memory: bool = True
    """Pinned host memory for faster host-to-GPU copies (used on CUDA only)."""


@dataclass
class DetectorConfig:
    """The detector (torchvision's, built by mabn.detection.models.build_detector)."""

    arch: str = "mask_rcnn"
    """"mask_rcnn" (box and mask AP), "faster_rcnn" or "retinanet" (box AP)."""
    backbone: str = "resnet50"
    """The ResNet of the backbone: "resnet18", "resnet34", "resnet50" (the paper's), "resnet101"."""
    backbone_width: int = 64
    """Base width of the ResNet (64 = torchvision's; stages at 1, 2, 4, 8 x it)."""
    fpn_channels: int = 256
    """Channels of the FPN levels (and of the heads' convolutions)."""
    fpn_norm: bool = True
    """Normalization after each FPN convolution (the authors' code: a centralized conv + MABN)."""
    norm_in: str = "backbone"
    """Where the normalization goes: "backbone" (body and FPN; Table 3) or "backbone_and_heads"
    (also the 4conv1fc box head and the mask head; Table 5). RetinaNet's head takes only
    norm.layer=gn (it is shared by the five FPN levels; retinanet_head_norm=gn puts GN there under
    any backbone norm)."""
    retinanet_head_norm: str = "none"
    """RetinaNet's head towers: "none" (torchvision's plain convolutions) or "gn" (GroupNorm of
    norm.num_groups after each of the towers' convolutions, whatever the backbone's norm: the head
    is shared by the five FPN levels, so a batch-statistics norm cannot go there; detectron2's
    from-scratch RetinaNet uses a GN head). Needed at small widths: the towers' N(0, 0.01) init
    shrinks a signal ~2,000x through 4 convolutions of 64 channels (~100x at 256). The R-CNN
    archs ignore it (their heads follow norm_in)."""
    box_head: str = "2fc"
    """R-CNN box head: "2fc" (torchvision's default) or "4conv1fc" (four 3x3 convs + one fc;
    Table 5, needed for norm_in=backbone_and_heads)."""
    fc_dim: int = 1024
    """Width of the box head's fully connected layers."""
    head_warmup_iters: int = 0
    """Iterations the heads' batch-statistics normalizations use batch statistics in both passes
    (their warmup_iters; Table 5: 10,000). norm_in=backbone_and_heads only."""
    num_classes: Optional[int] = None
    """Classes including the background; null = the data's categories + 1. When given it must
    equal that number."""
    min_size: int = 800
    """Shorter image side after the detector's resize (torchvision's GeneralizedRCNNTransform)."""
    max_size: int = 1333
    """Longest image side after the resize."""
    anchor_sizes: List[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    """Anchor size of each FPN level, P2-P6 (R-CNN) or P3-P7 (RetinaNet: 3 scales per octave)."""
    rpn_pre_nms_top_n_train: int = 2000
    """Proposals per level before NMS in training."""
    rpn_pre_nms_top_n_test: int = 1000
    """Proposals per level before NMS in evaluation."""
    rpn_post_nms_top_n_train: int = 2000
    """Proposals kept after NMS in training."""
    rpn_post_nms_top_n_test: int = 1000
    """Proposals kept after NMS in evaluation."""
    rpn_batch_size_per_image: int = 256
    """Anchors sampled per image for the RPN loss."""
    box_batch_size_per_image: int = 512
    """RoIs sampled per image for the box (and mask) head."""
    box_detections_per_img: int = 100
    """Detections kept per image (COCO's AP is over the top 100)."""
    backbone_checkpoint: Optional[str] = None
    """A train_imagenet.py checkpoint of the same normalization whose ResNet initialises the body
    (Table 6); null = from scratch (Tables 3, 5, 7)."""


def _detection_stats() -> StatsConfig:
    return StatsConfig(layers=["backbone.body.layer1.0.bn1"])


@dataclass
class DetectionConfig(base.Config):
    """A whole detection run: the classifier's keys, with the detector's ``data`` and ``model``."""

    model: DetectorConfig = field(default_factory=DetectorConfig)
    """Detector (configs/detector/)."""
    data: DetectionDataConfig = field(default_factory=DetectionDataConfig)
    """COCO-format data (configs/det_data/)."""
    stats: StatsConfig = field(default_factory=_detection_stats)
    """Batch-statistics recording of the backbone (Figures 2-4): statistics.csv."""
    name: str = "detection"
    """Run name."""
    out_dir: str = "runs/detection"
    """Run directory."""


def load(cfg: Any = None) -> DictConfig:
    """Merge ``cfg`` onto the detection schema and validate it (ConfigError naming the key)."""
    return base.load(cfg, schema=DetectionConfig, check=validate)


def validate(cfg: DictConfig) -> None:
    """The classifier's rules for the shared groups (mabn.engine.config.validate), with the
    detector's and its data's for model and data."""
    base.validate(cfg, _detector_groups)


def _detector_groups(cfg: DictConfig) -> None:
    validate_model(cfg.model, cfg.norm)
    validate_data(cfg.data)
    _check(not cfg.compile, "compile=true is not supported for detectors (their control flow depends on "
                            "the data); use compile=false")


def validate_model(m, norm) -> None:
    """model: a known detector and backbone, sizes, and where the normalization may go."""
    _one_of("model.arch", m.arch, ARCHS)
    _one_of("model.backbone", m.backbone, tuple(BACKBONES))
    _one_of("model.norm_in", m.norm_in, ("backbone", "backbone_and_heads"))
    _one_of("model.box_head", m.box_head, ("2fc", "4conv1fc"))
    _one_of("model.retinanet_head_norm", m.retinanet_head_norm, ("none", "gn"))
    for key in ("backbone_width", "fpn_channels", "fc_dim", "min_size", "rpn_batch_size_per_image",
                "box_batch_size_per_image", "box_detections_per_img"):
        _at_least(f"model.{key}", m[key], 1)
    _at_least("model.head_warmup_iters", m.head_warmup_iters, 0)
    _check(m.max_size >= m.min_size, f"model.max_size={m.max_size} must be >= model.min_size={m.min_size}")
    _check(len(m.anchor_sizes) == 5 and all(a > 0 for a in m.anchor_sizes),
           f"model.anchor_sizes={list(m.anchor_sizes)} must be 5 positive sizes (one per FPN level)")
    _check(m.num_classes is None or m.num_classes >= 2, f"model.num_classes={m.num_classes} must be >= 2")
    heads = m.norm_in == "backbone_and_heads"
    _check(not heads or m.arch == "retinanet" or m.box_head == "4conv1fc",
           "model.norm_in=backbone_and_heads needs model.box_head=4conv1fc (the 2fc head has no convolution)")
    _check(not heads or m.arch != "retinanet" or norm.layer == "gn",
           f"model.norm_in=backbone_and_heads with model.arch=retinanet needs norm.layer=gn (the head is "
           f"shared by the five FPN levels, whose statistics a batch norm would mix; norm.layer={norm.layer})")
    _check(heads or m.head_warmup_iters == 0,
           f"model.head_warmup_iters={m.head_warmup_iters} needs model.norm_in=backbone_and_heads")
    if norm.layer == "gn":
        widths = [m.backbone_width * 2 ** i * k for i in range(4) for k in (1, 4)] + [m.fpn_channels]
        bad = sorted({c for c in widths if c % norm.num_groups})
        _check(not bad, f"norm.num_groups={norm.num_groups} does not divide the {bad[:1]} channels of "
                        f"model.backbone={m.backbone} at model.backbone_width={m.backbone_width} / "
                        f"model.fpn_channels={m.fpn_channels}")
    _check(m.backbone_checkpoint is None or os.path.isfile(m.backbone_checkpoint),
           f"model.backbone_checkpoint={m.backbone_checkpoint} is not a file")


def validate_data(d) -> None:
    """data: the COCO layout must exist under data.root; sizes and loading."""
    _check(d.root is not None and str(d.root) != "",
           "data.root is required (a COCO-format folder; python scripts/make_detection_data.py OUT builds one)")
    _check(os.path.isdir(d.root), f"data.root={d.root} is not a folder")
    for key in ("train_split", "val_split"):
        ann = os.path.join(d.root, "annotations", f"instances_{d[key]}.json")
        _check(os.path.isfile(ann), f"data.{key}={d[key]}: annotation file {ann} does not exist")
    _at_least("data.batch_size", d.batch_size, 1)
    _at_least("data.eval_batch_size", d.eval_batch_size, 1)
    _check(d.val_images is None or d.val_images >= 1, f"data.val_images={d.val_images} must be >= 1")
    _check(0 <= d.hflip <= 1, f"data.hflip={d.hflip} must be in [0, 1]")
    _at_least("data.workers", d.workers, 0)
