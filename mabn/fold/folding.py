"""Folding an eval-mode normalization into the convolution before it (eq. 18 for CenConv2d):
``W' = W_hat * s``, ``b' = (b - running_mean) * s + bias`` with ``s = weight / sqrt(running_var +
eps)``, in float64."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..conv import CenConv2d
from ..norm import BatchStatNorm2d
from ..sync import SyncBatchNorm2d
from .pairing import UntraceableError, is_norm, find_pairs, is_foldable_norm

__all__ = ["fold_conv_norm", "fold_model", "FoldReport"]

logger = logging.getLogger("mabn.fold")


def _conv_weight(conv: nn.Module) -> torch.Tensor:
    """The weight the convolution actually uses: centered (eq. 18) for CenConv2d."""
    if isinstance(conv, CenConv2d):
        return conv.centered_weight()
    return conv.weight


def _norm_scale_shift(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) in float64 such that eval-mode ``norm(x) == x * s + t`` per channel."""
    mean = norm.running_mean.detach().double()
    var = norm.running_var.detach().double()
    c = mean.numel()
    weight = norm.weight.detach().double() if getattr(norm, "weight", None) is not None else mean.new_ones(c)
    bias = norm.bias.detach().double() if getattr(norm, "bias", None) is not None else mean.new_zeros(c)
    scale = weight / torch.sqrt(var + norm.eps)
    return scale, bias - mean * scale


def _plain_conv_like(conv: nn.Module, bias: bool) -> nn.Module:
    """An empty plain nn.ConvNd with the hyper-parameters, device and dtype of ``conv``."""
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[conv.weight.dim() - 2]
    new = cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=bias,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    new.train(conv.training)
    return new


