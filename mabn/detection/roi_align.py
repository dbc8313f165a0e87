"""RoIAlign whose CPU backward is one sparse matrix product.

RoIAlign (Mask R-CNN's pooler) is linear in the features: each pooled value is the mean of
``sampling_ratio**2`` bilinear samples, each a weighted sum of 4 feature-map cells. Its gradient
with respect to the features is therefore ``A^T @ grad`` for a sparse matrix ``A`` (one row per
pooled cell, one column per feature-map cell, 4 x sampling_ratio**2 taps per row), the same for
every channel. torchvision's CPU backward instead recomputes every tap's bilinear weights for
every channel, one element at a time: on the small detection protocol it took 25% of a Mask
R-CNN step, ~12x its forward (results/README.md, "Detector speed"). :func:`roi_align` keeps torchvision's forward
and, on the CPU, computes each tap once (:func:`bilinear_taps`, the arithmetic of torchvision's
kernel in the features' dtype) and the gradient as one ``torch.sparse.mm`` over all channels.
On CUDA, and for the adaptive sampling grid (``sampling_ratio <= 0``: a grid per RoI), it is
torchvision's op, backward included.

:class:`MultiScaleRoIAlign` is torchvision's FPN pooler (the same level of each box, the same
scales) pooling each level with :func:`roi_align`.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torchvision import ops
from torchvision.ops import poolers

__all__ = ["roi_align", "bilinear_taps", "MultiScaleRoIAlign"]


def roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: tuple[int, int], spatial_scale: float,
              sampling_ratio: int, aligned: bool = False) -> torch.Tensor:
    """torchvision.ops.roi_align of ``features`` [N, C, H, W] at ``rois`` [R, 5] (batch index,
    x1, y1, x2, y2 in image coordinates): [R, C, *output_size]. The chooser: on the CPU with a
    fixed sampling grid its gradient is the sparse product of :class:`_RoIAlign`; otherwise
    torchvision's own backward."""
    if features.device.type == "cpu" and sampling_ratio > 0 and torch.is_grad_enabled() and features.requires_grad:
        return _RoIAlign.apply(features, rois, tuple(output_size), float(spatial_scale), int(sampling_ratio), aligned)
    return ops.roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)


