"""Batch normalization with configurable forward and backward statistics.

One layer family, :class:`BatchStatNorm2d`, covers every normalization of the paper
"Towards Stabilizing Batch Statistics in Backward Propagation of Batch Normalization"
(Yan et al., ICLR 2020) and of its ablations (Tables 2 and 4): vanilla BN, BN on small
normalization groups, Batch Renormalization (BRN), the modified (un-centred) form and
Moving Average Batch Normalization (MABN). The named presets at the end of this file set the
paper's defaults.

Notation (one channel; all statistics are per channel)
-------------------------------------------------------
Forward, vanilla form (eq. 1-3)::

    Y = (X - mu) / sqrt(v + eps),          Z = gamma * Y + beta

Forward, modified form (eq. 15), no centring::

    Y = X / sqrt(q + eps),   q = chi^2 = E[X^2]

Backward (eq. 4-5; eq. 16 for the modified form, where g = 0)::

    dL/dX = (dL/dY - g - Y * Psi) / sqrt(v + eps),   g = E[dL/dY],   Psi = E[Y * dL/dY]

Exact semantics of a training forward/backward
-----------------------------------------------
Iteration ``t`` counts training forwards from 1 (``num_batches_tracked`` holds ``t`` after the
forward). The incoming batch of N samples is split, in order, into ``N / b`` groups of ``b =
norm_batch_size`` consecutive samples (appendix B.2); ``norm_batch_size=None`` means one group.
For each group k:

* batch statistics: vanilla ``mu_k`` and the biased variance ``v_k`` over the group's samples and
  pixels (eq. 2); modified ``q_k`` = mean of ``x^2`` over the same elements (eq. 15).
* SMA (eq. 13): every group's statistic is pushed, in batch order, into a window of the last
  ``m = buffer_size`` group statistics that persists across iterations; group k's SMA is the mean
  of the window entries ending with its own (fewer than m entries while the window fills). This is
  the sliding alignment of the authors' code (groups k+1.. of the previous iteration and 0..k of
  this one when m equals the number of groups). For the vanilla form the window holds (mu_k, v_k)
  and the SMA variance is the mean of the group variances.
* EMA (eq. 12): updated once per training forward, after use, with the mean over groups of the
  batch statistics; ``alpha`` is the paper's weight of the OLD value
  (``ema <- alpha * ema + (1 - alpha) * batch``). The constructor also accepts torch's
  ``momentum`` (the weight of the NEW value, ``momentum = 1 - alpha``), never both. The
  variance EMA stores the unbiased estimate ``v * n / (n - 1)`` (n = elements per group), as
  nn.BatchNorm2d does; chi^2 is stored as is. ``ema_init="first"``
  starts the EMA at the first training batch's value (the authors' code), ``"torch"`` starts
  from mean 0 / variance 1 like nn.BatchNorm2d.
* ``s`` = the ``bp_stats`` statistic (batch, SMA or EMA); the layer computes
  ``Y = (x - mu_s) / sqrt(v_s + eps)`` (modified: ``x / sqrt(q_s + eps)``).
* ``f`` = the ``fp_stats`` statistic. Renormalization (eq. 14, eq. 19)::

      r = clip(sqrt(v_s + eps) / sqrt(v_f + eps), 1 / r_max, r_max)
      d = clip((mu_s - mu_f) / sqrt(v_f + eps), -d_max, d_max)      (vanilla only; modified d = 0)
      Yhat = r * Y + d,   output = weight * Yhat + bias

  so that, unclipped, the output is normalized by the ``fp_stats`` statistic. r and d carry no
  gradient.
* Backward (eq. 20): ``G = r * dL/dYhat``; the group's backward statistics ``g_k = mean(G)``
  (vanilla only) and ``Psi_k = mean(Y * G)`` are computed, pushed into their own SMA window (same
  alignment as the forward window) and their own EMA (updated once per backward, ema_init as
  above); then ``dL/dx = (G - g_u - Y * Psi_u) / sqrt(v_s + eps)`` where ``(g_u, Psi_u)`` are the
  group's own statistics when ``bp_stats="batch"`` (this is then the exact gradient of Y through
  its batch statistics, eq. 4/16) and the SMA / EMA statistics otherwise. ``weight`` and ``bias``
  get their exact gradients.
* Warm-ups: while ``t <= warmup_iters`` both passes use the batch statistics and r = 1, d = 0;
  while ``t <= renorm_warmup_iters``, r = 1 and d = 0. Windows and EMAs are updated throughout.

Eval mode uses the EMA statistics: exactly
``F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)`` (for the modified
form ``running_mean`` stays 0 and ``running_var`` holds the EMA of chi^2), a per-channel affine map
that folds into the preceding convolution and whose buffers load into a stock nn.BatchNorm2d.

Implementation: every per-group computation is vectorized (per-(sample, channel) reductions over
H*W, then sums over the consecutive samples of each group; no Python loop over channels); the
normalization and its eq. 20 backward are one autograd Function that never materialises Y: the
forward reads x once for its statistics and once for the output ``x * scale + offset``; the
backward reads dL/dout and x once for its two reductions and once more for dx. The statistics
between those passes (~100 small operations on (group, channel) tensors: SMA windows, EMAs,
renormalization, coefficients) are two pure functions, :func:`_forward_statistics` and
:func:`_backward_statistics`. On the CPU in eager mode with float32 tensors (contiguous or
channels_last), :mod:`mabn.kernels` (C++, built on first use) runs the whole training forward
and its backward as one call each (:class:`_NativeNormalize`): one loop per pass (the
per-(group, channel) sums of channels_last rows, the per-plane sums of contiguous tensors, the
output, eq. 20's ``dout * a + x * b + c``) and the two statistics functions as C++ loops. The
Python path (:class:`_NormalizeAffine` and the functions it calls) stays the reference, tested
against it for every option set, and is the path everywhere else. ``MABN_CPU_KERNELS=off``
(or ``mabn.kernels.MODE = "off"``) keeps every step in torch operations, as do float64 tensors:
contiguous inputs reduced as (1, N*C, H, W) planes by torch's BatchNorm backward reduction kernel
(see _channel_sums), channels_last ones one normalization group at a time through the same
kernel (small ones, under _CHUNK elements, by plain products), dx by two multiply-adds. Group
variances come from float64 combinations of float32 partial sums; when an input is so badly
centred that this loses precision (mean^2 > 16 var), and always on CUDA, torch's centred
var_mean kernel is used instead. Statistics are computed in float32 for half-precision inputs
(autocast) and the output keeps the input's dtype and memory format (channels_last stays
channels_last); it is a tensor of its own, so in-place ops may follow. On CUDA and under
torch.compile every step is a plain torch expression (the compiler fuses them).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

__all__ = [
    "BatchStatNorm2d",
    "OptionError",
    "check_options",
    "resolve_alpha",
    "BatchNorm2d",
    "BatchRenorm2d",
    "ModifiedBatchNorm2d",
    "MABN2d",
    "FORMS",
    "STATISTICS",
    "EMA_INITS",
]

FORMS = ("vanilla", "modified")
STATISTICS = ("batch", "ema", "sma")
EMA_INITS = ("first", "torch")


class OptionError(ValueError):
    """An invalid option value of the normalization layers; ``option`` names it."""

    def __init__(self, option: str, value, requirement: str):
        self.option = option
        self.value = value
        super().__init__(f"{option}={value!r} {requirement}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: The checks of :func:`check_options`: option -> (predicate, requirement text).
_CHECKS = {
    "form": (lambda v: v in FORMS, f"is not one of {', '.join(map(repr, FORMS))}"),
    "fp_stats": (lambda v: v in STATISTICS, f"is not one of {', '.join(map(repr, STATISTICS))}"),
    "bp_stats": (lambda v: v in STATISTICS, f"is not one of {', '.join(map(repr, STATISTICS))}"),
    "ema_init": (lambda v: v in EMA_INITS, f"is not one of {', '.join(map(repr, EMA_INITS))}"),
    "norm_batch_size": (lambda v: v is None or (_is_int(v) and v >= 1), "must be None or a positive integer"),
    "alpha": (lambda v: isinstance(v, (int, float)) and 0.0 <= v < 1.0,
              "must be in [0, 1) (the paper's alpha: the weight of the OLD value in the EMA, eq. 12)"),
    "momentum": (lambda v: isinstance(v, (int, float)) and 0.0 < v <= 1.0,
                 "must be in (0, 1] (torch's momentum: the weight of the NEW value, 1 - alpha)"),
    "buffer_size": (lambda v: _is_int(v) and v >= 1, "must be an integer >= 1"),
    "eps": (lambda v: isinstance(v, (int, float)) and v > 0, "must be > 0"),
    "r_max": (lambda v: isinstance(v, (int, float)) and v >= 1.0, "must be >= 1"),
    "d_max": (lambda v: isinstance(v, (int, float)) and v >= 0.0, "must be >= 0"),
    "warmup_iters": (lambda v: _is_int(v) and v >= 0, "must be an integer >= 0"),
    "renorm_warmup_iters": (lambda v: _is_int(v) and v >= 0, "must be an integer >= 0"),
}


def check_options(**options) -> None:
    """Check option values of :class:`BatchStatNorm2d` (any subset, by keyword).

    The one place where the layer's value ranges are defined: the constructor calls it, and so do
    :func:`mabn.build_norm` and the trainer's config validation (which names its config key).
    Raises :class:`OptionError` (a ValueError) naming the first bad option; unknown names are a
    TypeError.
    """
    for name, value in options.items():
        if name not in _CHECKS:
            raise TypeError(f"check_options got an unknown option {name!r}; known: {list(_CHECKS)}")
        ok, requirement = _CHECKS[name]
        if not ok(value):
            raise OptionError(name, value, requirement)


class _Unset:
    """Default of ``momentum``: distinguishes "not given" from torch's ``momentum=None``."""

    def __repr__(self) -> str:
        return "<not given>"


