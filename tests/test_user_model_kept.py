"""The user's model is never changed by bnnshift (issue 9, item 2).

Models whose forward writes its own weights (BinaryNet style ``weight.data = sign(latent)``,
cases 07 and 28 of shared/cases): scan leaves them as they were, names the written
parameters, patch saves the loaded weights, export refuses with one line naming ``.data``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from bnnshift.cli import app
from bnnshift.scan import scan_model
from models import SignSTE

DATA_SIGN_PY = '''
import torch, torch.nn as nn, torch.nn.functional as F

class DataSignLinear(nn.Linear):
    """Binarizes its input and weight by assigning .data (BinaryNet style, case 07)."""
    def forward(self, x):
        if x.size(1) != 48:
            x.data = torch.sign(x.data)
        if not hasattr(self.weight, "latent"):
            self.weight.latent = self.weight.data.clone()
        self.weight.data = torch.sign(self.weight.latent)
        return F.linear(x, self.weight, self.bias)

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = DataSignLinear(48, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.act1 = nn.Hardtanh()
        self.fc2 = DataSignLinear(16, 16)
        self.bn2 = nn.BatchNorm1d(16)
        self.act2 = nn.Hardtanh()
        self.fc3 = DataSignLinear(16, 4)
    def forward(self, x):
        x = x.view(-1, 48)
        x = self.act1(self.bn1(self.fc1(x)))
        x = self.act2(self.bn2(self.fc2(x)))
        return self.fc3(x)
'''


class InplaceBinConv(nn.Conv2d):
    """weight.data = sign(W) * mean|W| in forward (case 28)."""

    def forward(self, x):
        if not hasattr(self.weight, "original"):
            self.weight.original = self.weight.data.clone()
        self.weight.data = torch.sign(self.weight.original) * self.weight.original.abs().mean()
        return F.conv2d(SignSTE.apply(x), self.weight, None, self.stride, self.padding)


class InplaceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = InplaceBinConv(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = F.hardtanh(self.bn0(self.conv0(x)))
        h = F.hardtanh(self.bn1(self.conv1(h)) + h)
        return self.fc(h.mean((2, 3)))


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_scan_model_leaves_an_inplace_binarizing_model_unchanged_and_names_the_weights():
    torch.manual_seed(0)
    m = InplaceNet()
    before = _state(m)
    weight_obj, data_ptr = m.conv1.weight, m.conv1.weight.data_ptr()
    report = scan_model(m, (3, 8, 8), batches=[torch.randn(16, 3, 8, 8)])
    after = m.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), \
        [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert m.conv1.weight is weight_obj and m.conv1.weight.data_ptr() == data_ptr
    assert not hasattr(m.conv1.weight, "original"), "bnnshift ran the user's forward"
    assert torch.unique(m.conv1.weight).numel() == m.conv1.weight.numel()  # still the latent weights
    assert report.inplace_writes == ["conv1.weight"]
    assert any("conv1.weight" in w and "in place" in w for w in report.warnings)
    assert report.to_json()["inplace_writes"] == ["conv1.weight"]
    assert [s.name for s in report.sites] == ["conv1:input"]


def test_a_model_that_does_not_write_its_weights_is_not_flagged():
    from conftest import zoo_small

    report = scan_model(*zoo_small("lenet5"))
    assert report.inplace_writes == []
    assert not any("in place" in w for w in report.warnings)


def test_patch_saves_the_loaded_weights_and_export_names_the_data_assignment(tmp_path):
    p = tmp_path / "datasign.py"
    p.write_text(DATA_SIGN_PY)
    import importlib.util

    spec = importlib.util.spec_from_file_location("datasign_for_test", p)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    ckpt = tmp_path / "latent.pt"
    torch.save(mod.Net().state_dict(), ckpt)
    ref = torch.load(ckpt, weights_only=True)

    runner = CliRunner()
    r = runner.invoke(app, ["patch", f"{p}:Net", "--checkpoint", str(ckpt), "--input-shape", "48", "--shift", "0.5",
                            "-o", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.stderr
    payload = json.loads(r.stdout)
    assert [s["name"] for s in payload["sites"]] == ["act1:output", "act2:output"]  # the inputs of fc2, fc3
    assert any("fc1.weight" in w for w in payload["warnings"])
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k in ("fc1.weight", "fc2.weight", "fc3.weight"):
        assert torch.equal(saved[k], ref[k]), f"{k}: saved weights are not the loaded latent weights"

    onnx_path = tmp_path / "m.onnx"
    r = runner.invoke(app, ["export", str(tmp_path / "out"), "--onnx", str(onnx_path)])
    assert r.exit_code == 1, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and ".data" in lines[0] and "fc1.weight" in lines[0]
    assert not onnx_path.exists()


class _BinAct(nn.Module):
    def forward(self, x):
        return SignSTE.apply(x)


SHARED_ACT = _BinAct()  # a module-level instance every model uses


class _SharedActNet(nn.Module):
    def __init__(self, act=_BinAct()):  # the default argument: one object for every instance
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.act = act
        self.act2 = SHARED_ACT
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 3)

    def forward(self, x):
        h = self.fc2(self.act(self.bn(self.fc1(x))))
        return self.fc3(self.act2(h))


def test_patching_one_instance_never_shifts_another_sharing_its_binarizer():
    from bnnshift.patch import patch_model
    from bnnshift.shift import get_thresholds

    torch.manual_seed(0)
    a, b = _SharedActNet(), _SharedActNet()
    assert a.act is b.act and a.act2 is b.act2
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.randn(16, 6)
    with torch.no_grad():
        ya = a(x)
    keys_a = set(a.state_dict())
    report = scan_model(b, (6,))
    assert [s.name for s in report.sites] == ["act", "act2"]
    patch_model(b, report, 0.5)
    with torch.no_grad():
        assert torch.equal(a(x), ya), "patching B shifted A"
        yb = b(x)
    assert set(a.state_dict()) == keys_a, "patching B added thresholds to A's state_dict"
    assert not hasattr(a.act, "bnnshift_threshold_call0") and not a.act._forward_pre_hooks
    assert set(get_thresholds(b)) == {"act", "act2"}
    # B really computes sign(x - 0.5) at both sites
    with torch.no_grad():
        # (by A's modules, same weights: B's bn now reads beta - t while it runs, Site.shift_into)
        h = a.fc2(torch.sign(a.bn(a.fc1(x)) - 0.5))
        want = a.fc3(torch.sign(h - 0.5))
    assert torch.equal(yb, want)
    # a third instance built after the patch is not shifted either
    c = _SharedActNet()
    c.load_state_dict(a.state_dict())
    c.eval()
    with torch.no_grad():
        assert torch.equal(c(x), ya)
