"""The mathematics of a batch-statistics layer's training step, top to bottom.

:class:`mabn.BatchStatNorm2d` (``mabn/norm.py``) holds the state; this module holds the math of
one training forward and its backward, in the order they run (the semantics, option by option,
are in ``mabn/norm.py``'s docstring):

1. :func:`batch_statistics`: each normalization group's mu and v (eq. 2), or q = E[x^2] (eq. 15).
2. :func:`forward_statistics`: the SMA (eq. 13) and EMA (eq. 12) of those, the statistic s that
   normalizes (``bp_stats``), the renormalization r, d towards ``fp_stats`` (eq. 14, 19); the
   windows and EMAs are updated after use.
3. :class:`Normalize`: ``out = weight * (r * Y + d) + bias`` with ``Y = (x - mu_s) / sqrt(v_s +
   eps)``, never materialising Y; its backward is eq. 20, whose statistics g, Psi (eq. 5) go
   through their own SMA / EMA in :func:`backward_statistics`.

Every pass over the data (a per-(group, channel) sum, the output, the input gradient) is a method
of a ``passes`` object (:class:`mabn.backends.base.Passes`: plain torch expressions, or the CPU's
faster ones): the math here never depends on how a pass runs. The statistics between the passes
act on small (group, channel) tensors and are functions of tensors and constants only, so that
torch.compile fuses them; the C++ layer (``mabn/csrc/norm_statistics.cpp``) is their
line-by-line twin, tested against them.
"""

from __future__ import annotations

import torch

from .options import NormOptions

__all__ = ["CANCELLATION_RATIO", "sliding_mean", "ema_update", "sample_rows", "batch_statistics",
           "forward_statistics", "backward_statistics", "Normalize", "train_forward",
           "record_forward", "record_backward"]

#: Above this ratio mean^2 / variance, E[x^2] - mu^2 in float32 loses too many digits: the layer
#: then recomputes the statistics (and the backward reduction) with centred, Welford-style kernels.
CANCELLATION_RATIO = 16.0


