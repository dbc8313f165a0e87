"""mabn's C++ kernels (:mod:`mabn.kernels`) for eager float32 CPU tensors: two backends.

* ``"cpp_layer"`` (:class:`CppLayer`): a layer's whole training forward, and its eq. 20
  backward, as one C++ call each (``mabn/csrc/norm_layer.cpp``): the passes of
  ``norm_kernels.cpp`` and the statistics of ``norm_statistics.cpp``, the line-by-line twin of
  :func:`mabn.functional.forward_statistics` and :func:`~mabn.functional.backward_statistics`.
  It does what :func:`mabn.functional.train_forward` does, step for step, without its ~100
  dispatched operations and autograd nodes per call (a fixed ~0.5 ms that, at 7x7 maps, cost as
  much as the passes over the data).
* ``"cpp_passes"`` (:class:`CppPasses`): :mod:`mabn.functional`'s statistics in torch, with the
  C++ kernels for each pass whose tensors they take (float32, contiguous or channels_last, one
  layout for both inputs) and the CPU backend's passes for the others: the path of float32
  inputs to a layer whose parameters or buffers are not float32 contiguous tensors.
"""

from __future__ import annotations

import torch

from .. import functional, kernels
from .base import group_sum, rows
from .cpu import CpuPasses

__all__ = ["CppPasses", "CppLayer"]


def _kernel_rows(dout, x):
    """``(extension, dout rows, x rows, dim)`` (see :func:`rows`) where the C++ kernels take the
    pair: float32, both contiguous or both channels_last, the extension built; else None."""
    if dout.dtype != torch.float32 or x.dtype != torch.float32:
        return None
    rd, dim = rows(dout)
    rx, dim_x = rows(x)
    ext = kernels.load()
    if rd is None or dim != dim_x or ext is None:
        return None
    return ext, rd, rx, dim


def _kernel_dot_sums(found, shape, groups):
    """Per-(group, channel) ``sum(dout)`` and ``sum(dout * x)``, float64 (G, C) each, of the pair
    :func:`_kernel_rows` found, in one pass: channels_last rows (N, H*W, C) summed per group over
    the (G, b*H*W, C) view, contiguous ones per (sample, channel) plane, then over each group's
    samples."""
    ext, rd, rx, dim = found
    n, c = shape[:2]
    if dim == 1:
        sums = ext.column_dot_sums(rd.reshape(groups, -1, c), rx.reshape(groups, -1, c))  # (2, G, C)
        return sums[0], sums[1]
    sums = ext.row_dot_sums(rd.reshape(n * c, -1), rx.reshape(n * c, -1)).view(2, n, c)
    return group_sum(sums[0], groups), group_sum(sums[1], groups)


class CppPasses(CpuPasses):
    """The CPU backend's passes, each by one C++ loop where the kernels take its tensors."""

    name = "cpp_passes"

    def group_dot_sums(self, dout, x, groups):
        """As :meth:`Passes.group_dot_sums`, in one pass (:func:`_kernel_dot_sums`)."""
        found = _kernel_rows(dout, x)
        if found is None:
            return super().group_dot_sums(dout, x, groups)
        return _kernel_dot_sums(found, x.shape, groups)

    def group_sums(self, x, groups, with_sum=True):
        """As :meth:`Passes.group_sums`: sum(x) and sum(x * x) in one pass (the dot sums of x, x)."""
        found = _kernel_rows(x, x)
        if found is None:
            return super().group_sums(x, groups, with_sum)
        s1, s2 = _kernel_dot_sums(found, x.shape, groups)
        return (s1 if with_sum else None), s2

    def affine(self, x, scale, offset):
        """As :meth:`Passes.affine`, one pass, with streaming stores for large outputs
        (:func:`mabn.kernels.stream`)."""
        rx, dim = rows(x)
        ext = kernels.load() if rx is not None and x.dtype == scale.dtype == torch.float32 else None
        if ext is None:
            return super().affine(x, scale, offset)
        offset = scale.new_empty(0) if offset is None else offset  # (empty: the kernel reads zeros)
        out = torch.empty_like(x)  # x's layout, written through its rows view
        ext.scale_shift(rx, scale.contiguous(), offset.to(torch.float32).contiguous(), dim == 1,
                        kernels.stream(out), rows(out)[0])
        return out

    def input_gradient(self, dout, x, a, b, const):
        """As :meth:`Passes.input_gradient`, in one pass over dout and x (3 memory passes, not
        the 5 of two eager multiply-adds)."""
        found = _kernel_rows(dout, x)
        if found is None:
            return super().input_gradient(dout, x, a, b, const)
        ext, rd, rx, dim = found
        if const is None:  # (an empty tensor: the kernel reads zeros)
            const = a.new_empty(0)
        a, b, const = (t.to(torch.float32).contiguous() for t in (a, b, const))
        dx = torch.empty_like(x)  # x's layout, written through its rows view
        ext.multiply_adds(rd, rx, a, b, const, dim == 1, kernels.stream(dx), rows(dx)[0])
        return dx


