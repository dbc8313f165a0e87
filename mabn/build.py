"""Builders: one normalization layer from options, and conversion of an existing model.

``build_norm`` takes the option names of :class:`mabn.BatchStatNorm2d` plus ``layer`` (which
implementation) and ``num_groups`` (GroupNorm); the Hydra ``norm`` config group of the trainer uses
the same names. ``convert_model`` swaps the layers of an existing model, in the spirit of
``nn.SyncBatchNorm.convert_sync_batchnorm`` and detectron2's ``FrozenBatchNorm2d.convert_frozen_batchnorm``.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .conv import CenConv2d
from .norm import BatchStatNorm2d

__all__ = ["build_norm", "convert_model", "NORM_OPTIONS", "LAYER_OPTIONS", "LAYERS"]

#: Implementations selectable with ``layer``.
#:  - "mabn": the configurable family :class:`BatchStatNorm2d` (BN, BRN, modified, MABN, ablations)
#:  - "bn": torch's nn.BatchNorm2d (the regular-batch reference; whole batch, no groups)
#:  - "syncbn": nn.SyncBatchNorm (statistics over all ranks; the SyncBN baseline)
#:  - "gn": nn.GroupNorm with ``num_groups`` groups (the GN baseline)
LAYERS = ("mabn", "bn", "syncbn", "gn")

_FAMILY_OPTIONS = tuple(p for p in inspect.signature(BatchStatNorm2d.__init__).parameters
                        if p not in ("self", "num_features"))
#: Every option name build_norm accepts.
NORM_OPTIONS = ("layer",) + _FAMILY_OPTIONS + ("num_groups",)

#: The options each layer uses (build_norm refuses the others when they are set).
LAYER_OPTIONS = {
    "mabn": _FAMILY_OPTIONS,
    "bn": ("momentum", "eps"),
    "syncbn": ("momentum", "eps"),
    "gn": ("num_groups", "eps"),
}


def build_norm(num_features: int, layer: str = "mabn", **options) -> nn.Module:
    """Build one normalization layer for ``num_features`` channels.

    Args:
        num_features: channels C.
        layer: one of :data:`LAYERS`.
        **options: for ``layer="mabn"``, any :class:`BatchStatNorm2d` argument (form, fp_stats,
            bp_stats, norm_batch_size, momentum, buffer_size, eps, r_max, d_max, warmup_iters,
            renorm_warmup_iters, ema_init). For "bn"/"syncbn": momentum (the paper's alpha, the
            weight of the old value; converted to torch's ``1 - alpha``) and eps; norm_batch_size
            must be None (they normalize the whole batch). For "gn": num_groups (default 32), eps.
            Options set to None are ignored, except norm_batch_size. Options that the chosen
            layer does not use are an error, so a typo cannot pass silently.
    """
    unknown = sorted(set(options) - set(NORM_OPTIONS))
    if unknown:
        raise ValueError(f"unknown normalization option(s) {unknown}; known: {list(NORM_OPTIONS)}")
    if layer not in LAYERS:
        raise ValueError(f"layer={layer!r} is not one of {list(LAYERS)}")

    def take(allowed):
        extra = sorted(k for k, v in options.items() if v is not None and k not in allowed)
        if extra:
            raise ValueError(f"option(s) {extra} do not apply to layer={layer!r} (it accepts {list(allowed)})")
        return {k: v for k, v in options.items() if v is not None and k in allowed}

    if layer == "mabn":
        opts = {k: v for k, v in options.items() if k != "num_groups"}
        if options.get("num_groups") is not None:
            raise ValueError("option num_groups applies to layer='gn' only")
        return BatchStatNorm2d(num_features, **{k: v for k, v in opts.items()
                                                if v is not None or k == "norm_batch_size"})
    if layer in ("bn", "syncbn"):
        opts = take(LAYER_OPTIONS[layer] + ("norm_batch_size",))  # for a clear error below
        if opts.pop("norm_batch_size", None) is not None:
            raise ValueError(f"norm_batch_size={options['norm_batch_size']!r} needs layer='mabn'; "
                             f"layer={layer!r} normalizes the whole batch")
        alpha = opts.pop("momentum", 0.9)
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"momentum={alpha!r} must be in [0, 1) (it is the weight of the old value)")
        cls = nn.BatchNorm2d if layer == "bn" else nn.SyncBatchNorm
        return cls(num_features, momentum=1.0 - alpha, **opts)
    opts = take(LAYER_OPTIONS["gn"])
    num_groups = opts.pop("num_groups", 32)
    if num_features % num_groups:
        raise ValueError(f"num_groups={num_groups} does not divide num_features={num_features}")
    return nn.GroupNorm(num_groups, num_features, **opts)


def _copy_norm_state(src: nn.modules.batchnorm._BatchNorm, dst: nn.Module) -> None:
    with torch.no_grad():
        if src.affine and getattr(dst, "weight", None) is not None:
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        if (src.track_running_stats and isinstance(dst, (nn.modules.batchnorm._BatchNorm, BatchStatNorm2d))
                and not (isinstance(dst, BatchStatNorm2d) and dst.form == "modified")):
            dst.running_mean.copy_(src.running_mean)
            dst.running_var.copy_(src.running_var)


def convert_model(model: nn.Module, norm: dict | None = None, weight_centralization: bool = False) -> nn.Module:
    """Swap the normalization (and optionally convolution) layers of ``model`` in place.

    Every nn.BatchNorm2d (not its subclasses such as SyncBatchNorm) becomes
    ``build_norm(num_features, **norm)``, keeping its affine weights (and its running statistics
    when the new layer is a vanilla BN-type layer); every nn.Conv2d becomes a :class:`CenConv2d`
    sharing its weights when ``weight_centralization`` is true. New layers are put on the old
    layer's device and dtype and in its train/eval mode. ``norm=None`` leaves the normalizations.

    Returns ``model`` (or the new layer when ``model`` itself is converted), like
    ``nn.SyncBatchNorm.convert_sync_batchnorm``.
    """
    if type(model) is nn.BatchNorm2d and norm is not None:
        new = build_norm(model.num_features, **norm)
        ref = model.weight if model.weight is not None else model.running_mean
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype)
        _copy_norm_state(model, new)
        new.train(model.training)
        return new
    if type(model) is nn.Conv2d and weight_centralization:
        return CenConv2d.from_conv(model)
    for name, child in model.named_children():
        new = convert_model(child, norm, weight_centralization)
        if new is not child:
            setattr(model, name, new)
    return model