_UNSET = _Unset()


def resolve_alpha(alpha: float | None, momentum=_UNSET, default: float = 0.9) -> float:
    """The paper's alpha (eq. 12, weight of the OLD value) from ``alpha`` or torch's ``momentum``.

    ``momentum`` has torch's meaning (weight of the NEW value): alpha = 1 - momentum. Giving both
    is an error; so is ``momentum=None`` (torch's cumulative moving average, which the layers do
    not implement). Neither given: ``default``.
    """
    if momentum is _UNSET:
        alpha = default if alpha is None else alpha
        check_options(alpha=alpha)
        return float(alpha)
    if alpha is not None:
        raise ValueError(f"give either alpha={alpha!r} (the paper's weight of the OLD value) or "
                         f"momentum={momentum!r} (torch's weight of the NEW value, 1 - alpha), not both")
    if momentum is None:
        raise OptionError("momentum", None, "(torch's cumulative moving average) is not supported: give "
                                            "alpha, the weight of the old value of the EMA (eq. 12)")
    check_options(momentum=momentum)
    return 1.0 - float(momentum)


def _sliding_mean(window, valid, new):
    """Simple moving averages of ``new`` (G, K, C) continuing ``window`` (m-1, K, C).

    Group k's average is the mean of the valid entries among the last m of
    ``cat(window, new)`` ending at ``new[k]``. ``valid`` (m-1,) marks the filled window rows (0/1).
    Returns the averages (G, K, C) and the updated (window, valid).
    """
    m = window.shape[0] + 1
    seq = torch.cat([window, new.to(window.dtype)], 0)
    seq_valid = torch.cat([valid, valid.new_ones(new.shape[0])], 0)
    sums = seq.unfold(0, m, 1).sum(-1)  # (G, K, C)
    counts = seq_valid.unfold(0, m, 1).sum(-1)  # (G,)
    sma = sums / counts[:, None, None]
    g = new.shape[0]  # the window keeps the last m - 1 entries
    return sma, seq[g:], seq_valid[g:]


def _ema_update(running, value, alpha, first):
    """running <- alpha * running + (1 - alpha) * value, or value itself where ``first`` is true."""
    value = value.to(running.dtype)
    updated = running * alpha + value * (1.0 - alpha)
    if first is not None:
        updated = torch.where(first, value, updated)
    running.copy_(updated)


#: Largest channels_last tensor, in elements, whose reductions are formed through a full-size
#: product on the CPU (2^18 floats, 1 MiB); larger ones go through torch's BatchNorm reduction
#: kernel one group at a time. A full-size temporary (e.g. ``(a * b).sum(...)`` on a ResNet-50
#: activation, ~100 MB) is a fresh allocation whose pages are faulted in on first touch: on the
#: VMs this project runs on that costs 5-8x a pass over the same memory.
_CHUNK = 1 << 18


def _rows(x):
    """``x`` (N, C, H, W) viewed without a copy as ``(N, C, H*W)`` (contiguous, reduce dim 2) or
    ``(N, H*W, C)`` (channels_last, reduce dim 1); ``(None, None)`` for any other layout."""
    n, c, h, w = x.shape
    if x.is_contiguous():
        return x.view(n, c, h * w), 2
    if x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).view(n, h * w, c), 1
    return None, None


def _eager_cpu(x) -> bool:
    """Whether the CPU kernels below apply (plane, block and view tricks; eager mode on the CPU);
    elsewhere one plain expression per pass (torch.compile fuses them, CUDA's are fast as they are)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _channel_sums(a, b, zero=None, one=None):
    """Per-channel ``sum(b)`` and ``sum(b * a)`` over (N, H, W) in one pass over both, by
    torch's BatchNorm backward reduction (its weight and bias gradients with mean 0 and inverse
    std 1, which may be passed in as ``zero`` and ``one``); ``a`` and ``b`` are 4-D tensors of
    one layout. Returns two (C,) tensors in a's dtype."""
    if zero is None:
        zero = torch.zeros(a.shape[1], dtype=a.dtype, device=a.device)
        one = torch.ones(a.shape[1], dtype=a.dtype, device=a.device)
    _, s_ba, s_b = torch.ops.aten.native_batch_norm_backward(
        b, a, None, None, None, zero, one, True, 0.0, [False, True, True])
    return s_b, s_ba


