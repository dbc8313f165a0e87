"""Detection and instance segmentation (scripts/train_detection.py): the task the shared training
loop (:mod:`mabn.engine.trainer`) runs for a detector.

COCO-format data (:mod:`mabn.detection.coco`), a torchvision detector with the config's
normalization (:mod:`mabn.detection.models`), the sum of the detector's losses, the mean of each
loss term per logging window, and the COCO evaluator's AP (:mod:`mabn.detection.coco_eval`):
bbox_AP, bbox_AP50, bbox_AP75, ... and for Mask R-CNN segm_AP, ... in metrics.json and TensorBoard.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from torch.utils.data import Subset

from ..engine import data, distributed, files
from ..engine.config import ConfigError
from ..engine.task import Task
from . import coco_eval
from .coco import CocoDetection, DatasetError, batch_to, collate
from .models import build_detector

__all__ = ["DetectionTask", "METRICS"]

log = logging.getLogger("mabn.engine.trainer")

#: The COCO summary numbers of each iou type, in COCOeval's order.
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def iou_types(arch: str) -> tuple[str, ...]:
    """What the detector is evaluated on: boxes, and masks for Mask R-CNN."""
    return ("bbox", "segm") if arch == "mask_rcnn" else ("bbox",)


class DetectionTask(Task):
    """Detection: the detector's losses while training, COCO AP (%) at validation."""

    def __init__(self):
        self.result_keys = ()

    def build(self, s) -> None:
        cfg, di, d = s.cfg, s.di, s.cfg.data
        self.iou_types = iou_types(cfg.model.arch)
        self.result_keys = tuple(f"{t}_{m}" for t in self.iou_types for m in METRICS)
        s.train_set, s.val_set = _datasets(d, masks="segm" in self.iou_types)
        s.num_classes = s.train_set.num_classes
        if cfg.model.num_classes is not None and cfg.model.num_classes != s.num_classes:
            raise ConfigError(f"model.num_classes={cfg.model.num_classes} disagrees with the data: "
                              f"{s.num_classes - 1} categories + background = {s.num_classes} in "
                              f"{d.root}/annotations/instances_{d.train_split}.json; set it to null or {s.num_classes}")
        s.stream = data.TrainStream(s.train_set, d, cfg.seed, di.rank, di.world_size, di.device, collate_fn=collate)
        val = s.val_set if d.val_images is None else Subset(s.val_set, range(min(d.val_images, len(s.val_set))))
        s.val_loader = data.build_val_loader(val, d, di.rank, di.world_size, di.device, collate_fn=collate)
        s.model = build_detector(cfg.model, cfg.norm, s.num_classes).to(di.device)

    def describe(self, s) -> str:
        d, skipped = s.cfg.data, s.train_set.skipped
        return (f"data {d.name} ({d.root}): {len(s.train_set)} training images ({d.train_split}; skipped: "
                f"{skipped}) / {len(s.val_loader.dataset)} validation images ({d.val_split}), "
                f"{s.num_classes - 1} categories; {s.stream.batches_per_epoch} batches of {d.batch_size} "
                f"per rank per epoch")

    def to_device(self, s, batch):
        return batch_to(*batch, s.di.device, non_blocking=True)

    def forward(self, s, inputs) -> tuple[torch.Tensor, dict, int]:
        images, targets = inputs
        losses = s.net(images, targets)
        loss = sum(losses.values())
        return loss, {k: float(v.detach()) for k, v in losses.items()}, len(images)

    def window_metrics(self, counts: dict, samples: int, iters: int, world_size: int) -> dict:
        return {k: v / (iters * world_size) for k, v in sorted(counts.items())}

    def window_text(self, row: dict) -> str:
        return ", ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in row.items() if k.startswith("loss_"))

    def evaluate(self, s) -> dict:
        results, image_ids = self.predict(s)
        gathered = distributed.all_gather_objects((results, image_ids))
        res = {}
        if s.di.is_main:
            results = {t: [r for rank_results, _ in gathered for r in rank_results[t]] for t in self.iou_types}
            ids = [i for _, rank_ids in gathered for i in rank_ids]
            if s.it == s.cfg.schedule.iterations:  # the final model's matches, for per-image paired tests
                res, text, matches = coco_eval.evaluate_results_and_matches(s.val_set.coco, results, ids,
                                                                            self.iou_types)
                files.atomic_write({os.path.join(s.cfg.out_dir, coco_eval.MATCHES_FILES[t]): json.dumps(matches[t])
                                    for t in self.iou_types})
            else:
                res, text = coco_eval.evaluate_results(s.val_set.coco, results, ids, self.iou_types)
            log.info("iter %d: COCO evaluation of %d images:\n%s", s.it, len(ids), text)
            log.info("iter %d: val %s", s.it, ", ".join(
                f"{t}_AP {res[f'{t}_AP']:.2f} (AP50 {res[f'{t}_AP50']:.2f}, AP75 {res[f'{t}_AP75']:.2f})"
                for t in self.iou_types))
            if s.writer:
                for k, v in res.items():
                    if v is not None:
                        s.writer.add_scalar(f"val/{k}", v, s.it)
        return res

    @torch.no_grad()
    def predict(self, s) -> tuple[dict, list]:
        """This rank's detections on its validation shard, as COCO result records of each iou
        type (masks as RLE, so that what is gathered stays small), and the image ids it evaluated."""
        model, dev = s.model, s.di.device
        was_training = model.training
        model.eval()
        results, ids = {t: [] for t in self.iou_types}, []
        for images, targets in s.val_loader:
            with s.autocast():
                outputs = model([im.to(dev) for im in images])
            for target, out in zip(targets, outputs):
                image_id = int(target["image_id"])
                ids.append(image_id)
                out = {image_id: {k: v.float().cpu() for k, v in out.items()}}
                for t in self.iou_types:
                    results[t] += coco_eval.coco_results(out, s.val_set.label_to_category_id, t)
        model.train(was_training)
        return results, ids

    def result_metrics(self, val: dict) -> dict:
        return {k: val.get(k) for k in self.result_keys}


def _datasets(d, masks: bool) -> tuple[CocoDetection, CocoDetection]:
    """The training and validation splits; a bad data set is a ConfigError (exit 2) naming the
    file; both splits must have the same categories."""
    try:
        train = CocoDetection(d.root, d.train_split, masks=masks, train=True, hflip=d.hflip,
                              drop_empty=d.drop_empty, cache=d.cache_images)
        val = CocoDetection(d.root, d.val_split, masks=masks, train=False, cache=d.cache_images)
    except DatasetError as e:
        raise ConfigError(f"data: {e}") from None
    ours, theirs = _category_ids(train), _category_ids(val)
    if ours != theirs:
        raise ConfigError(f"data: the categories of {d.train_split} and {d.val_split} differ (ids in one "
                          f"only: {sorted(set(ours) ^ set(theirs))[:5]})")
    return train, val


def _category_ids(dataset: CocoDetection) -> list[int]:
    return [c["id"] for c in dataset.categories]
