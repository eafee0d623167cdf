"""Folds into every affine that feeds only the binarizer (issue 19 item 6, case 57): a Linear /
conv / LayerNorm bias, as a module or as ``F.conv2d`` / ``F.linear`` inside a module's forward,
absorbs t exactly (folded == unfolded on random inputs, float64 probe inside fold_shifts); a
bias that also feeds something else is kept with a true reason. Models are made here."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnnshift.fold import fold_shifts
from bnnshift.patch import patch_model
from bnnshift.scan import scan_model


class SignSTE(nn.Module):
    def forward(self, x):
        c = x.clamp(-1, 1)
        return (torch.sign(x) - c).detach() + c


class ConvBias(nn.Module):
    """conv (with bias, padding) -> SignSTE module; LayerNorm over channels-last -> torch.sign."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 6, 3, padding=1, bias=True)
        self.act = SignSTE()
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.act(self.conv0(x))
        h = self.conv1(h).permute(0, 2, 3, 1)
        h = torch.sign(self.ln(h))
        return self.head(h.mean((1, 2)))


class BinConv(nn.Conv2d):
    """A binary conv layer written with F.conv2d inside its forward, keeping its bias."""

    def forward(self, x):
        return F.conv2d(x, torch.sign(self.weight) * 0.1, self.bias, self.stride, self.padding)


class FunctionalConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = BinConv(1, 6, 3, padding=1, bias=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.conv0(x)
        c = h.clamp(-1, 1)
        h = (torch.sign(h) - c).detach() + c  # inline STE
        return self.head(h.mean((2, 3)))


class SharedLinear(nn.Module):
    """fc0's output feeds the binarizer and a float skip: its bias must not absorb t."""

    def __init__(self):
        super().__init__()
        self.fc0 = nn.Linear(16, 8)
        self.act = SignSTE()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc0(x)
        return self.head(self.act(h) + 0.5 * h)


def _init(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return model.eval()


def _fold_and_compare(cls, shape, t=0.5, seed=0):
    model = _init(cls(), seed)
    patch_model(model, scan_model(model, shape, name=cls.__name__), t)
    unfolded = copy.deepcopy(model)
    report = fold_shifts(model, shape)
    x = torch.randn(256, *shape, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        diff = (model(x) - unfolded(x)).abs().max().item()
    return model, report, diff


def test_conv_bias_and_layernorm_bias_absorb_t():
    _, report, diff = _fold_and_compare(ConvBias, (1, 8, 8))
    assert sorted(report.folded.values()) == ["bias:conv0.bias", "bias:ln.bias"], (report.folded, report.kept)
    assert diff <= 1e-5


def test_functional_conv_bias_inside_a_binary_layer_absorbs_t():
    model, report, diff = _fold_and_compare(FunctionalConv, (1, 8, 8), t=0.3)
    assert list(report.folded.values()) == ["bias:conv0.bias"], (report.folded, report.kept)
    assert diff <= 1e-5


def test_bias_value_is_lowered_by_t_exactly():
    model = _init(ConvBias())
    before = model.conv0.bias.detach().clone()
    patch_model(model, scan_model(model, (1, 8, 8), name="cb"), 0.25)
    fold_shifts(model, (1, 8, 8))
    assert torch.allclose(model.conv0.bias.detach(), before - 0.25, atol=0, rtol=0)


def test_a_bias_that_also_feeds_something_else_is_kept_with_a_true_reason():
    _, report, diff = _fold_and_compare(SharedLinear, (16,))
    assert report.folded == {}
    (why,) = report.kept.values()
    assert "no bias" not in why and why
    assert diff == 0.0  # kept: the hook still subtracts t


@pytest.mark.parametrize("cls,shape", [(ConvBias, (1, 8, 8)), (FunctionalConv, (1, 8, 8))])
def test_t_zero_patch_is_bitwise_the_original(cls, shape):
    model = _init(cls(), 3)
    ref = copy.deepcopy(model)
    patch_model(model, scan_model(model, shape, name="z"), 0.0)
    x = torch.randn(8, *shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    a, b = model(x), ref(x2)
    assert torch.equal(a, b)
    a.sum().backward()
    b.sum().backward()
    assert torch.equal(x.grad, x2.grad)
