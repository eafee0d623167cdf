"""Zoo models with the shapes the paper (Kim et al., CVPR 2021) and its baselines use.

Conventions shared by every model here (see also ``models.py`` for the registered counts):

* first conv / first FC: real input and real weights; last FC: real input (no sign in
  front of it) and real weights;
* every other conv / FC is a binary layer (``BinaryConv2d`` / ``BinaryLinear`` /
  ``HardBinaryConv``) and binarizes its weight once per call (= 1 weight binarizer);
* an activation site is one call site of an activation binarizer.

ImageNet-style models end with adaptive average pooling so they also run on 32x32 or
28x28 inputs (``in_chans=1``); ResNet shortcuts are real (AvgPool + 1x1 conv + BN).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import (BinActive, BinaryActivation, BinaryConv2d, BinaryLinear, HardBinaryConv,
                     LearnableBias, SignActivation, ch, real_downsample)


# ----------------------------------------------------------------------------------------
# MLP (paper: MNIST, "2-layer MLP")
# ----------------------------------------------------------------------------------------
class BinaryMLP(nn.Module):
    """Binary MLP for MNIST-like input: real FC 784->H, then two binary hidden FC layers
    (H->H), then a real FC to the classes. Read as "2 (binary) hidden layers".

    Flatten -> fc1 (real) -> BN -> sign -> bfc2 -> BN -> sign -> bfc3 -> BN -> fc_out (real).
    The sign is inline ``torch.sign`` with a hardtanh-window detach-trick STE.
    Sites 2 (the two inline signs), weight binarizers 2 (bfc2, bfc3). No sign in front of
    fc_out: the last FC keeps a real-valued input (the paper's convention).
    """

    def __init__(self, num_classes=10, in_chans=1, width=1.0, input_size=28, hidden=512):
        super().__init__()
        h = ch(hidden, width, 8)
        self.fc1 = nn.Linear(in_chans * input_size * input_size, h)
        self.bn1 = nn.BatchNorm1d(h)
        self.bfc2 = BinaryLinear(h, h, bias=False)
        self.bn2 = nn.BatchNorm1d(h)
        self.bfc3 = BinaryLinear(h, h, bias=False)
        self.bn3 = nn.BatchNorm1d(h)
        self.fc_out = nn.Linear(h, num_classes)

    @staticmethod
    def _sign(x):
        h = F.hardtanh(x)
        return h + (torch.sign(x) - h).detach()

    def forward(self, x):
        x = torch.flatten(x, 1)
        x = self.bn1(self.fc1(x))
        x = self._sign(x)                      # site 1
        x = self.bn2(self.bfc2(x))
        x = self._sign(x)                      # site 2 (same helper, different call site)
        x = self.bn3(self.bfc3(x))
        return self.fc_out(x)


def mlp(num_classes=10, in_chans=1, width=1.0, input_size=28, hidden=512):
    return BinaryMLP(num_classes, in_chans, width, input_size, hidden)


# ----------------------------------------------------------------------------------------
# LeNet-5 (paper: MNIST)
# ----------------------------------------------------------------------------------------
class BinaryLeNet5(nn.Module):
    """Binary LeNet-5: conv6 5x5 (real, pad 2) -> pool -> BN -> sign -> bconv16 5x5 -> pool
    -> BN -> sign -> bfc120 -> BN -> sign -> bfc84 -> BN -> fc (real input, real weights).

    Sites 3 (``act1``, ``act2``, ``act3``), weight binarizers 3 (bconv2, bfc3, bfc4).
    Feature side: s -> s/2 -> s/2-4 -> (s/2-4)/2, i.e. 5 for 28x28, 6 for 32x32.
    """

    def __init__(self, num_classes=10, in_chans=1, width=1.0, input_size=28):
        super().__init__()
        c1, c2, f1, f2 = ch(6, width), ch(16, width), ch(120, width), ch(84, width)
        side = (input_size // 2 - 4) // 2
        self.conv1 = nn.Conv2d(in_chans, c1, 5, padding=2)
        self.pool1 = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(c1)
        self.act1 = SignActivation()
        self.conv2 = BinaryConv2d(c1, c2, 5, bias=False)
        self.pool2 = nn.MaxPool2d(2)
        self.bn2 = nn.BatchNorm2d(c2)
        self.act2 = SignActivation()
        self.fc3 = BinaryLinear(c2 * side * side, f1, bias=False)
        self.bn3 = nn.BatchNorm1d(f1)
        self.act3 = SignActivation()
        self.fc4 = BinaryLinear(f1, f2, bias=False)
        self.bn4 = nn.BatchNorm1d(f2)
        self.fc5 = nn.Linear(f2, num_classes)

    def forward(self, x):
        x = self.act1(self.bn1(self.pool1(self.conv1(x))))
        x = self.act2(self.bn2(self.pool2(self.conv2(x))))
        x = torch.flatten(x, 1)
        x = self.act3(self.bn3(self.fc3(x)))
        x = self.bn4(self.fc4(x))
        return self.fc5(x)


def lenet5(num_classes=10, in_chans=1, width=1.0, input_size=28):
    return BinaryLeNet5(num_classes, in_chans, width, input_size)


# ----------------------------------------------------------------------------------------
# vgg-small (paper: CIFAR-10 and MNIST; the main experiment)
# ----------------------------------------------------------------------------------------
class VGGSmall(nn.Module):
    """The paper's vgg-small: conv 64, 64, 128, 128 (3x3, pad 1) with MaxPool (AvgPool in
    ``vgg-small-avgpool``) after the 2nd and 4th conv, then FC 512, FC 512, FC classes.

    Order per layer: conv -> (pool) -> BN -> ``SignActivation`` -> next binary layer.
    conv1 is real; the last FC has a real input (BN output, no sign) and real weights.
    Sites 5 (act1..act5; act2 and act4 follow a pool: claim 2/3 of the paper),
    weight binarizers 5 (conv2, conv3, conv4, fc1, fc2).
    """

    def __init__(self, num_classes=10, in_chans=3, width=1.0, input_size=32, pool="max"):
        super().__init__()
        c1, c2, f = ch(64, width), ch(128, width), ch(512, width)
        Pool = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}[pool]
        side = input_size // 4
        self.conv1 = nn.Conv2d(in_chans, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.act1 = SignActivation()
        self.conv2 = BinaryConv2d(c1, c1, 3, padding=1, bias=False)
        self.pool2 = Pool(2)
        self.bn2 = nn.BatchNorm2d(c1)
        self.act2 = SignActivation()
        self.conv3 = BinaryConv2d(c1, c2, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c2)
        self.act3 = SignActivation()
        self.conv4 = BinaryConv2d(c2, c2, 3, padding=1, bias=False)
        self.pool4 = Pool(2)
        self.bn4 = nn.BatchNorm2d(c2)
        self.act4 = SignActivation()
        self.fc1 = BinaryLinear(c2 * side * side, f, bias=False)
        self.bn5 = nn.BatchNorm1d(f)
        self.act5 = SignActivation()
        self.fc2 = BinaryLinear(f, f, bias=False)
        self.bn6 = nn.BatchNorm1d(f)
        self.fc3 = nn.Linear(f, num_classes)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.pool2(self.conv2(x))))
        x = self.act3(self.bn3(self.conv3(x)))
        x = self.act4(self.bn4(self.pool4(self.conv4(x))))
        x = torch.flatten(x, 1)
        x = self.act5(self.bn5(self.fc1(x)))
        x = self.bn6(self.fc2(x))
        return self.fc3(x)


def vgg_small(num_classes=10, in_chans=3, width=1.0, input_size=32):
    return VGGSmall(num_classes, in_chans, width, input_size, pool="max")


def vgg_small_avgpool(num_classes=10, in_chans=3, width=1.0, input_size=32):
    return VGGSmall(num_classes, in_chans, width, input_size, pool="avg")


# ----------------------------------------------------------------------------------------
# ResNet-20 with Bi-Real double skip (paper: CIFAR-10, claim 8)
# ----------------------------------------------------------------------------------------
class BiRealUnit(nn.Module):
    """One Bi-Real unit: out = BN(binconv(BinaryActivation(x))) + shortcut(x), then an
    optional extra activation (PReLU / LeakyReLU) after the add. 1 site, 1 weight binarizer.

    The sign input is the residual stream itself (the previous add / PReLU output), so a
    threshold here cannot be folded into a BN bias."""

    def __init__(self, inplanes, planes, stride=1, post_act=None, conv=HardBinaryConv):
        super().__init__()
        self.binary_activation = BinaryActivation()
        self.binary_conv = conv(inplanes, planes, 3, stride=stride, padding=1)
        self.bn = nn.BatchNorm2d(planes)
        self.downsample = (real_downsample(inplanes, planes, stride)
                           if stride != 1 or inplanes != planes else None)
        self.post_act = post_act if post_act is not None else nn.Identity()

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.binary_activation(x)
        out = self.bn(self.binary_conv(out))
        return self.post_act(out + residual)


class ResNet20BiReal(nn.Module):
    """CIFAR ResNet-20 (16/32/64 channels, 3 stages x 3 basic blocks x 2 convs) where each of
    the 18 binary 3x3 convs has its own shortcut (Bi-Real double skip: the paper's "18
    residual blocks"). ``post_act``: None, "prelu" (nn.PReLU(channels) after every add) or
    "leakyrelu" (nn.LeakyReLU(slope) after every add).

    Sites 18 (one ``BinaryActivation`` per unit), weight binarizers 18 (``HardBinaryConv``).
    Stem conv and FC are real; stage-changing units have a real AvgPool+1x1 shortcut.
    """

    def __init__(self, num_classes=10, in_chans=3, width=1.0, post_act=None, slope=0.25):
        super().__init__()
        base = ch(16, width)
        planes = [base, base * 2, base * 4]  # multiples of base: structure independent of width

        def make_post(c):
            if post_act is None:
                return None
            if post_act == "prelu":
                return nn.PReLU(c)
            if post_act == "leakyrelu":
                return nn.LeakyReLU(slope)
            raise ValueError(post_act)

        self.conv1 = nn.Conv2d(in_chans, base, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        units: list[nn.Module] = []
        inplanes = base
        for stage, p in enumerate(planes):
            for i in range(6):  # 3 basic blocks x 2 convs, each conv its own unit
                stride = 2 if (stage > 0 and i == 0) else 1
                units.append(BiRealUnit(inplanes, p, stride, make_post(p)))
                inplanes = p
        self.layers = nn.Sequential(*units)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        x = self.layers(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20_bireal(num_classes=10, in_chans=3, width=1.0, input_size=None):
    return ResNet20BiReal(num_classes, in_chans, width)


def resnet20_bireal_prelu(num_classes=10, in_chans=3, width=1.0, input_size=None):
    return ResNet20BiReal(num_classes, in_chans, width, post_act="prelu")


def resnet20_bireal_leakyrelu(num_classes=10, in_chans=3, width=1.0, slope=0.25, input_size=None):
    return ResNet20BiReal(num_classes, in_chans, width, post_act="leakyrelu", slope=slope)


# ----------------------------------------------------------------------------------------
# ImageNet-style stems
# ----------------------------------------------------------------------------------------
def _imagenet_stem(in_chans, c, relu):
    layers = [nn.Conv2d(in_chans, c, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(c)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.MaxPool2d(3, stride=2, padding=1))
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------
# XNOR-Net ResNet-18 (paper: Table 1, claim 5)
# ----------------------------------------------------------------------------------------
class XnorBasicBlock(nn.Module):
    """XNOR-Net basic block: two times BN -> ``BinActive.apply`` (inline) -> binary conv
    (sign(W) * mean|W|); one shortcut per block (real AvgPool+1x1+BN when downsampling).
    The BN in front of each sign feeds nothing else, so a shift folds into its bias.
    2 sites, 2 weight binarizers."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = BinaryConv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False, scale=True)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = BinaryConv2d(planes, planes, 3, padding=1, bias=False, scale=True)
        self.downsample = (real_downsample(inplanes, planes, stride)
                           if stride != 1 or inplanes != planes else None)

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.bn1(x)
        out = BinActive.apply(out)
        out = self.conv1(out)
        out = self.bn2(out)
        out = BinActive.apply(out)
        out = self.conv2(out)
        return out + residual


class XnorResNet18(nn.Module):
    """XNOR-Net ResNet-18 (ImageNet shape): real 7x7 stem + BN + ReLU + MaxPool, 8 basic
    blocks (64/128/256/512) of two binary 3x3 convs, BN + ReLU, adaptive avgpool, real FC.

    Sites 16 (two inline ``BinActive.apply`` per block), weight binarizers 16.
    """

    def __init__(self, num_classes=10, in_chans=3, width=1.0):
        super().__init__()
        base = ch(64, width)
        self.stem = _imagenet_stem(in_chans, base, relu=True)
        blocks: list[nn.Module] = []
        inplanes = base
        for stage in range(4):
            p = base * 2 ** stage
            for i in range(2):
                blocks.append(XnorBasicBlock(inplanes, p, 2 if (stage > 0 and i == 0) else 1))
                inplanes = p
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def xnor_resnet18(num_classes=10, in_chans=3, width=1.0, input_size=None):
    return XnorResNet18(num_classes, in_chans, width)


# ----------------------------------------------------------------------------------------
# Bi-Real-Net ResNet-18 / 34 (paper: Table 1)
# ----------------------------------------------------------------------------------------
class BiRealNet(nn.Module):
    """Bi-Real-Net (Liu et al. ECCV 2018) as in its public ``birealnet.py``: real 7x7 stem
    + BN + MaxPool, then ``units`` Bi-Real units per stage (each = one binary 3x3 conv with
    its own shortcut; [4,4,4,4] for ResNet-18, [6,8,12,6] for ResNet-34), adaptive avgpool,
    real FC. Sites = weight binarizers = number of units (16 or 32)."""

    def __init__(self, units, num_classes=10, in_chans=3, width=1.0):
        super().__init__()
        base = ch(64, width)
        self.stem = _imagenet_stem(in_chans, base, relu=False)
        layers: list[nn.Module] = []
        inplanes = base
        for stage, n in enumerate(units):
            p = base * 2 ** stage
            for i in range(n):
                layers.append(BiRealUnit(inplanes, p, 2 if (stage > 0 and i == 0) else 1))
                inplanes = p
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def bireal_resnet18(num_classes=10, in_chans=3, width=1.0, input_size=None):
    return BiRealNet([4, 4, 4, 4], num_classes, in_chans, width)


def bireal_resnet34(num_classes=10, in_chans=3, width=1.0, input_size=None):
    return BiRealNet([6, 8, 12, 6], num_classes, in_chans, width)


# ----------------------------------------------------------------------------------------
# ReActNet-A (Liu et al. ECCV 2020), MobileNetV1-based
# ----------------------------------------------------------------------------------------
class ReActBlock(nn.Module):
    """ReActNet-A basic block, following the public ``reactnet.py``:

    move11 -> sign -> binary 3x3 (stride) -> BN -> + x (AvgPool'd when stride 2)
    -> RPReLU (move12, PReLU, move13) -> move21 -> sign -> binary 1x1 (two of them on the
    same binarized input, concatenated, when planes == 2 * inplanes) -> BN -> + out1
    -> RPReLU (move22, PReLU, move23).

    ONE ``self.binary_activation`` module called at two places: 2 sites per block. Each
    ``moveX1`` right before it is a learnable per-channel threshold (RSign).
    Weight binarizers: 2 (normal block) or 3 (channel-doubling block).
    """

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.inplanes, self.planes, self.stride = inplanes, planes, stride
        self.move11 = LearnableBias(inplanes)
        self.binary_3x3 = HardBinaryConv(inplanes, inplanes, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.move12 = LearnableBias(inplanes)
        self.prelu1 = nn.PReLU(inplanes)
        self.move13 = LearnableBias(inplanes)
        self.move21 = LearnableBias(inplanes)
        if inplanes == planes:
            self.binary_pw = HardBinaryConv(inplanes, planes, 1, padding=0)
            self.bn2 = nn.BatchNorm2d(planes)
        else:
            assert planes == 2 * inplanes, (inplanes, planes)
            self.binary_pw_down1 = HardBinaryConv(inplanes, inplanes, 1, padding=0)
            self.binary_pw_down2 = HardBinaryConv(inplanes, inplanes, 1, padding=0)
            self.bn2_1 = nn.BatchNorm2d(inplanes)
            self.bn2_2 = nn.BatchNorm2d(inplanes)
        self.move22 = LearnableBias(planes)
        self.prelu2 = nn.PReLU(planes)
        self.move23 = LearnableBias(planes)
        self.binary_activation = BinaryActivation()
        if stride == 2:
            # ceil_mode: odd maps (7x7 from 28x28 input) match the stride-2 conv output
            self.pooling = nn.AvgPool2d(2, 2, ceil_mode=True)

    def forward(self, x):
        out1 = self.move11(x)
        out1 = self.binary_activation(out1)            # site 1 of this block
        out1 = self.binary_3x3(out1)
        out1 = self.bn1(out1)
        if self.stride == 2:
            x = self.pooling(x)
        out1 = x + out1
        out1 = self.move13(self.prelu1(self.move12(out1)))

        out2 = self.move21(out1)
        out2 = self.binary_activation(out2)            # site 2: same module, second call
        if self.inplanes == self.planes:
            out2 = self.bn2(self.binary_pw(out2)) + out1
        else:
            out2_1 = self.bn2_1(self.binary_pw_down1(out2)) + out1
            out2_2 = self.bn2_2(self.binary_pw_down2(out2)) + out1
            out2 = torch.cat([out2_1, out2_2], dim=1)
        return self.move23(self.prelu2(self.move22(out2)))


# ReActNet-A channel plan (first conv + 13 blocks) as multiples of the first conv's width.
REACTNET_A_PLAN = (1, 2, 4, 4, 8, 8, 16, 16, 16, 16, 16, 16, 32, 32)  # x32 = 32..1024


class ReActNetA(nn.Module):
    """ReActNet-A: real 3x3 stem (stride 2) + BN, 13 ``ReActBlock`` (channels 32, 64, 128,
    128, 256, 256, 512 x6, 1024, 1024; stride 2 where the width grows, except 32->64),
    adaptive avgpool, real FC.

    Sites 26 (2 per block). Weight binarizers 31: 13 binary 3x3 + 8 single 1x1 (normal
    blocks) + 5 x 2 1x1 (channel-doubling blocks 32->64, 64->128, 128->256, 256->512,
    512->1024). Matches the counts measured on the public code (FINDINGS: 26 and 31).
    """

    def __init__(self, num_classes=10, in_chans=3, width=1.0):
        super().__init__()
        base = ch(32, width)
        plan = [base * m for m in REACTNET_A_PLAN]  # exact 2x steps at any width
        self.conv1 = nn.Conv2d(in_chans, plan[0], 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(plan[0])
        blocks: list[nn.Module] = []
        for i in range(1, len(plan)):
            stride = 2 if (plan[i - 1] != plan[i] and plan[i] != 2 * base) else 1
            blocks.append(ReActBlock(plan[i - 1], plan[i], stride))
        self.feature = nn.Sequential(*blocks)
        self.pool1 = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(plan[-1], num_classes)

    def forward(self, x):
        x = self.feature(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(self.pool1(x), 1))


def reactnet_a(num_classes=10, in_chans=3, width=1.0, input_size=None):
    return ReActNetA(num_classes, in_chans, width)
