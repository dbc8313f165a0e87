"""torchvision detectors built from scratch with the config's normalization (Section 5.2, B.3).

:func:`build_detector` builds Mask R-CNN, Faster R-CNN or RetinaNet on a ResNet-FPN backbone in
which every normalization is trainable and is the ``norm`` config's layer (never torchvision's
FrozenBatchNorm2d, the default of ``resnet_fpn_backbone``):

- the ResNet body (stem and every block) and the FPN's lateral and output convolutions (the
  authors' code pairs each FPN conv with MABN; torchvision's FPN has no normalization by default):
  ``model.norm_in=backbone``, the paper's Table 3;
- with ``model.norm_in=backbone_and_heads`` also the 4conv1fc box head and the mask head's four
  convolutions (Table 5), whose normalizations use batch statistics for the first
  ``model.head_warmup_iters`` iterations (the paper: 10,000). The heads see the RoIs of a whole
  step, so their normalization batch is every RoI of the step (norm_batch_size=None there).
  RetinaNet's head is shared by the five FPN levels: a batch-statistics norm there would mix the
  levels in one running average, so its head takes GroupNorm only: with norm.layer=gn and
  ``model.norm_in=backbone_and_heads``, or under any backbone norm with
  ``model.retinanet_head_norm=gn``.

With ``norm.weight_centralization`` every convolution paired with a normalization becomes a
``mabn.CenConv2d`` (eq. 18). The body is built from torchvision's ResNet blocks with torchvision's
module names, so the body of a ``train_imagenet.py`` ResNet-50 checkpoint of the same
normalization loads into it (``model.backbone_checkpoint``, Table 6); ``model.backbone_width``
narrows it for small CPU protocols.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

import mabn

from ..engine.config import ConfigError
from ..engine.models import init_weights
from ..engine.registry import norm_options
from .roi_align import MultiScaleRoIAlign

__all__ = ["ARCHS", "BACKBONES", "ResNetBody", "build_detector", "load_backbone_checkpoint", "norm_layers"]

log = logging.getLogger(__name__)

#: model.arch values.
ARCHS = ("mask_rcnn", "faster_rcnn", "retinanet")
#: model.backbone values: (block, blocks per stage).
BACKBONES = {"resnet18": (tv_resnet.BasicBlock, (2, 2, 2, 2)), "resnet34": (tv_resnet.BasicBlock, (3, 4, 6, 3)),
             "resnet50": (tv_resnet.Bottleneck, (3, 4, 6, 3)), "resnet101": (tv_resnet.Bottleneck, (3, 4, 23, 3))}


class ResNetBody(nn.Module):
    """The ResNet of torchvision (ImageNet stem: 7x7 stride-2 conv, max-pool; four stages of
    ``blocks`` at strides 4, 8, 16, 32) without its classifier, at base width ``width`` (64 =
    torchvision's; stage widths width x 1, 2, 4, 8), with torchvision's module names."""

    def __init__(self, block, blocks: tuple[int, ...], width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.inplanes = width
        for i, n in enumerate(blocks):
            setattr(self, f"layer{i + 1}", self._stage(block, width * 2 ** i, n, 1 if i == 0 else 2))
        self.out_channels = [width * 2 ** i * block.expansion for i in range(len(blocks))]

    def _stage(self, block, planes: int, n: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, down)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(n - 1)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _backbone(m, returned: tuple[int, ...], extra) -> BackboneWithFPN:
    """ResNet body + FPN over the stages ``returned`` (1-based), normalized FPN convs when
    ``model.fpn_norm``."""
    block, blocks = BACKBONES[m.backbone]
    body = ResNetBody(block, blocks, m.backbone_width)
    init_weights(body)  # the paper's (He) initialization, gamma 1, beta 0
    layers = {f"layer{i}": str(j) for j, i in enumerate(returned)}
    in_channels = [body.out_channels[i - 1] for i in returned]
    return BackboneWithFPN(body, layers, in_channels, m.fpn_channels, extra_blocks=extra,
                           norm_layer=nn.BatchNorm2d if m.fpn_norm else None)


def _anchors(m, levels: int, per_octave: int) -> AnchorGenerator:
    sizes = tuple(tuple(int(s * 2 ** (k / per_octave)) for k in range(per_octave)) for s in m.anchor_sizes[:levels])
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


def _rcnn(m, num_classes: int) -> nn.Module:
    """Mask R-CNN or Faster R-CNN: 2fc or 4conv1fc box head, the mask head (Mask R-CNN); the RoI
    poolers torchvision's (7 x 7 boxes, 14 x 14 masks, 2 x 2 samples) through mabn's roi_align."""
    backbone = _backbone(m, (1, 2, 3, 4), LastLevelMaxPool())
    c = m.fpn_channels
    head_norm = nn.BatchNorm2d if m.norm_in == "backbone_and_heads" else None
    if m.box_head == "4conv1fc":
        box_head = FastRCNNConvFCHead((c, 7, 7), [c] * 4, [m.fc_dim], norm_layer=head_norm)
    else:
        box_head = TwoMLPHead(c * 7 * 7, m.fc_dim)
    levels = ["0", "1", "2", "3"]  # torchvision's poolers (P2-P5), their CPU backward a sparse product
    kw = dict(min_size=m.min_size, max_size=m.max_size, rpn_anchor_generator=_anchors(m, 5, 1),
              box_roi_pool=MultiScaleRoIAlign(levels, 7, 2),
              box_head=box_head, box_predictor=FastRCNNPredictor(m.fc_dim, num_classes),
              rpn_pre_nms_top_n_train=m.rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=m.rpn_pre_nms_top_n_test,
              rpn_post_nms_top_n_train=m.rpn_post_nms_top_n_train,
              rpn_post_nms_top_n_test=m.rpn_post_nms_top_n_test,
              rpn_batch_size_per_image=m.rpn_batch_size_per_image,
              box_batch_size_per_image=m.box_batch_size_per_image,
              box_detections_per_img=m.box_detections_per_img)
    if m.arch == "faster_rcnn":
        return FasterRCNN(backbone, **kw)
    mask_head = MaskRCNNHeads(c, [c] * 4, 1, norm_layer=head_norm)
    return MaskRCNN(backbone, mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2), mask_head=mask_head,
                    mask_predictor=MaskRCNNPredictor(c, c, num_classes), **kw)


def _retinanet(m, norm, num_classes: int) -> nn.Module:
    """RetinaNet: P3-P7 (P6, P7 from P5), 3 scales x 3 ratios per location (the paper's)."""
    backbone = _backbone(m, (2, 3, 4), LastLevelP6P7(m.fpn_channels, m.fpn_channels))
    anchors = _anchors(m, 5, 3)
    head_norm = None
    if m.norm_in == "backbone_and_heads" or m.retinanet_head_norm == "gn":
        head_norm = lambda c: nn.GroupNorm(norm.num_groups, c)  # noqa: E731 (the only norm possible there)
    head = RetinaNetHead(m.fpn_channels, anchors.num_anchors_per_location()[0], num_classes, norm_layer=head_norm)
    return RetinaNet(backbone, num_classes, min_size=m.min_size, max_size=m.max_size, anchor_generator=anchors,
                     head=head, detections_per_img=m.box_detections_per_img)


def build_detector(model_cfg, norm_cfg, num_classes: int) -> nn.Module:
    """The detector of ``model_cfg`` (a :class:`~mabn.detection.config.DetectorConfig`) for
    ``num_classes`` classes (background included), with every nn.BatchNorm2d placeholder of the
    backbone (and heads) replaced by the layer of ``norm_cfg`` (``mabn.convert_model``); the
    body of ``model_cfg.backbone_checkpoint`` loaded when given."""
    m = model_cfg
    model = _rcnn(m, num_classes) if m.arch != "retinanet" else _retinanet(m, norm_cfg, num_classes)
    if m.backbone_checkpoint:
        load_backbone_checkpoint(model.backbone.body, m.backbone_checkpoint, norm_cfg)
    options = norm_options(norm_cfg)
    wc = norm_cfg.weight_centralization
    mabn.convert_model(model.backbone, norm=options, weight_centralization=wc)
    if m.norm_in == "backbone_and_heads" and m.arch != "retinanet":
        head = dict(options, norm_batch_size=None) if "norm_batch_size" in options else dict(options)
        if "warmup_iters" in head:
            head["warmup_iters"] = max(head["warmup_iters"], m.head_warmup_iters)
        for part in ("box_head", "mask_head"):
            if hasattr(model.roi_heads, part) and getattr(model.roi_heads, part) is not None:
                mabn.convert_model(getattr(model.roi_heads, part), norm=head, weight_centralization=wc)
    for name, module in model.named_modules():  # names in the whole detector, for the layers' errors
        if isinstance(module, mabn.BatchStatNorm2d):
            module.qualified_name = name
    return model


def norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every normalization layer of ``model`` by qualified name (BatchNorm family, GroupNorm,
    FrozenBatchNorm2d: the trap the tests look for)."""
    from torchvision.ops import FrozenBatchNorm2d
    kinds = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, FrozenBatchNorm2d, mabn.BatchStatNorm2d)
    return {n: mod for n, mod in model.named_modules() if isinstance(mod, kinds)}


def load_backbone_checkpoint(body: nn.Module, path: str, norm_cfg) -> None:
    """Load the ResNet of a train_imagenet.py checkpoint into ``body`` (Table 6: a backbone
    pretrained with the same normalization). Its norm config must be ``norm_cfg`` and its arch
    the body's (the body still holds nn.BatchNorm2d placeholders; the state loads into the
    converted layers after, so it is loaded into a converted copy here)."""
    from ..engine import checkpoint
    try:
        state = checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        raise ConfigError(f"model.backbone_checkpoint={path}: {e}") from None
    saved = state.get("config", {}).get("norm", {})
    differ = [f"norm.{k}={norm_cfg[k]!r} (the checkpoint's: {saved[k]!r})"
              for k in ("layer", "form", "fp_stats", "bp_stats", "weight_centralization")
              if k in saved and saved[k] != norm_cfg[k]]
    if differ:
        raise ConfigError(f"model.backbone_checkpoint={path} was trained with another normalization: "
                          f"{'; '.join(differ)}; pretrain with the same norm, or drop the checkpoint")
    weights = OrderedDict((k, v) for k, v in state["model"].items() if not k.startswith("fc."))
    mabn.convert_model(body, norm=norm_options(norm_cfg), weight_centralization=norm_cfg.weight_centralization)
    try:
        body.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"model.backbone_checkpoint={path} does not fit model.backbone: "
                          f"{str(e).strip().splitlines()[0][:300]}") from None
    log.info("backbone initialised from %s (iteration %d)", path, state.get("iteration", -1))
