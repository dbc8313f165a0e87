"""Synchronized batch normalization that also runs on the CPU (``gloo``).

torch's ``nn.SyncBatchNorm`` synchronizes its statistics with a CUDA kernel only: in a
distributed CPU run it stops with "SyncBatchNorm expected input tensor to be on GPU". The SyncBN
baseline of the paper (Table 1: statistics over all ranks' images, eq. 1-5 with the batch B the
union of the ranks' batches) must also run in 2-rank ``gloo`` tests and on CPU machines:
:class:`SyncBatchNorm2d` computes it with one differentiable all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SyncBatchNorm2d"]

#: Devices on which torch's own synchronizing kernel runs (``nn.SyncBatchNorm.forward``).
_KERNEL_DEVICES = ("cuda", "hpu", "xpu")


def _world_size(group) -> int:
    """Ranks in ``group`` (None: the default group); 1 when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group or dist.group.WORLD)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.SyncBatchNorm`` that also synchronizes on devices without torch's kernel (the CPU).

    Same constructor, parameters, buffers and state_dict as ``nn.SyncBatchNorm``. It is an
    ``nn.BatchNorm2d`` subclass, not an ``nn.SyncBatchNorm`` one: DDP refuses any module holding an
    ``nn.SyncBatchNorm`` on the CPU ("SyncBatchNorm layers only work with GPU modules"), and
    :func:`mabn.convert.is_batchnorm_2d`, :func:`mabn.fold_model` and the export treat it as the
    BatchNorm2d it is in eval mode. The forward pass:

    * training, with torch.distributed initialized and more than one rank in ``process_group``,
      on a device torch's kernel does not support (CPU): every rank computes per channel the
      element count n_r, the sum and the sum of squares of its batch (in float64); one
      differentiable all-reduce (``torch.distributed.nn.functional.all_reduce``, so autograd
      gives the exact cross-rank backward of eq. 4-5) gives the global n, mean mu and biased
      variance v = E[x^2] - mu^2; the output is ``weight * (x - mu) / sqrt(v + eps) + bias``
      (eq. 1-3) in the input's dtype. The running statistics are updated as nn.BatchNorm2d
      does, with the global statistics: ``running <- (1 - momentum) * running + momentum *
      batch`` with the unbiased variance ``v * n / (n - 1)`` (momentum=None: the cumulative
      average, factor ``1 / num_batches_tracked``); ``num_batches_tracked`` counts the forwards.
    * training on CUDA (and the other devices of torch's kernel): ``nn.SyncBatchNorm.forward``.
    * not distributed, or one rank: exactly nn.BatchNorm2d's forward over the local batch.
    * eval mode: ``F.batch_norm`` with the running statistics (nn.BatchNorm2d's forward).

    Every rank must call the forward the same number of times (a collective per call).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    # nn.SyncBatchNorm's own check, which its forward (used on CUDA below) calls.
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.training and input.device.type in _KERNEL_DEVICES:
            return nn.SyncBatchNorm.forward(self, input)  # torch's kernel, with this layer's state
        if self.training and _world_size(self.process_group) > 1:
            self._check_input_dim(input)
            self._check_non_zero_input_channels(input)
            return self._all_reduce_forward(input)
        self._check_input_dim(input)
        return _BatchNorm.forward(self, input)  # nn.BatchNorm2d's forward: the local batch

    def _all_reduce_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training forward with the statistics of all ranks (see the class docstring)."""
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        x64 = x.double()
        count = x64.new_full((c,), float(x.numel() // c))
        local = torch.cat([count, x64.sum(dims), (x64 * x64).sum(dims)])
        from torch.distributed.nn.functional import all_reduce  # differentiable (autograd) collective

        total = all_reduce(local, group=self.process_group or dist.group.WORLD)
        n, s, ss = total.split(c)
        mean = s / n
        var = (ss / n - mean * mean).clamp_min(0.0)  # biased: the normalization's variance (eq. 2)
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean.detach(), var.detach(), n.detach())
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = (x64 - mean.reshape(shape)) * torch.rsqrt(var + self.eps).reshape(shape)
        if self.weight is not None:
            y = y * self.weight.double().reshape(shape) + self.bias.double().reshape(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean, var, n) -> None:
        """nn.BatchNorm2d's update of the running statistics with the global batch statistics."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        unbiased = var * n / (n - 1).clamp_min(1.0)
        rm, rv = self.running_mean, self.running_var
        rm.copy_(rm * (1.0 - factor) + mean.to(rm.dtype) * factor)
        rv.copy_(rv * (1.0 - factor) + unbiased.to(rv.dtype) * factor)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """``nn.SyncBatchNorm.convert_sync_batchnorm`` that builds ``cls`` layers: every torch
        BatchNorm (``_BatchNorm``) of ``module`` becomes a SyncBatchNorm2d sharing its
        parameters and buffers, in its train/eval mode. Returns ``module``, or the new layer when
        ``module`` itself is a BatchNorm."""
        if isinstance(module, _BatchNorm):
            new = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group)
            if module.affine:
                new.weight, new.bias = module.weight, module.bias
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
            new.train(module.training)
            if hasattr(module, "qconfig"):
                new.qconfig = module.qconfig
            return new
        for name, child in module.named_children():
            new = cls.convert_sync_batchnorm(child, process_group)
            if new is not child:
                setattr(module, name, new)
        return module