def _float32_contiguous(*tensors) -> bool:
    return all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


class CppLayer:
    """A whole training forward and backward per C++ call; see the module docstring."""

    name = "cpp_layer"

    @staticmethod
    def applies(layer, x) -> bool:
        """Whether the C++ layer takes ``layer`` and its float32 input ``x``: x contiguous or
        channels_last, the parameters and buffers contiguous float32 tensors."""
        return ((x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
                and _float32_contiguous(layer.weight, layer.bias, layer.running_mean, layer.running_var,
                                        layer.running_g, layer.running_psi, layer.fp_window,
                                        layer.fp_window_valid, layer.bp_window, layer.bp_window_valid))

    def train_forward(self, layer, x, groups):
        """A training forward of ``layer`` on ``x`` (float32), differentiable through eq. 20."""
        return _TrainStep.apply(x, layer.weight, layer.bias, layer, kernels.load(), groups)


def layer_options(ext, o) -> object:
    """``ext.LayerOptions`` (mabn/csrc/norm_types.h) of a layer's :class:`mabn.options.NormOptions`."""
    return ext.LayerOptions(vanilla=o.vanilla, fp_stats=o.fp_stats, bp_stats=o.bp_stats,
                            ema_first=o.ema_init == "first", warmup_iters=o.warmup_iters,
                            renorm_warmup_iters=o.renorm_warmup_iters, r_max=o.r_max, d_max=o.d_max,
                            eps=o.eps, alpha=o.alpha, cancellation_ratio=functional.CANCELLATION_RATIO)


class _TrainStep(torch.autograd.Function):
    """The C++ layer's forward and backward as one autograd node."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, ext, groups):
        o = layer.options()
        options = layer_options(ext, o)
        buffers = ext.ForwardBuffers(layer.fp_window, layer.fp_window_valid, layer.running_mean,
                                     layer.running_var, layer.num_batches_tracked)
        step = ext.train_forward(x, groups, weight, bias, buffers, options, kernels.stream(x))
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.ext, ctx.options, ctx.norm = layer, ext, options, step.norm
        if layer.record_used_statistics:
            functional.record_forward(layer, step.s0, step.norm.r, o.vanilla)
        return step.out

    @staticmethod
    def backward(ctx, dout):
        x, weight = ctx.saved_tensors
        layer, ext = ctx.layer, ctx.ext
        layout = torch.contiguous_format if x.is_contiguous() else torch.channels_last
        buffers = ext.BackwardBuffers(layer.bp_window, layer.bp_window_valid, layer.running_g,
                                      layer.running_psi, layer.num_backward_tracked)
        step = ext.train_backward(dout.to(x.dtype).contiguous(memory_format=layout), x, weight, ctx.norm,
                                  buffers, ctx.options, kernels.stream(x))
        if layer.record_used_statistics:
            functional.record_backward(layer, step.g0, step.psi0)
        return step.dx, step.grad_weight, step.grad_bias, None, None, None
