"""The passes on the CPU in eager mode, from torch's own fast CPU kernels (the "cpu" backend).

Eager torch on the CPU has no single kernel for the layer's per-(sample, channel) reductions and
per-(sample, channel) affine maps, and its broadcast expressions (:class:`Passes`) cost several
passes over memory each. This backend reaches the fast ones through views: contiguous inputs as
(1, N*C, H, W) planes through torch's BatchNorm kernels (the per-channel sums of its backward,
its inference map), channels_last inputs on their (N, H*W, C) rows, where the channels stay the
vectorized inner loop. It is the CPU path for float64 tensors and wherever mabn's C++ kernels are
off or could not be built; the results equal the C++ backends' up to float32 summation order.
"""

from __future__ import annotations

import torch

from .base import Passes, group_sum, rows

__all__ = ["CpuPasses", "CHUNK", "channel_sums", "group_images"]

#: Largest channels_last tensor, in elements, whose reductions are formed through a full-size
#: product (2^18 floats, 1 MiB); larger ones go through torch's BatchNorm reduction kernel one
#: group at a time. A full-size temporary (e.g. ``(a * b).sum(...)`` on a ResNet-50 activation,
#: ~100 MB) is a fresh allocation whose pages are faulted in on first touch: on the VMs this
#: project runs on that costs 5-8x a pass over the same memory.
CHUNK = 1 << 18


def channel_sums(a, b, zero=None, one=None):
    """Per-channel ``sum(b)`` and ``sum(b * a)`` over (N, H, W) in one pass over both, by torch's
    BatchNorm backward reduction (its weight and bias gradients with mean 0 and inverse std 1,
    which may be passed in as ``zero`` and ``one``); ``a`` and ``b`` are 4-D tensors of one
    layout. Returns two (C,) tensors in a's dtype."""
    if zero is None:
        zero = torch.zeros(a.shape[1], dtype=a.dtype, device=a.device)
        one = torch.ones(a.shape[1], dtype=a.dtype, device=a.device)
    _, s_ba, s_b = torch.ops.aten.native_batch_norm_backward(
        b, a, None, None, None, zero, one, True, 0.0, [False, True, True])
    return s_b, s_ba


def group_images(t, groups):
    """A channels_last (N, C, H, W) tensor as (G, C, b*H, W) channels_last views without a copy,
    one image per normalization group of b consecutive samples (a sample's channels cannot share
    one channel axis with other samples' in that layout, so torch's per-channel kernels see one
    group at a time)."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(groups, (n // groups) * h, w, c).permute(0, 3, 1, 2)


class CpuPasses(Passes):
    """The passes through views onto torch's CPU kernels; see the module docstring."""

    name = "cpu"
    always_centred = False

    def group_sums(self, x, groups, with_sum=True):
        """As :meth:`Passes.group_sums`; large channels_last inputs through
        :meth:`group_dot_sums` (x, x), without a full-size temporary."""
        if rows(x)[1] == 1 and x.numel() > CHUNK:
            s1, s2 = self.group_dot_sums(x, x, groups)
            return (s1 if with_sum else None), s2
        return super().group_sums(x, groups, with_sum)

    def sample_sums(self, x, with_sum=True):
        """As :meth:`Passes.sample_sums`; contiguous inputs in one pass as (1, N*C, H, W) planes
        (the sum of squares alone by vector_norm, both sums by :func:`channel_sums`)."""
        rx, dim = rows(x)
        if dim != 2:
            return super().sample_sums(x, with_sum)
        n, c, h, w = x.shape
        if not with_sum:
            return None, torch.linalg.vector_norm(rx, 2, dim=2).double().square()
        planes = x.view(1, n * c, h, w)
        s1, s2 = channel_sums(planes, planes)
        return s1.double().view(n, c), s2.double().view(n, c)

    def group_dot_sums(self, dout, x, groups):
        """As :meth:`Passes.group_dot_sums`, by :func:`channel_sums`: contiguous inputs as
        (1, N*C, H, W) planes in one call, large channels_last ones one group at a time, each
        group's samples seen as one (1, C, b*H, W) channels_last image (:func:`group_images`)."""
        rd, dim = rows(dout)
        rx, dim_x = rows(x)
        if rd is None or dim != dim_x or (dim == 1 and x.numel() <= CHUNK):
            return super().group_dot_sums(dout, x, groups)
        n, c, h, w = x.shape
        if dim == 2:
            sd, sdx = channel_sums(x.view(1, n * c, h, w), dout.view(1, n * c, h, w))
            return group_sum(sd.double().view(n, c), groups), group_sum(sdx.double().view(n, c), groups)
        zero, one = x.new_zeros(c), x.new_ones(c)
        sums = [channel_sums(gx, gd, zero, one)
                for gx, gd in zip(group_images(x, groups).split(1), group_images(dout, groups).split(1))]
        return torch.stack([s for s, _ in sums]).double(), torch.stack([s for _, s in sums]).double()

    def affine(self, x, scale, offset):
        """As :meth:`Passes.affine`: channels_last inputs on their (N, H*W, C) rows (at 7x7 maps
        torch's broadcast of (N, C, 1, 1) coefficients over a channels_last tensor is ~5x slower);
        contiguous ones by BatchNorm's inference kernel on (1, N*C, H, W) planes with weight
        ``scale``, bias ``offset``, mean 0, variance 1 and eps 0, which computes exactly
        ``x * scale + offset`` at the speed of a plain multiply (a broadcast addcmul takes ~1.7x
        as long)."""
        rx, dim = rows(x)
        if dim == 1:
            out = torch.empty_like(x)
            rout = rows(out)[0]
            if offset is None:
                torch.mul(rx, scale[:, None, :], out=rout)
            else:
                torch.addcmul(offset[:, None, :], rx, scale[:, None, :], out=rout)
            return out
        if dim != 2:
            return super().affine(x, scale, offset)
        n, c, h, w = x.shape
        out = torch.empty_like(x)
        planes = n * c
        torch.ops.aten.native_batch_norm.out(
            x.view(1, planes, h, w), scale.reshape(planes), None if offset is None else offset.reshape(planes),
            x.new_zeros(planes), x.new_ones(planes), False, 0.0, 0.0,
            out=out.view(1, planes, h, w), save_mean=x.new_empty(0), save_invstd=x.new_empty(0))
        return out

    def input_gradient(self, dout, x, a, b, const):
        """As :meth:`Passes.input_gradient`: :meth:`affine` for ``x * b + const``, then the
        multiply-add of ``dout * a`` on the (N, H*W, C) rows when both are channels_last."""
        dx = self.affine(x, b, const)
        rd, dim = rows(dout)
        if dim == 1 and rows(x)[1] == 1:
            rows(dx)[0].addcmul_(rd, a[:, None, :])
            return dx
        return dx.addcmul_(dout, a[:, :, None, None])
