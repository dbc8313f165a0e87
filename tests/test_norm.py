"""Numerical tests of the normalization family against independent computations.

References used here: torch's nn.BatchNorm2d, torch.autograd.gradcheck (finite differences), and
an explicit loop-based float64 re-implementation of the paper's equations (``LoopReference``)
written from the formulas, group by group and iteration by iteration.
"""

import copy
import itertools
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mabn
import mabn.backends
from mabn import BatchStatNorm2d
from mabn.options import NormOptions

D = torch.float64


def make_input(n=8, c=3, h=4, w=4, seed=0, scale=2.0, offset=0.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, h, w, generator=g, dtype=D) * scale + offset)


# --------------------------------------------------------------------------- BN equivalence
def test_vanilla_one_group_equals_torch_batchnorm():
    ours = mabn.BatchNorm2d(5, alpha=0.9).double()
    ref = nn.BatchNorm2d(5, momentum=0.1).double()  # torch momentum = 1 - alpha
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, 5))
            m.bias.copy_(torch.linspace(-1, 1, 5))
    for it in range(4):
        x = make_input(6, 5, 3, 3, seed=it).requires_grad_()
        up = make_input(6, 5, 3, 3, seed=100 + it)
        y1, y2 = ours(x), ref(x)
        torch.testing.assert_close(y1, y2, rtol=0, atol=1e-12)
        g1 = torch.autograd.grad(y1, (x, ours.weight, ours.bias), up)
        g2 = torch.autograd.grad(y2, (x, ref.weight, ref.bias), up)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=0, atol=1e-14)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=0, atol=1e-13)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 4
    ours.eval(), ref.eval()
    x = make_input(3, 5, 3, 3, seed=9)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-12)


