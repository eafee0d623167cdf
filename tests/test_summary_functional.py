"""``scan --summary`` counts the MACs of convs / linears written as ``F.conv2d`` / ``F.linear``
inside a module's forward (issue 19, item 6): binary when the weight is binary (a 1-bit
parameter or a ``sign(w)`` / ``alpha * sign(w)`` computed in the forward), else float.

Expected MACs are computed by hand from the layer shapes: conv = output elements x
(in_channels / groups) x kernel size, linear = output elements x in_features, per sample.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from bnnshift.cli import app
from bnnshift.scan import scan_model
from bnnshift.summary import count_macs, is_binary_weight, layer_summary
from models import SIGN_STE_SOURCE

NET_PY = '''
import torch
from torch import nn
import torch.nn.functional as F
''' + SIGN_STE_SOURCE + '''

class FConv(nn.Module):
    """A binary conv written with F.conv2d: sign of the input, sign of the weight."""
    def __init__(self, cin, cout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))

    def forward(self, x):
        return F.conv2d(torch.sign(x), torch.sign(self.weight), padding=1)


class FLinear(nn.Module):
    """A binary linear written with F.linear; the weight binarized by a Function, XNOR-scaled."""
    def __init__(self, i, o):
        super().__init__()
        self.w = nn.Parameter(torch.randn(o, i))

    def forward(self, x):
        w = SignSTE.apply(self.w) * self.w.abs().mean(1, keepdim=True)
        return F.linear(SignSTE.apply(x), w)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = FConv(8, 8)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc1 = FLinear(8 * 8 * 8, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.bn0(self.conv0(x))
        x = self.bn1(self.conv1(x))
        return self.fc(self.fc1(torch.flatten(x, 1)))


def build():
    torch.manual_seed(0)
    return Net()
'''

CONV0 = 8 * 8 * 8 * 1 * 9  # output elements x in_channels x kernel
CONV1 = 8 * 8 * 8 * 8 * 9
FC1 = 16 * 512
FC = 10 * 16


def _rows(ls):
    return {r["layer"]: r for r in ls["layers"]}


def test_functional_conv_and_linear_count_binary_macs_in_scan_summary(tmp_path):
    p = tmp_path / "fnet.py"
    p.write_text(NET_PY)
    r = CliRunner().invoke(app, ["scan", f"{p}:build", "--input-shape", "1,8,8", "--summary", "--json"])
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    rows = _rows(payload["layer_summary"])
    assert (rows["conv1"]["binary_macs"], rows["conv1"]["float_macs"]) == (CONV1, 0)
    assert (rows["fc1"]["binary_macs"], rows["fc1"]["float_macs"]) == (FC1, 0)
    assert (rows["conv0"]["binary_macs"], rows["conv0"]["float_macs"]) == (0, CONV0)
    assert (rows["fc"]["binary_macs"], rows["fc"]["float_macs"]) == (0, FC)
    tot = payload["layer_summary"]["totals"]
    assert (tot["binary_macs"], tot["float_macs"]) == (CONV1 + FC1, CONV0 + FC)
    # the one-line summary of the scan reads the same counts
    assert (payload["summary"]["binary_macs"], payload["summary"]["float_macs"]) == (CONV1 + FC1, CONV0 + FC)


class _Spellings(nn.Module):
    """Other spellings: a grouped, strided F.conv2d with a float weight (float MACs); a binary
    F.linear on a (B, T, D) input (per sample: T x out x in); a binary weight held in a
    parameter-less module's forward (counted for the module that runs the op); a transposed
    conv with a sign weight."""

    def __init__(self):
        super().__init__()
        self.gw = nn.Parameter(torch.randn(8, 2, 3, 3))  # groups = 2 over 4 input channels
        self.lw = nn.Parameter(torch.randn(6, 5))
        self.tw = nn.Parameter(torch.randn(8, 3, 2, 2))  # transposed: (in, out, k, k)

    def forward(self, x):  # x: (B, 4, 8, 8)
        y = F.conv2d(x, self.gw, stride=2, padding=1, groups=2)  # (B, 8, 4, 4), float
        t = y.flatten(2)[:, :, :5]  # (B, 8, 5): T = 8 tokens of 5 features
        z = F.linear(torch.sign(t), torch.sign(self.lw))  # (B, 8, 6), binary
        u = F.conv_transpose2d(torch.sign(y), torch.sign(self.tw), stride=2)  # (B, 3, 8, 8), binary
        return z.sum() + u.sum()


def test_spellings_grouped_strided_token_linear_and_transposed():
    model = _Spellings()
    for batch in (1, 3):  # per sample, whatever the batch
        macs, ok = count_macs(model, torch.randn(batch, 4, 8, 8), set())
        assert ok
        grouped = 8 * 4 * 4 * 2 * 9  # output elements x (in_channels / groups) x kernel
        token = 8 * 6 * 5  # tokens x out x in
        transposed = 8 * 4 * 4 * 3 * 4  # input elements x out_channels x kernel
        assert macs == {"": {"binary": token + transposed, "float": grouped}}


def test_a_weight_named_binary_counts_binary_and_float_weights_do_not():
    lin = nn.Linear(4, 3)
    seq = nn.Sequential(lin)
    macs, _ = count_macs(seq, torch.randn(1, 4), {"0.weight"})
    assert macs == {"0": {"binary": 12, "float": 0}}
    macs, _ = count_macs(seq, torch.randn(1, 4), set())
    assert macs == {"0": {"binary": 0, "float": 12}}
    ls = layer_summary(seq, torch.randn(1, 4), set())
    assert ls["totals"]["float_macs"] == 12 and ls["layers"][0]["output_shape"] == [3]


def test_is_binary_weight():
    w = torch.randn(4, 3, 3, 3)
    assert not is_binary_weight(w)
    assert is_binary_weight(torch.sign(w))
    assert is_binary_weight(torch.sign(w) * w.abs().mean((1, 2, 3), keepdim=True))  # XNOR per channel
    assert not is_binary_weight(torch.zeros(4, 3))
    assert not is_binary_weight(torch.sign(w) + 0.5)  # two values, not symmetric
    assert is_binary_weight(torch.sign(w.transpose(0, 1)) * torch.rand(1, 4, 1, 1) + 0)  # (in, out, k, k)


def test_scan_model_summary_of_the_module_spelling_matches_nn_conv():
    """F.conv2d(sign(x), sign(w)) in a module and nn.Conv2d with a binarized weight count the
    same MACs (the first as binary, from the weight's value)."""
    class Mod(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
            self.weight = nn.Parameter(torch.randn(4, 4, 3, 3))
            self.head = nn.Linear(4 * 6 * 6, 10)

        def forward(self, x):
            x = self.conv(x)
            x = F.conv2d(torch.sign(x), torch.sign(self.weight), padding=1)
            return self.head(x.flatten(1))

    rep = scan_model(Mod(), (1, 6, 6))
    assert rep.summary["binary_macs"] == 6 * 6 * 4 * 4 * 9
    assert rep.summary["float_macs"] == 6 * 6 * 4 * 1 * 9 + 10 * 144
    rows = _rows(rep.layer_summary)
    assert rows["(root)"]["binary_macs"] == 6 * 6 * 4 * 4 * 9
