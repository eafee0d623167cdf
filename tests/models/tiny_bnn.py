"""A small BNN as user code writes it (the model of cases 03 / 17 / 32, smaller): real stem,
two binary blocks with a detach-trick STE module, real head; factories that wrap it the way
training scripts do (DataParallel, torch.compile) and a distillation variant returning
(logits, [features])."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class PolySign(nn.Module):
    def forward(self, x):
        hard = torch.sign(x)
        c = torch.clamp(x, -1, 1)
        soft = torch.where(c < 0, 2 * c + c * c, 2 * c - c * c)
        return hard.detach() - soft.detach() + soft


class TinyBNN(nn.Module):
    def __init__(self, classes=10, width=8):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.act1 = PolySign()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act2 = PolySign()
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, classes)

    def features(self, x):
        x = self.bn0(self.stem(x))
        f1 = self.bn1(self.conv1(self.act1(x))) + x
        f2 = self.bn2(self.conv2(self.act2(f1)))
        return f1, f2

    def forward(self, x):
        _, f2 = self.features(x)
        return self.head(F.adaptive_avg_pool2d(f2, 1).flatten(1))


class KDNet(TinyBNN):
    def forward(self, x):
        f1, f2 = self.features(x)
        return self.head(F.adaptive_avg_pool2d(f2, 1).flatten(1)), [f1, f2]


def build(classes=10):
    return TinyBNN(classes)


def build_dp():
    return nn.DataParallel(TinyBNN())


def build_compiled():
    return torch.compile(TinyBNN())


def build_kd():
    return KDNet()


def build_half():
    return TinyBNN().half()
