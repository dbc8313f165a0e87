"""Swapping the torch BatchNorms of an existing model for other layers.

The one walk over a model that :func:`mabn.convert_model` and every preset's
:meth:`~mabn.BatchStatNorm2d.convert_batchnorm` share, in the spirit of
``nn.SyncBatchNorm.convert_sync_batchnorm``: each torch BatchNorm of 4-D inputs becomes the layer
that ``make`` builds, on its device and dtype and in its train/eval mode, with its affine
parameters and running statistics. The new layer gets the plain attribute ``qualified_name`` (its
name in the converted module, e.g. ``"backbone.body.layer1.0.bn1"``; not a buffer, not in the
state_dict), which its error messages name.

Messages (python ``logging``, logger ``mabn.convert``): one INFO line per conversion call saying
what was built (:func:`log_conversion`), and a WARNING listing the BatchNorms left unconverted
(BatchNorm1d/3d, torchvision's FrozenBatchNorm2d). Logging rather than ``warnings.warn``: the
converter is 2-D only by design, the caller cannot silence the cause by changing the call, and
the library's other notices (folding) go through logging too, so one ``logging`` setup controls
them all (WARNING records reach stderr even without one).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from .conv import CenConv2d

__all__ = ["is_batchnorm_2d", "copy_norm_state", "replace_batchnorms", "Conversion", "log_conversion"]

logger = logging.getLogger(__name__)


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


@dataclass
class Conversion:
    """What one walk of :func:`replace_batchnorms` did (qualified names inside the walked module)."""

    #: Names of the BatchNorms replaced, in walk order.
    replaced: list = field(default_factory=list)
    #: torch momentum of each replaced BatchNorm (None: cumulative average), same order.
    momenta: list = field(default_factory=list)
    #: (name, class name, why) of each normalization left as it was.
    left: list = field(default_factory=list)


def _left_reason(module: nn.Module) -> str | None:
    """Why ``module`` is a BatchNorm that conversion leaves, or None when it is none."""
    if isinstance(module, _BatchNorm) and not is_batchnorm_2d(module):
        return "not a BatchNorm of 4-D inputs (the converter replaces 2-D BatchNorms only)"
    if type(module).__name__ == "FrozenBatchNorm2d":  # torchvision.ops.misc, fixed statistics
        return ("frozen statistics, not a torch BatchNorm (build the model with "
                "norm_layer=nn.BatchNorm2d to train it from scratch)")
    return None


def _replace(module: nn.Module, make: Callable, name: str) -> nn.Module:
    """The layer ``make(num_features, device=..., dtype=...)`` builds for a BatchNorm, with its
    state (:func:`copy_norm_state`), train/eval mode and ``qualified_name``."""
    if any(is_lazy(p) for p in list(module.parameters()) + list(module.buffers())):
        raise ValueError(f"cannot convert the uninitialized lazy {type(module).__name__}: run a "
                         f"forward pass first so that it knows its num_features")
    ref = module.weight if module.weight is not None else module.running_mean
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    new = make(module.num_features, **factory)
    copy_norm_state(module, new)
    new.train(module.training)
    if name:
        new.qualified_name = name
    return new


def replace_batchnorms(module: nn.Module, make: Callable | None, weight_centralization: bool = False,
                       record: Conversion | None = None, prefix: str = "") -> nn.Module:
    """Replace, in place, every BatchNorm of ``module`` (:func:`is_batchnorm_2d`) by
    ``make(num_features, **factory)`` (``make=None``: leave them) and, with
    ``weight_centralization``, every plain nn.Conv2d by a :class:`mabn.CenConv2d` sharing its
    weights. The source layer's momentum is not passed on: ``make`` chooses alpha. ``record``
    (a :class:`Conversion`) collects what was replaced and left; ``prefix`` is ``module``'s
    qualified name. Returns ``module``, or the new layer when ``module`` itself is replaced."""
    record = Conversion() if record is None else record
    if make is not None and is_batchnorm_2d(module):
        record.replaced.append(prefix)
        record.momenta.append(module.momentum)
        return _replace(module, make, prefix)
    if make is not None and _left_reason(module) is not None:
        record.left.append((prefix, type(module).__name__, _left_reason(module)))
    if weight_centralization and type(module) is nn.Conv2d:
        return CenConv2d.from_conv(module)
    for name, child in module.named_children():
        new = replace_batchnorms(child, make, weight_centralization, record, f"{prefix}.{name}" if prefix else name)
        if new is not child:
            setattr(module, name, new)
    return module


def _momentum_note(record: Conversion, alpha: float | None) -> str:
    """Why the source layers' momentum did not set alpha, when it differs from the chosen one."""
    if alpha is None:
        return ""
    differing = sorted({repr(m) for m in record.momenta
                        if m is None or abs((1.0 - m) - alpha) > 1e-9})
    if not differing:
        return ""
    return (f"; the source BatchNorms' momentum ({', '.join(differing)}; torch's weight of the new "
            f"value, alpha = 1 - momentum) was NOT used: pass alpha= (or momentum= to "
            f"convert_batchnorm) to choose another alpha")


def log_conversion(caller: str, record: Conversion, built: str, alpha: float | None,
                   alpha_source: str) -> None:
    """The messages of one conversion call: INFO ``"<caller>: replaced N BatchNorm layer(s) by
    <built>; alpha=<alpha> (<alpha_source>)"`` (and whether the source momentum was used), and a
    WARNING listing the normalizations left unconverted."""
    chosen = "" if alpha is None else f"; alpha={alpha:g} ({alpha_source})"
    logger.info("%s: replaced %d BatchNorm layer(s) by %s%s%s", caller, len(record.replaced), built,
                chosen, _momentum_note(record, alpha))
    if record.left:
        lines = "".join(f"\n  {name or '<the module itself>'} ({cls}): {why}" for name, cls, why in record.left)
        logger.warning("%s: %d normalization layer(s) left unconverted:%s", caller, len(record.left), lines)
