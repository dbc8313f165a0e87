"""Model builders: torchvision ResNets, the paper's initialization, then the mabn conversion."""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

import mabn

from .config import norm_options

__all__ = ["build_model", "init_weights"]

_ARCHS = {"resnet18": tvm.resnet18, "resnet50": tvm.resnet50}


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
    """The plain torchvision ResNet of ``model_cfg`` (nn.BatchNorm2d, nn.Conv2d) with its stem;
    the target of ``mabn.fold.export_torchvision_state_dict``."""
    model = _ARCHS[model_cfg.arch](weights=None, num_classes=num_classes)
    if model_cfg.small_input:  # 32-64 px inputs: 3x3 stride-1 stem, no max-pool
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


def build_model(model_cfg, norm_cfg, num_classes: int) -> nn.Module:
    """A torchvision ResNet with the configured stem and initialization, whose every
    nn.BatchNorm2d is replaced by ``mabn.build_norm(**norm options)`` and (with
    ``norm.weight_centralization``) every nn.Conv2d by ``mabn.CenConv2d``."""
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