def sliding_mean(window, valid, new):
    """Simple moving averages (eq. 13) of ``new`` (G, K, C) continuing ``window`` (m-1, K, C).

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


def ema_update(running, value, alpha, first):
    """Eq. 12 in place: running <- alpha * running + (1 - alpha) * value, or value itself where
    ``first`` (a bool tensor, or None) is true."""
    value = value.to(running.dtype)
    updated = running * alpha + value * (1.0 - alpha)
    if first is not None:
        updated = torch.where(first, value, updated)
    running.copy_(updated)


def sample_rows(t, groups, n):
    """(G, C) or (1, C) per-group coefficients -> (N, C), one row per sample."""
    c = t.shape[1]
    return t[:, None, :].expand(groups, n // groups, c).reshape(n, c)


def batch_statistics(x, groups, vanilla, eps, passes):
    """Each group's batch statistics (eq. 2 / eq. 15), (G, K, C) in x's dtype: (mu, v) per group
    for the vanilla form (K = 2, biased variance), (q,) = (E[x^2],) for the modified one; and
    whether they were computed centred.

    The sums come from ``passes.group_sums`` (float64 combinations of float32 partial sums);
    when the input is so badly centred that E[x^2] - mu^2 loses precision (mean^2 >
    CANCELLATION_RATIO * (v + eps)), and always where ``passes.always_centred``, the vanilla
    statistics are recomputed by torch's centred var_mean kernel, and the backward then reduces
    ``dout * (x - mu)`` instead of ``dout * x`` (``centred``)."""
    n, c, h, w = x.shape
    count = (n // groups) * h * w
    s1, s2 = passes.group_sums(x, groups, with_sum=vanilla)
    second = s2 / count
    if not vanilla:
        return second[:, None].to(x.dtype), False
    mean = s1 / count
    var = (second - mean * mean).clamp_min(0.0)
    centred = x.dtype != torch.float64 and (
        passes.always_centred or bool((mean * mean > CANCELLATION_RATIO * (var + eps)).any()))
    if centred:
        var, mean = torch.var_mean(x.view(groups, n // groups, c, h, w), dim=(1, 3, 4), correction=0)
    return torch.stack([mean, var], 1).to(x.dtype), centred


def _select(which, batch, sma, ema):
    return {"batch": batch, "sma": sma, "ema": ema}[which]


def _renormalization(s, f, warm, num_batches_tracked, o: NormOptions):
    """r and d of eq. 14 / 19 (G, C) between the normalizing statistic ``s`` and the forward
    statistic ``f`` (G, K, C); None where they are 1 and 0 (s and f the same statistic); r = 1,
    d = 0 during the warm-ups."""
    if o.fp_stats == o.bp_stats and warm is None:
        return None, None
    inv_std_f = torch.rsqrt(f[:, -1] + o.eps)
    r = ((s[:, -1] + o.eps).sqrt() * inv_std_f).clamp(1.0 / o.r_max, o.r_max)
    d = ((s[:, 0] - f[:, 0]) * inv_std_f).clamp(-o.d_max, o.d_max) if o.vanilla else None
    limit = max(o.warmup_iters, o.renorm_warmup_iters)
    if limit > 0:
        off = num_batches_tracked < limit
        r = torch.where(off, torch.ones_like(r), r)
        if d is not None:
            d = torch.where(off, torch.zeros_like(d), d)
    return r, d


def forward_statistics(batch, count, fp_window, fp_window_valid, running_mean, running_var,
                       num_batches_tracked, o: NormOptions):
    """One training forward's statistics from the groups' batch statistics ``batch`` (G, K, C).

    Returns ``(s0, inv_std, shift, r, d, warm)``: the bp_stats statistic s of the first group
    (K, C); ``1 / sqrt(v_s + eps)`` and the shift ``mu_s`` (G, C; shift None for the modified
    form); r and d (G, C, None where 1 and 0, see :func:`_renormalization`); the warm-up flag (a
    0-dim bool tensor, or None without warm-up). Updates the SMA window, the EMAs and the
    iteration counter in place, after use (eq. 12-14, 19)."""
    groups = batch.shape[0]
    # The value the EMA takes in this iteration: mean over groups, unbiased variance.
    ema_value = batch.mean(0, keepdim=True)  # (1, K, C)
    if o.vanilla:
        ema_value = torch.cat([ema_value[:, :1], ema_value[:, 1:] * (count / (count - 1))], 1)
    sma = window = valid = None
    if "sma" in (o.fp_stats, o.bp_stats):
        sma, window, valid = sliding_mean(fp_window, fp_window_valid, batch)
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
    r, d = _renormalization(s, f, warm, num_batches_tracked, o)
    s0 = s[0].clone()  # (not a view of an EMA buffer updated below)
    # SMA window and EMA updates, after use (eq. 12, 13).
    if sma is not None:
        fp_window.copy_(window)
        fp_window_valid.copy_(valid)
    if o.vanilla:
        ema_update(running_mean, ema_value[0, 0], o.alpha, first)
    ema_update(running_var, ema_value[0, -1], o.alpha, first)
    num_batches_tracked.add_(1)
    return s0, inv_std_s, shift, r, d, warm


def _used_backward_statistics(stats, mean, bp_window, bp_window_valid, running_g, running_psi, first, warm,
                              o: NormOptions):
    """The (G, K, C) backward statistics u that eq. 20 uses, by ``bp_stats``: the groups' own
    ``stats``, their SMA (the window updated) or the EMA of previous backwards ("after use"; their
    ``mean`` over groups on the first backward with ema_init "first"); the groups' own during
    warm-up."""
    if o.bp_stats == "batch":
        u = stats
    elif o.bp_stats == "sma":
        u, window, valid = sliding_mean(bp_window, bp_window_valid, stats)
        bp_window.copy_(window)
        bp_window_valid.copy_(valid)
    else:
        ema = torch.stack([running_g, running_psi])[-stats.shape[1]:]
        u = ema[None] if first is None else torch.where(first, mean, ema)[None]
    u = u.to(stats.dtype)
    if warm is not None and o.bp_stats != "batch":
        u = torch.where(warm, stats, u)
    return u


def backward_statistics(s_dout, s_dout_x, inv_std, shift, a, count, n, warm, centred, bp_window,
                        bp_window_valid, running_g, running_psi, num_backward_tracked, o: NormOptions):
    """One backward's statistics and eq. 20's coefficients, from the groups' reductions
    ``s_dout`` = sum(dL/dout) and ``s_dout_x`` = sum(dL/dout * x) (or * (x - shift) when
    ``centred``), float64 (G, C).

    Pushes the groups' g_B (vanilla) and Psi_B (eq. 5 with G = a * dL/dout = weight * r *
    dL/dYhat) into their SMA window and EMA (after use) and returns the per-sample rows (N, C) of
    ``dL/dx = dout * a_rows + x * b_rows + k_rows`` (k_rows None when 0), the affine parameters'
    gradient sums ``sum(dL/dout * Y)`` and ``sum(dL/dout)`` (G, C), and g_u, Psi_u of the first
    group (g_u None for the modified form)."""
    groups = inv_std.shape[0]
    sum_dout = s_dout.to(a.dtype)  # (G, C)
    if centred:
        sum_dout_y = inv_std * s_dout_x.to(a.dtype)
    else:
        sum_dout_x = s_dout_x.to(a.dtype)
        sum_dout_y = inv_std * (sum_dout_x if shift is None else sum_dout_x - shift * sum_dout)
    psi_b = a * sum_dout_y / count
    g_b = a * sum_dout / count if o.vanilla else None
    stats = psi_b[:, None] if g_b is None else torch.stack([g_b, psi_b], 1)  # (G, K, C)
    mean = stats.mean(0)  # (K, C)
    first = num_backward_tracked == 0 if o.ema_init == "first" else None
    u = _used_backward_statistics(stats, mean, bp_window, bp_window_valid, running_g, running_psi, first, warm, o)
    if g_b is not None:
        ema_update(running_g, mean[0], o.alpha, first)
    ema_update(running_psi, mean[-1], o.alpha, first)
    num_backward_tracked.add_(1)
    g_u, psi_u = (None if g_b is None else u[:, 0]), u[:, -1]
    # Eq. 20: dL/dx = (G - g_u - Y * Psi_u) * inv_std with Y = (x - shift) * inv_std, i.e.
    # dL/dx = dout * (a inv) + x * (-Psi_u inv^2) + (Psi_u inv^2 shift - g_u inv).
    coef_x = -psi_u * inv_std * inv_std
    const = None if shift is None else -coef_x * shift
    if g_u is not None:
        const = -g_u * inv_std if const is None else const - g_u * inv_std
    return (sample_rows(a * inv_std, groups, n), sample_rows(coef_x.expand_as(a), groups, n),
            None if const is None else sample_rows(const.expand_as(a), groups, n),
            sum_dout_y, sum_dout, None if g_u is None else g_u[0].clone(), psi_u[0].clone())


class Normalize(torch.autograd.Function):
    """``out = Y * a + c`` with ``Y = (x - shift) * inv_std`` per (group, channel), eq. 19/20.

    ``a = weight * r`` and ``c = weight * d + bias`` (G, C) are differentiable (they carry the
    affine parameters' gradients); ``shift`` and ``inv_std`` (G, C) are constants (the
    ``bp_stats`` statistic), and the input gradient is eq. 20 with the backward statistics chosen
    by ``layer.bp_stats``. Y is never materialised: the forward is one pass
    ``out = x * (a * inv_std) + (c - a * inv_std * shift)``, the backward two reductions and one
    more pass, with x saved instead of Y; ``passes`` runs the three.
    """

    @staticmethod
    def forward(ctx, x, shift, inv_std, a, c, layer, warm, centred, passes):
        groups, n = inv_std.shape[0], x.shape[0]
        scale = a * inv_std
        offset = c if shift is None else c - scale * shift
        out = passes.affine(x, sample_rows(scale, groups, n), sample_rows(offset.expand_as(scale), groups, n))
        ctx.save_for_backward(x, shift, inv_std, a)
        ctx.layer, ctx.warm, ctx.centred, ctx.passes = layer, warm, centred, passes
        return out

    @staticmethod
    def backward(ctx, dout):
        x, shift, inv_std, a = ctx.saved_tensors
        layer, passes = ctx.layer, ctx.passes
        dout = dout.to(x.dtype)
        groups, n = inv_std.shape[0], x.shape[0]
        count = (n // groups) * x.shape[2] * x.shape[3]
        if ctx.centred:  # badly centred input: reduce dout * (x - shift) directly
            shift_rows = sample_rows(shift.to(x.dtype), groups, n)[:, :, None, None]
            s_dout, s_dout_x = passes.group_dot_sums(dout, x - shift_rows, groups)
        else:
            s_dout, s_dout_x = passes.group_dot_sums(dout, x, groups)
        a_rows, b_rows, k_rows, sum_dout_y, sum_dout, g_0, psi_0 = backward_statistics(
            s_dout, s_dout_x, inv_std, shift, a, count, n, ctx.warm, ctx.centred,
            layer.bp_window, layer.bp_window_valid, layer.running_g, layer.running_psi,
            layer.num_backward_tracked, layer.options())
        if layer.record_used_statistics:
            record_backward(layer, g_0, psi_0)
        dx = passes.input_gradient(dout, x, a_rows, b_rows, k_rows)
        return dx, None, None, sum_dout_y, sum_dout, None, None, None, None


def train_forward(layer, x, groups, passes):
    """One training forward of ``layer`` on ``x`` (its compute dtype, ``groups`` normalization
    groups), differentiable through eq. 20: batch statistics, forward statistics, normalization."""
    n, c, h, w = x.shape
    o = layer.options()
    with torch.no_grad():
        batch, centred = batch_statistics(x, groups, o.vanilla, o.eps, passes)
        s0, inv_std, shift, r, d, warm = forward_statistics(
            batch, (n // groups) * h * w, layer.fp_window, layer.fp_window_valid,
            layer.running_mean, layer.running_var, layer.num_batches_tracked, o)
    # Affine coefficients per (group, channel): out = Y * a + c, a = weight*r, c = weight*d + bias.
    weight = layer.weight.to(x.dtype)
    bias = layer.bias.to(x.dtype)
    a = weight.expand(groups, c) if r is None else weight * r
    c_ = bias.expand(groups, c) if d is None else torch.addcmul(bias, weight, d)
    out = Normalize.apply(x, shift, inv_std, a, c_, layer, warm, centred, passes)
    if layer.record_used_statistics:
        record_forward(layer, s0, r, o.vanilla)
    return out


def record_forward(layer, s0, r, vanilla):
    """``layer.used_statistics`` after a training forward (see BatchStatNorm2d.record_used_statistics)."""
    used = {"mean": s0[0], "var": s0[1]} if vanilla else {"chi2": s0[0]}
    used["r"] = torch.ones_like(s0[-1]) if r is None else r[0]
    layer.used_statistics = {k: v.detach().clone() for k, v in used.items()}


def record_backward(layer, g_0, psi_0):
    """... and after its backward: Psi (and g, vanilla) of the first group."""
    layer.used_statistics["psi"] = psi_0
    if g_0 is not None:
        layer.used_statistics["g"] = g_0
