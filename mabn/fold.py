# -*- coding: utf-8 -*-
"""
Inference-time folding and export of models that use the mabn layer library.

MABN keeps inference linear (paper, Sec. 1 and appendix B.5): in eval mode every layer of the
family (BN, BRN, modified BN, MABN and every ablation combination of ``BatchStatNorm2d``) is exactly

    F.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=eps)
        = x * s + (bias - running_mean * s),    s = weight / sqrt(running_var + eps),

a per-channel affine map. For the modified form (eq. 19, MABN) ``running_mean`` is 0 and
``running_var`` holds the EMA of chi^2 = E[x^2], so the same formula applies. Weight centralization
(eq. 18, ``CenConv2d``) is a reparametrisation of a plain convolution: ``W_hat = W - mean_{in,kh,kw} W``.
Hence a (centralized) convolution followed by an eval-mode normalization is a single plain
``nn.Conv2d`` with bias:

    W' = W_hat * s[:, None, None, None],    b' = (b - running_mean) * s + bias.

This module provides

* :func:`fold_model`: a deep copy of an eval-mode model in which every normalization that directly
  follows a convolution is folded into it (plain ``nn.Conv{1,2,3}d`` with bias) and replaced by
  ``nn.Identity``; the copy contains no mabn classes.
* :func:`plain_model` / :func:`export_torchvision_state_dict`: map a converted model back onto the
  stock layers (``CenConv2d`` -> ``nn.Conv2d`` with the centered weight, family norms ->
  ``nn.BatchNorm2d`` with the same buffers), e.g. to load a MABN-trained ResNet-50 into
  ``torchvision.models.resnet50()`` with ``strict=True``.
* :func:`export_torchscript` and :func:`export_onnx` of the folded model.

Pairing rule (how a norm finds "its" convolution). The model is traced with ``torch.fx`` treating
convolutions and normalizations as leaf modules. A normalization call is folded into the
convolution call that produces its only input when

1. the convolution is a plain ``nn.Conv1d/2d/3d`` or a ``CenConv2d`` (not a transposed conv and not
   some other subclass whose forward we do not know);
2. the convolution's output has no other user (otherwise the other user would see the folded
   values);
3. both modules are called exactly once in the traced graph (no weight sharing);
4. ``conv.out_channels == norm.num_features``.

A norm that fails the rule is "unfoldable": :func:`fold_model` raises a ``ValueError`` naming it
(``strict=True``, the default) or keeps it as an eval-mode ``nn.BatchNorm2d`` holding the same
statistics (``strict=False``), which is still a linear per-channel affine map at inference.
torchvision's ResNets (``conv1/bn1``, ``convK/bnK`` in the blocks and the ``downsample``
``Sequential(conv, bn)``) fold completely.

Normalizations that use statistics of the input at inference (nn.GroupNorm, nn.LayerNorm,
nn.InstanceNorm2d, BatchNorm without running statistics) are not linear maps and are not
"normalizations" for this module: they are left untouched (a BatchNorm without running statistics
that is called is reported as unfoldable).
"""
from __future__ import annotations

import copy
import importlib.util
import inspect
import os

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .conv import CenConv2d
from .norm import BatchStatNorm2d

__all__ = [
    "fold_model",
    "fold_conv_norm",
    "plain_model",
    "export_torchvision_state_dict",
    "export_torchscript",
    "export_onnx",
    "is_foldable_norm",
]

_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _frozen_bn_type():
    try:  # torchvision is optional for the library
        from torchvision.ops.misc import FrozenBatchNorm2d

        return (FrozenBatchNorm2d,)
    except Exception:  # pragma: no cover
        return ()


_NORM_TYPES = (_BatchNorm, BatchStatNorm2d) + _frozen_bn_type()


def _is_norm(module: nn.Module) -> bool:
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
    if not _is_norm(norm):
        return False
    return getattr(norm, "running_mean", None) is not None and getattr(norm, "running_var", None) is not None


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


class _LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps convolutions and normalizations as single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_conv(m) or _is_norm(m) or super().is_leaf_module(m, qualname)


