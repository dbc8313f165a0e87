"""Export: a converted model as stock torch layers (and so a stock torchvision state_dict), and
the folded model as TorchScript or ONNX."""

from __future__ import annotations

import copy
import importlib.util
import inspect
import os

import torch
from torch import nn

from ..conv import CenConv2d
from ..norm import BatchStatNorm2d
from .folding import bn_from_norm, check_eval, set_submodule, fold_conv_norm, fold_model

__all__ = ["plain_model", "export_torchvision_state_dict", "export_torchscript", "export_onnx"]

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
            set_submodule(out, name, fold_conv_norm(m, None))
        elif isinstance(m, BatchStatNorm2d) or (
            eps is not None and type(m) is nn.BatchNorm2d and m.track_running_stats and m.eps != eps
        ):
            set_submodule(out, name, bn_from_norm(m, eps))
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
    check_eval(model, "export_torchscript")
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
    check_eval(model, "export_onnx")
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
