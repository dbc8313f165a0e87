"""Error metrics, running averages and the evaluation loop."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import distributed

__all__ = ["topk_correct", "WindowMeter", "evaluate"]


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose target is among the top-k logits, for each k (k capped at the
    number of classes)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target[:, None])
    return [int(hit[:, :min(k, maxk)].any(1).sum()) for k in ks]


class WindowMeter:
    """Sums over the current logging window (reset after each log line): the mean loss of each
    iteration, images, iterations and seconds, and the task's own ``counts`` (the classifier's
    top-1/top-5 hits, the detector's loss terms), summed over ranks when the window is logged."""

    def __init__(self):
        self.last_loss = None  # mean loss of the last logged window
        self.reset()

    def reset(self) -> None:
        self.loss = 0.0
        self.samples = self.iters = 0
        self.data_time = self.step_time = 0.0
        self.counts: dict[str, float] = {}

    def update(self, loss: float, counts: dict, samples: int, data_time: float, step_time: float) -> None:
        """One iteration: its mean loss, the task's counts, images, seconds waiting for data and
        seconds of the whole iteration (data included; validation and checkpoints excluded)."""
        self.loss += loss
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0.0) + float(v)
        self.samples += samples
        self.iters += 1
        self.data_time += data_time
        self.step_time += step_time

    _FIELDS = ("loss", "samples", "iters", "data_time", "step_time", "last_loss")

    def state_dict(self) -> dict:
        """The open window and the last logged loss, as plain numbers (saved in checkpoints so that
        a resumed run logs exactly what an uninterrupted one logs)."""
        state = {k: (v.item() if isinstance(v, torch.Tensor) else v)
                 for k, v in ((k, getattr(self, k)) for k in self._FIELDS)}
        state["counts"] = dict(self.counts)
        return state

    def load_state_dict(self, state: dict) -> None:
        for k in self._FIELDS:
            setattr(self, k, state[k])
        # Checkpoints written before the counts were the task's kept the classifier's at the top.
        self.counts = dict(state.get("counts", {k: state[k] for k in ("correct1", "correct5") if k in state}))


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, channels_last: bool = False,
             autocast: contextlib.AbstractContextManager | None = None, keep_predictions: bool = False) -> dict:
    """Top-1/top-5 error (%) of ``model`` in eval mode over the loader, summed over all ranks
    (each rank evaluates its own shard). Restores the model's train/eval mode. With
    ``keep_predictions``, also ``"predictions"``: this rank's (dataset index, target, top-1
    class) of every image, in loader order (the loader's sampler gives the indices)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)  # top-1 correct, top-5 correct, samples
    targets, top1 = [], []
    for images, target in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        target = target.to(device, non_blocking=True)
        with autocast or contextlib.nullcontext():
            logits = model(images)
        c1, c5 = topk_correct(logits.float(), target)
        counts += torch.tensor([c1, c5, target.shape[0]], dtype=torch.float64)
        if keep_predictions:
            targets += target.tolist()
            top1 += logits.float().argmax(1).tolist()
    model.train(was_training)
    c1, c5, n = distributed.all_reduce_sum(counts, device).tolist()
    res = {"top1_err": 100.0 * (1 - c1 / n), "top5_err": 100.0 * (1 - c5 / n), "samples": int(n)}
    if keep_predictions:
        res["predictions"] = list(zip(list(loader.sampler), targets, top1))
    return res
