"""The GPU path: run with ``pytest -m cuda tests`` on a machine with a CUDA GPU (every test here
is skipped without one, so the default ``pytest tests`` stays green on a CPU).

(a) The layers on CUDA against the float64 CPU references of tests/test_norm.py (the explicit
    loop re-implementation ``LoopReference`` and torch's nn.BatchNorm2d), at test_norm's
    tolerances; (b) the bf16/fp16 autocast path (output dtype, float32 statistics, finite
    gradients, agreement with float32); (c) 2-iteration trainer runs with device=cuda.
"""

import copy
import math

import pytest
import torch
from torch import nn

import mabn
from _train_utils import read_log, tiny, train_in_process
from mabn import BatchStatNorm2d
from test_norm import COMBOS, D, LoopReference, make_input

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")]
CUDA = "cuda"

#: Unit roundoff u = 2^-p of the half types (p = 8 significant bits for bfloat16, 11 for float16):
#: rounding a real number to the type changes it by at most u relative (normal range).
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


# --------------------------------------------------------------------------- (a) exactness
@pytest.mark.parametrize("form,fp,bp", COMBOS)
@pytest.mark.parametrize("ema_init", ["first", "torch"])
def test_matches_loop_reference_on_cuda(form, fp, bp, ema_init):
    """test_norm.test_matches_loop_reference_over_iterations with the layer on the GPU (float64):
    outputs, gradients and buffers against the float64 CPU loop reference, same tolerances."""
    C, b, m, iters = 3, 2, 5, 9
    kw = dict(form=form, fp_stats=fp, bp_stats=bp, norm_batch_size=b, alpha=0.8, buffer_size=m,
              eps=1e-5, r_max=1.15, d_max=0.2, warmup_iters=2, renorm_warmup_iters=4, ema_init=ema_init)
    layer = BatchStatNorm2d(C, **kw, device=CUDA, dtype=D)
    ref = LoopReference(C, form, fp, bp, b, 0.8, m, 1e-5, 1.15, 0.2, 2, 4, ema_init)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.7, 1.3, -0.4]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    for it in range(iters):
        x = make_input(8, C, 3, 3, seed=it, scale=1.0 + 0.3 * it, offset=0.2 * it)
        up = make_input(8, C, 3, 3, seed=1000 + it)
        xg = x.to(CUDA).requires_grad_()
        y = layer(xg)
        assert y.device.type == torch.device(CUDA).type
        w, bias = layer.weight.detach().cpu(), layer.bias.detach().cpu()
        y_ref, state = ref.forward(x, w, bias)
        torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-10, atol=1e-10, msg=f"output, iteration {it + 1}")
        gx, gw, gb = torch.autograd.grad(y, (xg, layer.weight, layer.bias), up.to(CUDA))
        rx, rw, rb = ref.backward(up, w, state)
        torch.testing.assert_close(gx.cpu(), rx, rtol=1e-10, atol=1e-10, msg=f"dL/dx, iteration {it + 1}")
        torch.testing.assert_close(gw.cpu(), rw, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gb.cpu(), rb, rtol=1e-10, atol=1e-10)
    ema, bp_ema = ref.ema_buffers()
    if form == "vanilla":
        torch.testing.assert_close(layer.running_mean.cpu(), ema["mu"])
        torch.testing.assert_close(layer.running_g.cpu(), bp_ema["g"])
    torch.testing.assert_close(layer.running_var.cpu(), ema["v"])
    torch.testing.assert_close(layer.running_psi.cpu(), bp_ema["psi"])
    assert int(layer.num_batches_tracked) == iters


