"""``fold`` / ``export`` with ``--data`` on models that do not return a bare tensor, and the
"weights changed since the BatchNorm statistics were measured" note after folding into a
learnable bias (both found by a new user's own Bi-Real / ReActNet-style models)."""
from __future__ import annotations

import textwrap

import pytest

from bnnshift.patch import ShiftConfig
from bnnshift.pipeline import BnOptions, FoldOptions, PatchOptions, fold_dir, patch_spec
from bnnshift.source import ModelSource
from models import SIGN_STE_SOURCE

DATA = """
import torch, torch.nn.functional as F

def load(seed=0):
    g = torch.Generator().manual_seed(1234)
    pattern = F.interpolate(torch.randint(0, 2, (10, 1, 4, 4), generator=g).float() * 2 - 1, size=(16, 16))

    def draw(n):
        y = torch.randint(0, 10, (n,), generator=g)
        return (pattern[y] + 1.5 * torch.randn(n, 1, 16, 16, generator=g)) / 1.8, y

    return (*draw(768), *draw(256))
"""

# a Bi-Real / ReActNet-style block: learnable bias -> sign -> binary conv -> BN, residual add;
# {RETURN} is how the model hands back its logits
MODEL = """
import dataclasses
import torch, torch.nn as nn, torch.nn.functional as F
""" + SIGN_STE_SOURCE + """

class LearnableBias(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x):
        return x + self.bias


class Move(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x):
        return torch.add(self.b, x)


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    feat: torch.Tensor


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        {MOVE_INIT}
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        w = self.conv.weight
        wb = w.abs().mean(dim=(1, 2, 3), keepdim=True).detach() * torch.sign(w)
        wb = wb.detach() - w.detach() + w
        return x + self.bn(F.conv2d(SignSTE.apply({MOVE_CALL}), wb, None, 1, 1))


class Net(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.b1, self.b2 = Block(c), Block(c)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.b2(self.b1(self.bn0(self.stem(x))))
        feat = F.adaptive_avg_pool2d(x, 1).flatten(1)
        logits = self.fc(feat)
        return {RETURN}
"""

RETURNS = {"tuple": "logits, feat", "dict": '{"feat": feat, "logits": logits}', "dataclass": "Out(logits, feat)",
           "tensor": "logits"}
MOVES = {  # the learnable bias as a module of its own, or as a bare parameter of the block
    "module": ("self.move = LearnableBias(c)", "self.move(x)"),
    "add": ("self.shift_in = Move(c)", "self.shift_in(x)"),
}


def _write(tmp_path, returns="tensor", move="module"):
    init, call = MOVES[move]
    src = MODEL.replace("{RETURN}", RETURNS[returns]).replace("{MOVE_INIT}", init).replace("{MOVE_CALL}", call)
    (tmp_path / "net.py").write_text(textwrap.dedent(src))
    (tmp_path / "data.py").write_text(DATA)
    return f"{tmp_path / 'net.py'}:Net", f"{tmp_path / 'data.py'}:load"


def _patch(tmp_path, spec, name="p"):
    out = tmp_path / name
    patch_spec(PatchOptions(ModelSource(spec, input_shape="1,16,16"), out, ShiftConfig(shift=0.5)))
    return out


@pytest.mark.parametrize("returns", ["tuple", "dict", "dataclass"])
def test_fold_data_reads_the_logits_of_a_tuple_dict_or_dataclass_output(tmp_path, returns):
    spec, data = _write(tmp_path, returns)
    out = _patch(tmp_path, spec)
    res = fold_dir(FoldOptions(str(out), bn=BnOptions(data=data, batches=2)))
    bn = res.to_json()["bn_statistics"]
    assert bn["recalibrated"] == bn["accepted"]  # re-estimated, kept only when the probe accuracy is not lower
    for when in ("before", "candidate"):
        assert 0.0 <= bn[when]["eval_accuracy"] <= 1.0  # accuracies read from the output's logits
    kept = bn["after"]["eval_accuracy"]
    assert kept >= bn["before"]["eval_accuracy"] or not bn["accepted"]
    assert res.report.folded  # the fold itself still ran


@pytest.mark.parametrize("move", ["module", "add"])
def test_folding_into_a_learnable_bias_is_not_taken_for_fine_tuning(tmp_path, move):
    spec, _ = _write(tmp_path, move=move)
    out = _patch(tmp_path, spec)
    res = fold_dir(FoldOptions(str(out)))
    assert any(t.startswith("bias:") for t in res.report.folded.values()), res.report.folded
    assert res.note is None  # fold wrote t into the bias: no "weights changed (fine-tuned?)" note
    again = fold_dir(FoldOptions(str(out)))  # read back from disk: still no note
    assert again.note is None


def test_a_fine_tuned_conv_weight_still_gets_the_note(tmp_path):
    import torch

    from bnnshift.patch import load_patched, read_recipe, save_patched

    spec, _ = _write(tmp_path)
    out = _patch(tmp_path, spec)
    model = load_patched(out)
    with torch.no_grad():
        model.b1.conv.weight.add_(0.01)  # "fine-tuned"
    save_patched(model, read_recipe(out), out, force=True)
    assert fold_dir(FoldOptions(str(out))).note