def _plane_sums(x, with_sum: bool = True):
    """Per-(sample, channel) sum (None unless ``with_sum``) and sum of squares of a 4-D tensor
    over H, W: float64 (N, C) each.

    Each memory format is reduced in its own layout without copying the input, reading it once.
    On the CPU: contiguous inputs as (1, N*C, H, W) planes (the sum of squares by vector_norm,
    both sums together by torch's BatchNorm reduction, see _channel_sums); channels_last inputs
    on their (N, H*W, C) view reduced over the middle axis (the channels stay the vectorized
    inner loop), through one product; _group_sums reduces large channels_last inputs without it.
    The sums are accumulated in float32 per plane and combined in float64, so that the group
    variance E[x^2] - mu^2 is formed without float32 cancellation between planes.
    """
    rows, dim = _rows(x)
    if rows is None:  # other strides: torch's generic reductions
        return (x.sum((2, 3)).double() if with_sum else None), x.square().sum((2, 3)).double()
    n, c, h, w = x.shape
    if not _eager_cpu(x):  # the compiler fuses; avoids vector_norm's decomposition
        s1 = rows.sum(dim).double() if with_sum else None  # (miscompiled gradients in torch 2.14,
        return s1, (rows * rows).sum(dim).double()  # see mabn/engine/compiling.py)
    if dim == 2:  # contiguous: one pass over every (sample, channel) plane
        if not with_sum:
            return None, torch.linalg.vector_norm(rows, 2, dim=2).double().square()
        planes = x.view(1, n * c, h, w)
        s1, s2 = _channel_sums(planes, planes)
        return s1.double().view(n, c), s2.double().view(n, c)
    # channels_last: one product (vector_norm over the middle axis is a slow path); large
    # channels_last inputs are reduced by _group_sums without this full-size temporary
    s1 = rows.sum(1).double() if with_sum else None
    return s1, (rows * rows).sum(1).double()


def _kernel_rows(dout, x):
    """``(extension, dout rows, x rows, dim)`` (see _rows) where mabn's C++ kernels apply to the
    pair: float32 CPU tensors in eager mode, both contiguous or both channels_last, kernels on
    and built; else None."""
    ext = kernels.enabled(dout, x)
    if ext is None:
        return None
    rd, dim = _rows(dout)
    rx, dim_x = _rows(x)
    if rd is None or dim != dim_x:
        return None
    return ext, rd, rx, dim


def _kernel_dot_sums(dout, x, groups):
    """Per-(group, channel) ``sum(dout)`` and ``sum(dout * x)``, float64 (G, C) each, in one pass
    by mabn's C++ kernels (mabn.kernels), or None where they do not apply (not float32 CPU eager
    tensors of one layout, contiguous or channels_last; kernels off or not built). channels_last
    rows (N, H*W, C) are summed per group over the (G, b*H*W, C) view, contiguous ones per
    (sample, channel) plane over H*W, then over each group's samples."""
    found = _kernel_rows(dout, x)
    if found is None:
        return None
    ext, rd, rx, dim = found
    n, c = x.shape[:2]
    if dim == 1:
        sums = ext.column_dot_sums(rd.reshape(groups, -1, c), rx.reshape(groups, -1, c))  # (2, G, C)
        return sums[0], sums[1]
    sums = ext.row_dot_sums(rd.reshape(n * c, -1), rx.reshape(n * c, -1)).view(2, n, c)
    return _group_sum(sums[0], groups), _group_sum(sums[1], groups)


