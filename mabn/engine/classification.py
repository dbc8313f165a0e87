"""Image classification (train_imagenet.py): the task the shared training loop runs by default.

ImageNet / any ImageFolder / synthetic data (:mod:`mabn.engine.data`), a ResNet with the config's
normalization (:mod:`mabn.engine.models`), cross-entropy with label smoothing, top-1/top-5 error
of each logging window and of the validation set.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from . import data, distributed, files, models
from .config import check_num_classes
from .meters import evaluate, topk_correct
from .task import Task

__all__ = ["ClassificationTask", "write_predictions", "read_predictions"]

log = logging.getLogger("mabn.engine.trainer")


class ClassificationTask(Task):
    """Classification: top-1/top-5 error (%), of the training windows and of validation."""

    result_keys = ("val_top1_err", "val_top5_err")

    def build(self, s) -> None:
        cfg, di = s.cfg, s.di
        s.train_set, s.val_set, s.num_classes = data.build_datasets(cfg.data, cfg.seed)
        check_num_classes(cfg.model, s.num_classes, cfg.data.name)
        s.stream = data.TrainStream(s.train_set, cfg.data, cfg.seed, di.rank, di.world_size, di.device)
        s.val_loader = data.build_val_loader(s.val_set, cfg.data, di.rank, di.world_size, di.device)
        model = models.build_model(cfg.model, cfg.norm, cfg.model.num_classes or s.num_classes).to(di.device)
        s.model = model.to(memory_format=s.memory_format)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)

    def describe(self, s) -> str:
        return (f"data {s.cfg.data.name}: {len(s.train_set)} training / {len(s.val_set)} validation images, "
                f"{s.num_classes} classes; {s.stream.batches_per_epoch} batches of {s.cfg.data.batch_size} "
                f"per rank per epoch")

    def to_device(self, s, batch):
        images, target = batch
        images = images.to(s.di.device, non_blocking=True).contiguous(memory_format=s.memory_format)
        return images, target.to(s.di.device, non_blocking=True)

    def forward(self, s, inputs) -> tuple[torch.Tensor, dict, int]:
        images, target = inputs
        logits = s.net(images)
        loss = self.criterion(logits.float(), target)
        with torch.no_grad():
            c1, c5 = topk_correct(logits.detach(), target)
        return loss, {"correct1": c1, "correct5": c5}, target.shape[0]

    def window_metrics(self, counts: dict, samples: int, iters: int, world_size: int) -> dict:
        return {"top1_err": 100 * (1 - counts["correct1"] / samples),
                "top5_err": 100 * (1 - counts["correct5"] / samples)}

    def window_text(self, row: dict) -> str:
        return f"top-1 error {row['top1_err']:.2f}%, top-5 error {row['top5_err']:.2f}%"

    def evaluate(self, s) -> dict:
        final = s.it == s.cfg.schedule.iterations
        res = evaluate(s.model, s.val_loader, s.di.device, s.cfg.channels_last, s.autocast(), keep_predictions=final)
        if final:  # the final model's prediction of every validation image, for per-image paired tests
            write_predictions(os.path.join(s.cfg.out_dir, "val_predictions.csv"), res.pop("predictions"), s.di.is_main)
        log.info("iter %d: val top-1 error %.2f%%, top-5 error %.2f%% (%d images)", s.it,
                 res["top1_err"], res["top5_err"], res["samples"])
        if s.writer:
            s.writer.add_scalar("val/top1_err", res["top1_err"], s.it)
            s.writer.add_scalar("val/top5_err", res["top5_err"], s.it)
        return res

    def result_metrics(self, val: dict) -> dict:
        return {"val_top1_err": val["top1_err"], "val_top5_err": val["top5_err"]}


def write_predictions(path: str, predictions: list[tuple[int, int, int]], is_main: bool) -> None:
    """Gather every rank's (dataset index, target, top-1 class) and write them, by index, to
    ``path`` (CSV ``index,target,prediction``; atomically, on rank 0). Two runs validated on the
    same images give two files whose lines pair image by image (McNemar, paired bootstrap)."""
    every = sorted(p for rank in distributed.all_gather_objects(predictions) for p in rank)
    if is_main:
        files.atomic_write({path: "index,target,prediction\n" + "".join(f"{i},{t},{p}\n" for i, t, p in every)})


def read_predictions(path: str) -> dict[int, tuple[int, int]]:
    """{dataset index: (target, top-1 class)} of a ``val_predictions.csv``."""
    with open(path) as f:
        next(f)
        rows = (line.strip().split(",") for line in f if line.strip())
        return {int(i): (int(t), int(p)) for i, t, p in rows}
