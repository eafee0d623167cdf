"""``style-*`` zoo models: small 28x28 BNNs, each writing its activation binarizer the way
one kind of real code does (see /work/shared/FINDINGS.md, "Where binarizers live").

Common skeleton (unless a docstring says otherwise), input (1, 28, 28):

    stem: real 3x3 conv (in_chans -> C)                                  28x28
    block1: BN -> <binarizer> -> binary 3x3 conv (C -> C)  -> MaxPool2   14x14
    block2: BN -> <binarizer> -> binary 3x3 conv (C -> C2) -> MaxPool2    7x7
    head: BN -> adaptive avgpool -> real FC (C2 -> classes)

C = 16 * width, C2 = 32 * width. So: 2 activation sites, 2 weight binarizers, a BN right
before every site (XNOR-Net order), a real first layer and a real last layer.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import BinaryConv2d, BinaryLinear, SignActivation, SignSTE, ch


# ----------------------------------------------------------------------------------------
# Skeleton
# ----------------------------------------------------------------------------------------
class _Block(nn.Module):
    """BN -> (binarizer, written by the subclass's forward) -> binary conv -> MaxPool."""

    def __init__(self, cin, cout, conv_cls=BinaryConv2d):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = conv_cls(cin, cout, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)

    def binarize(self, x):  # overridden, or replaced by inline code in ``forward``
        raise NotImplementedError

    def forward(self, x):
        x = self.bn(x)
        x = self.binarize(x)
        return self.pool(self.conv(x))


class StyleNet(nn.Module):
    """stem (real conv) -> block1 -> block2 -> BN -> avgpool -> FC (real)."""

    def __init__(self, block1, block2, c2, num_classes, in_chans, c):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, c, 3, padding=1, bias=False)
        self.block1 = block1
        self.block2 = block2
        self.bn_out = nn.BatchNorm2d(c2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        x = self.pool(self.bn_out(x))
        return self.fc(torch.flatten(x, 1))


def _style_net(block_cls, num_classes, in_chans, width, **block_kwargs):
    c, c2 = ch(16, width), ch(32, width)
    return StyleNet(block_cls(c, c, **block_kwargs), block_cls(c, c2, **block_kwargs),
                    c2, num_classes, in_chans, c)


# ----------------------------------------------------------------------------------------
# style-torch-sign: inline torch.sign, no STE
# ----------------------------------------------------------------------------------------
class TorchSignBlock(_Block):
    """``torch.sign`` inline after BN and no STE at all (inference-style code): gradient
    does not flow through the sign, so only layers after the last site train."""

    def forward(self, x):
        x = self.bn(x)
        x = torch.sign(x)
        x = self.conv(x)
        return self.pool(x)


def style_torch_sign(num_classes=10, in_chans=1, width=1.0, input_size=None):
    return _style_net(TorchSignBlock, num_classes, in_chans, width)


# ----------------------------------------------------------------------------------------
# style-tensor-sign: inline x.sign() (identity STE via detach)
# ----------------------------------------------------------------------------------------
class TensorSignBlock(_Block):
    """Tensor method ``x.sign()`` inline, identity STE ``x + (x.sign() - x).detach()``."""

    def forward(self, x):
        x = self.bn(x)
        x = x + (x.sign() - x).detach()
        x = self.conv(x)
        return self.pool(x)


def style_tensor_sign(num_classes=10, in_chans=1, width=1.0, input_size=None):
    return _style_net(TensorSignBlock, num_classes, in_chans, width)


# ----------------------------------------------------------------------------------------
# style-function-ste: autograd.Function called via .apply inside a Module
# ----------------------------------------------------------------------------------------
class StraightThroughSign(nn.Module):
    """Activation module whose forward is ``SignSTE.apply(x)`` (hardtanh-window STE)."""

    def forward(self, x):
        return SignSTE.apply(x)


class FunctionSTEBlock(_Block):
    def __init__(self, cin, cout):
        super().__init__(cin, cout)
        self.act = StraightThroughSign()

    def binarize(self, x):
        return self.act(x)


def style_function_ste(num_classes=10, in_chans=1, width=1.0, input_size=None):
    return _style_net(FunctionSTEBlock, num_classes, in_chans, width)


# ----------------------------------------------------------------------------------------
# style-detach-ste: polynomial approximation, detach trick
# ----------------------------------------------------------------------------------------
class ApproxSign(nn.Module):
    """sign forward; backward through 2c - c|c| with c = clamp(x, -1, 1) (Bi-Real's
    polynomial, written with clamp instead of masks), via the detach trick."""

    def forward(self, x):
        c = x.clamp(-1, 1)
        approx = 2 * c - c * c.abs()
        return torch.sign(x).detach() - approx.detach() + approx


class DetachSTEBlock(_Block):
    def __init__(self, cin, cout):
        super().__init__(cin, cout)
        self.act = ApproxSign()

    def binarize(self, x):
        return self.act(x)


def style_detach_ste(num_classes=10, in_chans=1, width=1.0, input_size=None):
    return _style_net(DetachSTEBlock, num_classes, in_chans, width)


# ----------------------------------------------------------------------------------------
# style-heaviside: (x > 0).float(), alphabet {0, 1}
# ----------------------------------------------------------------------------------------
class HeavisideSTE(nn.Module):
    """Heaviside step ``(x > 0).float()`` in {0, 1}; STE through the hard sigmoid
    (clamp(x, -1, 1) + 1) / 2. A threshold shift here means ``x > t``."""

    def forward(self, x):
        out = (x > 0).float()
        approx = (x.clamp(-1, 1) + 1) / 2
        return approx + (out - approx).detach()


class HeavisideBlock(_Block):
    def __init__(self, cin, cout):
        super().__init__(cin, cout)
        self.act = HeavisideSTE()

    def binarize(self, x):
        return self.act(x)


def style_heaviside(num_classes=10, in_chans=1, width=1.0, input_size=None):
    return _style_net(HeavisideBlock, num_classes, in_chans, width)


# ----------------------------------------------------------------------------------------
# style-where: torch.where(x >= 0, 1., -1.), sign(0) = +1
# ----------------------------------------------------------------------------------------
def where_sign(x):
    """Plain function (not a module): +1 where x >= 0 else -1 (so sign(0) = +1, unlike
    ``torch.sign``), hardtanh-window STE by the detach trick."""
    out = torch.where(x >= 0, 1.0, -1.0)
    h = F.hardtanh(x)
    return h + (out - h).detach()


class WhereBlock(_Block):
    def forward(self, x):
        x = self.bn(x)
        x = where_sign(x)
        x = self.conv(x)
        return self.pool(x)


def style_where(num_classes=10, in_chans=1, width=1.0, input_size=None):
    return _style_net(WhereBlock, num_classes, in_chans, width)


# ----------------------------------------------------------------------------------------
# style-scaled: alpha * sign(x)
# ----------------------------------------------------------------------------------------
class ScaledSign(nn.Module):
    """alpha * sign(x) (STE on the sign). ``mode="learnable"``: alpha is a learnable scalar;
    ``mode="mean"``: alpha = mean |x| per sample (XNOR-Net's activation scale K). The
    binary alphabet is {-alpha, +alpha}: the threshold is still at 0."""

    def __init__(self, mode="learnable"):
        super().__init__()
        self.mode = mode
        if mode == "learnable":
            self.alpha = nn.Parameter(torch.ones(()))
        elif mode != "mean":
            raise ValueError(mode)

    def forward(self, x):
        if self.mode == "learnable":
            alpha = self.alpha
        else:
            alpha = x.abs().mean(dim=(1, 2, 3), keepdim=True)
        return alpha * SignSTE.apply(x)


class ScaledBlock(_Block):
    def __init__(self, cin, cout, mode="learnable"):
        super().__init__(cin, cout)
        self.act = ScaledSign(mode)

    def binarize(self, x):
        return self.act(x)


def style_scaled(num_classes=10, in_chans=1, width=1.0, input_size=None):
    """block1: learnable scalar alpha; block2: alpha = mean|x| per sample."""
    c, c2 = ch(16, width), ch(32, width)
    return StyleNet(ScaledBlock(c, c, "learnable"), ScaledBlock(c, c2, "mean"),
                    c2, num_classes, in_chans, c)


# ----------------------------------------------------------------------------------------
# style-rsign: learnable per-channel bias just before sign (ReActNet RSign)
# ----------------------------------------------------------------------------------------
class RSign(nn.Module):
    """ReActNet RSign: sign(x + b_c) with a learnable per-channel bias b_c (an existing,
    learnable threshold t_c = -b_c); hardtanh-window STE around the shifted input."""

    def __init__(self, channels):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        x = x + self.bias
        h = F.hardtanh(x)
        return h + (torch.sign(x) - h).detach()


class RSignBlock(_Block):
    def __init__(self, cin, cout):
        super().__init__(cin, cout)
        self.act = RSign(cin)

    def binarize(self, x):
        return self.act(x)


def style_rsign(num_classes=10, in_chans=1, width=1.0, input_size=None):
    return _style_net(RSignBlock, num_classes, in_chans, width)


# ----------------------------------------------------------------------------------------
# style-conv-input: the binary conv binarizes its own input (and its weight)
# ----------------------------------------------------------------------------------------
class InputBinarizingConv2d(nn.Conv2d):
    """IR-Net / BinaryNet style conv: ``F.conv2d(SignSTE.apply(input), SignSTE.apply(W))``.
    Each call = 1 activation site (the input quantizer of this layer) + 1 weight binarizer.
    Zero padding is applied by conv2d after the sign."""

    is_binary_layer = True

    def forward(self, input):
        return F.conv2d(SignSTE.apply(input), SignSTE.apply(self.weight), self.bias,
                        self.stride, self.padding, self.dilation, self.groups)


class ConvInputBlock(_Block):
    """BN -> InputBinarizingConv2d -> MaxPool: no separate activation op at all."""

    def __init__(self, cin, cout):
        super().__init__(cin, cout, conv_cls=InputBinarizingConv2d)

    def forward(self, x):
        return self.pool(self.conv(self.bn(x)))


def style_conv_input(num_classes=10, in_chans=1, width=1.0, input_size=None):
    return _style_net(ConvInputBlock, num_classes, in_chans, width)


# ----------------------------------------------------------------------------------------
# style-control-flow: data-dependent Python `if` (FX tracing fails inside the block)
# ----------------------------------------------------------------------------------------
class GuardedBinaryBlock(_Block):
    """BN -> (guard: rescale if activations explode) -> inline torch.sign STE -> binary
    conv -> MaxPool. The ``if`` on a tensor value makes ``torch.fx`` fail inside this block,
    so it has to be a leaf, and its (inline) binarizer must be found inside that leaf."""

    def forward(self, x):
        x = self.bn(x)
        if x.abs().mean() > 100:  # data-dependent control flow (never true after BN)
            x = x / x.abs().amax()
        h = F.hardtanh(x)
        x = h + (torch.sign(x) - h).detach()
        return self.pool(self.conv(x))


class SelfBinarizingConv2d(nn.Conv2d):
    """Conv that binarizes its input and weight inline in forward (detach-trick STEs,
    hardtanh window for the input, identity for the weight): 1 site + 1 weight binarizer."""

    is_binary_layer = True

    def forward(self, input):
        h = F.hardtanh(input)
        bx = h + (torch.sign(input) - h).detach()
        w = self.weight
        bw = w + (torch.sign(w) - w).detach()
        return F.conv2d(bx, bw, self.bias, self.stride, self.padding, self.dilation, self.groups)


class SelfBinarizingBlock(_Block):
    def __init__(self, cin, cout):
        super().__init__(cin, cout, conv_cls=SelfBinarizingConv2d)

    def forward(self, x):
        return self.pool(self.conv(self.bn(x)))


def style_control_flow(num_classes=10, in_chans=1, width=1.0, input_size=None):
    """block1: GuardedBinaryBlock (control flow + inline sign); block2: BN ->
    SelfBinarizingConv2d (sign of its own input inside the conv's forward)."""
    c, c2 = ch(16, width), ch(32, width)
    return StyleNet(GuardedBinaryBlock(c, c), SelfBinarizingBlock(c, c2),
                    c2, num_classes, in_chans, c)


# ----------------------------------------------------------------------------------------
# style-shared-act: one activation module called at three places
# ----------------------------------------------------------------------------------------
class SharedActNet(nn.Module):
    """stem -> BN -> act -> bconv1 -> BN -> act -> bconv2 -> pool -> BN -> act -> bconv3 ->
    pool -> BN -> avgpool -> FC, with ONE ``self.act`` (SignActivation) object called three
    times: 3 sites (each needs its own threshold), 3 weight binarizers."""

    def __init__(self, num_classes=10, in_chans=1, width=1.0):
        super().__init__()
        c, c2 = ch(16, width), ch(32, width)
        self.stem = nn.Conv2d(in_chans, c, 3, padding=1, bias=False)
        self.act = SignActivation()
        self.bn1 = nn.BatchNorm2d(c)
        self.conv1 = BinaryConv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv2 = BinaryConv2d(c, c, 3, padding=1, bias=False)
        self.pool2 = nn.MaxPool2d(2)
        self.bn3 = nn.BatchNorm2d(c)
        self.conv3 = BinaryConv2d(c, c2, 3, padding=1, bias=False)
        self.pool3 = nn.MaxPool2d(2)
        self.bn_out = nn.BatchNorm2d(c2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.conv1(self.act(self.bn1(x)))                  # site 1
        x = self.pool2(self.conv2(self.act(self.bn2(x))))      # site 2
        x = self.pool3(self.conv3(self.act(self.bn3(x))))      # site 3
        x = self.pool(self.bn_out(x))
        return self.fc(torch.flatten(x, 1))


def style_shared_act(num_classes=10, in_chans=1, width=1.0, input_size=None):
    return SharedActNet(num_classes, in_chans, width)


# ----------------------------------------------------------------------------------------
# style-temperature: STE sharpness in a buffer the training loop anneals
# ----------------------------------------------------------------------------------------
class TemperatureSign(nn.Module):
    """sign forward; backward through tanh(k x) where ``k`` is a buffer the training loop
    raises every epoch (``set_temperature``). An fx-traced copy would freeze ``k``."""

    def __init__(self, k: float = 1.0):
        super().__init__()
        self.register_buffer("k", torch.tensor(float(k)))

    def forward(self, x):
        approx = torch.tanh(self.k * x)
        return torch.sign(x).detach() - approx.detach() + approx


class TemperatureBlock(_Block):
    def __init__(self, cin, cout):
        super().__init__(cin, cout)
        self.act = TemperatureSign()

    def binarize(self, x):
        return self.act(x)


class TemperatureNet(StyleNet):
    def set_temperature(self, k: float) -> None:
        """Called by the training loop (e.g. k = 1 -> 10 over training)."""
        for m in self.modules():
            if isinstance(m, TemperatureSign):
                m.k.fill_(float(k))


def style_temperature(num_classes=10, in_chans=1, width=1.0, input_size=None):
    c, c2 = ch(16, width), ch(32, width)
    return TemperatureNet(TemperatureBlock(c, c), TemperatureBlock(c, c2), c2, num_classes, in_chans, c)


# ----------------------------------------------------------------------------------------
# style-numpy-scalar: a numpy integer as an op argument
# ----------------------------------------------------------------------------------------
class NumpyScalarNet(nn.Module):
    """stem -> MaxPool -> BN -> act1 -> bconv -> MaxPool -> BN -> act2 ->
    ``x.view(x.size(0), np.int64(-1))`` -> binary FC -> BN -> real FC.
    The numpy int breaks plain ``torch.fx`` tracing. 2 sites, 2 weight binarizers
    (bconv, bfc). Flatten size depends on ``input_size`` (28 -> 7x7)."""

    def __init__(self, num_classes=10, in_chans=1, width=1.0, input_size=28):
        super().__init__()
        c, c2, f = ch(16, width), ch(32, width), ch(64, width)
        side = input_size // 4
        self.stem = nn.Conv2d(in_chans, c, 3, padding=1, bias=False)
        self.pool1 = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(c)
        self.act1 = SignActivation()
        self.conv = BinaryConv2d(c, c2, 3, padding=1, bias=False)
        self.pool2 = nn.MaxPool2d(2)
        self.bn2 = nn.BatchNorm2d(c2)
        self.act2 = SignActivation()
        self.flat_dim = np.int64(c2 * side * side)  # numpy ints, as scripts often keep
        self.fc1 = BinaryLinear(int(self.flat_dim), f, bias=False)
        self.bn3 = nn.BatchNorm1d(f)
        self.fc2 = nn.Linear(f, num_classes)

    def forward(self, x):
        x = self.act1(self.bn1(self.pool1(self.stem(x))))
        x = self.act2(self.bn2(self.pool2(self.conv(x))))
        x = x.view(x.size(0), np.int64(-1))
        return self.fc2(self.bn3(self.fc1(x)))


def style_numpy_scalar(num_classes=10, in_chans=1, width=1.0, input_size=28):
    return NumpyScalarNet(num_classes, in_chans, width, input_size)


# ----------------------------------------------------------------------------------------
# style-hardtanh: BinaryNet (Courbariaux/Hubara): nn.Hardtanh module, then sign
# ----------------------------------------------------------------------------------------
class HardtanhBlock(_Block):
    """BN -> ``nn.Hardtanh`` module -> inline sign with identity STE (the hardtanh supplies
    the |x| <= 1 gradient window, as in BinaryNet.pytorch). A shift must go *before* the
    hardtanh so the clip window moves with it."""

    def __init__(self, cin, cout):
        super().__init__(cin, cout)
        self.htanh = nn.Hardtanh()

    def forward(self, x):
        x = self.bn(x)
        x = self.htanh(x)
        x = x + (torch.sign(x) - x).detach()
        x = self.conv(x)
        return self.pool(x)


def style_hardtanh(num_classes=10, in_chans=1, width=1.0, input_size=None):
    return _style_net(HardtanhBlock, num_classes, in_chans, width)
