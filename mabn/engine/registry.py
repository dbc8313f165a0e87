"""What the config may name: the architectures (with their channel widths) and the normalization
layers (with the ``mabn.build_norm`` options of each).

Both :mod:`mabn.engine.config` (validation) and :mod:`mabn.engine.models` (building) read these
tables; this module imports neither, so neither imports the other for them.
"""

from __future__ import annotations

from mabn import LAYER_OPTIONS, LAYERS

__all__ = ["TORCHVISION_ARCHS", "CIFAR_DEPTHS", "ARCHS", "channel_widths", "NORM_LAYERS",
           "LEGACY_NORM_LAYERS", "norm_options"]

#: torchvision's ResNets (resnet50 is v1.5, stride in the 3x3 conv).
TORCHVISION_ARCHS = ("resnet18", "resnet50")
#: CIFAR-style ResNets (He et al. 2016, section 4.2): depth = 6n + 2.
CIFAR_DEPTHS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet56": 56}
#: Every value model.arch accepts.
ARCHS = TORCHVISION_ARCHS + tuple(CIFAR_DEPTHS)


def channel_widths(arch: str) -> tuple[int, ...]:
    """The channel counts of the normalization layers of ``arch`` (each a multiple of the first)."""
    if arch in CIFAR_DEPTHS:
        return (16, 32, 64)
    return (64, 128, 256, 512) + ((1024, 2048) if arch == "resnet50" else ())


#: Every value norm.layer accepts: the ``layer`` argument of ``mabn.build_norm`` (mabn.LAYERS):
#:  - "batchstat": the configurable family mabn.BatchStatNorm2d (BN, BRN, the modified
#:    normalization, MABN and every ablation of the paper, in groups of norm_batch_size images)
#:  - "bn": torch's nn.BatchNorm2d (whole per-GPU batch)
#:  - "syncbn": mabn.SyncBatchNorm2d (statistics over all ranks; nn.SyncBatchNorm that also runs on the CPU)
#:  - "gn": nn.GroupNorm (num_groups groups)
NORM_LAYERS = LAYERS
#: Values of norm.layer from before the family had its own name: old value -> current value.
LEGACY_NORM_LAYERS = {"mabn": "batchstat"}


def norm_options(norm) -> dict:
    """The ``mabn.build_norm`` keyword arguments of a norm config: ``layer`` and the options
    that layer accepts."""
    return {"layer": norm.layer, **{k: getattr(norm, k) for k in LAYER_OPTIONS[norm.layer]}}
