"""Builders: one normalization layer from options, and conversion of an existing model.

``build_norm`` takes the option names of :class:`mabn.BatchStatNorm2d` (``alpha``, the paper's
weight of the old value, not torch's ``momentum``) plus ``layer`` (which implementation) and
``num_groups`` (GroupNorm); the Hydra ``norm`` config group of the trainer uses the same names.
``convert_model`` swaps the layers of an existing model, in the spirit of
``nn.SyncBatchNorm.convert_sync_batchnorm`` (also available as the classmethod
:meth:`mabn.BatchStatNorm2d.convert_batchnorm` of every preset).

The default rule, shared by both: an option that is not given (or is None; except
``norm_batch_size``, where None means the whole batch) takes its value from
:data:`DEFAULT_OPTIONS`: for ``layer="batchstat"`` those of the :class:`mabn.MABN2d` preset
(modified form, EMA forward / SMA backward statistics, alpha 0.98, buffer 16, r_max 5, r = 1 for
100 iterations, ema_init "first"), so that the MABN library's builders give MABN, not the vanilla
BN baseline; a source BatchNorm's momentum is never used.
"""

from __future__ import annotations

from types import MappingProxyType

from torch import nn

from .convert import Conversion, log_conversion, replace_batchnorms
from .norm import OPTION_NAMES, BatchStatNorm2d, MABN2d
from .options import check_options
from .sync import SyncBatchNorm2d

__all__ = ["build_norm", "convert_model", "resolve_norm_options", "NORM_OPTIONS", "LAYER_OPTIONS",
           "LAYERS", "DEFAULT_OPTIONS"]

#: Implementations selectable with ``layer``.
#:  - "batchstat": the configurable family :class:`BatchStatNorm2d` (BN, BRN, modified, MABN, ablations)
#:  - "bn": torch's nn.BatchNorm2d (the regular-batch reference; whole batch, no groups)
#:  - "syncbn": :class:`mabn.SyncBatchNorm2d`, an nn.SyncBatchNorm (statistics over all ranks;
#:    the SyncBN baseline) that also runs on the CPU with gloo
#:  - "gn": nn.GroupNorm with ``num_groups`` groups (the GN baseline)
LAYERS = ("batchstat", "bn", "syncbn", "gn")

# The family's options by name; torch's ``momentum`` and the factory arguments are not options
# (``alpha`` is the one name of the EMA weight in options and configs).
_FAMILY_OPTIONS = OPTION_NAMES
#: Every option name build_norm accepts.
NORM_OPTIONS = ("layer",) + _FAMILY_OPTIONS + ("num_groups",)

#: The options each layer uses (build_norm refuses the others when they are set).
LAYER_OPTIONS = {
    "batchstat": _FAMILY_OPTIONS,
    "bn": ("alpha", "eps"),
    "syncbn": ("alpha", "eps"),
    "gn": ("num_groups", "eps"),
}


#: The value of each option that is not given (or None), per layer: MABN2d's options for
#: "batchstat"; torch's defaults (alpha 0.9, i.e. momentum 0.1; eps 1e-5) for "bn"/"syncbn";
#: 32 groups for "gn".
DEFAULT_OPTIONS = MappingProxyType({
    "batchstat": MappingProxyType(MABN2d(1, device="meta").option_values()),
    "bn": MappingProxyType({"alpha": 0.9, "eps": 1e-5}),
    "syncbn": MappingProxyType({"alpha": 0.9, "eps": 1e-5}),
    "gn": MappingProxyType({"num_groups": 32, "eps": 1e-5}),
})


def resolve_norm_options(layer: str = "batchstat", **options) -> dict:
    """The complete options ``build_norm`` builds with: ``layer`` and every option that layer
    uses (:data:`LAYER_OPTIONS`), the given ones (not None) and :data:`DEFAULT_OPTIONS` for the
    rest; ``norm_batch_size=None`` means the whole batch. Unknown options, options the layer
    does not use and bad values are a ValueError (an :class:`mabn.OptionError` for values)."""
    unknown = sorted(set(options) - set(NORM_OPTIONS))
    if unknown:
        hint = " (torch's momentum is 1 - alpha; the options take alpha)" if "momentum" in unknown else ""
        raise ValueError(f"unknown normalization option(s) {unknown}{hint}; known: {list(NORM_OPTIONS)}")
    if layer not in LAYERS:
        raise ValueError(f"layer={layer!r} is not one of {list(LAYERS)}")
    given = {k: v for k, v in options.items() if v is not None}
    if layer != "batchstat" and "norm_batch_size" in given:
        raise ValueError(f"norm_batch_size={given['norm_batch_size']!r} needs layer='batchstat'; "
                         f"layer={layer!r} normalizes the whole batch")
    if layer == "batchstat" and "num_groups" in given:
        raise ValueError("option num_groups applies to layer='gn' only")
    allowed = LAYER_OPTIONS[layer]
    extra = sorted(k for k in given if k not in allowed)
    if extra:
        raise ValueError(f"option(s) {extra} do not apply to layer={layer!r} (it accepts {list(allowed)})")
    resolved = {**DEFAULT_OPTIONS[layer], **given}
    if layer == "batchstat":
        BatchStatNorm2d(1, **resolved, device="meta")  # checks every value
    else:
        check_options(**{k: v for k, v in resolved.items() if k != "num_groups"})
    return {"layer": layer, **resolved}


