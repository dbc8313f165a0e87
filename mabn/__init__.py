"""mabn: Moving Average Batch Normalization (Yan et al., ICLR 2020) and its ablations in PyTorch.

The library: normalization layers (:mod:`mabn.norm`), weight-centralized convolutions
(:mod:`mabn.conv`) and builders/converters (:mod:`mabn.build`). It knows nothing of Hydra or of the
trainer (which lives in :mod:`mabn.engine` and is not imported here).
"""

from .build import LAYERS, NORM_OPTIONS, build_norm, convert_model
from .conv import CenConv2d
from .norm import (
    FORMS,
    STATISTICS,
    BatchNorm2d,
    BatchRenorm2d,
    BatchStatNorm2d,
    MABN2d,
    ModifiedBatchNorm2d,
)

__all__ = [
    "BatchStatNorm2d", "BatchNorm2d", "BatchRenorm2d", "ModifiedBatchNorm2d", "MABN2d",
    "CenConv2d", "build_norm", "convert_model", "NORM_OPTIONS", "LAYERS", "FORMS", "STATISTICS",
]