@torch.no_grad()
def fold_conv_norm(conv: nn.Module, norm: nn.Module | None) -> nn.Module:
    """
    Fold an eval-mode normalization into the convolution that precedes it.

    Args:
        conv: nn.Conv{1,2,3}d or CenConv2d (its centered weight, eq. 18, is used).
        norm: a foldable normalization (see :func:`is_foldable_norm`), or None to only turn a
            CenConv2d into a plain convolution with its centered weight.

    Returns:
        A new plain nn.Conv{1,2,3}d equal to ``norm(conv(x))`` in eval mode (with bias when a norm
        was folded or ``conv`` had one). The arithmetic is done in float64 and cast back to the
        convolution's dtype.
    """
    weight = _conv_weight(conv).detach()
    if norm is None:
        new = _plain_conv_like(conv, bias=conv.bias is not None)
        new.weight.copy_(weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
        return new
    if not is_foldable_norm(norm):
        raise ValueError(f"{type(norm).__name__} does not have running statistics and cannot be folded")
    if norm.running_mean.numel() != conv.out_channels:
        raise ValueError(
            f"cannot fold {type(norm).__name__}({norm.running_mean.numel()}) into a convolution "
            f"with {conv.out_channels} output channels"
        )
    scale, shift = _norm_scale_shift(norm)
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    new = _plain_conv_like(conv, bias=True)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    new.weight.copy_((weight.double() * scale.reshape(shape)).to(weight.dtype))
    new.bias.copy_((b * scale + shift).to(weight.dtype))
    return new


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def check_eval(model: nn.Module, what: str) -> None:
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(training[:5]) + (", ..." if len(training) > 5 else "")
        raise ValueError(
            f"{what} needs a model in eval mode, but these modules are in training mode: {shown}. "
            f"Call model.eval() first (training-mode normalizations use batch statistics and "
            f"cannot be folded)."
        )


def bn_from_norm(norm: nn.Module, eps: float | None = None) -> nn.BatchNorm2d:
    """An nn.BatchNorm2d whose eval-mode forward equals the eval-mode forward of ``norm``.

    With ``eps`` given, the difference ``norm.eps - eps`` is moved into ``running_var`` so that
    ``running_var + eps`` (all that F.batch_norm uses) is unchanged.
    """
    c = norm.running_mean.numel()
    ref = norm.running_mean
    target_eps = norm.eps if eps is None else eps
    momentum = getattr(norm, "momentum", 0.1)  # torch's meaning, also for the family (1 - alpha)
    bn = nn.BatchNorm2d(c, eps=target_eps, momentum=momentum, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        bn.running_mean.copy_(norm.running_mean)
        bn.running_var.copy_(norm.running_var + (norm.eps - target_eps))
        if getattr(norm, "weight", None) is not None:
            bn.weight.copy_(norm.weight)
        if getattr(norm, "bias", None) is not None:
            bn.bias.copy_(norm.bias)
        nbt = getattr(norm, "num_batches_tracked", None)
        if nbt is not None:
            bn.num_batches_tracked.copy_(nbt)
    bn.train(norm.training)
    return bn


@dataclass
class FoldReport:
    """What :func:`fold_model` did, by qualified name in the model (``""`` is the model itself).

    Attributes:
        folded: {normalization: the convolution it was folded into}.
        left: {normalization NOT folded: why}; each is still in the result, as an eval-mode
            nn.BatchNorm2d with the same statistics when it was a mabn layer, else as it was.
        traced: the modules torch.fx traced (the model alone when the whole model traces; else
            the largest traceable submodules holding normalizations, e.g. ``backbone.body``).
        untraced: {module holding normalizations that torch.fx could not trace: the error};
            their traceable children were folded instead.
    """

    folded: dict = field(default_factory=dict)
    left: dict = field(default_factory=dict)
    traced: list = field(default_factory=list)
    untraced: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True when no normalization was left unfolded."""
        return not self.left


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _find_pairs_deep(module: nn.Module, prefix: str, report: FoldReport, unfoldable: dict) -> None:
    """The pairs of ``module`` (named ``prefix``) into ``report.folded``, its unfoldable norms
    into ``unfoldable``; where torch.fx cannot trace ``module``, those of its children."""
    if is_norm(module) or not any(is_norm(m) for m in module.modules()):
        return  # nothing to fold here (a lone norm outside a traced graph is reported as left)
    try:
        pairs, bad = find_pairs(module)
    except UntraceableError as e:
        cause = e.__cause__ or e
        report.untraced[prefix] = f"{type(cause).__name__}: {cause}".splitlines()[0].split(". ")[0]
        for name, child in module.named_children():
            _find_pairs_deep(child, _join(prefix, name), report, unfoldable)
        return
    report.traced.append(prefix)
    report.folded.update({_join(prefix, n): _join(prefix, c) for n, c in pairs.items()})
    unfoldable.update({_join(prefix, n): reason for n, reason in bad})


def _why_left(name: str, report: FoldReport, unfoldable: dict) -> str:
    """Why the normalization ``name`` was not folded."""
    if name in unfoldable:
        return unfoldable[name]
    inside = [m for m in report.untraced if m == "" or name.startswith(m + ".")]
    if inside:
        where = max(inside, key=len)
        caller = f"the forward of {where!r}" if where else "the model's forward"
        return f"it is called by {caller}, which torch.fx cannot trace ({report.untraced[where]})"
    return "it is not called in the traced forward"


def _log_left(model: nn.Module, report: FoldReport) -> None:
    """One WARNING listing the normalizations not folded (none: nothing is logged)."""
    if not report.left:
        return
    lines = "".join(f"\n  {name}: {why}" for name, why in report.left.items())
    traced = ", ".join(t or "<the model>" for t in report.traced) or "none"
    logger.warning("fold_model(%s): %d normalization layer(s) NOT folded (%d folded, in the traced "
                   "module(s): %s):%s", type(model).__name__, len(report.left), len(report.folded),
                   traced, lines)


def fold_model(model: nn.Module, strict: bool = True, *, return_report: bool = False):
    """
    Fold every eval-mode normalization that directly follows a convolution into it.

    The model is traced with torch.fx (pairing rule of :mod:`mabn.fold`). When the whole model
    does not trace (torchvision's detectors: their control flow iterates over inputs), its
    children are traced instead, recursively, and every traceable submodule holding
    normalizations is folded in place (e.g. a detector's ``backbone.body``, a
    ``FastRCNNConvFCHead`` / ``MaskRCNNHeads`` box or mask head, a RetinaNet head's conv
    towers). The normalizations left unfolded are logged (one WARNING, logger ``mabn.fold``) and
    listed in the :class:`FoldReport` (``return_report=True``).

    Args:
        model: an eval-mode model (``model.eval()``), e.g. a torchvision ResNet after
            ``mabn.convert_model``. It is not modified.
        strict: if True, raise ValueError when a normalization of a traced graph cannot be folded
            (see the pairing rule in the module docstring). If False, such a normalization is kept
            as an eval-mode ``nn.BatchNorm2d`` with the same statistics (still linear at
            inference). Normalizations in code that torch.fx cannot trace are never an error:
            they are kept the same way and reported.
        return_report: also return the :class:`FoldReport`.

    Returns:
        A deep copy of ``model`` (same class, same submodule names) in which every folded
        convolution is a plain ``nn.Conv{1,2,3}d`` with bias, every folded normalization is
        ``nn.Identity``, every mabn normalization left is an eval-mode ``nn.BatchNorm2d`` and
        every remaining ``CenConv2d`` is a plain convolution with its centered weight. Its
        forward equals the eval-mode forward of ``model`` up to float rounding, and it contains
        no mabn classes. With ``return_report``: ``(folded_model, report)``.
    """
    check_eval(model, "fold_model")
    report, unfoldable = FoldReport(), {}
    _find_pairs_deep(model, "", report, unfoldable)
    if unfoldable and strict:
        lines = "\n".join(f"  {name}: {reason}" for name, reason in unfoldable.items())
        raise ValueError(
            "fold_model: these normalizations do not directly follow a convolution they can be "
            f"folded into:\n{lines}\nPass strict=False to keep them as eval-mode nn.BatchNorm2d "
            "layers (a per-channel affine map)."
        )
    folded = copy.deepcopy(model)
    modules = dict(folded.named_modules())
    for norm_name, conv_name in report.folded.items():
        set_submodule(folded, conv_name, fold_conv_norm(modules[conv_name], modules[norm_name]))
        set_submodule(folded, norm_name, nn.Identity())
    for name, norm in modules.items():
        if is_norm(norm) and name not in report.folded:
            report.left[name] = _why_left(name, report, unfoldable)
            if isinstance(norm, (BatchStatNorm2d, SyncBatchNorm2d)) and is_foldable_norm(norm):
                set_submodule(folded, name, bn_from_norm(norm))
    done = set(report.folded.values())
    for name, m in modules.items():
        if isinstance(m, CenConv2d) and name not in done:
            set_submodule(folded, name, fold_conv_norm(m, None))
    _log_left(model, report)
    return (folded.eval(), report) if return_report else folded.eval()
