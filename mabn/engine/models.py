"""Model builders: torchvision ResNets, CIFAR-style ResNets, the paper's initialization, then the
mabn conversion."""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock

import mabn

from .config import ConfigError
from .registry import ARCHS, CIFAR_DEPTHS, TORCHVISION_ARCHS, channel_widths, norm_options

__all__ = ["build_model", "build_stock_model", "init_weights", "load_weights", "CifarResNet",
           "CIFAR_DEPTHS", "ARCHS", "channel_widths"]

_TORCHVISION = {name: getattr(tvm, name) for name in TORCHVISION_ARCHS}


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016, section 4.2) for 32 px inputs, built from
    torchvision's ``BasicBlock`` and with torchvision's attribute names (``conv1``, ``bn1``,
    ``layer1``..``layer3``, ``downsample``, ``fc``), so that ``mabn.convert_model``, the folding
    and the statistics recorder treat it like torchvision's ResNets.

    A 3x3 stride-1 stem with ``width`` channels, three stages of ``(depth - 2) / 6`` basic blocks
    at widths (w, 2w, 4w) and strides (1, 2, 2), global average pooling and a linear classifier.
    The shortcut of a block that changes shape is a 1x1 convolution + BN ("option B"), so every
    normalization is an nn.BatchNorm2d that conversion replaces. At 32 px the stages work on
    32x32, 16x16 and 8x8 maps: a normalization group of b images holds b x 1024, b x 256 and
    b x 64 values per channel (128 at b = 2 in the last stage).
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, width: int = 16):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth={depth}: a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, ...)")
        blocks = (depth - 2) // 6
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(width, blocks, 1)
        self.layer2 = self._stage(2 * width, blocks, 2)
        self.layer3 = self._stage(4 * width, blocks, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            downsample = None
            if s != 1 or self.inplanes != planes:
                downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, s, bias=False),
                                           nn.BatchNorm2d(planes))
            layers.append(BasicBlock(self.inplanes, planes, s, downsample))
            self.inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def init_weights(model: nn.Module) -> None:
    """Appendix B.2 and the authors' code: He (kaiming normal, fan_out) convolutions, gamma = 1,
    beta = 0; the fc layer keeps PyTorch's default initialization."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_stock_model(model_cfg, num_classes: int) -> nn.Module:
    """The plain network of ``model_cfg`` (nn.BatchNorm2d, nn.Conv2d): a torchvision ResNet with
    its stem, or a :class:`CifarResNet`; the target of ``mabn.fold.export_torchvision_state_dict``."""
    if model_cfg.arch in CIFAR_DEPTHS:
        return CifarResNet(CIFAR_DEPTHS[model_cfg.arch], num_classes)
    model = _TORCHVISION[model_cfg.arch](weights=None, num_classes=num_classes)
    if model_cfg.small_input:  # 32-64 px inputs: 3x3 stride-1 stem, no max-pool
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


def build_model(model_cfg, norm_cfg, num_classes: int) -> nn.Module:
    """The network of ``model_cfg`` with the paper's initialization, whose every nn.BatchNorm2d
    is replaced by ``mabn.build_norm(**norm options)`` and (with ``norm.weight_centralization``)
    every nn.Conv2d by ``mabn.CenConv2d``."""
    model = build_stock_model(model_cfg, num_classes)
    init_weights(model)
    if model_cfg.zero_init_residual:  # last gamma of each residual branch = 0 (not in the paper)
        for m in model.modules():
            if isinstance(m, tvm.resnet.Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, tvm.resnet.BasicBlock):
                nn.init.zeros_(m.bn2.weight)
    return mabn.convert_model(model, norm=norm_options(norm_cfg),
                              weight_centralization=norm_cfg.weight_centralization)


def load_weights(modules: dict, state: dict) -> None:
    """Load ``state[name]`` into each ``modules[name]`` (the model, and when resuming the optimizer
    and the loss scaler); a checkpoint whose tensors do not fit raises :class:`ConfigError` with
    the first line of torch's message. Training and eval.py load checkpoints through here."""
    try:
        for name, module in modules.items():
            module.load_state_dict(state[name])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(f"the checkpoint does not fit the model of this config: "
                          f"{str(e).strip().splitlines()[0]}") from None
