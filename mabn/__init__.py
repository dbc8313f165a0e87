"""mabn: Moving Average Batch Normalization (Yan et al., ICLR 2020) and its ablations in PyTorch.

The library, one concern a module (it knows nothing of Hydra or of the trainer, which lives in
:mod:`mabn.engine` and is not imported here):

* :mod:`mabn.norm`: the layers (:class:`BatchStatNorm2d` and its presets BN, BRN, modified, MABN);
* :mod:`mabn.functional`: their mathematics (eq. 5-20), forward and backward;
* :mod:`mabn.backends`: how the passes over the data run (torch, CPU, C++), chosen per call;
* :mod:`mabn.kernels`: building and loading the C++ extension of ``mabn/csrc``;
* :mod:`mabn.options`: the layers' options, value ranges and :class:`OptionError`;
* :mod:`mabn.conv`: weight-centralized convolutions (eq. 18);
* :mod:`mabn.build`, :mod:`mabn.convert`: one layer from options; swapping a model's BatchNorms;
* :mod:`mabn.sync`: :class:`SyncBatchNorm2d`, nn.SyncBatchNorm that also runs on the CPU (gloo);
* :mod:`mabn.fold`: folding into convolutions and export for inference;
* :mod:`mabn.stats`: the batch-statistics recorder of Figures 2-4.
"""

from .build import DEFAULT_OPTIONS, LAYER_OPTIONS, LAYERS, NORM_OPTIONS, build_norm, convert_model, resolve_norm_options
from .conv import CenConv2d
from .convert import is_batchnorm_2d
from .norm import BatchNorm2d, BatchRenorm2d, BatchStatNorm2d, MABN2d, ModifiedBatchNorm2d
from .sync import SyncBatchNorm2d
from .options import EMA_INITS, FORMS, STATISTICS, OptionError, check_options
from . import fold, stats
from .fold import FoldReport, export_torchvision_state_dict, fold_model
from .stats import StatisticsRecorder

__all__ = [
    "fold_model", "FoldReport", "export_torchvision_state_dict", "StatisticsRecorder", "SyncBatchNorm2d",
    "BatchStatNorm2d", "BatchNorm2d", "BatchRenorm2d", "ModifiedBatchNorm2d", "MABN2d",
    "CenConv2d", "build_norm", "convert_model", "is_batchnorm_2d", "check_options", "OptionError",
    "resolve_norm_options", "DEFAULT_OPTIONS", "NORM_OPTIONS", "LAYER_OPTIONS", "LAYERS", "FORMS", "STATISTICS", "EMA_INITS",
]