def build_norm(num_features: int, layer: str = "batchstat", *, device=None, dtype=None, **options) -> nn.Module:
    """Build one normalization layer for ``num_features`` channels.

    Args:
        num_features: channels C.
        layer: one of :data:`LAYERS`.
        device, dtype: factory arguments of the new layer.
        **options: for ``layer="batchstat"``, any :class:`BatchStatNorm2d` option (form, fp_stats,
            bp_stats, norm_batch_size, alpha, buffer_size, eps, r_max, d_max, warmup_iters,
            renorm_warmup_iters, ema_init); those not given (or None) take the values of the
            :class:`MABN2d` preset (:data:`DEFAULT_OPTIONS`), so ``build_norm(c)`` is MABN
            (as a :class:`BatchStatNorm2d`) and norm_batch_size=None the whole batch. For
            "bn"/"syncbn": alpha (the paper's weight of the old value, default 0.9; the torch
            layer gets ``momentum = 1 - alpha``) and eps; norm_batch_size must be None (they
            normalize the whole batch). For "gn": num_groups (default 32), eps. Options that the
            chosen layer does not use are an error, so a typo cannot pass silently; the values
            are checked by :func:`mabn.options.check_options`.

    Returns a :class:`BatchStatNorm2d`, nn.BatchNorm2d, :class:`mabn.SyncBatchNorm2d` or
    nn.GroupNorm (see :func:`resolve_norm_options` for the complete options it uses).
    """
    return _build(num_features, resolve_norm_options(layer, **options), device=device, dtype=dtype)


def _build(num_features: int, resolved: dict, **factory) -> nn.Module:
    """The layer of ``resolved`` (the output of :func:`resolve_norm_options`)."""
    opts = dict(resolved)
    layer = opts.pop("layer")
    if layer == "batchstat":
        return BatchStatNorm2d(num_features, **opts, **factory)
    if layer in ("bn", "syncbn"):
        cls = nn.BatchNorm2d if layer == "bn" else SyncBatchNorm2d
        return cls(num_features, momentum=1.0 - opts["alpha"], eps=opts["eps"], **factory)
    num_groups = opts["num_groups"]
    if not isinstance(num_groups, int) or num_groups < 1 or num_features % num_groups:
        raise ValueError(f"num_groups={num_groups!r} must be a positive divisor of num_features={num_features}")
    return nn.GroupNorm(num_groups, num_features, eps=opts["eps"], **factory)


def _describe(resolved: dict) -> str:
    """The layer class and its options, for the conversion's log line."""
    opts = {k: v for k, v in resolved.items() if k != "layer"}
    if resolved["layer"] == "batchstat":
        return BatchStatNorm2d(1, **opts, device="meta").describe()
    cls = {"bn": "nn.BatchNorm2d", "syncbn": "mabn.SyncBatchNorm2d", "gn": "nn.GroupNorm"}[resolved["layer"]]
    if "alpha" in opts:
        opts = {"momentum": round(1.0 - opts.pop("alpha"), 12), **opts}
    return f"{cls}({', '.join(f'{k}={v!r}' for k, v in opts.items())})"


def convert_model(model: nn.Module, norm: dict | None = None, weight_centralization: bool = False) -> nn.Module:
    """Swap the normalization (and optionally convolution) layers of ``model`` in place.

    Every torch BatchNorm of 4-D inputs (:func:`mabn.convert.is_batchnorm_2d`: nn.BatchNorm2d,
    nn.SyncBatchNorm, other ``_BatchNorm`` subclasses) becomes ``build_norm(num_features,
    **norm)`` on the old layer's device and dtype and in its train/eval mode, keeping its affine
    weights and running statistics (see :func:`mabn.convert.copy_norm_state`) and recording its
    qualified name in the model as ``layer.qualified_name`` (error messages name it).

    Options of ``norm`` not given take :data:`DEFAULT_OPTIONS` (the rule of :func:`build_norm`):
    ``convert_model(m, dict(norm_batch_size=2))`` is MABN on groups of 2 images, not vanilla BN.
    alpha is ``norm["alpha"]`` or that default (0.98 for "batchstat", 0.9 for "bn"/"syncbn");
    the source layers' torch momentum is NOT used. One INFO line (logger ``mabn.convert``) says
    what was built: the layer class, every option, how many layers were replaced, and that the
    source momentum was not used when it differs; a WARNING lists the BatchNorm1d/3d (and
    torchvision FrozenBatchNorm2d) layers left as they are. Bad options are refused before the
    model is touched. With ``weight_centralization`` every plain nn.Conv2d becomes a
    :class:`CenConv2d` sharing its weights. ``norm=None`` leaves the normalizations.

    Layers that already are mabn family layers or CenConv2d are left as they are, so converting
    a converted model changes nothing (idempotent).

    Returns ``model`` (or the new layer when ``model`` itself is converted), like
    ``nn.SyncBatchNorm.convert_sync_batchnorm``.
    """
    if norm is None:
        return replace_batchnorms(model, None, weight_centralization)
    resolved = resolve_norm_options(**norm)
    record = Conversion()
    result = replace_batchnorms(model, lambda c, **factory: _build(c, resolved, **factory),
                                weight_centralization, record)
    alpha_given = dict(norm).get("alpha") is not None
    default = "MABN2d's default" if resolved["layer"] == "batchstat" else f"the default of layer={resolved['layer']!r}"
    log_conversion("convert_model", record, _describe(resolved), resolved.get("alpha"),
                   "given" if alpha_given else default)
    return result
