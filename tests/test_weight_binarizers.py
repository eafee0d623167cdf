"""Issue 20 item 9a: weight binarizers counted by the *effective* weight, in every style.

A conv / linear whose weight, as passed to ``F.conv2d`` / ``F.linear`` / ``F.conv1d`` at run
time, is ``alpha_c * sign`` (one ``alpha`` per output channel) has a binary weight, whatever
code produced it. Each model here has binary layers in styles that make no binarizing op on a
parameter (a pre-binarized buffer, ``copysign``, ``w / |w|``, an STE expression that equals the
binary weight only up to rounding) next to the usual ones; the float layers must stay float.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from bnnshift.scan import scan_model
from bnnshift.summary import is_binary_weight
from test_site_identity import SignSTE


def _act(x):
    return SignSTE.apply(x)


class ReActConv(nn.Module):
    """ReActNet's HardBinaryConv: the latent weight is an (n, 1) parameter, viewed; sign * mean|W|
    per output channel, joined to the clipped latent by an STE expression (rounding, not exact)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.shape = (cout, cin, 3, 3)
        self.weight = nn.Parameter(torch.rand(cout * cin * 9, 1) * 0.001)

    def forward(self, x):
        w = self.weight.view(self.shape)
        scale = w.abs().mean((1, 2, 3), keepdim=True).detach()
        clipped = torch.clamp(w, -1.0, 1.0)
        return F.conv2d(x, (scale * torch.sign(w)).detach() - clipped.detach() + clipped, padding=1)


class BufferConv(nn.Conv2d):
    """Weights binarized once into a buffer (deployment style): no op binarizes at run time."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.register_buffer("wb", torch.sign(self.weight.detach()) * 0.05)

    def forward(self, x):
        return F.conv2d(x, self.wb, None, self.stride, self.padding)


class CopysignConv(nn.Conv2d):
    """XNOR's scale mean|W| per output channel, the sign written as copysign."""

    def forward(self, x):
        alpha = self.weight.abs().mean((1, 2, 3), keepdim=True)
        return F.conv2d(x, torch.copysign(alpha.expand_as(self.weight), self.weight), None, self.stride, self.padding)


