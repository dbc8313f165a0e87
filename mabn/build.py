"""Builders: one normalization layer from options, and conversion of an existing model.

``build_norm`` takes the option names of :class:`mabn.BatchStatNorm2d` (``alpha``, the paper's
weight of the old value, not torch's ``momentum``) plus ``layer`` (which implementation) and
``num_groups`` (GroupNorm); the Hydra ``norm`` config group of the trainer uses the same names.
``convert_model`` swaps the layers of an existing model, in the spirit of
``nn.SyncBatchNorm.convert_sync_batchnorm`` (also available as the classmethod
:meth:`mabn.BatchStatNorm2d.convert_batchnorm` of every preset).
"""

from __future__ import annotations

import inspect

from torch import nn

from .convert import replace_batchnorms
from .norm import BatchStatNorm2d
from .options import check_options, resolve_alpha

__all__ = ["build_norm", "convert_model", "NORM_OPTIONS", "LAYER_OPTIONS", "LAYERS"]

#: Implementations selectable with ``layer``.
#:  - "batchstat": the configurable family :class:`BatchStatNorm2d` (BN, BRN, modified, MABN, ablations)
#:  - "bn": torch's nn.BatchNorm2d (the regular-batch reference; whole batch, no groups)
#:  - "syncbn": nn.SyncBatchNorm (statistics over all ranks; the SyncBN baseline)
#:  - "gn": nn.GroupNorm with ``num_groups`` groups (the GN baseline)
LAYERS = ("batchstat", "bn", "syncbn", "gn")

# The family's options by name; torch's ``momentum`` and the factory arguments are not options
# (``alpha`` is the one name of the EMA weight in options and configs).
_FAMILY_OPTIONS = tuple(p for p in inspect.signature(BatchStatNorm2d.__init__).parameters
                        if p not in ("self", "num_features", "momentum", "device", "dtype"))
#: Every option name build_norm accepts.
NORM_OPTIONS = ("layer",) + _FAMILY_OPTIONS + ("num_groups",)

#: The options each layer uses (build_norm refuses the others when they are set).
LAYER_OPTIONS = {
    "batchstat": _FAMILY_OPTIONS,
    "bn": ("alpha", "eps"),
    "syncbn": ("alpha", "eps"),
    "gn": ("num_groups", "eps"),
}


def build_norm(num_features: int, layer: str = "batchstat", *, device=None, dtype=None, **options) -> nn.Module:
    """Build one normalization layer for ``num_features`` channels.

    Args:
        num_features: channels C.
        layer: one of :data:`LAYERS`.
        device, dtype: factory arguments of the new layer.
        **options: for ``layer="batchstat"``, any :class:`BatchStatNorm2d` option (form, fp_stats,
            bp_stats, norm_batch_size, alpha, buffer_size, eps, r_max, d_max, warmup_iters,
            renorm_warmup_iters, ema_init). For "bn"/"syncbn": alpha (the paper's weight of the
            old value, default 0.9; the torch layer gets ``momentum = 1 - alpha``) and eps;
            norm_batch_size must be None (they normalize the whole batch). For "gn": num_groups
            (default 32), eps. Options set to None are ignored, except norm_batch_size. Options
            that the chosen layer does not use are an error, so a typo cannot pass silently; the
            values are checked by :func:`mabn.options.check_options`.
    """
    unknown = sorted(set(options) - set(NORM_OPTIONS))
    if unknown:
        hint = " (torch's momentum is 1 - alpha; the options take alpha)" if "momentum" in unknown else ""
        raise ValueError(f"unknown normalization option(s) {unknown}{hint}; known: {list(NORM_OPTIONS)}")
    if layer not in LAYERS:
        raise ValueError(f"layer={layer!r} is not one of {list(LAYERS)}")
    factory = {"device": device, "dtype": dtype}

    def take(allowed):
        extra = sorted(k for k, v in options.items() if v is not None and k not in allowed)
        if extra:
            raise ValueError(f"option(s) {extra} do not apply to layer={layer!r} (it accepts {list(allowed)})")
        return {k: v for k, v in options.items() if v is not None and k in allowed}

    if layer == "batchstat":
        if options.get("num_groups") is not None:
            raise ValueError("option num_groups applies to layer='gn' only")
        opts = {k: v for k, v in options.items()
                if k != "num_groups" and (v is not None or k == "norm_batch_size")}
        return BatchStatNorm2d(num_features, **opts, **factory)
    if layer in ("bn", "syncbn"):
        opts = take(LAYER_OPTIONS[layer] + ("norm_batch_size",))  # for a clear error below
        if opts.pop("norm_batch_size", None) is not None:
            raise ValueError(f"norm_batch_size={options['norm_batch_size']!r} needs layer='batchstat'; "
                             f"layer={layer!r} normalizes the whole batch")
        alpha = resolve_alpha(opts.pop("alpha", None))
        check_options(**opts)
        cls = nn.BatchNorm2d if layer == "bn" else nn.SyncBatchNorm
        return cls(num_features, momentum=1.0 - alpha, **opts, **factory)
    opts = take(LAYER_OPTIONS["gn"])
    num_groups = opts.pop("num_groups", 32)
    check_options(**opts)
    if not isinstance(num_groups, int) or num_groups < 1 or num_features % num_groups:
        raise ValueError(f"num_groups={num_groups!r} must be a positive divisor of num_features={num_features}")
    return nn.GroupNorm(num_groups, num_features, **opts, **factory)


def convert_model(model: nn.Module, norm: dict | None = None, weight_centralization: bool = False) -> nn.Module:
    """Swap the normalization (and optionally convolution) layers of ``model`` in place.

    Every torch BatchNorm of 4-D inputs (:func:`mabn.convert.is_batchnorm_2d`: nn.BatchNorm2d,
    nn.SyncBatchNorm, other ``_BatchNorm`` subclasses) becomes ``build_norm(num_features,
    **norm)`` on the old layer's device and dtype and in its train/eval mode, keeping its affine
    weights and running statistics (see :func:`mabn.convert.copy_norm_state`). torch's momentum is carried
    over as ``alpha = 1 - momentum`` unless ``norm`` sets ``alpha`` (a BatchNorm with
    ``momentum=None``, torch's cumulative average, has no such alpha: the new layer then gets
    ``norm``'s alpha or its default). With ``weight_centralization`` every plain nn.Conv2d becomes
    a :class:`CenConv2d` sharing its weights. ``norm=None`` leaves the normalizations.

    Layers that already are mabn family layers or CenConv2d are left as they are, so converting
    a converted model changes nothing (idempotent).

    Returns ``model`` (or the new layer when ``model`` itself is converted), like
    ``nn.SyncBatchNorm.convert_sync_batchnorm``.
    """
    make = None
    if norm is not None:
        norm = dict(norm)

        def make(num_features, alpha, **factory):
            options = dict(norm)
            if options.get("alpha") is None and alpha is not None \
                    and "alpha" in LAYER_OPTIONS[options.get("layer", "batchstat")]:
                options["alpha"] = alpha
            return build_norm(num_features, **options, **factory)

    return replace_batchnorms(model, make, weight_centralization)

