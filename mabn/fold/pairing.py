"""Which eval-mode normalization folds into which convolution: the pairing rule of
:mod:`mabn.fold`, applied to a ``torch.fx`` trace that keeps convolutions and normalizations as
leaf modules."""

from __future__ import annotations

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..conv import CenConv2d
from ..norm import BatchStatNorm2d

__all__ = ["is_norm", "is_foldable_norm", "find_pairs", "UntraceableError"]

_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _frozen_bn_type():
    try:  # torchvision is optional for the library
        from torchvision.ops.misc import FrozenBatchNorm2d

        return (FrozenBatchNorm2d,)
    except Exception:  # pragma: no cover
        return ()


_NORM_TYPES = (_BatchNorm, BatchStatNorm2d) + _frozen_bn_type()


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization the folding knows (a torch BatchNorm or a mabn layer)."""
    return isinstance(module, _NORM_TYPES)


def _is_conv(module: nn.Module) -> bool:
    # Exact types only: an unknown subclass may change what forward computes.
    return type(module) in _PLAIN_CONVS or isinstance(module, CenConv2d)


def is_foldable_norm(norm: nn.Module) -> bool:
    """
    Whether ``norm`` is, in eval mode, the per-channel affine map of ``F.batch_norm`` with its
    running statistics (true for every mabn family layer, nn.BatchNorm*d/SyncBatchNorm that track
    running stats, and torchvision's FrozenBatchNorm2d).
    """
    if not is_norm(norm):
        return False
    return getattr(norm, "running_mean", None) is not None and getattr(norm, "running_var", None) is not None


class UntraceableError(ValueError):
    """``torch.fx`` could not trace a module (data-dependent control flow, iteration over an
    input, unsupported Python): :func:`mabn.fold.fold_model` then folds its traceable children."""


class _LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps convolutions and normalizations as single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_conv(m) or is_norm(m) or super().is_leaf_module(m, qualname)


def find_pairs(model: nn.Module) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """
    Trace ``model`` and apply the pairing rule of the module docstring.

    Returns:
        pairs: {norm qualified name: conv qualified name} for every foldable pair.
        unfoldable: [(norm qualified name, reason)] for every norm called in the graph that
            cannot be folded.
    """
    try:
        graph = _LeafTracer().trace(model)
    except Exception as e:  # data-dependent control flow, unsupported Python, ...
        raise UntraceableError(
            f"fold_model traces the model with torch.fx to find conv -> norm pairs, and tracing "
            f"{type(model).__name__} failed: {type(e).__name__}: {e}"
        ) from e
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    pairs: dict[str, str] = {}
    unfoldable: list[tuple[str, str]] = []
    seen = set()
    for node in graph.nodes:
        if node.op != "call_module" or not is_norm(modules[node.target]):
            continue
        name = node.target
        if name in seen:
            continue
        seen.add(name)
        norm = modules[name]
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not is_foldable_norm(norm):
            reason = "it has no running statistics (eval mode uses batch statistics)"
        elif calls[name] != 1:
            reason = f"it is called {calls[name]} times"
        elif not isinstance(src, torch.fx.Node) or src.op != "call_module" or not _is_conv(modules[src.target]):
            what = f"{src.op} {src.target}" if isinstance(src, torch.fx.Node) else f"args {node.args!r}"
            reason = f"its input is not produced by an nn.Conv1d/2d/3d or CenConv2d (it comes from {what})"
        elif calls[src.target] != 1:
            reason = f"its convolution {src.target!r} is called {calls[src.target]} times"
        elif len(src.users) != 1:
            reason = f"the output of its convolution {src.target!r} is also used elsewhere"
        elif modules[src.target].out_channels != norm.running_mean.numel():
            reason = f"channel mismatch with its convolution {src.target!r}"
        else:
            pairs[name] = src.target
            continue
        unfoldable.append((name, reason))
    return pairs, unfoldable