def test_vanilla_one_group_equals_cpu_batchnorm():
    """mabn.BatchNorm2d (one group) on the GPU equals nn.BatchNorm2d on the CPU, float64, at
    test_norm's tolerances (outputs, gradients, running statistics, eval)."""
    ours = mabn.BatchNorm2d(5, alpha=0.9, device=CUDA, dtype=D)
    ref = nn.BatchNorm2d(5, momentum=0.1).double()
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, 5))
            m.bias.copy_(torch.linspace(-1, 1, 5))
    for it in range(4):
        x = make_input(6, 5, 3, 3, seed=it).requires_grad_()
        xg = x.detach().to(CUDA).requires_grad_()
        up = make_input(6, 5, 3, 3, seed=100 + it)
        y1, y2 = ours(xg), ref(x)
        torch.testing.assert_close(y1.cpu(), y2, rtol=0, atol=1e-12)
        g1 = torch.autograd.grad(y1, (xg, ours.weight, ours.bias), up.to(CUDA))
        g2 = torch.autograd.grad(y2, (x, ref.weight, ref.bias), up)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.running_mean.cpu(), ref.running_mean, rtol=0, atol=1e-14)
    torch.testing.assert_close(ours.running_var.cpu(), ref.running_var, rtol=0, atol=1e-13)
    ours.eval(), ref.eval()
    x = make_input(3, 5, 3, 3, seed=9)
    torch.testing.assert_close(ours(x.to(CUDA)).cpu(), ref(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_float32_on_cuda_matches_float64_cpu(fmt):
    """MABN2d in float32 on the GPU (NCHW and channels_last) against the same layer in float64
    on the CPU: test_norm's float32 tolerances (rtol 1e-4, atol 1e-5)."""
    layer64 = mabn.MABN2d(3, norm_batch_size=2, renorm_warmup_iters=1).double()
    layer32 = mabn.MABN2d(3, norm_batch_size=2, renorm_warmup_iters=1, device=CUDA)
    for it in range(3):
        x64, up64 = make_input(8, 3, 5, 5, seed=it), make_input(8, 3, 5, 5, seed=3 + it)
        xa = x64.clone().requires_grad_()
        xb = x64.float().to(CUDA).contiguous(memory_format=fmt).requires_grad_()
        ya, yb = layer64(xa), layer32(xb)
        assert yb.dtype == torch.float32 and yb.is_contiguous(memory_format=fmt)
        (ga,) = torch.autograd.grad(ya, xa, up64)
        (gb,) = torch.autograd.grad(yb, xb, up64.float().to(CUDA))
        torch.testing.assert_close(yb.double().cpu(), ya, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gb.double().cpu(), ga, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer32.running_var.double().cpu(), layer64.running_var, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 3.0, 100.0])
@pytest.mark.parametrize("bp", ["batch", "sma"])
def test_float32_precision_for_badly_centred_inputs_on_cuda(offset, bp):
    """test_norm.test_float32_precision_for_badly_centred_inputs on the GPU (which always takes
    the centred statistics path), against float64 on the CPU, atol 2e-5 as there."""
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(8, 4, 6, 6, generator=g, dtype=D) + offset
    up = torch.randn(8, 4, 6, 6, generator=g, dtype=D)
    kw = dict(form="vanilla", fp_stats="batch", bp_stats=bp, norm_batch_size=2)
    l32, l64 = BatchStatNorm2d(4, **kw, device=CUDA), BatchStatNorm2d(4, **kw).double()
    for it in range(2):
        xa, xb = x64.float().to(CUDA).requires_grad_(), x64.clone().requires_grad_()
        ya, yb = l32(xa), l64(xb)
        ya.backward(up.float().to(CUDA)), yb.backward(up)
        torch.testing.assert_close(ya.double().cpu(), yb, rtol=0, atol=2e-5)
        torch.testing.assert_close(xa.grad.double().cpu(), xb.grad, rtol=0, atol=2e-5)


@pytest.mark.parametrize("preset", ["BatchNorm2d", "BatchRenorm2d", "ModifiedBatchNorm2d", "MABN2d"])
def test_eval_on_cuda_is_the_folded_affine_map(preset):
    """Eval mode on the GPU: x * gamma / sqrt(running_var + eps) + (beta - running_mean * scale),
    computed on the CPU from the layer's buffers (float64)."""
    layer = getattr(mabn, preset)(4, norm_batch_size=2, device=CUDA, dtype=D)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2)
        layer.bias.uniform_(-1, 1)
    for it in range(3):
        layer(make_input(4, 4, 3, 3, seed=it).to(CUDA)).sum().backward()
    layer.eval()
    x = make_input(3, 4, 3, 3, seed=7)
    w, b, rm, rv = (t.detach().cpu() for t in (layer.weight, layer.bias, layer.running_mean, layer.running_var))
    scale = w / torch.sqrt(rv + layer.eps)
    expected = x * scale[None, :, None, None] + (b - rm * scale)[None, :, None, None]
    torch.testing.assert_close(layer(x.to(CUDA)).cpu(), expected, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- (b) autocast
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("preset", ["BatchNorm2d", "BatchRenorm2d", "ModifiedBatchNorm2d", "MABN2d"])
def test_autocast_equals_float32_on_the_rounded_input(dtype, preset):
    """Under torch.autocast a half-precision input is normalized with float32 statistics and the
    output is rounded back to the input's type. So the result must be the float32 layer's, run on
    the same rounded input and upstream gradient, rounded to ``dtype``: equal up to one unit in
    the last place (2u relative; both float32 computations may differ in their last bits, which
    can move a rounding to the neighbouring half value), for the output and dL/dx; the float32
    parameter gradients and buffers agree to float32 reduction noise (rtol 1e-5). Over 4
    iterations, past the renormalization warm-up, so EMAs and SMA windows take part."""
    u = UNIT_ROUNDOFF[dtype]
    kw = dict(norm_batch_size=2)
    if preset in ("BatchRenorm2d", "MABN2d"):
        kw["renorm_warmup_iters"] = 1
    half = getattr(mabn, preset)(4, **kw, device=CUDA)
    full = copy.deepcopy(half)
    for it in range(4):
        x = make_input(8, 4, 6, 6, seed=it, scale=1.0 + 0.3 * it).float().to(CUDA)
        up = make_input(8, 4, 6, 6, seed=50 + it).float().to(CUDA)
        xh = x.to(dtype).requires_grad_()
        with torch.autocast(CUDA, dtype=dtype):
            yh = half(xh)
        assert yh.dtype == dtype
        yh.backward(up.to(dtype))  # outside autocast, as torch recommends
        assert xh.grad.dtype == dtype and torch.isfinite(xh.grad).all()
        xr = xh.detach().float().requires_grad_()
        yr = full(xr)
        yr.backward(up.to(dtype).float())
        torch.testing.assert_close(yh.float(), yr.detach().to(dtype).float(), rtol=2 * u, atol=1e-7,
                                   msg=f"output, iteration {it + 1}")
        torch.testing.assert_close(xh.grad.float(), xr.grad.to(dtype).float(), rtol=2 * u, atol=1e-7,
                                   msg=f"dL/dx, iteration {it + 1}")
        for p_half, p_full in zip(half.parameters(), full.parameters()):
            assert p_half.grad.dtype == torch.float32 and torch.isfinite(p_half.grad).all()
            torch.testing.assert_close(p_half.grad, p_full.grad, rtol=1e-5, atol=1e-5)
    for (name, b_half), (_, b_full) in zip(half.named_buffers(), full.named_buffers()):
        assert b_half.dtype == b_full.dtype, name  # statistics stay float32 (counters int64)
        torch.testing.assert_close(b_half, b_full, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_mabn_close_to_float32(dtype):
    """MABN2d (gamma 1, beta 0: y = x * r / sqrt(chi^2 + eps)) under autocast against float32 on
    the UNROUNDED input. Bound, with u the unit roundoff of ``dtype``: the input rounding moves
    each x by <= u relative; chi^2 (a mean of squares of positive terms) and hence the EMA and
    SMA statistics by <= 2u, their square roots by <= u each; r = sqrt(SMA) / sqrt(EMA) by <= 2u,
    1 / sqrt(SMA) by <= u; the output rounding adds u: <= 5u relative in all, 6u allowed."""
    u = UNIT_ROUNDOFF[dtype]
    half = mabn.MABN2d(4, norm_batch_size=2, renorm_warmup_iters=1, device=CUDA)
    full = copy.deepcopy(half)
    for it in range(4):
        x = make_input(8, 4, 6, 6, seed=it, scale=1.0 + 0.3 * it).float().to(CUDA)
        with torch.autocast(CUDA, dtype=dtype):
            yh = half(x.to(dtype))
        yr = full(x)
        assert yh.dtype == dtype and torch.isfinite(yh).all()
        torch.testing.assert_close(yh.float(), yr.detach(), rtol=6 * u, atol=1e-6, msg=f"iteration {it + 1}")
        # A check that can fail: the half result is not simply the float32 one.
        assert not torch.equal(yh.float(), yr.detach())


# --------------------------------------------------------------------------- (c) trainer
def test_trainer_on_cuda_matches_the_cpu_first_iteration(tmp_path):
    """Two iterations with device=cuda finish with finite losses; the first iteration's loss
    (same seed, same data and initialization, before any update) agrees with a CPU run's to
    rtol 1e-2: cuDNN convolutions use TF32 by default (10-bit mantissa, ~5e-4 relative per
    product), which moves a loss of ~2.3 by ~1e-3."""
    gpu = train_in_process(tiny(tmp_path / "gpu", iterations=2, device="cuda"))
    cpu = train_in_process(tiny(tmp_path / "cpu", iterations=1, device="cpu"))
    assert gpu["status"] == "finished" and gpu["iteration"] == 2
    losses = [row["loss"] for row in read_log(tmp_path / "gpu")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert "device cuda" in (tmp_path / "gpu" / "log.txt").read_text()
    assert losses[0] == pytest.approx(read_log(tmp_path / "cpu")[0]["loss"], rel=1e-2)


@pytest.mark.parametrize("extra", [{"amp": "bf16"}, {"amp": "fp16", "channels_last": "true"}], ids=["bf16", "fp16-cl"])
def test_trainer_amp_on_cuda(tmp_path, extra):
    """Mixed precision on the GPU (fp16 with loss scaling only exists there): two iterations,
    finished, finite losses."""
    r = train_in_process(tiny(tmp_path / "run", iterations=2, device="cuda", **extra))
    assert r["status"] == "finished" and r["iteration"] == 2
    losses = [row["loss"] for row in read_log(tmp_path / "run")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
