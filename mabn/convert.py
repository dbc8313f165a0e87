"""Swapping the torch BatchNorms of an existing model for other layers.

The one walk over a model that :func:`mabn.convert_model` and every preset's
:meth:`~mabn.BatchStatNorm2d.convert_batchnorm` share, in the spirit of
``nn.SyncBatchNorm.convert_sync_batchnorm``: each torch BatchNorm of 4-D inputs becomes the layer
that ``make`` builds, on its device and dtype and in its train/eval mode, with its affine
parameters and running statistics.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from .conv import CenConv2d

__all__ = ["is_batchnorm_2d", "copy_norm_state", "replace_batchnorms"]


def is_batchnorm_2d(module: nn.Module) -> bool:
    """Whether ``module`` is a torch BatchNorm of 4-D inputs that conversion replaces: any
    ``nn.modules.batchnorm._BatchNorm`` subclass (nn.BatchNorm2d, nn.SyncBatchNorm, a user's
    subclass) whose input check accepts (N, C, H, W), not a mabn family layer."""
    if not isinstance(module, _BatchNorm):
        return False
    try:
        module._check_input_dim(torch.empty(0, 0, 0, 0))
    except ValueError:  # BatchNorm1d / BatchNorm3d and their subclasses
        return False
    return True


def copy_norm_state(src: _BatchNorm, dst: nn.Module) -> None:
    """Affine parameters and running statistics of ``src`` into the fresh layer ``dst``.

    A layer of the modified form (eq. 15; ``dst.form == "modified"``) keeps running_mean 0 and
    running_var the EMA of chi^2 = E[x^2]: it gets ``var + mean^2``. Iteration counters are not
    copied (the training that follows starts at t = 1: its warm-ups apply, and with
    ``ema_init="first"`` its first batch replaces the EMAs).
    """
    with torch.no_grad():
        if src.affine and getattr(dst, "weight", None) is not None:
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        if not src.track_running_stats or getattr(dst, "running_var", None) is None:
            return
        mean, var = src.running_mean, src.running_var
        if getattr(dst, "form", None) == "modified":
            mean, var = torch.zeros_like(mean), var + mean * mean
        dst.running_mean.copy_(mean)
        dst.running_var.copy_(var)


def _replace(module: nn.Module, make: Callable | None) -> nn.Module:
    """The layer ``make(num_features, alpha, device=..., dtype=...)`` builds for a BatchNorm,
    carrying torch's momentum as ``alpha = 1 - momentum`` (None for torch's cumulative average)."""
    if any(is_lazy(p) for p in list(module.parameters()) + list(module.buffers())):
        raise ValueError(f"cannot convert the uninitialized lazy {type(module).__name__}: run a "
                         f"forward pass first so that it knows its num_features")
    alpha = None if module.momentum is None else 1.0 - module.momentum
    ref = module.weight if module.weight is not None else module.running_mean
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    new = make(module.num_features, alpha, **factory)
    copy_norm_state(module, new)
    new.train(module.training)
    return new


def replace_batchnorms(module: nn.Module, make: Callable | None, weight_centralization: bool = False) -> nn.Module:
    """Replace, in place, every BatchNorm of ``module`` (:func:`is_batchnorm_2d`) by
    ``make(num_features, alpha, **factory)`` (``make=None``: leave them) and, with
    ``weight_centralization``, every plain nn.Conv2d by a :class:`mabn.CenConv2d` sharing its
    weights. Returns ``module``, or the new layer when ``module`` itself is replaced."""
    if make is not None and is_batchnorm_2d(module):
        return _replace(module, make)
    if weight_centralization and type(module) is nn.Conv2d:
        return CenConv2d.from_conv(module)
    for name, child in module.named_children():
        new = replace_batchnorms(child, make, weight_centralization)
        if new is not child:
            setattr(module, name, new)
    return module