def _find_pairs(model: nn.Module) -> tuple[dict[str, str], list[tuple[str, str]]]:
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
        raise ValueError(
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
        if node.op != "call_module" or not _is_norm(modules[node.target]):
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


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _check_eval(model: nn.Module, what: str) -> None:
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(training[:5]) + (", ..." if len(training) > 5 else "")
        raise ValueError(
            f"{what} needs a model in eval mode, but these modules are in training mode: {shown}. "
            f"Call model.eval() first (training-mode normalizations use batch statistics and "
            f"cannot be folded)."
        )


def _bn_from_norm(norm: nn.Module, eps: float | None = None) -> nn.BatchNorm2d:
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


def fold_model(model: nn.Module, strict: bool = True) -> nn.Module:
    """
    Fold every eval-mode normalization that directly follows a convolution into it.

    Args:
        model: an eval-mode model (``model.eval()``), e.g. a torchvision ResNet after
            ``mabn.convert_model``. It is not modified.
        strict: if True, raise ValueError when a normalization cannot be folded (see the pairing
            rule in the module docstring). If False, such a normalization is kept as an eval-mode
            ``nn.BatchNorm2d`` with the same statistics (still linear at inference).

    Returns:
        A deep copy of ``model`` (same class, same submodule names) in which every folded
        convolution is a plain ``nn.Conv{1,2,3}d`` with bias, every folded normalization is
        ``nn.Identity``, and every remaining ``CenConv2d`` is a plain convolution with its centered
        weight. Its forward equals the eval-mode forward of ``model`` up to float rounding. It
        contains no mabn classes, so it can be scripted, exported or loaded without mabn.
    """
    _check_eval(model, "fold_model")
    pairs, unfoldable = _find_pairs(model)
    if unfoldable and strict:
        lines = "\n".join(f"  {name}: {reason}" for name, reason in unfoldable)
        raise ValueError(
            "fold_model: these normalizations do not directly follow a convolution they can be "
            f"folded into:\n{lines}\nPass strict=False to keep them as eval-mode nn.BatchNorm2d "
            "layers (a per-channel affine map)."
        )
    folded = copy.deepcopy(model)
    modules = dict(folded.named_modules())
    for norm_name, conv_name in pairs.items():
        _set_submodule(folded, conv_name, fold_conv_norm(modules[conv_name], modules[norm_name]))
        _set_submodule(folded, norm_name, nn.Identity())
    for name, _ in unfoldable:
        norm = modules[name]
        if isinstance(norm, BatchStatNorm2d) and is_foldable_norm(norm):
            _set_submodule(folded, name, _bn_from_norm(norm))
    done = set(pairs.values())
    for name, m in modules.items():
        if isinstance(m, CenConv2d) and name not in done:
            _set_submodule(folded, name, fold_conv_norm(m, None))
    return folded.eval()


def plain_model(model: nn.Module, eps: float | None = None) -> nn.Module:
    """
    A deep copy of ``model`` expressed with stock torch layers, without folding.

    Every ``CenConv2d`` becomes an ``nn.Conv2d`` holding its centered weight (eq. 18) and every
    mabn family normalization becomes an ``nn.BatchNorm2d`` with the same weight, bias,
    running_mean, running_var and num_batches_tracked (the family's extra buffers, e.g. SMA
    windows, are dropped). The eval-mode forward is unchanged because a family layer's eval is
    F.batch_norm on those very tensors. The training mode flag of each layer is kept, but
    training-mode behaviour is of course that of stock BatchNorm.

    Args:
        eps: if given, every resulting BatchNorm2d gets this eps and ``running_var`` absorbs the
            difference (so that ``running_var + eps`` is unchanged), which is needed when the
            target architecture (e.g. torchvision's, eps=1e-5) builds its BatchNorm2d with a
            different eps than the trained layers used. Stock nn.BatchNorm2d layers are adjusted
            the same way.
    """
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, CenConv2d):
            _set_submodule(out, name, fold_conv_norm(m, None))
        elif isinstance(m, BatchStatNorm2d) or (
            eps is not None and type(m) is nn.BatchNorm2d and m.track_running_stats and m.eps != eps
        ):
            _set_submodule(out, name, _bn_from_norm(m, eps))
    return out


def export_torchvision_state_dict(model: nn.Module, eps: float = 1e-5) -> dict[str, torch.Tensor]:
    """
    State dict of ``plain_model(model, eps)``: loads with ``strict=True`` into the stock
    architecture the model was converted from.

    For a torchvision ResNet converted by ``mabn.convert_model`` (any family normalization, with or
    without weight centralization) the result loads into e.g. ``torchvision.models.resnet50()``
    with no missing or unexpected keys, and the loaded model's eval-mode outputs equal the
    converted model's. Each family norm maps 1:1 onto the BatchNorm2d of the same name (for the
    modified form running_mean is 0 and running_var is the EMA of E[x^2]); the conv weights are
    centralized. Works on models in either mode; the returned tensors are detached copies.

    Args:
        eps: the eps of the target architecture's BatchNorm2d (torchvision: 1e-5).
    """
    return {k: v.detach().clone() for k, v in plain_model(model, eps=eps).state_dict().items()}


def _example_for(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor:
    if example_input is not None:
        return example_input
    p = next(model.parameters())
    return torch.randn(1, 3, 224, 224, device=p.device, dtype=p.dtype)


def export_torchscript(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor | None = None,
    fold: bool = True,
) -> torch.jit.ScriptModule:
    """
    Save ``model`` (folded with :func:`fold_model` unless ``fold=False``) as TorchScript.

    The model is compiled with ``torch.jit.script``; if that fails and ``example_input`` is given,
    it is traced with it instead. Load with ``torch.jit.load(path)``.

    Returns:
        The ScriptModule that was saved.
    """
    _check_eval(model, "export_torchscript")
    m = fold_model(model) if fold else model
    try:
        scripted = torch.jit.script(m)
    except Exception:
        if example_input is None:
            raise
        with torch.no_grad():
            scripted = torch.jit.trace(m, (example_input,))
    scripted.save(os.fspath(path))
    return scripted


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor | None = None,
    fold: bool = True,
    opset_version: int | None = None,
    dynamic_batch: bool = True,
) -> None:
    """
    Export ``model`` (folded unless ``fold=False``) to ONNX with input "input" and output
    "output" (a dynamic batch dimension when ``dynamic_batch``).

    Requires the optional ``onnx`` package (and what torch.onnx.export needs in this torch
    version); raises ImportError saying so when it is missing.

    Args:
        example_input: the tracing input; default a 1x3x224x224 randn of the model's dtype/device.
    """
    if importlib.util.find_spec("onnx") is None:
        raise ImportError("export_onnx needs the optional 'onnx' package: pip install onnx onnxscript")
    _check_eval(model, "export_onnx")
    m = fold_model(model) if fold else model
    x = _example_for(m, example_input)
    kwargs = {"input_names": ["input"], "output_names": ["output"]}
    if opset_version is not None:
        kwargs["opset_version"] = opset_version
    if dynamic_batch and "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs.update(dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},))
    elif dynamic_batch:  # the TorchScript-based exporter of torch < 2.5
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(m, (x,), os.fspath(path), **kwargs)
