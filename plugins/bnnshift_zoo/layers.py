"""Binarizers and binary layers shared by the zoo models.

Two kinds of binarizing op live here, and bnnshift's scan must tell them apart:

* activation binarizers (their input depends on the data): ``SignActivation``,
  ``BinaryActivation`` (Bi-Real / ReActNet), ``SignSTE`` and ``BinActive``
  (``autograd.Function`` STEs), ``LearnableBias`` is *not* a binarizer but the learnable
  threshold ReActNet puts in front of one;
* weight binarizers (their input depends only on parameters): the ``sign`` inside
  ``BinaryConv2d`` / ``BinaryLinear`` / ``HardBinaryConv`` forward, one per layer call.

Every STE here keeps ``sign`` in the forward pass and replaces its (zero) gradient:
the hardtanh window (grad 1 where |x| <= 1) unless said otherwise.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def ch(c: int, width: float, min_c: int = 1) -> int:
    """Channel count ``c`` scaled by ``width`` (at least ``min_c``)."""
    return max(min_c, int(round(c * width)))


# ----------------------------------------------------------------------------------------
# Activation binarizers
# ----------------------------------------------------------------------------------------
class SignSTE(torch.autograd.Function):
    """sign(x) forward; hardtanh-window STE backward (BinaryNet / larq ``ste_sign``)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return grad_output * (x.abs() <= 1).to(grad_output.dtype)


class BinActive(torch.autograd.Function):
    """XNOR-Net's activation binarizer (static-method version of the original legacy
    Function): sign forward, hardtanh-window STE backward. Called inline via ``.apply``."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sign()

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        grad_input = grad_output.clone()
        grad_input[x.ge(1)] = 0
        grad_input[x.le(-1)] = 0
        return grad_input


class SignActivation(nn.Module):
    """sign(x) with a hardtanh-window STE, written as a detach trick (plain torch ops, so it
    traces with ``torch.fx`` and keeps its STE). Used by the paper-style models (vgg-small,
    lenet5) so that what precedes each site (MaxPool/AvgPool -> BN) is visible."""

    def forward(self, x):
        h = F.hardtanh(x)
        return h + (torch.sign(x) - h).detach()


class BinaryActivation(nn.Module):
    """Bi-Real-Net's activation binarizer (also used by ReActNet): sign forward, backward
    through the piecewise-quadratic approximation of sign (grad 2 - 2|x| inside [-1, 1]).
    Written exactly like the public code (masks cast with ``.type(torch.float32)``)."""

    def forward(self, x):
        out_forward = torch.sign(x)
        mask1 = x < -1
        mask2 = x < 0
        mask3 = x < 1
        out1 = (-1) * mask1.type(torch.float32) + (x * x + 2 * x) * (1 - mask1.type(torch.float32))
        out2 = out1 * mask2.type(torch.float32) + (-x * x + 2 * x) * (1 - mask2.type(torch.float32))
        out3 = out2 * mask3.type(torch.float32) + 1 * (1 - mask3.type(torch.float32))
        return out_forward.detach() - out3.detach() + out3


class LearnableBias(nn.Module):
    """ReActNet's ``LearnableBias`` ("move"): a per-channel learnable shift. In front of a
    sign it is a learnable threshold (RSign = move + sign); around a PReLU it makes RPReLU."""

    def __init__(self, out_chn: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, out_chn, 1, 1))

    def forward(self, x):
        return x + self.bias.expand_as(x)


# ----------------------------------------------------------------------------------------
# Binary layers (weight binarizers): one ``sign`` on the weight per forward call
# ----------------------------------------------------------------------------------------
class BinaryConv2d(nn.Conv2d):
    """Conv whose weight is binarized in forward: sign(W) with an identity STE, optionally
    times mean|W| per output channel (XNOR-Net's alpha; ``scale=True``). The input is used
    as given: the activation binarizer is a separate op in front of this layer."""

    is_binary_layer = True  # zoo marker (tests use it to find the first binary layer)

    def __init__(self, *args, scale: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale

    def binary_weight(self) -> torch.Tensor:
        w = self.weight
        bw = w + (torch.sign(w) - w).detach()  # the one weight binarizer of this layer
        if self.scale:
            bw = bw * w.abs().mean(dim=(1, 2, 3), keepdim=True)
        return bw

    def forward(self, input):
        return F.conv2d(input, self.binary_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class HardBinaryConv(BinaryConv2d):
    """Bi-Real-Net / ReActNet ``HardBinaryConv``: sign(W) * mean|W| (scale detached), and
    the gradient of clamp(W, -1, 1) (detach trick), as in the public code. Kept as an
    ``nn.Conv2d`` subclass with a 4-D ``weight`` (the public code uses a flat ``weights``)."""

    def __init__(self, in_chn, out_chn, kernel_size=3, stride=1, padding=1):
        super().__init__(in_chn, out_chn, kernel_size, stride=stride, padding=padding,
                         bias=False, scale=True)

    def binary_weight(self) -> torch.Tensor:
        real_weights = self.weight
        scaling_factor = real_weights.abs().mean(dim=(1, 2, 3), keepdim=True).detach()
        binary_weights_no_grad = scaling_factor * torch.sign(real_weights)
        cliped_weights = torch.clamp(real_weights, -1.0, 1.0)
        return binary_weights_no_grad.detach() - cliped_weights.detach() + cliped_weights


class BinaryLinear(nn.Linear):
    """Linear whose weight is binarized in forward (sign with identity STE, optional
    mean|W| per output feature)."""

    is_binary_layer = True

    def __init__(self, *args, scale: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale

    def forward(self, input):
        w = self.weight
        bw = w + (torch.sign(w) - w).detach()  # the one weight binarizer of this layer
        if self.scale:
            bw = bw * w.abs().mean(dim=1, keepdim=True)
        return F.linear(input, bw, self.bias)


def real_downsample(inplanes: int, planes: int, stride: int) -> nn.Module:
    """Bi-Real-style real-valued shortcut: AvgPool (when strided) + real 1x1 conv + BN.

    ``ceil_mode=True`` so odd feature maps (7x7 from a 28x28 input) give the same size as the
    stride-2 3x3 conv on the main path."""
    layers: list[nn.Module] = []
    if stride != 1:
        layers.append(nn.AvgPool2d(kernel_size=2, stride=stride, ceil_mode=True))
    layers += [nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)]
    return nn.Sequential(*layers)
