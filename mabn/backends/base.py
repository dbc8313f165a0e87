"""The passes over the data of a training step, as plain torch expressions (the "torch" backend).

:class:`Passes` is the interface every backend of :mod:`mabn.functional` implements: the three
kinds of memory-bound passes of a training step (per-(group, channel) sums, the normalized output,
eq. 20's input gradient). Its own methods are one broadcast torch expression each: the path on
CUDA and under torch.compile (the compiler fuses them; CUDA's kernels are fast as they are), and
the reference the CPU backends are tested against. A new backend (CUDA, Triton) subclasses it
and overrides what it does faster.
"""

from __future__ import annotations

import torch

from .. import functional

__all__ = ["Passes", "rows", "group_sum"]


def rows(x):
    """``x`` (N, C, H, W) viewed without a copy as ``(N, C, H*W)`` (contiguous, reduce dim 2) or
    ``(N, H*W, C)`` (channels_last, reduce dim 1); ``(None, None)`` for any other layout."""
    n, c, h, w = x.shape
    if x.is_contiguous():
        return x.view(n, c, h * w), 2
    if x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).view(n, h * w, c), 1
    return None, None


def group_sum(t, groups):
    """(N, C) per-sample sums -> (G, C) per-group sums (groups of consecutive samples)."""
    return t.view(groups, -1, t.shape[-1]).sum(1)


class Passes:
    """The passes of :func:`mabn.functional.train_forward`, in plain torch expressions."""

    #: This backend's name in :data:`mabn.backends.BACKENDS`.
    name = "torch"
    #: Whether the vanilla batch statistics are always computed centred (torch's var_mean), not
    #: only when E[x^2] - mu^2 would cancel: here, because the test for cancellation is a
    #: data-dependent branch that would break a torch.compile graph (and CUDA's var_mean is fast).
    always_centred = True

    def train_forward(self, layer, x, groups):
        """A training forward of ``layer`` on ``x`` (its compute dtype) with these passes."""
        return functional.train_forward(layer, x, groups, self)

    def group_sums(self, x, groups, with_sum=True):
        """Per-(group, channel) sum (None unless ``with_sum``) and sum of squares of ``x`` over
        each group's samples and H, W: float64 (G, C) each (eq. 2 / eq. 15). The sums are
        accumulated in x's dtype per (sample, channel) and combined in float64, so that the
        group variance E[x^2] - mu^2 is formed without float32 cancellation between samples."""
        s1, s2 = self.sample_sums(x, with_sum)
        return (None if s1 is None else group_sum(s1, groups)), group_sum(s2, groups)

    def sample_sums(self, x, with_sum=True):
        """Per-(sample, channel) sum (None unless ``with_sum``) and sum of squares over H, W,
        float64 (N, C) each."""
        rx, dim = rows(x)
        if rx is None:
            return (x.sum((2, 3)).double() if with_sum else None), x.square().sum((2, 3)).double()
        # (rows * rows, not vector_norm, whose decomposition torch 2.14 miscompiles the gradient
        # of; see mabn/engine/compiling.py)
        return (rx.sum(dim).double() if with_sum else None), (rx * rx).sum(dim).double()

    def group_dot_sums(self, dout, x, groups):
        """Per-(group, channel) ``sum(dout)`` and ``sum(dout * x)`` over each group's samples and
        H, W: float64 (G, C) each, the two reductions of eq. 20's backward."""
        rd, dim = rows(dout)
        rx, dim_x = rows(x)
        if rd is None or dim != dim_x:  # layouts differ (or are neither format)
            sd, sdx = dout.sum((2, 3)).double(), (dout * x).sum((2, 3)).double()
        else:
            sd, sdx = rd.sum(dim).double(), (rd * rx).sum(dim).double()
        return group_sum(sd, groups), group_sum(sdx, groups)

    def affine(self, x, scale, offset):
        """``x * scale + offset`` with per-(sample, channel) coefficients (N, C) (``offset`` may
        be None), into a new tensor in x's layout (not a view: in-place ops may follow)."""
        if offset is None:
            return torch.mul(x, scale[:, :, None, None])
        return torch.addcmul(offset[:, :, None, None], x, scale[:, :, None, None])

    def input_gradient(self, dout, x, a, b, const):
        """Eq. 20's ``dout * a + x * b (+ const)`` with per-(sample, channel) coefficients (N, C)
        (``const`` may be None), in x's layout."""
        dx = self.affine(x, b, const)
        return dx.addcmul_(dout, a[:, :, None, None])
