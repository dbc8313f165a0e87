"""Weight centralization (eq. 18): convolutions whose kernels have zero mean per output channel."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CenConv2d", "centralize"]


def _centred(t: torch.Tensor) -> torch.Tensor:
    """``t`` minus its mean over (in, kh, kw) per output channel."""
    return t - t.mean(dim=(1, 2, 3), keepdim=True)


class _Centralize(torch.autograd.Function):
    """``W - mean(W)`` over (in, kh, kw) per output channel (eq. 18), with its exact gradient.

    Centring each output channel's n weights is the orthogonal projection P = I - 1 1^T / n, and P
    is symmetric, so dL/dW = P dL/dW_bar = g - mean(g): one mean and one subtraction in each pass,
    in the weight's own memory format. (Autograd of the plain expression materialises the mean's
    gradient as a separate contiguous tensor and adds it to g: for a channels_last weight, one
    extra pass over mixed layouts per convolution and step.)
    """

    @staticmethod
    def forward(ctx, w):
        return _centred(w)

    @staticmethod
    def backward(ctx, g):
        return _centred(g)


def centralize(w: torch.Tensor) -> torch.Tensor:
    """``w - w.mean(dim=(1, 2, 3), keepdim=True)`` (eq. 18) for a (out, in, kh, kw) kernel; its
    gradient is the same centring of the incoming gradient (see _Centralize). Under torch.compile
    the plain expression is traced instead, and the compiler derives and fuses its gradient (the
    autograd Function made a compiled ResNet-50 step 2.5% slower: ``results/speed.md``)."""
    if w.dim() != 4:
        raise ValueError(f"centralize: expected a 4-D (out, in, kh, kw) kernel, got shape {tuple(w.shape)}")
    if torch.compiler.is_compiling():
        return _centred(w)
    return _Centralize.apply(w)


class CenConv2d(nn.Conv2d):
    """nn.Conv2d that convolves with its weight centralized per output channel (eq. 18).

    ``W_bar = W - mean(W[o, :, :, :])`` for every output channel o: the mean runs over the input
    channels of the group and the kernel window, so each output is a zero-mean combination of its
    inputs. This compensates for the missing mean-centring of the modified normalization (section
    4.2). Same constructor signature and the same state_dict keys (``weight``, ``bias``) as
    nn.Conv2d: the stored parameter is the raw W; the centring happens inside forward and is part
    of the autograd graph.
    """

    def centered_weight(self) -> torch.Tensor:
        """The kernel actually convolved with: W minus its mean over (in, kh, kw) per output."""
        return centralize(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.centered_weight(), self.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "CenConv2d":
        """A CenConv2d with ``conv``'s hyper-parameters, sharing its weight and bias parameters."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                  conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                  conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        new.weight = conv.weight
        if conv.bias is not None:
            new.bias = conv.bias
        new.train(conv.training)
        return new
