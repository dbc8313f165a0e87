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

Code: this module holds the state (parameters, buffers, options) and checks the input;
:mod:`mabn.functional` holds the mathematics above, top to bottom; :func:`mabn.backends.choose`
picks how its passes over the data run (plain torch on CUDA and under torch.compile, torch's CPU
kernels through views, or mabn's C++ kernels for eager float32 CPU tensors), every backend giving
the same results up to float32 summation order. Statistics are computed in float32 for
half-precision inputs (autocast) and the output keeps the input's dtype and memory format
(channels_last stays channels_last); it is a tensor of its own, so in-place ops may follow.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from . import backends, convert
from .options import UNSET, NormOptions, check_options, resolve_alpha

__all__ = ["BatchStatNorm2d", "BatchNorm2d", "BatchRenorm2d", "ModifiedBatchNorm2d", "MABN2d", "OPTION_NAMES"]


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
    #: The layer's name in its model (e.g. "backbone.body.layer1.0.bn1"), set on the instance by
    #: the converters as a plain attribute (not a buffer, not in the state_dict); error messages
    #: name it. None: unknown (the messages show the layer's repr).
    qualified_name: str | None = None
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
        momentum: float | None = UNSET,
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
        alpha = resolve_alpha(alpha, momentum, self.default_alpha)
        check_options(num_features=num_features, form=form, fp_stats=fp_stats, bp_stats=bp_stats, ema_init=ema_init,
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

        self._make_state(num_features, 2 if form == "vanilla" else 1, buffer_size, device, dtype)

    def _make_state(self, num_features, k, buffer_size, device, dtype) -> None:
        """The parameters and buffers, on ``device`` in ``dtype`` (the counters int64); ``k``
        forward statistics per group: (mu, v) or (q,)."""
        f = {"device": device, "dtype": dtype}
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
        parameters, running statistics, train/eval mode and ``qualified_name`` (its name in
        ``module``, which error messages name). ``options`` are the constructor's keywords, e.g.
        ``MABN2d.convert_batchnorm(model, norm_batch_size=2)``.

        alpha (eq. 12) is the preset's own (:attr:`default_alpha`: 0.98 for MABN2d, 0.9 for the
        others) unless ``options`` give ``alpha`` or torch's ``momentum``; the source layers'
        momentum is NOT used (a stock BatchNorm's 0.1 would silently turn MABN's 0.98 into 0.9).
        One INFO line (logger ``mabn.convert``) says what was built, with every option, how many
        layers were replaced and, when it differs, that the source momentum was not used; a
        WARNING lists the BatchNorm1d/3d (and torchvision FrozenBatchNorm2d) layers left as
        they are. Layers that already are mabn layers are left alone (idempotent). Returns
        ``module``, or the new layer when ``module`` itself is a BatchNorm.
        """
        probe = cls(1, **options, device="meta")  # bad options fail before the model is touched

        def make(num_features, **factory):
            return cls(num_features, **options, **factory)

        record = convert.Conversion()
        result = convert.replace_batchnorms(module, make, record=record)
        given = options.get("alpha") is not None or "momentum" in options
        convert.log_conversion(f"{cls.__name__}.convert_batchnorm", record, probe.describe(), probe.alpha,
                               "given" if given else f"{cls.__name__}'s default")
        return result

    def option_values(self) -> dict:
        """Every constructor option (:data:`OPTION_NAMES`) with its value:
        ``BatchStatNorm2d(c, **layer.option_values())`` computes what ``layer`` computes."""
        return {name: getattr(self, name) for name in OPTION_NAMES}

    def describe(self) -> str:
        """The class and every option, e.g. ``"MABN2d(form='modified', ..., ema_init='first')"``."""
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.option_values().items())})"

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
            where = self.qualified_name or repr(self)
            raise ValueError(f"{where}: batch size {n} is not divisible by norm_batch_size={b}. Feed "
                             f"batches whose size is a multiple of {b} (DataLoader(drop_last=True), or "
                             f"a batch sampler that keeps whole groups of {b} samples), or build the "
                             f"layer with norm_batch_size=None to normalize each batch as one group")
        if self.form == "vanilla" and b * x.shape[2] * x.shape[3] < 2:
            raise ValueError(f"vanilla normalization needs more than 1 value per channel in a group "
                             f"(norm_batch_size={b}, input shape {tuple(x.shape)})")
        return n // b

    def options(self) -> NormOptions:
        """The options as :mod:`mabn.functional` takes them."""
        return NormOptions(self.form == "vanilla", self.fp_stats, self.bp_stats, self.ema_init,
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
        in_dtype = x.dtype
        # Statistics in at least float32 (autocast / half inputs), output in the input's dtype.
        x = x.to(torch.promote_types(in_dtype, torch.float32))
        return backends.choose(self, x).train_forward(self, x, groups).to(in_dtype)


#: The constructor options of the family (torch's ``momentum`` and the factory arguments aside):
#: form, fp_stats, bp_stats, norm_batch_size, alpha, buffer_size, eps, r_max, d_max, warmup_iters,
#: renorm_warmup_iters, ema_init.
OPTION_NAMES = tuple(p for p in inspect.signature(BatchStatNorm2d.__init__).parameters
                     if p not in ("self", "num_features", "momentum", "device", "dtype"))


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
