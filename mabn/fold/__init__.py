# -*- coding: utf-8 -*-
"""
Inference-time folding and export of models that use the mabn layer library.

MABN keeps inference linear (paper, Sec. 1 and appendix B.5): in eval mode every layer of the
family (BN, BRN, modified BN, MABN and every ablation combination of ``BatchStatNorm2d``) is exactly

    F.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=eps)
        = x * s + (bias - running_mean * s),    s = weight / sqrt(running_var + eps),

a per-channel affine map. For the modified form (eq. 19, MABN) ``running_mean`` is 0 and
``running_var`` holds the EMA of chi^2 = E[x^2], so the same formula applies. Weight centralization
(eq. 18, ``CenConv2d``) is a reparametrisation of a plain convolution: ``W_hat = W - mean_{in,kh,kw} W``.
Hence a (centralized) convolution followed by an eval-mode normalization is a single plain
``nn.Conv2d`` with bias:

    W' = W_hat * s[:, None, None, None],    b' = (b - running_mean) * s + bias.

The package holds one concern per module (all names are importable from ``mabn.fold``):

* :mod:`mabn.fold.pairing`: which normalization folds into which convolution (the pairing rule
  below, on a ``torch.fx`` trace), :func:`is_foldable_norm`;
* :mod:`mabn.fold.folding`: :func:`fold_conv_norm` and :func:`fold_model`, a deep copy of an eval-mode model in which every normalization that directly
  follows a convolution is folded into it (plain ``nn.Conv{1,2,3}d`` with bias) and replaced by
  ``nn.Identity``; the copy contains no mabn classes.
* :mod:`mabn.fold.export`: :func:`plain_model` / :func:`export_torchvision_state_dict` map a
  converted model back onto the
  stock layers (``CenConv2d`` -> ``nn.Conv2d`` with the centered weight, family norms ->
  ``nn.BatchNorm2d`` with the same buffers), e.g. to load a MABN-trained ResNet-50 into
  ``torchvision.models.resnet50()`` with ``strict=True``.
  :func:`export_torchscript` and :func:`export_onnx` save the folded model.

Pairing rule (how a norm finds "its" convolution). The model is traced with ``torch.fx`` treating
convolutions and normalizations as leaf modules. A normalization call is folded into the
convolution call that produces its only input when

1. the convolution is a plain ``nn.Conv1d/2d/3d`` or a ``CenConv2d`` (not a transposed conv and not
   some other subclass whose forward we do not know);
2. the convolution's output has no other user (otherwise the other user would see the folded
   values);
3. both modules are called exactly once in the traced graph (no weight sharing);
4. ``conv.out_channels == norm.num_features``.

A norm that fails the rule is "unfoldable": :func:`fold_model` raises a ``ValueError`` naming it
(``strict=True``, the default) or keeps it as an eval-mode ``nn.BatchNorm2d`` holding the same
statistics (``strict=False``), which is still a linear per-channel affine map at inference.
torchvision's ResNets (``conv1/bn1``, ``convK/bnK`` in the blocks and the ``downsample``
``Sequential(conv, bn)``) fold completely.

A model that torch.fx cannot trace as a whole (torchvision's Faster/Mask R-CNN and RetinaNet:
their forward iterates over inputs and has data-dependent control flow) is folded part by part:
:func:`fold_model` traces its children instead, recursively, and folds every traceable submodule
that holds normalizations (the backbone body, a ``FastRCNNConvFCHead``/``MaskRCNNHeads``, a
RetinaNet head's conv towers). What is left unfolded is logged (one WARNING, logger
``mabn.fold``) and listed in the :class:`FoldReport` that ``fold_model(model,
return_report=True)`` also returns. The pairing rule is then applied inside each traced
submodule; a convolution or normalization that untraced code also calls directly (weight
sharing across the boundary) is not detected.

Normalizations that use statistics of the input at inference (nn.GroupNorm, nn.LayerNorm,
nn.InstanceNorm2d, BatchNorm without running statistics) are not linear maps and are not
"normalizations" for this module: they are left untouched (a BatchNorm without running statistics
that is called is reported as unfoldable).
"""
from __future__ import annotations

from .export import export_onnx, export_torchscript, export_torchvision_state_dict, plain_model
from .folding import FoldReport, fold_conv_norm, fold_model
from .pairing import is_foldable_norm

__all__ = [
    "fold_model",
    "FoldReport",
    "fold_conv_norm",
    "plain_model",
    "export_torchvision_state_dict",
    "export_torchscript",
    "export_onnx",
    "is_foldable_norm",
]
