"""mabn: Moving Average Batch Normalization (Yan et al., ICLR 2020) and its ablations in PyTorch.

The library: normalization layers (:mod:`mabn.norm`), weight-centralized convolutions
(:mod:`mabn.conv`), builders/converters (:mod:`mabn.build`), folding and export for inference
(:mod:`mabn.fold`) and the batch-statistics recorder of Figures 2-4 (:mod:`mabn.stats`). It knows nothing of Hydra or of the
trainer (which lives in :mod:`mabn.engine` and is not imported here).
"""

from .build import LAYER_OPTIONS, LAYERS, NORM_OPTIONS, build_norm, convert_model, is_batchnorm_2d
from .conv import CenConv2d
from .norm import (
    EMA_INITS,
    FORMS,
    STATISTICS,
    BatchNorm2d,
    BatchRenorm2d,
    BatchStatNorm2d,
    MABN2d,
    ModifiedBatchNorm2d,
    OptionError,
    check_options,
)
from . import fold, stats
from .fold import export_torchvision_state_dict, fold_model
from .stats import StatisticsRecorder

__all__ = [
    "fold_model", "export_torchvision_state_dict", "StatisticsRecorder",
    "BatchStatNorm2d", "BatchNorm2d", "BatchRenorm2d", "ModifiedBatchNorm2d", "MABN2d",
    "CenConv2d", "build_norm", "convert_model", "is_batchnorm_2d", "check_options", "OptionError", "NORM_OPTIONS", "LAYER_OPTIONS", "LAYERS", "FORMS", "STATISTICS", "EMA_INITS",
]
