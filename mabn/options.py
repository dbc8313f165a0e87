"""The options of the normalization layers: their names, value ranges and errors.

Both sides of the library import this module (the layers, the builders, the C++ kernels' loader,
the trainer's config validation), so that a value range is defined once and every bad value is
the same :class:`OptionError` naming the option.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["FORMS", "STATISTICS", "EMA_INITS", "OptionError", "check_options", "resolve_alpha",
           "NormOptions", "UNSET"]

#: ``form``: "vanilla" centres by mu and scales by sigma (eq. 1); "modified" scales by
#: chi = sqrt(E[x^2]) without centring (eq. 15).
FORMS = ("vanilla", "modified")
#: ``fp_stats`` / ``bp_stats``: the batch statistics, their EMA (eq. 12) or their SMA (eq. 13).
STATISTICS = ("batch", "ema", "sma")
#: ``ema_init``: the EMA starts at the first value ("first", the authors' code) or at torch's
#: mean 0 / variance 1 ("torch").
EMA_INITS = ("first", "torch")


class OptionError(ValueError):
    """An invalid option value of the normalization layers; ``option`` names it."""

    def __init__(self, option: str, value, requirement: str):
        self.option = option
        self.value = value
        super().__init__(f"{option}={value!r} {requirement}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _one_of(choices) -> str:
    return f"is not one of {', '.join(map(repr, choices))}"


#: The checks of :func:`check_options`: option -> (predicate, requirement text).
_CHECKS = {
    "num_features": (lambda v: _is_int(v) and v >= 1, "must be a positive integer"),
    "form": (lambda v: v in FORMS, _one_of(FORMS)),
    "fp_stats": (lambda v: v in STATISTICS, _one_of(STATISTICS)),
    "bp_stats": (lambda v: v in STATISTICS, _one_of(STATISTICS)),
    "ema_init": (lambda v: v in EMA_INITS, _one_of(EMA_INITS)),
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
    """Check option values of :class:`mabn.BatchStatNorm2d` (any subset, by keyword).

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


#: The ``momentum`` default of the layers: not given.
UNSET = _Unset()


def resolve_alpha(alpha: float | None, momentum=UNSET, default: float = 0.9) -> float:
    """The paper's alpha (eq. 12, weight of the OLD value) from ``alpha`` or torch's ``momentum``.

    ``momentum`` has torch's meaning (weight of the NEW value): alpha = 1 - momentum. Giving both
    is an error; so is ``momentum=None`` (torch's cumulative moving average, which the layers do
    not implement). Neither given: ``default``.
    """
    if momentum is UNSET:
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


class NormOptions(NamedTuple):
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
