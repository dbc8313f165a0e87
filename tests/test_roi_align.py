"""mabn.detection.roi_align: torchvision's RoIAlign with the CPU backward as a sparse product,
checked against torchvision's own op (forward and backward) and against finite differences."""

import pytest
import torch
from torchvision import ops

from mabn.detection.roi_align import MultiScaleRoIAlign, bilinear_taps, roi_align


def random_rois(n_images, count, extent, dtype, seed):
    """RoIs [count, 5] over images of side ``extent``: some reach past the border, some are
    thinner than one cell."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(count, 2, generator=g, dtype=dtype) * extent * 1.2 - extent * 0.1
    wh = torch.rand(count, 2, generator=g, dtype=dtype) * extent * 0.6
    wh[: count // 5] *= 0.02  # below one feature cell
    index = torch.randint(0, n_images, (count, 1), generator=g).to(dtype)
    return torch.cat([index, xy, xy + wh], 1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_roi_align_matches_torchvision_forward_and_backward(aligned, sampling_ratio):
    """float64: the same pooled values and the same feature gradient as torchvision's op."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 11, 9, dtype=torch.float64, requires_grad=True)
    rois = random_rois(3, 50, 40.0, torch.float64, seed=sampling_ratio)
    grad = torch.randn(50, 4, 5, 3, dtype=torch.float64)
    ours = roi_align(x, rois, (5, 3), 0.25, sampling_ratio, aligned)
    (g_ours,) = torch.autograd.grad(ours, x, grad)
    ref = ops.roi_align(x, rois, (5, 3), 0.25, sampling_ratio, aligned)
    (g_ref,) = torch.autograd.grad(ref, x, grad)
    assert torch.equal(ours, ref)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)
    assert g_ref.abs().sum() > 0


def test_roi_align_gradient_is_the_finite_difference_one():
    """gradcheck (float64): the sparse backward against the forward's numerical Jacobian."""
    torch.manual_seed(1)
    x = torch.randn(2, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = random_rois(2, 8, 28.0, torch.float64, seed=5)
    assert torch.autograd.gradcheck(lambda f: roi_align(f, rois, (3, 2), 0.25, 2, False), (x,))


def test_bilinear_taps_by_hand():
    """One RoI, one bin, one sample: the centre of [x 0..2, y 0..2] at scale 1 is (1, 1): a
    single cell, weight 1; at (x 0..1, y 0..3) the sample (0.5, 1.5) splits 4 ways by 1/4."""
    rois = torch.tensor([[0.0, 0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 0.0, 1.0, 3.0]], dtype=torch.float64)
    cell, pooled, weight = bilinear_taps(rois, 4, 5, (1, 1), 1.0, 1, False)
    by_roi = [{int(c): float(w) for c, w, p in zip(cell, weight, pooled) if int(p) == r and w > 0} for r in (0, 1)]
    assert by_roi[0] == {1 * 5 + 1: 1.0}
    assert by_roi[1] == {1 * 5 + 0: 0.25, 1 * 5 + 1: 0.25, 2 * 5 + 0: 0.25, 2 * 5 + 1: 0.25}


def test_roi_align_without_rois_and_the_adaptive_grid_fall_back_cleanly():
    """No RoIs: a zero gradient of the features' shape; sampling_ratio 0 (a grid per RoI) is
    torchvision's op, backward included."""
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    out = roi_align(x, torch.zeros(0, 5), (2, 2), 1.0, 2)
    out.sum().backward()
    assert out.shape == (0, 2, 2, 2) and torch.equal(x.grad, torch.zeros_like(x))
    rois = torch.tensor([[0.0, 0.5, 0.5, 4.0, 3.0]])
    adaptive = roi_align(x, rois, (2, 2), 1.0, 0)
    assert "RoiAlign" in type(adaptive.grad_fn).__name__ or "roi_align" in type(adaptive.grad_fn).__name__.lower()
    assert torch.equal(adaptive, ops.roi_align(x, rois, (2, 2), 1.0, 0))


def test_multiscale_pooler_matches_torchvision():
    """The FPN pooler: the same pooled RoIs and feature gradients as torchvision's
    MultiScaleRoIAlign on four levels (boxes of every level, two images)."""
    torch.manual_seed(2)
    side = 448  # boxes of 10-270 px: levels P2-P5 (canonical 224 px at P4)
    feats = {str(k): torch.randn(2, 3, side // 2 ** (k + 2), side // 2 ** (k + 2), dtype=torch.float64,
                                 requires_grad=True) for k in range(4)}
    feats["pool"] = torch.randn(2, 3, 1, 1, dtype=torch.float64)
    boxes = [random_rois(1, 40, float(side), torch.float64, seed=s)[:, 1:] for s in (7, 8)]
    shapes = [(side, side), (side, side)]
    ours, ref = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2), ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    a, b = ours(feats, boxes, shapes), ref(feats, boxes, shapes)
    assert torch.equal(a, b)
    levels = ours.map_levels(boxes)
    assert len(set(levels.tolist())) >= 3  # the boxes reach several levels
    grad = torch.randn_like(a)
    ga = torch.autograd.grad(a, [feats[str(k)] for k in range(4)], grad)
    gb = torch.autograd.grad(b, [feats[str(k)] for k in range(4)], grad)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