def _group_images(t, groups):
    """A channels_last (N, C, H, W) tensor as (G, C, b*H, W) channels_last views without a copy,
    one image per normalization group of b consecutive samples (a sample's channels cannot share
    one channel axis with other samples' in that layout, so torch's per-channel kernels see one
    group at a time)."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(groups, (n // groups) * h, w, c).permute(0, 3, 1, 2)


def _group_sums(x, groups, with_sum: bool = True):
    """Per-(group, channel) sum (None unless ``with_sum``) and sum of squares over the group's
    samples and H, W: float64 (G, C) each, the forward statistics of eq. 2 / eq. 15.

    Large channels_last inputs on the CPU (eager): _group_dot_sum(x, x), i.e. one group at a
    time as a (1, C, b*H, W) channels_last image, both sums in one pass by torch's BatchNorm
    backward reduction (the same kernel, and the same float32 accumulation, as the backward's
    reductions and as nn.BatchNorm2d's own). Everything else: the
    per-(sample, channel) sums of _plane_sums, summed over each group's samples in float64."""
    sums = _kernel_dot_sums(x, x, groups)
    if sums is not None:  # mabn.kernels: sum(x) and sum(x * x) in one pass
        return (sums[0] if with_sum else None), sums[1]
    if _rows(x)[1] == 1 and _eager_cpu(x) and x.numel() > _CHUNK:
        s1, s2 = _group_dot_sum(x, x, groups)  # its per-group channels_last images, dout = x
        return (s1 if with_sum else None), s2
    s1, s2 = _plane_sums(x, with_sum)
    return (None if s1 is None else _group_sum(s1, groups)), _group_sum(s2, groups)


#: Above this ratio mean^2 / variance, E[x^2] - mu^2 in float32 loses too many digits: the layer
#: then recomputes the statistics (and the backward reduction) with centred, Welford-style kernels.
_CANCELLATION_RATIO = 16.0


def _group_dot_sum(dout, x, groups):
    """Per-(group, channel) ``sum(dout)`` and ``sum(dout * x)`` over the group's samples and
    H, W, float64 (G, C) each: the two reductions of eq. 20's backward, reading both inputs once.
    On the CPU both come from torch's BatchNorm backward reduction (_channel_sums): contiguous
    inputs as (1, N*C, H, W) planes in one call (then summed per group), channels_last ones one
    group at a time, each group's b consecutive samples seen as one (1, C, b*H, W) channels_last
    image (a sample's channels cannot share one channel axis with other samples' in that
    layout)."""
    sums = _kernel_dot_sums(dout, x, groups)
    if sums is not None:
        return sums
    rd, dim = _rows(dout)
    rx, dim_x = _rows(x)
    if rd is None or dim != dim_x:  # layouts differ (or are neither format): generic reductions
        sd, sdx = dout.sum((2, 3)).double(), (dout * x).sum((2, 3)).double()
    elif not _eager_cpu(x) or (dim == 1 and x.numel() <= _CHUNK):  # (small: one product)
        sd, sdx = rd.sum(dim).double(), (rd * rx).sum(dim).double()
    elif dim == 2:
        n, c, h, w = x.shape
        sd, sdx = _channel_sums(x.view(1, n * c, h, w), dout.view(1, n * c, h, w))
        sd, sdx = sd.double().view(n, c), sdx.double().view(n, c)
    else:
        c = x.shape[1]
        zero, one = x.new_zeros(c), x.new_ones(c)
        sums = [_channel_sums(gx, gd, zero, one)
                for gx, gd in zip(_group_images(x, groups).split(1), _group_images(dout, groups).split(1))]
        return torch.stack([s for s, _ in sums]).double(), torch.stack([s for _, s in sums]).double()
    return _group_sum(sd, groups), _group_sum(sdx, groups)


def _affine_rows(x, scale, offset):
    """``x * scale + offset`` with per-(sample, channel) coefficients (N, C) (``offset`` may be
    None), in x's layout, one pass, into a new tensor (not a view). float32 inputs on the CPU in
    eager mode: mabn.kernels (scale_shift). Otherwise channels_last inputs are
    computed on their (N, H*W, C) view (at 7x7 maps torch's broadcast of (N, C, 1, 1)
    coefficients over a channels_last tensor is ~5x slower than this). Contiguous ones on the CPU
    by BatchNorm's inference kernel on (1, N*C, H, W) planes with weight ``scale``, bias
    ``offset``, mean 0, variance 1 and eps 0, which computes exactly ``x * scale + offset`` at the
    speed of a plain multiply (torch's addcmul with broadcast (N, C, 1, 1) coefficients takes ~1.7x
    as long; scripts/bench_norm.py shows the layer's total). On CUDA and under torch.compile: one
    broadcast multiply-add."""
    rx, dim = _rows(x)
    ext = kernels.enabled(x, scale) if rx is not None else None
    if ext is not None:  # mabn.kernels: one pass, streaming stores for large outputs
        offset = scale.new_empty(0) if offset is None else offset  # (empty: the kernel reads zeros)
        out = torch.empty_like(x)  # x's layout; written through its rows view (returned: not a view,
        ext.scale_shift(rx, scale.to(torch.float32).contiguous(),  # in-place ops may follow)
                        offset.to(torch.float32).contiguous(), dim == 1, kernels.stream(out), _rows(out)[0])
        return out
    if not _eager_cpu(x):
        dim = None
    if dim == 1:  # written through the (N, H*W, C) view of a new channels_last tensor (not a view:
        out = torch.empty_like(x)  # in-place ops such as ReLU(inplace=True) may follow)
        rout = _rows(out)[0]
        if offset is None:
            torch.mul(rx, scale[:, None, :], out=rout)
        else:
            torch.addcmul(offset[:, None, :], rx, scale[:, None, :], out=rout)
        return out
    if dim == 2:  # through BatchNorm's inference kernel on (1, N*C, H, W) planes
        n, c, h, w = x.shape
        out = torch.empty_like(x)
        planes = n * c
        torch.ops.aten.native_batch_norm.out(
            x.view(1, planes, h, w), scale.reshape(planes), None if offset is None else offset.reshape(planes),
            x.new_zeros(planes), x.new_ones(planes), False, 0.0, 0.0,
            out=out.view(1, planes, h, w), save_mean=x.new_empty(0), save_invstd=x.new_empty(0))
        return out
    if offset is None:
        return torch.mul(x, scale[:, :, None, None])
    return torch.addcmul(offset[:, :, None, None], x, scale[:, :, None, None])


def _fused_input_gradient(dout, x, a, b, const):
    """``dout * a + x * b + const`` in one pass over dout and x by mabn's C++ kernel
    (mabn.kernels; 3 memory passes, not the 5 of two eager multiply-adds, whose intermediate
    eager torch must write and read back), or None where it does not apply: not float32 CPU
    eager tensors, layouts that differ or are neither format, kernels off or not built.
    Computed on the (N, C, H*W) / (N, H*W, C) views of both inputs with (N, C) coefficients."""
    found = _kernel_rows(dout, x)
    if found is None:
        return None
    ext, rd, rx, dim = found
    if const is None:  # (an empty tensor: the kernel reads zeros)
        const = a.new_empty(0)
    a, b, const = (t.to(torch.float32).contiguous() for t in (a, b, const))
    dx = torch.empty_like(x)  # x's layout, written through its rows view
    ext.multiply_adds(rd, rx, a, b, const, dim == 1, kernels.stream(dx), _rows(dx)[0])
    return dx


def _input_gradient(dout, x, a, b, const):
    """``dout * a + x * b (+ const)`` with per-(sample, channel) coefficients (N, C) (``const``
    may be None): eq. 20's input gradient. One pass where _fused_input_gradient applies; else two
    fused multiply-adds in x's layout (the first one by _affine_rows; the second on the
    (N, H*W, C) views when both are channels_last on the CPU)."""
    dx = _fused_input_gradient(dout, x, a, b, const)
    if dx is not None:
        return dx
    dx = _affine_rows(x, b, const)
    rd, dim = _rows(dout)
    if dim == 1 and _rows(x)[1] == 1 and _eager_cpu(x):
        _rows(dx)[0].addcmul_(rd, a[:, None, :])
        return dx
    return dx.addcmul_(dout, a[:, :, None, None])


def _group_sum(t, groups):
    """(N, C) per-sample sums -> (G, C) per-group sums (groups of consecutive samples)."""
    return t.view(groups, -1, t.shape[-1]).sum(1)


def _sample_rows(t, groups, n):
    """(G, C) or (1, C) per-group coefficients -> (N, C), one row per sample."""
    c = t.shape[1]
    return t[:, None, :].expand(groups, n // groups, c).reshape(n, c)


def _per_sample(t, groups, n):
    """(G, C) or (1, C) per-group coefficients -> (N, C, 1, 1), to broadcast against the input."""
    return _sample_rows(t, groups, n)[:, :, None, None]


class _NormalizeAffine(torch.autograd.Function):
    """``out = Y * a + c`` with ``Y = (x - shift) * inv_std`` per (group, channel), eq. 19/20.

    ``a = weight * r`` and ``c = weight * d + bias`` (G, C) are differentiable (they carry the
    affine parameters' gradients); ``shift`` and ``inv_std`` (G, C) are constants (the ``bp_stats``
    statistic), and the input gradient is eq. 20 with the backward statistics chosen by
    ``layer.bp_stats``. Y is never materialised: the forward is one fused pass
    ``out = x * (a * inv_std) + (c - a * inv_std * shift)`` and the backward two passes plus two
    reductions, with x saved instead of Y.
    """

    @staticmethod
    def forward(ctx, x, shift, inv_std, a, c, layer, warm, centred):
        groups, n = inv_std.shape[0], x.shape[0]
        scale = a * inv_std
        offset = c if shift is None else c - scale * shift
        out = _affine_rows(x, _sample_rows(scale, groups, n), _sample_rows(offset.expand_as(scale), groups, n))
        ctx.save_for_backward(x, shift, inv_std, a)
        ctx.layer = layer
        ctx.warm = warm
        ctx.centred = centred
        return out

    @staticmethod
    def backward(ctx, dout):
        x, shift, inv_std, a = ctx.saved_tensors
        layer = ctx.layer
        dout = dout.to(x.dtype)
        groups, n = inv_std.shape[0], x.shape[0]
        count = (n // groups) * x.shape[2] * x.shape[3]
        if ctx.centred:  # badly centred input: reduce dout * (x - shift) directly
            s_dout, s_dout_x = _group_dot_sum(dout, x - _per_sample(shift.to(x.dtype), groups, n), groups)
        else:
            s_dout, s_dout_x = _group_dot_sum(dout, x, groups)
        a_rows, b_rows, k_rows, sum_dout_y, sum_dout, g_0, psi_0 = _backward_statistics(
            s_dout, s_dout_x, inv_std, shift, a, count, n, ctx.warm, ctx.centred,
            layer.bp_window, layer.bp_window_valid, layer.running_g, layer.running_psi,
            layer.num_backward_tracked, layer._options())
        if layer.record_used_statistics:
            _record_backward(layer, g_0, psi_0)
        dx = _input_gradient(dout, x, a_rows, b_rows, k_rows)
        return dx, None, None, sum_dout_y, sum_dout, None, None, None


class _Options(NamedTuple):
    """A layer's options as the statistics functions see them (constants to torch.compile)."""
    vanilla: bool
    fp_stats: str
    bp_stats: str
    ema_init: str
    warmup_iters: int
    renorm_warmup_iters: int
    r_max: float
    d_max: float
    eps: float
    alpha: float


def _select(which, batch, sma, ema):
    return {"batch": batch, "sma": sma, "ema": ema}[which]


def _forward_statistics(batch, count, fp_window, fp_window_valid, running_mean, running_var,
                        num_batches_tracked, o: _Options):
    """One training forward's statistics from the groups' batch statistics ``batch`` (G, K, C):
    returns ``(s0, inv_std, shift, r, d, warm)`` (the bp_stats statistic s of the first group,
    (K, C); ``1 / sqrt(v_s + eps)`` and the shift ``mu_s`` (G, C; shift None for the modified
    form); the renormalization r and d (G, C), None where they are 1 and 0; the warm-up flag, a
    0-dim bool tensor or None), and updates the SMA window, the EMAs and the iteration counter in
    place, after use (eq. 12-14, 19). A function of tensors and constants only, so that
    torch.compile can fuse its ~50 small operations (a compiled layer); the eager float32 CPU
    path runs its C++ version (forward_statistics in mabn/csrc/norm_statistics.cpp)."""
    groups = batch.shape[0]
    # The value the EMA takes in this iteration: mean over groups, unbiased variance.
    ema_value = batch.mean(0, keepdim=True)  # (1, K, C)
    if o.vanilla:
        ema_value = torch.cat([ema_value[:, :1], ema_value[:, 1:] * (count / (count - 1))], 1)
    sma = window = valid = None
    if "sma" in (o.fp_stats, o.bp_stats):
        sma, window, valid = _sliding_mean(fp_window, fp_window_valid, batch)
        sma = sma.to(batch.dtype)
    ema = (torch.stack([running_mean, running_var])[None] if o.vanilla else running_var[None, None]).to(batch.dtype)
    first = num_batches_tracked == 0 if o.ema_init == "first" else None
    if first is not None and "ema" in (o.fp_stats, o.bp_stats):
        ema = torch.where(first, ema_value, ema)
    s = _select(o.bp_stats, batch, sma, ema)
    f = _select(o.fp_stats, batch, sma, ema)
    # t <= limit, with t = num_batches_tracked + 1 before the update
    warm = num_batches_tracked < o.warmup_iters if o.warmup_iters > 0 else None
    if warm is not None:
        s = torch.where(warm, batch, s)
        f = torch.where(warm, batch, f)
    s = s.expand(groups, -1, -1)
    inv_std_s = torch.rsqrt(s[:, -1] + o.eps)  # (G, C)
    shift = s[:, 0].contiguous() if o.vanilla else None
    # Renormalization (eq. 14 / 19); r = 1, d = 0 when s and f are the same statistic.
    r = d = None
    if o.fp_stats != o.bp_stats or warm is not None:
        inv_std_f = torch.rsqrt(f[:, -1] + o.eps)
        r = ((s[:, -1] + o.eps).sqrt() * inv_std_f).clamp(1.0 / o.r_max, o.r_max)
        if o.vanilla:
            d = ((s[:, 0] - f[:, 0]) * inv_std_f).clamp(-o.d_max, o.d_max)
        limit = max(o.warmup_iters, o.renorm_warmup_iters)
        if limit > 0:
            off = num_batches_tracked < limit
            r = torch.where(off, torch.ones_like(r), r)
            if d is not None:
                d = torch.where(off, torch.zeros_like(d), d)
    s0 = s[0].clone()  # (not a view of an EMA buffer updated below)
    # SMA window and EMA updates, after use (eq. 12, 13).
    if sma is not None:
        fp_window.copy_(window)
        fp_window_valid.copy_(valid)
    if o.vanilla:
        _ema_update(running_mean, ema_value[0, 0], o.alpha, first)
    _ema_update(running_var, ema_value[0, -1], o.alpha, first)
    num_batches_tracked.add_(1)
    return s0, inv_std_s, shift, r, d, warm


def _backward_statistics(s_dout, s_dout_x, inv_std, shift, a, count, n, warm, centred, bp_window,
                         bp_window_valid, running_g, running_psi, num_backward_tracked, o: _Options):
    """One backward's statistics and eq. 20's coefficients, from the groups' reductions
    ``s_dout`` = sum(dL/dout) and ``s_dout_x`` = sum(dL/dout * x) (or * (x - shift) when
    ``centred``), float64 (G, C): pushes the groups' g_B (vanilla) and Psi_B (eq. 5 with
    G = a * dL/dout = weight * r * dL/dYhat) into their SMA window and EMA (after use) and returns
    the per-sample rows (N, C) of ``dL/dx = dout * a_rows + x * b_rows + k_rows`` (k_rows None
    when 0), the affine parameters' gradient sums ``sum(dL/dout * Y)`` and ``sum(dL/dout)``
    (G, C), and g_u, Psi_u of the first group (g_u None for the modified form). Tensors and
    constants only, like _forward_statistics."""
    groups = inv_std.shape[0]
    sum_dout = s_dout.to(a.dtype)  # (G, C)
    if centred:
        sum_dout_y = inv_std * s_dout_x.to(a.dtype)
    else:
        sum_dout_x = s_dout_x.to(a.dtype)
        sum_dout_y = inv_std * (sum_dout_x if shift is None else sum_dout_x - shift * sum_dout)
    psi_b = a * sum_dout_y / count
    g_b = a * sum_dout / count if o.vanilla else None
    # The groups' backward statistics into their SMA window and EMA; (g_u, Psi_u) by bp_stats.
    stats = psi_b[:, None] if g_b is None else torch.stack([g_b, psi_b], 1)  # (G, K, C)
    mean = stats.mean(0)  # (K, C)
    first = num_backward_tracked == 0 if o.ema_init == "first" else None
    if o.bp_stats == "batch":
        u = stats
    elif o.bp_stats == "sma":
        u, window, valid = _sliding_mean(bp_window, bp_window_valid, stats)
        bp_window.copy_(window)
        bp_window_valid.copy_(valid)
    else:  # EMA of the previous backwards ("after use"); the current mean on the first one
        ema = torch.stack([running_g, running_psi])[-stats.shape[1]:]
        u = ema[None] if first is None else torch.where(first, mean, ema)[None]
    u = u.to(stats.dtype)
    if warm is not None and o.bp_stats != "batch":
        u = torch.where(warm, stats, u)
    if g_b is not None:
        _ema_update(running_g, mean[0], o.alpha, first)
    _ema_update(running_psi, mean[-1], o.alpha, first)
    num_backward_tracked.add_(1)
    g_u, psi_u = (None if g_b is None else u[:, 0]), u[:, -1]
    # Eq. 20: dL/dx = (G - g_u - Y * Psi_u) * inv_std with Y = (x - shift) * inv_std, i.e.
    # dL/dx = dout * (a inv) + x * (-Psi_u inv^2) + (Psi_u inv^2 shift - g_u inv).
    coef_x = -psi_u * inv_std * inv_std
    const = None if shift is None else -coef_x * shift
    if g_u is not None:
        const = -g_u * inv_std if const is None else const - g_u * inv_std
    return (_sample_rows(a * inv_std, groups, n), _sample_rows(coef_x.expand_as(a), groups, n),
            None if const is None else _sample_rows(const.expand_as(a), groups, n),
            sum_dout_y, sum_dout, None if g_u is None else g_u[0].clone(), psi_u[0].clone())


def _float32_contiguous(*tensors) -> bool:
    return all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def _native_layer(layer, x):
    """mabn's C++ extension where _NativeNormalize applies to ``layer`` and its (compute-dtype)
    input ``x``: float32 CPU tensors in eager mode (mabn.kernels.enabled), x contiguous or
    channels_last, the parameters and buffers contiguous float32 ones; else None."""
    ext = kernels.enabled(x)
    if ext is None or not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return None
    if not _float32_contiguous(layer.weight, layer.bias, layer.running_mean, layer.running_var, layer.running_g,
                               layer.running_psi, layer.fp_window, layer.fp_window_valid, layer.bp_window,
                               layer.bp_window_valid):
        return None
    return ext


class _NativeNormalize(torch.autograd.Function):
    """A layer's whole training forward, and its eq. 20 backward, as one C++ call each
    (mabn/csrc/norm_layer.cpp, with the kernels of mabn.kernels and C++ versions of
    _forward_statistics and _backward_statistics): the path of eager float32 CPU layers. It does
    what _forward_train's Python path and _NormalizeAffine do, step for step, without their
    ~100 dispatched operations and autograd nodes per call; the Python path stays the reference
    (tests/test_norm.py compares the two for every option set)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, ext, groups):
        o = layer._options()
        (out, inv_std, shift, r, d, warm, s0), centred = ext.train_forward(
            x, groups, weight, bias, layer.fp_window, layer.fp_window_valid, layer.running_mean, layer.running_var,
            layer.num_batches_tracked, o.vanilla, o.fp_stats, o.bp_stats, o.ema_init == "first", o.warmup_iters,
            o.renorm_warmup_iters, o.r_max, o.d_max, o.eps, o.alpha, _CANCELLATION_RATIO, kernels.stream(x))
        ctx.save_for_backward(x, weight, inv_std, shift, r, d)
        ctx.layer, ctx.ext, ctx.warm, ctx.centred = layer, ext, warm, centred
        if layer.record_used_statistics:
            _record_forward(layer, s0, r, o.vanilla)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, inv_std, shift, r, d = ctx.saved_tensors
        layer = ctx.layer
        o = layer._options()
        layout = torch.contiguous_format if x.is_contiguous() else torch.channels_last
        dx, grad_weight, grad_bias, g_0, psi_0 = ctx.ext.train_backward(
            dout.to(x.dtype).contiguous(memory_format=layout), x, weight, inv_std, shift, r, d, ctx.warm,
            ctx.centred, layer.bp_window, layer.bp_window_valid, layer.running_g, layer.running_psi,
            layer.num_backward_tracked, o.vanilla, o.bp_stats, o.ema_init == "first", o.alpha, kernels.stream(x))
        if layer.record_used_statistics:
            _record_backward(layer, g_0, psi_0)
        return dx, grad_weight, grad_bias, None, None, None


def _record_forward(layer, s0, r, vanilla):
    """``layer.used_statistics`` after a training forward (see BatchStatNorm2d.record_used_statistics)."""
    used = {"mean": s0[0], "var": s0[1]} if vanilla else {"chi2": s0[0]}
    used["r"] = torch.ones_like(s0[-1]) if r is None else r[0]
    layer.used_statistics = {k: v.detach().clone() for k, v in used.items()}


def _record_backward(layer, g_0, psi_0):
    """... and after its backward: Psi (and g, vanilla) of the first group."""
    layer.used_statistics["psi"] = psi_0
    if g_0 is not None:
        layer.used_statistics["g"] = g_0


class BatchStatNorm2d(nn.Module):
    """Normalization of 4-D inputs with configurable forward/backward statistics.

    See the module docstring for the exact semantics and equation numbers. Shaped like
    nn.BatchNorm2d: every argument after ``num_features`` is keyword-only, ``device``/``dtype``
    are factory arguments (``device="meta"`` works), the parameters and buffers of nn.BatchNorm2d
    have the same names, and a stock nn.BatchNorm2d state_dict loads with ``strict=True`` (see
    :meth:`_load_from_state_dict`).

    Args:
        num_features: channels C of the (N, C, H, W) input.
        form: ``"vanilla"`` (centre by mu, scale by sigma; eq. 1) or ``"modified"`` (scale by
            chi = sqrt(E[x^2]), no centring; eq. 15).
        fp_stats: statistic the forward pass effectively normalizes with:
            ``"batch"``, ``"ema"`` or ``"sma"`` (applied through renormalization r, d).
        bp_stats: statistic used to compute Y and in the backward pass (eq. 4, 16, 20).
        norm_batch_size: b, samples per normalization group (appendix B.2); None = whole batch.
        alpha: the paper's alpha (eq. 12), weight of the OLD value in the EMA, in [0, 1);
            0.9 for BN/BRN, 0.98 for MABN. None: the class's :attr:`default_alpha`.
        momentum: torch's momentum, weight of the NEW value, in (0, 1]: it means
            ``alpha = 1 - momentum``, so ``MABN2d(c, momentum=0.1)`` keeps 0.9 of the old value
            exactly as ``nn.BatchNorm2d(c, momentum=0.1)`` does. Give ``alpha`` or ``momentum``,
            not both; ``momentum=None`` (torch's cumulative average) is refused. Readable (and
            assignable) afterwards as the property :attr:`momentum`.
        buffer_size: m, SMA window length counted in normalization groups (>= 1; eq. 13).
        eps: added to the variance / chi^2.
        r_max: lambda; r is clipped to [1/r_max, r_max] (>= 1; eq. 14, 19).
        d_max: d is clipped to [-d_max, d_max] (vanilla form only, >= 0; eq. 14).
        warmup_iters: iterations t <= warmup_iters use batch statistics in both passes, r=1, d=0.
        renorm_warmup_iters: iterations t <= renorm_warmup_iters use r = 1, d = 0.
        ema_init: ``"first"`` (EMA starts at the first value, as the authors' code) or
            ``"torch"`` (starts at mean 0 / variance 1 / g 0 / Psi 0, as nn.BatchNorm2d).
        device, dtype: where and in which floating type parameters and buffers are created, as
            torch's factory arguments (the two iteration counters stay int64).
    """

    #: State-dict format. 1: the original buffers. 2: the same buffers; a state_dict without the
    #: MABN-only buffers (a stock nn.BatchNorm2d's) is accepted, see :meth:`_load_from_state_dict`.
    _version = 2
    #: alpha when neither ``alpha`` nor ``momentum`` is given (eq. 12; appendix B.2).
    default_alpha = 0.9
    #: The buffers nn.BatchNorm2d does not have: EMAs of g and Psi, the SMA windows (eq. 12-13).
    MABN_BUFFERS = ("running_g", "running_psi", "num_backward_tracked", "fp_window",
                    "fp_window_valid", "bp_window", "bp_window_valid")

    def __init__(
        self,
        num_features: int,
        *,
        form: str = "vanilla",
        fp_stats: str = "batch",
        bp_stats: str = "batch",
        norm_batch_size: int | None = None,
        alpha: float | None = None,
        momentum: float | None = _UNSET,
        buffer_size: int = 16,
        eps: float = 1e-5,
        r_max: float = 5.0,
        d_max: float = 5.0,
        warmup_iters: int = 0,
        renorm_warmup_iters: int = 0,
        ema_init: str = "first",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not _is_int(num_features) or num_features < 1:
            raise OptionError("num_features", num_features, "must be a positive integer")
        alpha = resolve_alpha(alpha, momentum, self.default_alpha)
        check_options(form=form, fp_stats=fp_stats, bp_stats=bp_stats, ema_init=ema_init,
                      norm_batch_size=norm_batch_size, buffer_size=buffer_size, eps=eps,
                      r_max=r_max, d_max=d_max, warmup_iters=warmup_iters,
                      renorm_warmup_iters=renorm_warmup_iters)

        self.num_features = num_features
        self.form = form
        self.fp_stats = fp_stats
        self.bp_stats = bp_stats
        self.norm_batch_size = norm_batch_size
        self.alpha = alpha
        self.buffer_size = buffer_size
        self.eps = float(eps)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_iters = warmup_iters
        self.renorm_warmup_iters = renorm_warmup_iters
        self.ema_init = ema_init
        #: When true (set by mabn.stats.StatisticsRecorder), each training forward/backward stores
        #: the statistics it used for the FIRST group in ``used_statistics`` (detached):
        #: "mean"/"var" (vanilla) or "chi2" (modified) of the bp_stats statistic s, "r", and after
        #: the backward "g" (vanilla) and "psi". Off by default: it costs one attribute check.
        self.record_used_statistics = False
        self.used_statistics: dict[str, torch.Tensor] = {}

        f = {"device": device, "dtype": dtype}
        k = 2 if form == "vanilla" else 1  # forward statistics per group: (mu, v) or (q,)
        self.weight = nn.Parameter(torch.ones(num_features, **f))
        self.bias = nn.Parameter(torch.zeros(num_features, **f))
        # EMA of the forward statistics (eq. 12); names match nn.BatchNorm2d.
        self.register_buffer("running_mean", torch.zeros(num_features, **f))
        self.register_buffer("running_var", torch.ones(num_features, **f))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        # EMA of the backward statistics g and Psi (used when bp_stats="ema").
        self.register_buffer("running_g", torch.zeros(num_features, **f))
        self.register_buffer("running_psi", torch.zeros(num_features, **f))
        self.register_buffer("num_backward_tracked", torch.tensor(0, dtype=torch.long, device=device))
        # SMA windows (eq. 13): the last m-1 group statistics, oldest first, and their validity.
        self.register_buffer("fp_window", torch.zeros(buffer_size - 1, k, num_features, **f))
        self.register_buffer("fp_window_valid", torch.zeros(buffer_size - 1, **f))
        self.register_buffer("bp_window", torch.zeros(buffer_size - 1, k, num_features, **f))
        self.register_buffer("bp_window_valid", torch.zeros(buffer_size - 1, **f))

    @property
    def momentum(self) -> float:
        """torch's momentum, ``1 - alpha`` (the weight of the NEW value); assigning it sets alpha."""
        return 1.0 - self.alpha

    @momentum.setter
    def momentum(self, value: float) -> None:
        self.alpha = resolve_alpha(None, value)

    def __setstate__(self, state: dict) -> None:
        # Whole modules pickled before _version 2 stored the paper's alpha under "momentum".
        if "alpha" not in state and "momentum" in state:
            state = dict(state)
            state["alpha"] = state.pop("momentum")
        super().__setstate__(state)

    @classmethod
    def convert_batchnorm(cls, module: nn.Module, **options) -> nn.Module:
        """Replace every 2-D BatchNorm of ``module`` by ``cls(num_features, **options)``.

        The counterpart of ``nn.SyncBatchNorm.convert_sync_batchnorm``: every torch BatchNorm of
        4-D inputs (``nn.modules.batchnorm._BatchNorm`` subclasses: nn.BatchNorm2d,
        nn.SyncBatchNorm, ...) becomes a ``cls`` layer on its device and dtype, with its affine
        parameters, running statistics and train/eval mode, and ``alpha = 1 - momentum`` unless
        ``options`` give ``alpha`` or ``momentum`` (rules of :func:`mabn.convert_model`).
        ``options`` are the constructor's keywords, e.g.
        ``MABN2d.convert_batchnorm(model, norm_batch_size=2, alpha=0.98)``. Layers that already
        are mabn layers are left alone (idempotent). Returns ``module``, or the new layer when
        ``module`` itself is a BatchNorm.
        """
        from .build import convert_batchnorm  # build imports this module

        return convert_batchnorm(cls, module, **options)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Accept a stock nn.BatchNorm2d state_dict with ``strict=True``.

        When NONE of the :attr:`MABN_BUFFERS` is in ``state_dict`` (a stock BatchNorm's
        state_dict), they keep their current (fresh) values: empty SMA windows and zero EMAs of g
        and Psi. For the modified form (eq. 15, running_mean is 0 and running_var the EMA of
        chi^2 = E[x^2]) the stock statistics are converted: chi^2 = var + mean^2, mean 0. A
        state_dict of torch's BatchNorm before its version 2 may also lack
        ``num_batches_tracked`` (taken as 0, as torch does). A partial set of MABN buffers is
        still reported missing.
        """
        mabn_keys = [prefix + name for name in self.MABN_BUFFERS]
        stock = (prefix + "running_var" in state_dict and not any(k in state_dict for k in mabn_keys))
        if stock:
            for name, key in zip(self.MABN_BUFFERS, mabn_keys):
                state_dict[key] = getattr(self, name).detach().clone()
            if self.form == "modified" and prefix + "running_mean" in state_dict:
                mean = state_dict[prefix + "running_mean"]
                state_dict[prefix + "running_var"] = state_dict[prefix + "running_var"] + mean * mean
                state_dict[prefix + "running_mean"] = torch.zeros_like(mean)
            version = local_metadata.get("version")
            if (version is None or version < 2) and prefix + "num_batches_tracked" not in state_dict:
                state_dict[prefix + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # ------------------------------------------------------------------ state
    def reset_running_stats(self) -> None:
        """Zero the EMAs (variance to 1), the iteration counters and the SMA windows."""
        for name in ("running_mean", "running_g", "running_psi", "num_batches_tracked",
                     "num_backward_tracked", "fp_window", "fp_window_valid", "bp_window",
                     "bp_window_valid"):
            getattr(self, name).zero_()
        self.running_var.fill_(1.0)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        s = (f"{self.num_features}, form={self.form}, fp_stats={self.fp_stats}, "
             f"bp_stats={self.bp_stats}, norm_batch_size={self.norm_batch_size}, "
             f"alpha={self.alpha}, eps={self.eps}")
        if "sma" in (self.fp_stats, self.bp_stats):
            s += f", buffer_size={self.buffer_size}"
        if self.fp_stats != self.bp_stats:
            s += f", r_max={self.r_max}"
            if self.form == "vanilla":
                s += f", d_max={self.d_max}"
        if self.warmup_iters or self.renorm_warmup_iters:
            s += f", warmup_iters={self.warmup_iters}, renorm_warmup_iters={self.renorm_warmup_iters}"
        return s

    # ------------------------------------------------------------------ helpers
    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")

    def _groups(self, x: torch.Tensor) -> int:
        self._check_input(x)
        if x.shape[1] != self.num_features:
            raise ValueError(f"input has {x.shape[1]} channels but num_features={self.num_features}")
        n = x.shape[0]
        b = self.norm_batch_size or n
        if n % b != 0:
            raise ValueError(f"batch size {n} is not divisible by norm_batch_size={b}")
        if self.form == "vanilla" and b * x.shape[2] * x.shape[3] < 2:
            raise ValueError(f"vanilla normalization needs more than 1 value per channel in a group "
                             f"(norm_batch_size={b}, input shape {tuple(x.shape)})")
        return n // b

    def _options(self) -> _Options:
        return _Options(self.form == "vanilla", self.fp_stats, self.bp_stats, self.ema_init,
                        int(self.warmup_iters), int(self.renorm_warmup_iters), float(self.r_max),
                        float(self.d_max), float(self.eps), float(self.alpha))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self._check_input(x)
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        return self._forward_train(x)

    def _forward_train(self, x: torch.Tensor) -> torch.Tensor:
        groups = self._groups(x)
        n, c, h, w = x.shape
        in_dtype = x.dtype
        # Statistics in at least float32 (autocast / half inputs), output in the input's dtype.
        compute_dtype = torch.promote_types(in_dtype, torch.float32)
        x = x.to(compute_dtype)
        ext = _native_layer(self, x)
        if ext is not None:  # mabn's C++ layer: eager float32 CPU
            return _NativeNormalize.apply(x, self.weight, self.bias, self, ext, groups).to(in_dtype)
        count = (n // groups) * h * w
        vanilla = self.form == "vanilla"

        with torch.no_grad():
            # Batch statistics of every group (eq. 2 / eq. 15), shape (G, K, C).
            s1, s2 = _group_sums(x, groups, with_sum=vanilla)
            second = s2 / count
            centred = False
            if vanilla:
                mean = s1 / count
                var = (second - mean * mean).clamp_min(0.0)
                # Off the eager CPU path (CUDA; torch.compile, where the data-dependent test would
                # break the graph) the centred kernel is always used.
                if compute_dtype != torch.float64 and (
                        not _eager_cpu(x)
                        or bool((mean * mean > _CANCELLATION_RATIO * (var + self.eps)).any())):
                    # One-pass E[x^2] - mu^2 is inaccurate here: use torch's centred kernel.
                    var, mean = torch.var_mean(x.view(groups, n // groups, c, h, w), dim=(1, 3, 4),
                                               correction=0)
                    centred = True
                batch = torch.stack([mean, var], 1)
            else:
                batch = second[:, None]
            batch = batch.to(compute_dtype)
            s0, inv_std_s, shift, r, d, warm = _forward_statistics(
                batch, count, self.fp_window, self.fp_window_valid,
                self.running_mean, self.running_var, self.num_batches_tracked, self._options())

        # Affine coefficients per (group, channel): out = Y * a + c, a = weight*r, c = weight*d + bias.
        weight = self.weight.to(compute_dtype)
        bias = self.bias.to(compute_dtype)
        a = weight.expand(groups, c) if r is None else weight * r
        c_ = bias.expand(groups, c) if d is None else torch.addcmul(bias, weight, d)
        out = _NormalizeAffine.apply(x, shift, inv_std_s, a, c_, self, warm, centred)
        if self.record_used_statistics:
            _record_forward(self, s0, r, vanilla)
        return out.to(in_dtype)


# ---------------------------------------------------------------------- presets
# Each preset fixes form/fp_stats/bp_stats and sets the paper's defaults; every other argument
# (alpha or momentum, eps, device, dtype, ...) is passed on, keyword-only, to BatchStatNorm2d.
class BatchNorm2d(BatchStatNorm2d):
    """Vanilla BN (eq. 1-5) on normalization groups of ``norm_batch_size`` samples.

    With ``norm_batch_size=None`` it equals nn.BatchNorm2d with the same ``momentum`` (alpha =
    1 - momentum, default alpha 0.9), including the running statistics (``ema_init="torch"``).
    """

    def __init__(self, num_features, *, norm_batch_size=None, **kwargs):
        kwargs.setdefault("ema_init", "torch")
        super().__init__(num_features, form="vanilla", fp_stats="batch", bp_stats="batch",
                         norm_batch_size=norm_batch_size, **kwargs)


class BatchRenorm2d(BatchStatNorm2d):
    """Batch Renormalization (Ioffe 2017; eq. 14): vanilla form, EMA in the forward pass, batch
    statistics in the backward pass, r clipped to [1/r_max, r_max] and d to [-d_max, d_max];
    alpha 0.9 unless given."""

    def __init__(self, num_features, *, norm_batch_size=None, r_max=3.0, d_max=5.0,
                 renorm_warmup_iters=100, **kwargs):
        super().__init__(num_features, form="vanilla", fp_stats="ema", bp_stats="batch",
                         norm_batch_size=norm_batch_size, r_max=r_max, d_max=d_max,
                         renorm_warmup_iters=renorm_warmup_iters, **kwargs)


class ModifiedBatchNorm2d(BatchStatNorm2d):
    """The modified normalization of eq. 15-16: x / sqrt(E[x^2] + eps), batch statistics;
    alpha 0.9 unless given."""

    def __init__(self, num_features, *, norm_batch_size=None, **kwargs):
        super().__init__(num_features, form="modified", fp_stats="batch", bp_stats="batch",
                         norm_batch_size=norm_batch_size, **kwargs)


class MABN2d(BatchStatNorm2d):
    """Moving Average Batch Normalization (eq. 19-20), a drop-in for nn.BatchNorm2d.

    Modified form; the forward pass normalizes with the EMA of chi^2 (alpha = 0.98 unless
    ``alpha`` or torch's ``momentum`` is given: ``momentum=0.1`` means alpha = 0.9) through
    r = clip(chi_SMA / chi_EMA, 1/r_max, r_max); Y and the backward pass use the SMA over the last
    ``buffer_size`` = 16 normalization groups of chi^2 and Psi. r = 1 for the first
    ``renorm_warmup_iters`` iterations. Pair it with :class:`mabn.CenConv2d` (eq. 18).
    """

    default_alpha = 0.98

    def __init__(self, num_features, *, norm_batch_size=None, buffer_size=16, r_max=5.0,
                 renorm_warmup_iters=100, **kwargs):
        super().__init__(num_features, form="modified", fp_stats="ema", bp_stats="sma",
                         norm_batch_size=norm_batch_size, buffer_size=buffer_size, r_max=r_max,
                         renorm_warmup_iters=renorm_warmup_iters, **kwargs)