def bilinear_taps(rois: torch.Tensor, height: int, width: int, output_size: tuple[int, int], spatial_scale: float,
                  sampling_ratio: int, aligned: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every tap of RoIAlign's bilinear sampling: (feature-map cell, pooled cell, weight), each
    flat [R x PH x PW x g x g x 4] with g = ``sampling_ratio``. The cell is ``n * H * W + y * W
    + x``; the pooled cell ``r * PH * PW + ph * PW + pw``; the weight already divided by g*g (the
    mean over the samples), 0 for a sample outside [-1, H] x [-1, W]. torchvision's arithmetic:
    a RoI starts at ``x1 * scale - offset`` (offset 0.5 when ``aligned``), at least 1 cell wide
    unless aligned; sample iy of bin ph at ``y1 + ph * bin_h + (iy + 0.5) * bin_h / g``, clamped
    to >= 0 and, from row H - 1 on, onto the last row."""
    ph_n, pw_n = output_size
    g = sampling_ratio
    offset = 0.5 if aligned else 0.0
    start_x, start_y = rois[:, 1] * spatial_scale - offset, rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - start_x
    roi_h = rois[:, 4] * spatial_scale - offset - start_y
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    y_valid, y_lo, y_hi, y_wlo, y_whi = _axis(_samples(start_y, roi_h / ph_n, ph_n, g), height)  # [R, PH, g]
    x_valid, x_lo, x_hi, x_wlo, x_whi = _axis(_samples(start_x, roi_w / pw_n, pw_n, g), width)   # [R, PW, g]

    def rows(t):  # [R, PH, g] -> [R, PH, g, 1, 1]
        return t[:, :, :, None, None]

    def cols(t):  # [R, PW, g] -> [R, 1, 1, PW, g]
        return t[:, None, None, :, :]

    image = rois[:, 0].long()[:, None, None, None, None] * (height * width)
    cell = torch.stack([image + rows(y_lo) * width + cols(x_lo), image + rows(y_lo) * width + cols(x_hi),
                        image + rows(y_hi) * width + cols(x_lo), image + rows(y_hi) * width + cols(x_hi)], -1)
    weight = torch.stack([rows(y_wlo) * cols(x_wlo), rows(y_wlo) * cols(x_whi),
                          rows(y_whi) * cols(x_wlo), rows(y_whi) * cols(x_whi)], -1)
    weight = weight * (rows(y_valid) & cols(x_valid))[..., None] / (g * g)
    r = torch.arange(rois.shape[0], device=rois.device)[:, None, None, None, None, None]
    ph = torch.arange(ph_n, device=rois.device)[None, :, None, None, None, None]
    pw = torch.arange(pw_n, device=rois.device)[None, None, None, :, None, None]
    pooled = (r * (ph_n * pw_n) + ph * pw_n + pw).expand_as(cell)
    return cell.reshape(-1), pooled.reshape(-1), weight.reshape(-1)


def _samples(start: torch.Tensor, bin_size: torch.Tensor, bins: int, g: int) -> torch.Tensor:
    """[R, bins, g]: the coordinate of sample i of bin b, ``start + b * bin + (i + 0.5) * bin / g``."""
    b = torch.arange(bins, dtype=start.dtype, device=start.device)[None, :, None]
    i = torch.arange(g, dtype=start.dtype, device=start.device)[None, None, :] + 0.5
    size = bin_size[:, None, None]
    return start[:, None, None] + b * size + i * size / g


def _axis(v: torch.Tensor, n: int):
    """Along one axis of n cells: (sample inside [-1, n], low cell, high cell, weight of low, of high)."""
    valid = (v >= -1.0) & (v <= n)
    v = v.clamp(min=0.0)
    lo = v.floor().long()
    last = lo >= n - 1
    lo = torch.where(last, torch.full_like(lo, n - 1), lo)
    hi = torch.where(last, lo, lo + 1)
    frac = torch.where(last, torch.zeros_like(v), v - lo.to(v.dtype))
    return valid, lo, hi, 1.0 - frac, frac


class _RoIAlign(torch.autograd.Function):
    """torchvision's RoIAlign forward; the features' gradient as ``A^T @ grad`` (module doc)."""

    @staticmethod
    def forward(ctx, features, rois, output_size, spatial_scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.setup = (features.shape, features.dtype, output_size, spatial_scale, sampling_ratio, aligned)
        return ops.roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        (n, c, h, w), dtype, output_size, spatial_scale, sampling_ratio, aligned = ctx.setup
        if rois.shape[0] == 0:
            return grad.new_zeros(n, c, h, w, dtype=dtype), None, None, None, None, None
        cell, pooled, weight = bilinear_taps(rois.to(grad.dtype), h, w, output_size, spatial_scale,
                                             sampling_ratio, aligned)
        shape = (n * h * w, rois.shape[0] * output_size[0] * output_size[1])  # A^T: cells x pooled cells
        a_t = torch.sparse_coo_tensor(torch.stack([cell, pooled]), weight, shape, check_invariants=False)
        per_pooled = grad.permute(0, 2, 3, 1).reshape(-1, c)  # [R * PH * PW, C]
        grad_features = torch.sparse.mm(a_t, per_pooled).view(n, h, w, c).permute(0, 3, 1, 2)
        return grad_features.contiguous().to(dtype), None, None, None, None, None


class MultiScaleRoIAlign(poolers.MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (the FPN level of each box from its size, the levels'
    scales inferred from the feature maps) pooling each level with :func:`roi_align`. Same
    arguments and outputs."""

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        features = [v for k, v in x.items() if k in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = poolers._setup_scales(features, image_shapes, self.canonical_scale,
                                                                 self.canonical_level)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
        if len(features) == 1:
            return roi_align(features[0], rois, self.output_size, self.scales[0], self.sampling_ratio)
        levels = self.map_levels(boxes)
        pooled = features[0].new_zeros((rois.shape[0], features[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            index = torch.where(levels == level)[0]
            level_pooled = roi_align(feature, rois[index], self.output_size, scale, self.sampling_ratio)
            pooled[index] = level_pooled.to(pooled.dtype)
        return pooled