class Net2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.c1, self.bn1 = ReActConv(8, 8), nn.BatchNorm2d(8)
        self.c2, self.bn2 = BufferConv(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c3, self.bn3 = CopysignConv(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.bn0(self.stem(x))
        x = self.bn1(self.c1(_act(x)))
        x = self.bn2(self.c2(_act(x)))
        x = self.bn3(self.c3(_act(x)))
        return self.fc(x.mean((2, 3)))


class Sign(nn.Module):
    """A parametrization: the weight seen by the layer is sign(latent)."""

    def forward(self, w):
        return torch.sign(w)


class BiRealLinear(nn.Linear):
    """Bi-Real's magnitude-aware sign on a linear (per output row), STE by detach."""

    def forward(self, x):
        w = self.weight
        b = (w.abs().mean(1, keepdim=True) * torch.sign(w)).detach()
        return F.linear(x, b - w.detach() + w, self.bias)


class DivLinear(nn.Linear):
    """The sign written as w / |w|, scaled per output row."""

    def forward(self, x):
        w = self.weight
        return F.linear(x, w.abs().amax(1, keepdim=True) * (w / w.abs()), self.bias)


class NetLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0, self.bn0 = nn.Linear(12, 16), nn.BatchNorm1d(16)
        self.l1, self.bn1 = BiRealLinear(16, 16, bias=False), nn.BatchNorm1d(16)
        self.l2, self.bn2 = nn.Linear(16, 16, bias=False), nn.BatchNorm1d(16)
        parametrize.register_parametrization(self.l2, "weight", Sign())
        self.l3, self.bn3 = DivLinear(16, 16, bias=False), nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.bn0(self.fc0(x))
        x = self.bn1(self.l1(_act(x)))
        x = self.bn2(self.l2(_act(x)))
        x = self.bn3(self.l3(_act(x)))
        return self.fc(x)


class WhereConv1d(nn.Conv1d):
    """A point-cloud / audio style conv1d: the binary weight from a compare, +-alpha per channel."""

    def forward(self, x):
        a = self.weight.abs().mean((1, 2), keepdim=True)
        return F.conv1d(x, torch.where(self.weight >= 0, a, -a), None, self.stride, self.padding)


class FnConv1d(nn.Conv1d):
    """An autograd.Function binarizes the weight; a learnt per-channel scale multiplies it."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.alpha = nn.Parameter(torch.rand(self.out_channels, 1, 1) + 0.5)

    def forward(self, x):
        return F.conv1d(x, SignSTE.apply(self.weight) * self.alpha, None, self.stride, self.padding)


class Net1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv1d(2, 8, 3, padding=1), nn.BatchNorm1d(8)
        self.c1, self.bn1 = WhereConv1d(8, 8, 3, padding=1, bias=False), nn.BatchNorm1d(8)
        self.c2, self.bn2 = FnConv1d(8, 8, 3, padding=1, bias=False), nn.BatchNorm1d(8)
        self.c3, self.bn3 = BufferConv1d(8, 8, 3, padding=1, bias=False), nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.bn0(self.stem(x))
        x = self.bn1(self.c1(_act(x)))
        x = self.bn2(self.c2(_act(x)))
        x = self.bn3(self.c3(_act(x)))
        return self.fc(x.mean(2))


class BufferConv1d(nn.Conv1d):
    """Variant of the pre-binarized buffer: a binary weight kept as +-1 int8, scaled at run time."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.register_buffer("bits", torch.sign(self.weight.detach()).to(torch.int8))
        self.register_buffer("scale", torch.rand(self.out_channels, 1, 1) + 0.1)

    def forward(self, x):
        return F.conv1d(x, self.bits.float() * self.scale, None, self.stride, self.padding)


CASES = {
    # model, input shape, binary layers, their latent parameters, float layers
    "conv2d": (Net2d, (3, 8, 8), ["c1", "c2", "c3"], {"c1.weight", "c2.weight", "c3.weight"}, ["stem", "fc"]),
    "linear": (NetLinear, (12,), ["l1", "l2", "l3"], {"l1.weight", "l2.parametrizations.weight.original", "l3.weight"},
               ["fc0", "fc"]),
    "conv1d": (Net1d, (2, 16), ["c1", "c2", "c3"], {"c1.weight", "c2.weight", "c3.weight"}, ["stem", "fc"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_weight_binarizers_counted_by_the_effective_weight(case):
    build, shape, binary, latent, floats = CASES[case]
    torch.manual_seed(0)
    model = build()
    report = scan_model(model, shape)
    assert report.num_sites == 3, [s.name for s in report.sites]
    assert report.weight_binarizers == len(binary)
    rows = {r["layer"]: r for r in report.layer_summary["layers"]}
    params = dict(model.named_parameters())
    for name in binary:
        assert rows[name]["binary_macs"] > 0 and rows[name]["float_macs"] == 0, rows[name]
    for name in floats:
        assert rows[name]["binary_macs"] == 0 and rows[name]["float_macs"] > 0, rows[name]
        assert rows[name]["params_1bit"] == 0
    # every latent weight is 1-bit in the table and in the one-line summary; nothing else is
    one_bit = sum(params[n].numel() for n in latent)
    assert report.layer_summary["totals"]["params_1bit"] == one_bit
    assert report.summary["binary_params"] == one_bit
    assert report.summary["binary_macs"] == report.layer_summary["totals"]["binary_macs"] > 0


def test_is_binary_weight_up_to_ste_rounding_but_not_ternary_or_float():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3) * 0.01
    b = (w.abs().mean((1, 2, 3), keepdim=True) * torch.sign(w))
    c = w.clamp(-1, 1)
    ste = b.detach() - c.detach() + c
    assert not torch.equal(ste, b)  # the STE expression is the binary weight only up to rounding
    assert is_binary_weight(ste)
    assert not is_binary_weight(w)
    assert not is_binary_weight(torch.where(w.abs() < 0.005, 0.0, torch.sign(w)))  # ternary
    assert not is_binary_weight(torch.sign(w).half().float() * 0 + torch.sign(w) + 0.01)  # shifted, not symmetric
