"""Issue 20 item 5: a forward that writes a parameter is found by the act, not by a changed value.

Each model clamps its latent weight into [-1, 1] in forward, in another spelling, while the
weight is already inside [-1, 1]: no value changes, the write is there. scan names the parameter
and the spelling; export refuses in one line naming them and the fix. A forward that clamps a
copy (no write) or writes an activation in place is not flagged.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnnshift._guard import ParamWrites
from bnnshift.export import ExportError, export_onnx
from bnnshift.scan import scan_model
from test_site_identity import SignSTE


def _clamp(p: nn.Parameter, style: str) -> torch.Tensor:
    if style == "data.clamp_":
        p.data.clamp_(-1, 1)
    elif style == "data =":
        p.data = p.data.clamp(-1, 1)
    elif style == "no_grad clamp_":
        with torch.no_grad():
            p.clamp_(-1, 1)
    elif style == "no_grad copy_":
        with torch.no_grad():
            p.copy_(p.clamp(-1, 1))
    elif style == "no_grad setitem":
        with torch.no_grad():
            p[:] = p.clamp(-1, 1)
    elif style == "copy":  # not a write: a clamped copy
        return p.clamp(-1, 1)
    return p


class ClampLinear(nn.Linear):
    def __init__(self, *a, style: str, **k):
        super().__init__(*a, **k)
        self.style = style

    def forward(self, x):
        w = _clamp(self.weight, self.style)
        return F.linear(SignSTE.apply(x), SignSTE.apply(w), self.bias)


class Net(nn.Module):
    def __init__(self, style):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(12, 16), nn.BatchNorm1d(16)
        self.fc2 = ClampLinear(16, 3, style=style)

    def forward(self, x):
        h = self.bn1(self.fc1(x))
        h = F.relu(h.clone(), inplace=True) - 0.5  # an in-place op on an activation is no parameter write
        return self.fc2(h)


WRITES = ["data.clamp_", "data =", "no_grad clamp_", "no_grad copy_", "no_grad setitem"]


@pytest.mark.parametrize("style", WRITES)
def test_a_write_that_changes_nothing_is_found_by_the_act(style):
    torch.manual_seed(0)
    model = Net(style)
    before = model.fc2.weight.detach().clone()
    assert before.abs().max() <= 1  # the clamp changes no value
    report = scan_model(model, (12,))
    assert report.inplace_writes == ["fc2.weight"]
    said = [w for w in report.warnings if "fc2.weight" in w and "in place" in w]
    assert len(said) == 1 and ("data" in said[0] or "no_grad" in said[0]), report.warnings
    assert torch.equal(model.fc2.weight, before)


@pytest.mark.parametrize("style", WRITES)
def test_export_names_the_write_and_the_fix_in_one_line(style, tmp_path):
    torch.manual_seed(0)
    with pytest.raises(ExportError) as ei:
        export_onnx(Net(style).eval(), (12,), tmp_path / "m.onnx")
    msg = ei.value.message
    assert "fc2.weight" in msg and "\n" not in msg and len(msg) < 300, msg
    spelling = {"data.clamp_": "p.data.clamp_", "data =": ".data =", "no_grad clamp_": "p.clamp_",
                "no_grad copy_": "p.copy_", "no_grad setitem": "p.__setitem__"}[style]
    assert spelling in msg, msg
    assert "SignSTE.apply" in ei.value.hint and "optimizer.step" in ei.value.hint
    assert not (tmp_path / "m.onnx").exists()


def test_no_write_no_flag():
    torch.manual_seed(0)
    report = scan_model(Net("copy"), (12,))
    assert report.inplace_writes == []
    assert not [w for w in report.warnings if "in place" in w]


def test_param_writes_sees_views_and_ignores_requires_grad():
    lin = nn.Linear(4, 4)
    with ParamWrites(lin) as watch:
        lin.weight.requires_grad_(True)
        lin.weight.data.t()[0].mul_(1.0)  # a view of .data: the parameter's storage
    assert watch.writes == {"weight": "p.data.mul_(...)"}
