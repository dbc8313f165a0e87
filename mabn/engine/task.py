"""What a training task adds to the shared training loop (:mod:`mabn.engine.trainer`).

The loop (config checks, torchrun/DDP, the out_dir lock, resume, the iteration with its all-reduce,
the lr schedule, SGD, checkpoints, SIGTERM, divergence, metrics.json, TensorBoard, the statistics
recorder) is the same for every task; a :class:`Task` supplies the data, the model, the loss of a
batch, the numbers of a logging window and the validation. :class:`~mabn.engine.classification.
ClassificationTask` (train_imagenet.py) and :class:`mabn.detection.task.DetectionTask`
(scripts/train_detection.py) are the two.
"""

from __future__ import annotations

import torch

__all__ = ["Task"]


class Task:
    """The interface; every method gets the trainer's run state ``s`` (its ``cfg``, ``di``: the
    rank and device, ``model``, ``net``: the model as trained, DDP/compile wrapped, ``writer``:
    TensorBoard on rank 0, ``it``: the iteration)."""

    #: metrics.json keys of the final validation (None in a run that diverged).
    result_keys: tuple[str, ...] = ()

    def build(self, s) -> None:
        """Set ``s.train_set``, ``s.val_set``, ``s.num_classes``, ``s.stream`` (a
        :class:`~mabn.engine.data.TrainStream`), ``s.val_loader`` and ``s.model`` (on ``s.di.device``,
        in ``s.memory_format``). Nothing may be written; a bad input raises ConfigError."""
        raise NotImplementedError

    def describe(self, s) -> str:
        """The log line that says what data the run trains on."""
        raise NotImplementedError

    def to_device(self, s, batch):
        """A batch of the stream, moved to ``s.di.device`` (what :meth:`forward` takes)."""
        raise NotImplementedError

    def forward(self, s, inputs) -> tuple[torch.Tensor, dict, int]:
        """(the loss to minimize, this iteration's counts for the logging window, images) of
        ``s.net`` on ``inputs``; runs under the run's autocast."""
        raise NotImplementedError

    def window_metrics(self, counts: dict, samples: int, iters: int, world_size: int) -> dict:
        """The task's numbers of a logging window from its counts summed over ranks (``samples``
        and ``iters`` are the window's images over all ranks and iterations of one rank)."""
        raise NotImplementedError

    def window_text(self, row: dict) -> str:
        """The task's part of a training log line (``row``: the window's numbers)."""
        raise NotImplementedError

    def evaluate(self, s) -> dict:
        """Validate ``s.model`` at iteration ``s.it`` (in eval mode, restoring train mode), log it,
        write it to TensorBoard on rank 0, and return its numbers."""
        raise NotImplementedError

    def result_metrics(self, val: dict) -> dict:
        """The metrics.json entries (:attr:`result_keys`) of a validation result."""
        raise NotImplementedError