def test_groups_equal_separate_batchnorm_calls():
    b, groups = 2, 4
    ours = mabn.BatchNorm2d(3, norm_batch_size=b, alpha=0.9).double()
    refs = [nn.BatchNorm2d(3, momentum=0.1).double() for _ in range(groups)]
    x = make_input(b * groups, 3, 5, 5).requires_grad_()
    up = make_input(b * groups, 3, 5, 5, seed=1)
    y = ours(x)
    chunks = [x[k * b:(k + 1) * b] for k in range(groups)]
    y_ref = torch.cat([m(ch) for m, ch in zip(refs, chunks)])
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    gx, gw, gb = torch.autograd.grad(y, (x, ours.weight, ours.bias), up)
    params = [p for m in refs for p in (m.weight, m.bias)]
    grads = torch.autograd.grad(y_ref, [x] + params, up)
    torch.testing.assert_close(gx, grads[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(gw, sum(grads[1::2]), rtol=0, atol=1e-12)
    torch.testing.assert_close(gb, sum(grads[2::2]), rtol=0, atol=1e-12)
    # The EMA is updated with the mean over groups of the batch statistics.
    torch.testing.assert_close(ours.running_mean, torch.stack([m.running_mean for m in refs]).mean(0))
    torch.testing.assert_close(ours.running_var, torch.stack([m.running_var for m in refs]).mean(0))


@pytest.mark.parametrize("form", ["vanilla", "modified"])
@pytest.mark.parametrize("b", [None, 2])
def test_batch_statistics_gradcheck(form, b):
    layer = BatchStatNorm2d(3, form=form, norm_batch_size=b).double()
    x = make_input(4, 3, 3, 3).requires_grad_()
    w = torch.linspace(0.5, 2.0, 3, dtype=D).requires_grad_()
    bias = torch.linspace(-1.0, 1.0, 3, dtype=D).requires_grad_()

    def fn(x, w, bias):  # weight and bias as graph inputs
        return torch.func.functional_call(layer, {"weight": w, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(fn, (x, w, bias))


def test_modified_form_formula():
    layer = mabn.ModifiedBatchNorm2d(3, norm_batch_size=2).double()
    x = make_input(4, 3, 2, 2)
    y = layer(x)
    for k in range(2):
        xk = x[2 * k:2 * k + 2]
        q = (xk ** 2).mean(dim=(0, 2, 3), keepdim=True)
        torch.testing.assert_close(y[2 * k:2 * k + 2], xk / torch.sqrt(q + 1e-5))


# --------------------------------------------------------------------------- loop reference
class LoopReference:
    """Explicit, group-by-group float64 implementation of the layer's documented semantics."""

    def __init__(self, C, form, fp, bp, b, alpha, m, eps, r_max, d_max, warmup, renorm_warmup, ema_init):
        self.__dict__.update(C=C, form=form, fp=fp, bp=bp, b=b, alpha=alpha, m=m, eps=eps,
                             r_max=r_max, d_max=d_max, warmup=warmup, renorm_warmup=renorm_warmup,
                             ema_init=ema_init)
        self.t = 0
        self.fp_hist = []  # every group statistic ever pushed, in order
        self.bp_hist = []
        self.ema = None if ema_init == "first" else {"mu": torch.zeros(C, dtype=D), "v": torch.ones(C, dtype=D)}
        self.bp_ema = None if ema_init == "first" else {"g": torch.zeros(C, dtype=D), "psi": torch.zeros(C, dtype=D)}

    def _ema_step(self, ema, new):
        if ema is None:
            return dict(new)
        return {k: self.alpha * ema[k] + (1 - self.alpha) * new[k] for k in ema}

    def forward(self, x, weight, bias):
        self.t += 1
        N, C, H, W = x.shape
        b = self.b or N
        G = N // b
        n = b * H * W
        vanilla = self.form == "vanilla"
        per_group = []
        for k in range(G):
            xk = x[k * b:(k + 1) * b]
            if vanilla:
                mu = xk.mean(dim=(0, 2, 3))
                v = ((xk - mu[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
            else:
                mu = torch.zeros(C, dtype=D)
                v = (xk ** 2).mean(dim=(0, 2, 3))
            self.fp_hist.append((mu, v))
            win = self.fp_hist[-self.m:]
            sma = (sum(e[0] for e in win) / len(win), sum(e[1] for e in win) / len(win))
            per_group.append({"batch": (mu, v), "sma": sma})
        new = {"mu": sum(p["batch"][0] for p in per_group) / G,
               "v": sum(p["batch"][1] for p in per_group) / G * (n / (n - 1) if vanilla else 1.0)}
        ema_used = self.ema if self.ema is not None else new
        warm = self.t <= self.warmup
        off = self.t <= max(self.warmup, self.renorm_warmup)
        outs, cache = [], []
        for k in range(G):
            xk = x[k * b:(k + 1) * b]
            stats = dict(per_group[k], ema=(ema_used["mu"], ema_used["v"]))
            mu_s, v_s = stats["batch" if warm else self.bp]
            mu_f, v_f = stats["batch" if warm else self.fp]
            if not vanilla:
                mu_s = mu_f = torch.zeros(C, dtype=D)
            sig_s, sig_f = torch.sqrt(v_s + self.eps), torch.sqrt(v_f + self.eps)
            Y = (xk - mu_s[None, :, None, None]) / sig_s[None, :, None, None]
            if off:
                r, d = torch.ones(C, dtype=D), torch.zeros(C, dtype=D)
            else:
                r = torch.clamp(sig_s / sig_f, 1 / self.r_max, self.r_max)
                d = torch.clamp((mu_s - mu_f) / sig_f, -self.d_max, self.d_max)
                if not vanilla:
                    d = torch.zeros(C, dtype=D)
            bcast = lambda t: t[None, :, None, None]
            Yhat = bcast(r) * Y + bcast(d)
            outs.append(bcast(weight) * Yhat + bcast(bias))
            cache.append((Y, Yhat, r, sig_s))
        self.ema = self._ema_step(self.ema, new)
        return torch.cat(outs), (cache, warm, b, G)

    def backward(self, dout, weight, state):
        cache, warm, b, G = state
        vanilla = self.form == "vanilla"
        bcast = lambda t: t[None, :, None, None]
        gs = []
        for k in range(G):
            Y, Yhat, r, sig = cache[k]
            Gk = dout[k * b:(k + 1) * b] * bcast(weight * r)
            g = Gk.mean(dim=(0, 2, 3)) if vanilla else torch.zeros(self.C, dtype=D)
            psi = (Gk * Y).mean(dim=(0, 2, 3))
            self.bp_hist.append((g, psi))
            win = self.bp_hist[-self.m:]
            gs.append({"G": Gk, "batch": (g, psi),
                       "sma": (sum(e[0] for e in win) / len(win), sum(e[1] for e in win) / len(win))})
        new = {"g": sum(p["batch"][0] for p in gs) / G, "psi": sum(p["batch"][1] for p in gs) / G}
        ema_used = self.bp_ema if self.bp_ema is not None else new
        dx = []
        for k in range(G):
            Y, Yhat, r, sig = cache[k]
            stats = dict(gs[k], ema=(ema_used["g"], ema_used["psi"]))
            g_u, psi_u = stats["batch" if warm else self.bp]
            dx.append((gs[k]["G"] - bcast(g_u) - Y * bcast(psi_u)) / bcast(sig))
        self.bp_ema = self._ema_step(self.bp_ema, new)
        dw = sum((dout[k * b:(k + 1) * b] * cache[k][1]).sum(dim=(0, 2, 3)) for k in range(G))
        return torch.cat(dx), dw, dout.sum(dim=(0, 2, 3))

    def ema_buffers(self):
        return self.ema, self.bp_ema


COMBOS = [(form, fp, bp) for form in ("vanilla", "modified")
          for fp, bp in itertools.product(("batch", "ema", "sma"), repeat=2)]


@pytest.mark.parametrize("form,fp,bp", COMBOS)
@pytest.mark.parametrize("ema_init", ["first", "torch"])
def test_matches_loop_reference_over_iterations(form, fp, bp, ema_init):
    C, b, m, iters = 3, 2, 5, 9  # 4 groups per batch: the window of 5 wraps across iterations
    kw = dict(form=form, fp_stats=fp, bp_stats=bp, norm_batch_size=b, alpha=0.8, buffer_size=m,
              eps=1e-5, r_max=1.15, d_max=0.2, warmup_iters=2, renorm_warmup_iters=4, ema_init=ema_init)
    layer = BatchStatNorm2d(C, **kw).double()
    ref = LoopReference(C, form, fp, bp, b, 0.8, m, 1e-5, 1.15, 0.2, 2, 4, ema_init)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.7, 1.3, -0.4]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    assert iters >= m + 3
    for it in range(iters):
        # A drifting input distribution so that batch, SMA and EMA statistics differ.
        x = make_input(8, C, 3, 3, seed=it, scale=1.0 + 0.3 * it, offset=0.2 * it).requires_grad_()
        up = make_input(8, C, 3, 3, seed=1000 + it)
        y = layer(x)
        y_ref, state = ref.forward(x.detach(), layer.weight.detach(), layer.bias.detach())
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10, msg=f"output, iteration {it + 1}")
        gx, gw, gb = torch.autograd.grad(y, (x, layer.weight, layer.bias), up)
        rx, rw, rb = ref.backward(up, layer.weight.detach(), state)
        torch.testing.assert_close(gx, rx, rtol=1e-10, atol=1e-10, msg=f"dL/dx, iteration {it + 1}")
        torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gb, rb, rtol=1e-10, atol=1e-10)
    ema, bp_ema = ref.ema_buffers()
    if form == "vanilla":
        torch.testing.assert_close(layer.running_mean, ema["mu"])
        torch.testing.assert_close(layer.running_g, bp_ema["g"])
    else:
        assert torch.count_nonzero(layer.running_mean) == 0
    torch.testing.assert_close(layer.running_var, ema["v"])
    torch.testing.assert_close(layer.running_psi, bp_ema["psi"])
    assert int(layer.num_batches_tracked) == iters


@pytest.mark.parametrize("form", ["vanilla", "modified"])
@pytest.mark.parametrize("x_fmt,up_fmt", [("nchw", "nchw"), ("cl", "cl"), ("cl", "nchw"), ("nchw", "cl")])
@pytest.mark.parametrize("chunk", [1, 5, 45, 100, 1 << 18])
def test_chunked_layout_reductions_match_loop_reference(monkeypatch, form, x_fmt, up_fmt, chunk):
    """The CPU backend's reductions in each memory format, chunked down to single elements
    (mabn.backends.cpu.CHUNK), and with the upstream gradient in another format than the input,
    against the float64 loop."""
    monkeypatch.setattr(mabn.backends.cpu, "CHUNK", chunk)  # (float64: the "cpu" backend)
    fmt = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
    C, b = 3, 2
    kw = dict(form=form, fp_stats="ema", bp_stats="sma", norm_batch_size=b, alpha=0.8, buffer_size=3,
              eps=1e-5, r_max=1.15, d_max=0.2, warmup_iters=0, renorm_warmup_iters=1, ema_init="first")
    layer = BatchStatNorm2d(C, **kw).double()
    ref = LoopReference(C, form, "ema", "sma", b, 0.8, 3, 1e-5, 1.15, 0.2, 0, 1, "first")
    for it in range(3):
        x = make_input(8, C, 3, 5, seed=it, scale=1.0 + 0.3 * it, offset=0.2 * it)
        up = make_input(8, C, 3, 5, seed=100 + it)
        xin = x.contiguous(memory_format=fmt[x_fmt]).requires_grad_()
        y = layer(xin)
        assert y.is_contiguous(memory_format=fmt[x_fmt])
        y_ref, state = ref.forward(x, layer.weight.detach(), layer.bias.detach())
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        (gx,) = torch.autograd.grad(y, xin, up.contiguous(memory_format=fmt[up_fmt]))
        rx, _, _ = ref.backward(up, layer.weight.detach(), state)
        torch.testing.assert_close(gx, rx, rtol=1e-10, atol=1e-10)


def test_bp_sma_is_not_batch_gradient():
    """Guard against a test that cannot fail: SMA backward differs from the exact gradient."""
    torch.manual_seed(0)
    kw = dict(form="modified", fp_stats="sma", norm_batch_size=2, buffer_size=4)
    a = BatchStatNorm2d(3, bp_stats="sma", **kw).double()
    bl = BatchStatNorm2d(3, bp_stats="batch", **kw).double()
    for it in range(3):
        x = make_input(4, 3, 3, 3, seed=it, scale=1 + it).requires_grad_()
        up = make_input(4, 3, 3, 3, seed=50 + it)
        ga = torch.autograd.grad(a(x), x, up)[0]
        gb = torch.autograd.grad(bl(x), x, up)[0]
    assert (ga - gb).abs().max() > 1e-3


# --------------------------------------------------------------------------- renormalization
def test_r_d_identity_during_warmup_then_clipped():
    layer = mabn.BatchRenorm2d(2, alpha=0.9, r_max=2.0, d_max=0.5, renorm_warmup_iters=3).double()
    bn = BatchStatNorm2d(2).double()  # batch statistics reference
    x = make_input(4, 2, 3, 3)
    for it in range(3):  # t = 1..3: r = 1, d = 0 -> identical to BN with batch statistics
        torch.testing.assert_close(layer(x), bn(x), rtol=0, atol=1e-12)
    # Make the EMA far from the batch: sigma_EMA = 10 sigma_B, mu_EMA far away.
    with torch.no_grad():
        mu = x.mean(dim=(0, 2, 3))
        v = x.var(dim=(0, 2, 3), unbiased=False)
        layer.running_var.copy_(100 * (v + 1e-5) - 1e-5)
        layer.running_mean.copy_(mu - 10 * torch.sqrt(v + 1e-5))
    y = layer(x)  # t = 4
    Y = (x - mu[None, :, None, None]) / torch.sqrt(v + 1e-5)[None, :, None, None]
    # r = sigma_B / sigma_EMA = 0.1 -> clipped to 1/2; d = (mu_B - mu_EMA)/sigma_EMA = 1 -> 0.5.
    torch.testing.assert_close(y, 0.5 * Y + 0.5, rtol=0, atol=1e-10)
    # Unclipped case: r, d as computed from the formula.
    layer2 = mabn.BatchRenorm2d(2, alpha=0.9, r_max=5.0, d_max=5.0, renorm_warmup_iters=0).double()
    with torch.no_grad():
        layer2.running_var.fill_(2.0)
        layer2.running_mean.fill_(0.3)
        layer2.num_batches_tracked.fill_(10)
    y2 = layer2(x)
    sig_f = torch.sqrt(torch.tensor(2.0 + 1e-5, dtype=D))
    expected = (x - 0.3) / sig_f
    torch.testing.assert_close(y2, expected, rtol=0, atol=1e-10)


def test_brn_with_unit_clip_equals_bn():
    brn = mabn.BatchRenorm2d(3, norm_batch_size=2, r_max=1.0, d_max=0.0, renorm_warmup_iters=0).double()
    bn = mabn.BatchNorm2d(3, norm_batch_size=2, ema_init="first").double()
    for it in range(4):
        x = make_input(6, 3, 3, 3, seed=it, scale=1 + it).requires_grad_()
        up = make_input(6, 3, 3, 3, seed=20 + it)
        y1, y2 = brn(x), bn(x)
        torch.testing.assert_close(y1, y2, rtol=0, atol=1e-12)
        for a, b in zip(torch.autograd.grad(y1, (x, brn.weight), up), torch.autograd.grad(y2, (x, bn.weight), up)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(brn.running_var, bn.running_var)


def test_mabn_renorm_uses_ema_over_sma():
    """After the warm-up, MABN output = x / sqrt(EMA + eps) (unclipped), as eq. 19 intends."""
    layer = mabn.MABN2d(2, norm_batch_size=2, buffer_size=4, renorm_warmup_iters=1).double()
    x = make_input(4, 2, 3, 3)
    layer(x)  # t = 1
    ema = layer.running_var.clone()
    y = layer(x)  # t = 2: forward normalizes with the EMA (before this iteration's update)
    torch.testing.assert_close(y, x / torch.sqrt(ema + 1e-5)[None, :, None, None], rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- state, eval, conv
def test_state_dict_round_trip_continues_bit_identically():
    torch.manual_seed(0)
    a = mabn.MABN2d(3, norm_batch_size=2, buffer_size=5, renorm_warmup_iters=2)
    for it in range(4):
        x = torch.randn(6, 3, 4, 4, requires_grad=True)
        a(x).pow(2).sum().backward()
    b = mabn.MABN2d(3, norm_batch_size=2, buffer_size=5, renorm_warmup_iters=2)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    a.zero_grad(set_to_none=True)
    names = {n for n, _ in a.named_buffers()}
    assert {"fp_window", "bp_window", "fp_window_valid", "running_psi", "num_backward_tracked"} <= names
    for it in range(3):
        x = torch.randn(6, 3, 4, 4)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = a(xa), b(xb)
        assert torch.equal(ya, yb)
        ya.pow(2).sum().backward()
        yb.pow(2).sum().backward()
        assert torch.equal(xa.grad, xb.grad)
        assert torch.equal(a.weight.grad, b.weight.grad)
        a.zero_grad(set_to_none=True), b.zero_grad(set_to_none=True)
    for (n1, t1), (n2, t2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1


@pytest.mark.parametrize("preset", ["BatchNorm2d", "BatchRenorm2d", "ModifiedBatchNorm2d", "MABN2d"])
def test_eval_is_the_folded_affine_map(preset):
    layer = getattr(mabn, preset)(4, norm_batch_size=2).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2)
        layer.bias.uniform_(-1, 1)
    for it in range(3):
        layer(make_input(4, 4, 3, 3, seed=it)).sum().backward()
    layer.eval()
    x = make_input(3, 4, 3, 3, seed=7)
    scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
    shift = layer.bias - layer.running_mean * scale
    torch.testing.assert_close(layer(x), x * scale[None, :, None, None] + shift[None, :, None, None],
                               rtol=0, atol=1e-12)
    # The modified form keeps running_mean at 0 and running_var = EMA of chi^2.
    if preset in ("ModifiedBatchNorm2d", "MABN2d"):
        assert torch.count_nonzero(layer.running_mean) == 0


def test_cenconv_equals_conv_with_centred_weights():
    torch.manual_seed(0)
    conv = mabn.CenConv2d(4, 6, 3, padding=1, bias=True).double()
    x = torch.randn(2, 4, 5, 5, dtype=D)
    w = conv.weight.detach().clone()
    centred = torch.empty_like(w)
    for o in range(w.shape[0]):  # explicit per-output-channel mean
        centred[o] = w[o] - w[o].sum() / w[o].numel()
    torch.testing.assert_close(conv(x), F.conv2d(x, centred, conv.bias, padding=1), rtol=0, atol=1e-12)
    assert set(conv.state_dict()) == set(nn.Conv2d(4, 6, 3).state_dict())
    assert torch.autograd.gradcheck(lambda inp: conv(inp), (x[:1, :, :3, :3].clone().requires_grad_(),))


def test_centralize_gradient_is_the_centred_gradient():
    """mabn.centralize's own backward (g - mean(g)) against finite differences (gradcheck and
    gradgradcheck, float64) and, in float32 channels_last, against autograd of the plain
    expression; the weight's gradient keeps the weight's memory format."""
    from mabn.conv import centralize
    w = torch.randn(3, 2, 3, 3, dtype=D, requires_grad=True)
    probe = torch.randn(3, 2, 3, 3, dtype=D)
    assert torch.autograd.gradcheck(lambda t: (centralize(t) * probe).sin(), (w,))
    assert torch.autograd.gradgradcheck(lambda t: (centralize(t) * probe).sin(), (w,))
    w32 = torch.randn(16, 8, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(16, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    (ours,) = torch.autograd.grad(centralize(w32), w32, g)
    (plain,) = torch.autograd.grad(w32 - w32.mean(dim=(1, 2, 3), keepdim=True), w32, g)
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-6)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"4-D .* got shape \(3, 2\)"):
        centralize(torch.randn(3, 2))


# --------------------------------------------------------------------------- dtypes, layouts
def test_channels_last_and_float32_match_float64():
    x64 = make_input(8, 3, 5, 5)
    up64 = make_input(8, 3, 5, 5, seed=3)
    layers = [mabn.MABN2d(3, norm_batch_size=2, renorm_warmup_iters=1).double(),
              mabn.MABN2d(3, norm_batch_size=2, renorm_warmup_iters=1)]
    for it in range(3):
        outs = []
        for layer, dtype, fmt in ((layers[0], D, torch.contiguous_format), (layers[1], torch.float32, torch.channels_last)):
            x = x64.to(dtype).to(memory_format=fmt).requires_grad_()
            y = layer(x)
            assert y.dtype == dtype and y.shape == x.shape
            if fmt is torch.channels_last:
                assert y.is_contiguous(memory_format=torch.channels_last)
            (gx,) = torch.autograd.grad(y, x, up64.to(dtype))
            outs.append((y.double(), gx.double()))
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-5)


def _float32_layer_against_float64(preset, fmt, shape=(4, 8, 9, 9)):
    """Three iterations of a float32 layer in ``fmt`` and a float64 copy in NCHW on one input:
    the largest relative error of the input gradient (against the float64 one's scale)."""
    x64, up64 = make_input(*shape), make_input(*shape, seed=7)
    ref = getattr(mabn, preset)(shape[1], norm_batch_size=2, renorm_warmup_iters=1).double()
    layer = getattr(mabn, preset)(shape[1], norm_batch_size=2, renorm_warmup_iters=1)
    worst = 0.0
    for it in range(3):
        x, x32 = x64.clone().requires_grad_(), x64.float().contiguous(memory_format=fmt).requires_grad_()
        (g64,) = torch.autograd.grad(ref(x * (1 + it)), x, up64)
        y = layer(x32 * (1 + it)).mul_(1.0)  # an in-place op may follow (a ReLU): not a view
        (g32,) = torch.autograd.grad(y, x32, up64.float().contiguous(memory_format=fmt))
        assert g32.is_contiguous(memory_format=fmt) and g32.dtype == torch.float32
        worst = max(worst, float((g32.double() - g64).abs().max() / g64.abs().max()))
    return worst


class _CountingKernels:
    """Stands in for the built mabn.kernels extension and counts the calls of each kernel."""

    def __init__(self, ext):
        self.ext, self.calls, self.streamed = ext, {}, []

    def __getattr__(self, name):
        fn = getattr(self.ext, name)

        if isinstance(fn, type):  # the extension's argument structs
            return fn

        def counted(*args):
            self.calls[name] = self.calls.get(name, 0) + 1
            if name in ("scale_shift", "multiply_adds"):  # (out bytes, the stream flag passed)
                self.streamed.append((args[-1].numel() * 4, args[-2]))
            return fn(*args)
        return counted


@pytest.fixture
def cpu_kernels():
    """The built C++ kernels (mabn.kernels). Skipped with MABN_CPU_KERNELS=off or on a machine
    without a C++ compiler; anywhere else a failed build fails the test."""
    import shutil

    from mabn import kernels
    if kernels.MODE != "auto":
        pytest.skip(f"mabn.kernels.MODE is {kernels.MODE!r}")
    if not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        pytest.skip("no C++ compiler on this machine: mabn's kernels cannot be built")
    ext = kernels.load()
    assert ext is not None, "mabn's C++ kernels failed to build (see the RuntimeWarning)"
    return ext


def _column_reference(d, x, groups):
    d, x = d.double(), x.double()
    n, c, h, w = d.shape
    return (d.view(groups, n // groups, c, h, w).sum((1, 3, 4)),
            (d * x).view(groups, n // groups, c, h, w).sum((1, 3, 4)))


@pytest.mark.parametrize("shape,groups", [((4, 3, 5, 7), 2), ((2, 37, 9, 11), 1), ((6, 16, 1, 1), 3),
                                          ((2, 5, 40, 40), 2), ((3, 130, 2, 3), 3)])
def test_cpu_kernel_sums_match_float64(cpu_kernels, shape, groups):
    """column_dot_sums (channels_last rows per group) and row_dot_sums (contiguous planes) against
    float64 sums of the float32 values, at sizes that are not multiples of the vector width, of
    the float32 block (64 rows, 1024 values: the 40x40 maps span several) or of the threads."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g) * 3 + 1
    d = torch.randn(shape, generator=g)
    ref_sum, ref_dot = _column_reference(d, x, groups)
    dl, xl = (t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(groups, -1, c) for t in (d, x))
    abs_sum, abs_dot = _column_reference(d.abs(), x.abs(), groups)

    def within_float32_bound(got, ref, abs_ref, block):
        # Recursive float32 summation of a block of m terms errs by at most (m + 1) eps sum|terms|
        # (the +1: rounding of each product); float64 adds of the block sums are exact enough.
        bound = (block + 1) * 2.0 ** -24 * abs_ref + 1e-12
        assert bool(((got - ref).abs() <= bound).all()), float(((got - ref).abs() / bound).max())

    sums = cpu_kernels.column_dot_sums(dl, xl)
    assert sums.dtype == torch.float64 and sums.shape == (2, groups, c)
    within_float32_bound(sums[0], ref_sum, abs_sum, 64)
    within_float32_bound(sums[1], ref_dot, abs_dot, 64)
    rows = cpu_kernels.row_dot_sums(d.reshape(n * c, h * w), x.reshape(n * c, h * w))
    assert rows.shape == (2, n * c)
    within_float32_bound(rows[0], d.double().sum((2, 3)).flatten(), d.double().abs().sum((2, 3)).flatten(), 1024)
    within_float32_bound(rows[1], (d.double() * x.double()).sum((2, 3)).flatten(),
                         (d.double() * x.double()).abs().sum((2, 3)).flatten(), 1024)


@pytest.mark.parametrize("per_column", [True, False])
@pytest.mark.parametrize("npq", [(3, 7, 19), (2, 3, 700_001)], ids=["small", "large"])
def test_cpu_kernel_multiply_adds_matches_float64(cpu_kernels, per_column, npq):
    """multiply_adds (d * a + x * b + k) and scale_shift (x * b + k) with coefficients per
    (sample, column) or (sample, row), on rows that are not multiples of the vector width, with
    ordinary and with streaming stores (whose loops have unaligned heads and tails)."""
    g = torch.Generator().manual_seed(5)
    n, p, q = npq
    d, x = torch.randn(n, p, q, generator=g), torch.randn(n, p, q, generator=g)
    a, b, k = (torch.randn(n, q if per_column else p, generator=g) for _ in range(3))
    expand = (lambda t: t.double()[:, None, :]) if per_column else (lambda t: t.double()[:, :, None])
    for stream in (False, True):
        out = cpu_kernels.multiply_adds(d, x, a, b, k, per_column, stream, torch.empty_like(x))
        ref = d.double() * expand(a) + x.double() * expand(b) + expand(k)
        torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
        out = cpu_kernels.multiply_adds(d, x, a, b, torch.empty(0), per_column, stream, torch.empty_like(x))  # k = 0
        torch.testing.assert_close(out.double(), d.double() * expand(a) + x.double() * expand(b), rtol=1e-6, atol=1e-6)
        out = cpu_kernels.scale_shift(x, b, k, per_column, stream, torch.empty_like(x))
        torch.testing.assert_close(out.double(), x.double() * expand(b) + expand(k), rtol=1e-6, atol=1e-6)
        out = cpu_kernels.scale_shift(x, b, torch.empty(0), per_column, stream, torch.empty_like(x))
        torch.testing.assert_close(out.double(), x.double() * expand(b), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        cpu_kernels.scale_shift(x.transpose(1, 2), b, k, per_column, False, torch.empty_like(x))
    with pytest.raises(RuntimeError, match="out must have"):
        cpu_kernels.scale_shift(x, b, k, per_column, False, torch.empty(1, 1, 1))


def test_cpu_kernels_refuse_wrong_inputs_by_name(cpu_kernels):
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="x must be float32"):
        cpu_kernels.column_dot_sums(x, x.double())
    with pytest.raises(RuntimeError, match="d must be contiguous"):
        cpu_kernels.column_dot_sums(x.transpose(1, 2), x.transpose(1, 2).contiguous())
    with pytest.raises(RuntimeError, match="coefficients must be"):
        cpu_kernels.multiply_adds(x, x, torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), True, False,
                                  torch.empty_like(x))
    with pytest.raises(RuntimeError, match="b must have 2 dimensions"):  # only k may be empty
        cpu_kernels.multiply_adds(x, x, torch.ones(2, 4), torch.empty(0), torch.ones(2, 4), True, False,
                                  torch.empty_like(x))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("preset", ["MABN2d", "BatchNorm2d", "BatchRenorm2d"])
def test_cpu_kernels_are_taken_and_match_float64(monkeypatch, cpu_kernels, fmt, preset):
    """Eager float32 layers on the CPU take mabn's C++ layer (backend "cpp_layer": one call per
    forward and per backward) in both layouts; backend "cpp_passes" takes mabn's C++ kernels
    (forward sums, backward reductions and the one-pass input gradient); with mabn.kernels.MODE
    "off" no kernel is called. In all three the input gradient matches the float64 layer's
    (which keeps torch's operations)."""
    from mabn import kernels
    counting = _CountingKernels(cpu_kernels)
    monkeypatch.setattr(kernels, "_module", counting)
    err_native = _float32_layer_against_float64(preset, fmt)
    assert counting.calls == {"train_forward": 3, "train_backward": 3}, counting.calls
    counting.calls.clear()
    with mabn.backends.forced("cpp_passes"):
        err_kernels = _float32_layer_against_float64(preset, fmt)
    sums = "column_dot_sums" if fmt is torch.channels_last else "row_dot_sums"
    assert counting.calls == {sums: 6, "scale_shift": 3, "multiply_adds": 3}, counting.calls  # 3 fwd + 3 bwd
    monkeypatch.setattr(kernels, "MODE", "off")
    counting.calls.clear()
    err_torch = _float32_layer_against_float64(preset, fmt)
    assert counting.calls == {}
    assert max(err_native, err_kernels, err_torch) < 1e-5, (err_native, err_kernels, err_torch)


def test_cpu_kernels_stream_outputs_of_at_least_stream_bytes(monkeypatch, cpu_kernels):
    """The layer asks for streaming stores exactly for outputs of >= mabn.kernels.STREAM_BYTES
    (4 x 8 x 9 x 9 float32 = 10368 bytes here; the Python path's kernel calls and the C++ layer
    both get the flag), and the result does not depend on it."""
    from mabn import kernels
    counting = _CountingKernels(cpu_kernels)
    monkeypatch.setattr(kernels, "_module", counting)
    native = {}

    def forward(*args):  # the C++ layer's last argument: the stream flag
        native.setdefault("forward", []).append(args[-1])
        return cpu_kernels.train_forward(*args)

    def backward(*args):
        native.setdefault("backward", []).append(args[-1])
        return cpu_kernels.train_backward(*args)

    errors = []
    for threshold in (10368, 10369):
        monkeypatch.setattr(kernels, "STREAM_BYTES", threshold)
        counting.streamed.clear()
        with mabn.backends.forced("cpp_passes"):
            errors.append(_float32_layer_against_float64("MABN2d", torch.channels_last))
        assert counting.streamed == [(10368, threshold <= 10368)] * 6, counting.streamed  # 3 fwd + 3 bwd
        native.clear()
        with monkeypatch.context() as patch:
            patch.setattr(kernels, "_module", type("Ext", (), {
                "train_forward": staticmethod(forward), "train_backward": staticmethod(backward),
                **{name: getattr(cpu_kernels, name) for name in ("LayerOptions", "ForwardBuffers", "BackwardBuffers")}}))
            errors.append(_float32_layer_against_float64("MABN2d", torch.channels_last))
        assert native == {"forward": [threshold <= 10368] * 3, "backward": [threshold <= 10368] * 3}, native
    assert max(errors) < 1e-5, errors


def test_stream_bytes_setting(monkeypatch):
    """MABN_STREAM_BYTES: a whole number of bytes (default 4 MiB), or an error naming it."""
    from mabn import kernels
    monkeypatch.delenv("MABN_STREAM_BYTES", raising=False)
    assert kernels.stream_bytes_from_env() == 4 << 20
    monkeypatch.setenv("MABN_STREAM_BYTES", "0")
    assert kernels.stream_bytes_from_env() == 0
    monkeypatch.setenv("MABN_STREAM_BYTES", "4MiB")
    with pytest.raises(ValueError, match="MABN_STREAM_BYTES.*'4MiB'"):
        kernels.stream_bytes_from_env()


def test_cpu_kernels_fall_back_when_they_cannot_be_built(monkeypatch, tmp_path):
    """A build that fails (e.g. no C++ compiler) warns once, naming the switch; the layers then
    take torch's operations, with the float64 gradient, and reports say so."""
    from torch.utils import cpp_extension

    from mabn import kernels

    def broken(**kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # (no build there yet)
    monkeypatch.setattr(kernels, "MODE", "auto")
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.warns(RuntimeWarning, match="could not be built.*no C\\+\\+ compiler found.*MABN_CPU_KERNELS=off"):
        err = _float32_layer_against_float64("MABN2d", torch.channels_last)
    assert kernels._module is False and kernels.load() is None
    assert "failed to build" in kernels.status()
    assert err < 1e-5


def test_built_kernels_load_without_the_builder(monkeypatch, cpu_kernels):
    """A build of the same sources (any checkout, any process) is loaded from its folder
    directly: torch's builder is not run again."""
    from torch.utils import cpp_extension

    from mabn import kernels

    def builder(**kwargs):
        raise AssertionError("the extension was built again")

    monkeypatch.setattr(cpp_extension, "load", builder)
    monkeypatch.setattr(kernels, "_module", None)
    ext = kernels.load()
    assert ext is not None and os.path.dirname(ext.__file__) == kernels.build_directory()
    assert hasattr(ext, "train_forward") and hasattr(ext, "LayerOptions")


def test_build_key_follows_the_sources_content(monkeypatch, tmp_path):
    """The build folder is named by the sources' content: a copy of mabn/csrc elsewhere (a
    second checkout) has the same key; a changed source, a new one."""
    import shutil

    from mabn import kernels

    key = kernels.build_key()
    copy_dir = tmp_path / "checkout" / "csrc"
    shutil.copytree(os.path.join(os.path.dirname(kernels.__file__), "csrc"), copy_dir)
    monkeypatch.setattr(kernels, "_CSRC", str(copy_dir))
    assert kernels.build_key() == key
    with open(copy_dir / "norm_types.h", "a") as f:
        f.write("// changed\n")
    assert kernels.build_key() != key
    assert os.path.basename(kernels.build_directory()) == f"mabn_cpu_{kernels.build_key()}"


def test_cpu_kernels_bad_setting_is_named(monkeypatch):
    from mabn import kernels
    monkeypatch.setattr(kernels, "MODE", "on")
    monkeypatch.setattr(kernels, "_module", None)
    with pytest.raises(ValueError, match="MABN_CPU_KERNELS.*on"):
        _float32_layer_against_float64("MABN2d", torch.contiguous_format)


def _iterations(kw, shape, iters, python_path, monkeypatch):
    """``iters`` training iterations of a float32 BatchStatNorm2d(**kw) (channels_last, inputs
    growing in scale, off-centre): per iteration the output, the input and parameter gradients
    and the recorded statistics; then the layer. ``python_path``: the layer takes its Python
    path (backend "cpp_passes": mabn.functional's statistics, mabn's kernels for the passes over
    the data) instead of mabn's C++ layer (backend "cpp_layer")."""
    with mabn.backends.forced("cpp_passes" if python_path else None):
        return _run_iterations(kw, shape, iters)


def _run_iterations(kw, shape, iters):
    torch.manual_seed(0)
    layer = BatchStatNorm2d(shape[1], **kw)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    layer.record_used_statistics = True
    outs = []
    for it in range(iters):
        x = make_input(*shape, seed=it, scale=1.0 + 0.5 * it, offset=0.3).float()
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        y = layer(x)
        grads = torch.autograd.grad(y, (x, layer.weight, layer.bias), make_input(*shape, seed=50 + it).float())
        outs.append([y, *grads] + [v.clone() for v in layer.used_statistics.values()])
    return layer, outs


#: (batch, norm_batch_size, buffer_size): fewer groups than the SMA window's rows (the window
#: fills over several iterations) and more (each iteration replaces it).
_WINDOWS = [(4, 2, 5), (8, 2, 3)]


@pytest.mark.parametrize("n,b,m", _WINDOWS, ids=["window-fills", "window-replaced"])
@pytest.mark.parametrize("form", ["vanilla", "modified"])
def test_native_layer_matches_the_python_path(monkeypatch, cpu_kernels, form, n, b, m):
    """Eager float32 CPU layers run their training forward and backward as one C++ call each
    (backend "cpp_layer": mabn/csrc/norm_layer.cpp and norm_statistics.cpp); mabn.functional
    (here with the "cpp_passes" backend) stays the reference. For every option set (fp_stats x bp_stats x ema_init x warm-ups) over five
    iterations (warm-ups ending, renormalization switching on, SMA windows filling, EMAs
    starting) the output, the input and parameter gradients, the recorded statistics and every
    buffer agree to float32 rounding (the C++ loops sum SMA windows and group means in float64,
    so single values move by a few float32 ulps, and more where a gradient sums values of both
    signs); the C++ layer was really called."""
    from mabn import kernels
    counting = _CountingKernels(cpu_kernels)
    shape = (n, 6, 5, 5)
    for fp, bp, ema_init, warm, renorm_warm in itertools.product(
            mabn.STATISTICS, mabn.STATISTICS, mabn.EMA_INITS, (0, 2), (0, 3)):
        kw = dict(form=form, fp_stats=fp, bp_stats=bp, ema_init=ema_init, warmup_iters=warm,
                  renorm_warmup_iters=renorm_warm, norm_batch_size=b, alpha=0.8, buffer_size=m,
                  r_max=1.2, d_max=0.3)
        counting.calls.clear()
        monkeypatch.setattr(kernels, "_module", counting)
        native, native_outs = _iterations(kw, shape, 5, False, monkeypatch)
        assert counting.calls == {"train_forward": 5, "train_backward": 5}, (kw, counting.calls)
        python, python_outs = _iterations(kw, shape, 5, True, monkeypatch)
        for it, (a, b_) in enumerate(zip(native_outs, python_outs)):
            assert len(a) == len(b_)
            for u, v in zip(a, b_):
                torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5, msg=lambda msg: f"{kw}, iteration {it}: {msg}")
        for (name, u), (_, v) in zip(native.state_dict().items(), python.state_dict().items()):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5, msg=lambda msg: f"{kw}, {name}: {msg}")


def _layer_options(ext, **changes):
    """The C++ LayerOptions of NormOptions with these changes (vanilla batch statistics,
    ema_init "first", no warm-up, r_max = d_max = 5, eps 1e-5, alpha 0.9 otherwise)."""
    options = dict(vanilla=True, fp_stats="batch", bp_stats="batch", ema_init="first", warmup_iters=0,
                   renorm_warmup_iters=0, r_max=5.0, d_max=5.0, eps=1e-5, alpha=0.9)
    options.update(changes)
    return mabn.backends.cpp.layer_options(ext, NormOptions(**options))


def test_native_statistics_sliding_mean_against_explicit_windows(cpu_kernels):
    """The C++ forward statistics' SMA (eq. 13) against an explicit list of the last m pushed
    group statistics, over iterations that fill the window (fewer valid entries than m), with
    group 0's statistic recorded as s0: float64 sums of float32 values."""
    C, G, m = 3, 2, 5
    window, valid = torch.zeros(m - 1, 1, C), torch.zeros(m - 1)
    running_mean, running_var = torch.zeros(C), torch.ones(C)
    counter = torch.tensor(0)
    pushed = []
    gen = torch.Generator().manual_seed(3)
    for it in range(4):
        batch = torch.rand(G, 1, C, generator=gen) + 0.5
        st = cpu_kernels.forward_statistics(
            batch, 50, cpu_kernels.ForwardBuffers(window, valid, running_mean, running_var, counter),
            _layer_options(cpu_kernels, vanilla=False, fp_stats="sma", bp_stats="sma"))
        s0, inv_std, shift, r, d, warm = st.s0, st.inv_std, st.shift, st.r, st.d, st.warm
        assert shift is None and r is None and d is None and warm is None
        for g in range(G):
            pushed.append(batch[g, 0].double())
            expected = torch.stack(pushed[-m:]).mean(0)
            torch.testing.assert_close(inv_std[g].double(), (expected + 1e-5).rsqrt(), rtol=1e-6, atol=0)
            if g == 0:
                torch.testing.assert_close(s0[0].double(), expected, rtol=1e-6, atol=0)
        assert int(counter) == it + 1
        assert valid.tolist() == [0.0] * max(0, m - 1 - G * (it + 1)) + [1.0] * min(m - 1, G * (it + 1))


def test_native_statistics_name_bad_arguments(cpu_kernels):
    """The C++ functions check what they are given and say which argument is wrong."""
    C = 4
    window, valid, rm, rv = torch.zeros(2, 1, C), torch.zeros(2), torch.zeros(C), torch.ones(C)
    buffers = cpu_kernels.ForwardBuffers(window, valid, rm, rv, torch.tensor(0))
    options = _layer_options(cpu_kernels, vanilla=False, fp_stats="ema", bp_stats="sma")
    with pytest.raises(RuntimeError, match="batch must be a contiguous float32"):
        cpu_kernels.forward_statistics(torch.rand(3, 1, C, dtype=D), 50, buffers, options)
    with pytest.raises(RuntimeError, match="running_var must have shape"):
        cpu_kernels.forward_statistics(torch.rand(3, 1, C), 50, cpu_kernels.ForwardBuffers(
            window, valid, rm, torch.ones(C + 1), torch.tensor(0)), options)
    with pytest.raises(RuntimeError, match='fp_stats must be "batch", "ema" or "sma", got "emma"'):
        cpu_kernels.forward_statistics(torch.rand(3, 1, C), 50, buffers,
                                       _layer_options(cpu_kernels, vanilla=False, fp_stats="emma"))


def test_native_layer_leaves_other_dtypes_to_python(monkeypatch, cpu_kernels):
    """A float64 layer given float32 inputs (float64 parameters and buffers) keeps the Python
    path (with mabn's kernels for the passes over the data), and its gradient is the float64
    layer's."""
    from mabn import kernels
    counting = _CountingKernels(cpu_kernels)
    monkeypatch.setattr(kernels, "_module", counting)
    x, up = make_input(4, 3, 5, 5), make_input(4, 3, 5, 5, seed=9)
    ref = mabn.MABN2d(3, norm_batch_size=2, renorm_warmup_iters=0).double()
    layer = copy.deepcopy(ref)
    for _ in range(2):
        xr, x32 = x.clone().requires_grad_(), x.float().requires_grad_()
        (g64,) = torch.autograd.grad(ref(xr), xr, up)
        (g32,) = torch.autograd.grad(layer(x32), x32, up)
        torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-5)
    assert "train_forward" not in counting.calls and "train_backward" not in counting.calls
    assert counting.calls.get("column_dot_sums", 0) + counting.calls.get("row_dot_sums", 0) > 0


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("preset", ["MABN2d", "BatchNorm2d"])
def test_inplace_relu_after_the_layer(fmt, preset):
    """The output is a tensor of its own, not a view made inside the autograd Function: an
    in-place ReLU may follow (as in torchvision's ResNets), and the gradient through it is the
    float64 reference's."""
    x64, up64 = make_input(8, 3, 5, 5), make_input(8, 3, 5, 5, seed=3)
    grads = []
    for dtype, layout, inplace in ((D, torch.contiguous_format, False), (torch.float32, fmt, True)):
        layer = getattr(mabn, preset)(3, norm_batch_size=2).to(dtype)
        x = x64.to(dtype).contiguous(memory_format=layout).requires_grad_()
        y = torch.relu_(layer(x)) if inplace else torch.relu(layer(x))
        assert y.is_contiguous(memory_format=layout)
        grads.append(torch.autograd.grad(y, x, up64.to(dtype))[0].double())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_autocast_keeps_float32_statistics():
    layer = mabn.MABN2d(3, norm_batch_size=2)
    x = torch.randn(4, 3, 4, 4).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.running_var.dtype == torch.float32 and layer.fp_window.dtype == torch.float32
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- builders
def test_build_norm_layers_and_alpha_conversion():
    bn = mabn.build_norm(8, layer="bn", alpha=0.9)
    assert type(bn) is nn.BatchNorm2d and bn.momentum == pytest.approx(0.1)
    gn = mabn.build_norm(8, layer="gn", num_groups=4)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 4
    assert isinstance(mabn.build_norm(8, layer="syncbn"), mabn.SyncBatchNorm2d)
    layer = mabn.build_norm(8, form="modified", fp_stats="ema", bp_stats="sma", norm_batch_size=2,
                            alpha=0.98, buffer_size=16)
    assert (layer.form, layer.fp_stats, layer.bp_stats, layer.norm_batch_size, layer.alpha,
            layer.buffer_size) == ("modified", "ema", "sma", 2, 0.98, 16)


def test_convert_model_swaps_layers_and_keeps_weights():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        model.layer1[0].bn1.weight.uniform_()
    w_bn = model.layer1[0].bn1.weight.clone()
    w_conv = model.conv1.weight.clone()
    n_bn = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    n_conv = sum(type(m) is nn.Conv2d for m in model.modules())
    mabn.convert_model(model, dict(form="modified", fp_stats="ema", bp_stats="sma", norm_batch_size=2,
                                   alpha=0.98), weight_centralization=True)
    assert sum(isinstance(m, BatchStatNorm2d) for m in model.modules()) == n_bn
    assert sum(isinstance(m, mabn.CenConv2d) for m in model.modules()) == n_conv
    assert not any(type(m) in (nn.BatchNorm2d, nn.Conv2d) for m in model.modules())
    assert torch.equal(model.layer1[0].bn1.weight, w_bn) and torch.equal(model.conv1.weight, w_conv)
    out = model(torch.randn(4, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (4, 10) and model.conv1.weight.grad is not None


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,needle", [
    (dict(form="centred"), "form='centred'"),
    (dict(fp_stats="median"), "fp_stats='median'"),
    (dict(bp_stats="EMA"), "bp_stats='EMA'"),
    (dict(buffer_size=0), "buffer_size=0"),
    (dict(alpha=1.0), "alpha=1.0 must be in [0, 1)"),
    (dict(alpha=-0.1), "alpha=-0.1"),
    (dict(momentum=0.0), "momentum=0.0 must be in (0, 1]"),
    (dict(momentum=1.5), "momentum=1.5"),
    (dict(momentum=None), "momentum=None (torch's cumulative moving average) is not supported"),
    (dict(alpha=0.9, momentum=0.1), "give either alpha=0.9 (the paper's weight of the OLD value) or momentum=0.1"),
    (dict(norm_batch_size=0), "norm_batch_size=0"),
    (dict(r_max=0.5), "r_max=0.5"),
    (dict(ema_init="zero"), "ema_init='zero'"),
])
def test_bad_options_name_the_option(kwargs, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        BatchStatNorm2d(4, **kwargs)


def test_bad_inputs():
    layer = mabn.MABN2d(3, norm_batch_size=4)
    with pytest.raises(ValueError, match="batch size 6 is not divisible by norm_batch_size=4"):
        layer(torch.randn(6, 3, 2, 2))
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match="4-D"):
        layer.eval()(torch.randn(4, 3))
    with pytest.raises(ValueError, match="unknown normalization option.*'buffersize'"):
        mabn.build_norm(3, buffersize=4)
    with pytest.raises(ValueError, match="layer='bnn'"):
        mabn.build_norm(3, layer="bnn")
    with pytest.raises(ValueError, match="norm_batch_size=2 needs layer='batchstat'"):
        mabn.build_norm(3, layer="bn", norm_batch_size=2)


@pytest.mark.parametrize("offset", [0.0, 3.0, 100.0])  # fast one-pass path, and the centred path
@pytest.mark.parametrize("bp", ["batch", "sma"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_float32_precision_for_badly_centred_inputs(offset, bp, fmt):
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(8, 4, 6, 6, generator=g, dtype=D) + offset
    up = torch.randn(8, 4, 6, 6, generator=g, dtype=D)
    kw = dict(form="vanilla", fp_stats="batch", bp_stats=bp, norm_batch_size=2)
    l32, l64 = BatchStatNorm2d(4, **kw), BatchStatNorm2d(4, **kw).double()
    for it in range(2):
        xa, xb = x64.float().contiguous(memory_format=fmt).requires_grad_(), x64.clone().requires_grad_()
        ya, yb = l32(xa), l64(xb)
        ya.backward(up.float().contiguous(memory_format=fmt)), yb.backward(up)
        torch.testing.assert_close(ya.double(), yb, rtol=0, atol=2e-5)
        torch.testing.assert_close(xa.grad.double(), xb.grad, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", ["cpp_layer", "cpp_passes", "cpu", "torch"])
def test_a_training_output_is_freed_when_dropped(cpu_kernels, backend):
    """Nothing a backend keeps (its autograd context, the C++ layer's results) holds the output
    alive: a training forward's output, dropped, is freed at once, so that a training loop reuses
    the memory instead of growing."""
    import weakref
    layer = mabn.MABN2d(4, norm_batch_size=2)
    x = make_input(4, 4, 3, 3).float().requires_grad_()
    with mabn.backends.forced(backend):
        y = layer(x)
        y.sum().backward()
        y2 = layer(x)  # one without a backward: its graph holds the context
    refs = [weakref.ref(y), weakref.ref(y2)]
    del y, y2
    assert [r() for r in refs] == [None, None]
