"""Evaluate a detection checkpoint: COCO AP of the detector as trained, on its validation split,
and COCOeval's per-image matches of boxes and masks (``coco_eval.MATCHES_FILES``, the detection
tables' per-image paired tests), e.g. for a run that finished before the trainer wrote them."""

from __future__ import annotations

import contextlib
import logging
from types import SimpleNamespace

import torch
from torch.utils.data import Subset

from ..engine import data, models
from ..engine.evaluation import resolve_checkpoint, saved_config
from . import coco_eval, config
from .coco import CocoDetection, collate
from .models import build_detector
from .task import DetectionTask, iou_types

__all__ = ["evaluate_detection_checkpoint"]

log = logging.getLogger(__name__)


def evaluate_detection_checkpoint(path: str, data_root: str | None = None, split: str | None = None,
                                  images: int | None = None) -> tuple[dict, dict, int]:
    """(COCO numbers in percent, iou type -> its matches (:func:`coco_eval.match_records`), the
    checkpoint's iteration) of the checkpoint ``path`` (a file, or a run directory: its newest
    usable checkpoint) on its config's validation split (``data_root`` replaces data.root), on
    the CPU, as one process of the trainer validates: the same images (the first
    data.val_images when that is set), batches and autocast, through the task's own prediction
    code, so that a single-process run's final numbers reproduce exactly.

    ``split`` evaluates another split of the data set instead (e.g. the training split, without
    its augmentation: the generalization gap), ``images`` its first that many images."""
    state, file = resolve_checkpoint(path)
    cfg = saved_config(state)
    if data_root is not None:
        cfg.data.root = data_root
    cfg = config.load(cfg)
    task, device = DetectionTask(), torch.device("cpu")
    task.iou_types = iou_types(cfg.model.arch)
    val = CocoDetection(cfg.data.root, split or cfg.data.val_split, masks="segm" in task.iou_types, train=False)
    count = images if images is not None else (cfg.data.val_images if split is None else None)
    shown = val if count is None else Subset(val, range(min(count, len(val))))
    model = build_detector(cfg.model, cfg.norm, val.num_classes)
    models.load_weights({"model": model}, state)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    s = SimpleNamespace(model=model, val_set=val, di=SimpleNamespace(device=device),
                        val_loader=data.build_val_loader(shown, cfg.data, 0, 1, device, collate_fn=collate),
                        autocast=lambda: torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext())
    results, ids = task.predict(s)
    metrics, _, matches = coco_eval.evaluate_results_and_matches(val.coco, results, ids, task.iou_types)
    log.info("%s (iteration %d): %s", file, state["iteration"],
             ", ".join(f"{t}_AP {metrics[f'{t}_AP']:.2f}" for t in task.iou_types))
    return metrics, matches, int(state["iteration"])
