"""Regressions (issue 9, cases 10, 18, 27): folds through ops between BN and sign are exact or
refused, and a shift lands on the binarizer's own input (standardising conv, Function with
extra tensor arguments the training loop overwrites)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnnshift.fold import fold_shifts
from bnnshift.patch import patch_model
from bnnshift.scan import scan_model
from models import SignSTE


class SignAct(nn.Module):
    def forward(self, x):
        c = x.clamp(-1, 1)
        return (torch.sign(x) - c).detach() + c


class BinConv(nn.Conv2d):
    def forward(self, x):
        w = self.weight
        return F.conv2d(x, (torch.sign(w) - w).detach() + w, None, self.stride, self.padding)


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(2.5))

    def forward(self, x):
        return self.alpha * x


class Between(nn.Module):
    """Case 10: stem -> BN -> [between] -> sign -> binary conv -> BN -> pool -> fc."""

    def __init__(self, between, affine=True):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8, affine=affine)
        self.between = between
        self.act = SignAct()
        self.conv = BinConv(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.act(self.between(self.bn(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(self.bn2(self.conv(x)), 1).flatten(1))


def _bn_stats(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("between,affine,folds", [
    (nn.AvgPool2d(3, stride=1, padding=1), True, False),  # zero padding counted: avg(y) - t != avg(y - t)
    (nn.MaxPool2d(3, stride=1, padding=1), True, True),  # max(y - t) = max(y) - t (-inf padding)
    (Scale(), True, False),                               # beta - t / alpha would be needed
    (nn.Identity(), False, False),                        # no beta
    (nn.Identity(), True, True),
])
def test_fold_through_ops_is_exact_or_refused(between, affine, folds):
    shape = (1, 10, 10)
    model = _bn_stats(Between(between, affine))
    report = scan_model(model, shape)
    hooked = patch_model(copy.deepcopy(model), report, 0.5).eval()
    folded = copy.deepcopy(hooked)
    rep = fold_shifts(folded, shape)
    assert bool(rep.folded) == folds and (folds or rep.kept["act"])
    ref = copy.deepcopy(model)
    ref.act.register_forward_pre_hook(lambda mod, a: (a[0] - 0.5,))
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert float((ref(x) - folded(x)).abs().max()) <= 1e-5


class StdBinConv(nn.Conv2d):
    """Case 27: standardises its input per sample, then binarizes it."""

    shift = 0.0

    def forward(self, x):
        a = x - x.mean([1, 2, 3], keepdim=True)
        a = a / a.std([1, 2, 3], keepdim=True)
        return F.conv2d(SignSTE.apply(a - self.shift), SignSTE.apply(self.weight), None, self.stride, self.padding)


class StdNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = StdBinConv(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = F.hardtanh(self.bn0(self.conv0(x)))
        h = F.hardtanh(self.bn1(self.conv1(h)) + h)
        return self.fc(h.mean((2, 3)))


def test_standardising_conv_shift_lands_after_the_standardisation():
    """Case 27: patch --shift 1 computes sign((x - mean)/std - 1); t = 0 is bitwise."""
    shape = (3, 8, 8)
    torch.manual_seed(0)
    model = StdNet().eval()
    report = scan_model(model, shape)
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y0 = model(x)
        assert torch.equal(patch_model(copy.deepcopy(model), report, 0.0)(x), y0)
        hand = copy.deepcopy(model)
        hand.conv1.shift = 1.0
        y1 = patch_model(copy.deepcopy(model), report, 1.0)(x)
        assert float((y1 - hand(x)).abs().max()) <= 1e-5 and float((y1 - y0).abs().max()) > 1e-3


class EDESign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k, t):
        ctx.save_for_backward(x, k, t)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, g):
        x, k, t = ctx.saved_tensors
        return k * t * (1 - torch.tanh(x * t) ** 2) * g, None, None


class EDEConv(nn.Conv2d):
    """Case 18: a Function with extra tensor arguments k, t that the training loop overwrites."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.k = torch.tensor([10.0])
        self.t = torch.tensor([0.1])

    def forward(self, x):
        bw = EDESign().apply(self.weight, self.k, self.t)
        return F.conv2d(EDESign().apply(x, self.k, self.t), bw, self.bias, self.stride, self.padding)


class EdeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = EDEConv(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.hardtanh(self.bn0(self.stem(x)))
        x = F.hardtanh(self.bn1(self.conv1(x)) + x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_function_with_extra_args_keeps_live_schedule():
    """Case 18: t = 0 bitwise in outputs and gradients; with k, t changed after patching, the
    patched model equals a hand-shifted one (the hooks do not freeze k and t)."""
    shape = (1, 8, 8)
    torch.manual_seed(0)
    model = EdeNet()
    report = scan_model(model, shape)
    assert len(report.sites) == 1 and report.weight_binarizers == 1
    x, y = torch.randn(8, *shape), torch.randint(0, 10, (8,))

    def grads(m):
        m.train()
        m.zero_grad()
        out = m(x)
        F.cross_entropy(out, y).backward()
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    (oa, ga), (ob, gb) = grads(copy.deepcopy(model)), grads(patch_model(copy.deepcopy(model), report, 0.0))
    assert torch.equal(oa, ob) and all(torch.equal(ga[k], gb[k]) for k in ga)
    patched = patch_model(copy.deepcopy(model), report, 0.3)
    hand = copy.deepcopy(model)
    for m in (patched, hand):
        m.conv1.k, m.conv1.t = torch.tensor([2.0]), torch.tensor([1.5])
    hand.conv1.register_forward_pre_hook(lambda mod, a: (a[0] - 0.3,))
    (oc, gc), (oh, gh) = grads(patched), grads(hand)
    assert torch.allclose(oc, oh) and max(float((gc[k] - gh[k]).abs().max()) for k in gh) <= 1e-6


# ------------------------------------------------------------------ multi-output producers


class _Dup(torch.autograd.Function):
    """Two outputs of one input (a tensor and its copy), like a block that returns (x, skip)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone(), x.clone()

    @staticmethod
    def backward(ctx, ga, gb):
        return ga + gb


class _TwoOutModule(nn.Module):
    """A producer module with two outputs: the same normalised map twice (one tensor object)."""

    def __init__(self, c, untraceable=False):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.untraceable = untraceable

    def forward(self, x):
        h = self.bn(x)
        if self.untraceable and bool(h.sum() > -1e30):  # data-dependent branch: an untraced leaf
            return h, h
        return h, h


class _TwoOutNet(nn.Module):
    """stem -> two-output producer -> (sign STE on output 0 -> binary conv) + output 1 (shortcut)."""

    def __init__(self, producer, inline="sign"):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.producer = producer
        self.inline = inline
        self.conv = BinConv(8, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 10)
        self.t = 0.0  # the hand-written shift of the reference model

    def split(self, h):
        if self.producer == "function":
            return _Dup.apply(h)
        return self.producer(h)

    def forward(self, x):
        a, b = self.split(self.bn0(self.stem(x)))
        c = a.clamp(-1, 1)
        s = (torch.sign(a - self.t if self.t else a) - c).detach() + c  # inline STE: t moves the sign only
        y = self.conv(s) + b  # output 1 feeds the shortcut
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("producer", ["module", "leaf", "function"])
def test_a_two_output_producer_is_never_shifted_at_the_producer(producer):
    """A producer with two outputs, one feeding the binarizer and one the shortcut: the shift
    goes on the binarizer's own input (never on the producer, which would move the shortcut
    too), and the patched model is bitwise sign(a - t) with the shortcut unchanged."""
    from bnnshift.sites import APPLY_PRODUCER

    torch.manual_seed(0)
    prod = {"module": lambda: _TwoOutModule(8), "leaf": lambda: _TwoOutModule(8, untraceable=True),
            "function": lambda: "function"}[producer]()
    model = _TwoOutNet(prod)
    _bn_stats(model)
    model.eval()
    shape = (1, 8, 8)
    report = scan_model(model, shape)
    (s,) = report.sites
    assert s.apply != APPLY_PRODUCER and s.module not in ("producer", "producer.bn", "bn0"), s
    assert not s.shift_into
    hooked = patch_model(copy.deepcopy(model), report, 0.5).eval()
    ref = copy.deepcopy(model).eval()
    ref.t = 0.5
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(hooked(x), ref(x))
        assert not torch.equal(hooked(x), model(x))  # the shift did something
