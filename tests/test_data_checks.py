"""A data function's inputs and labels are checked, not cast: NaN/inf images, float labels that
are not class indices, one-hot labels and negative labels are refused in one line naming what is
wrong (before, NaN images made every site "constant" and float labels became class 0, exit 0).
Three spellings each: tensors (x, y), numpy arrays (x, y, val_x, val_y), a map-style Dataset."""
from __future__ import annotations

import textwrap

import pytest
import torch
from typer.testing import CliRunner

from bnnshift.cli import app
from bnnshift.data import load_data
from bnnshift.errors import DataError
from models import SIGN_STE_SOURCE

FUNCS = textwrap.dedent('''
    import numpy as np
    import torch


    class Pairs(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], self.y[i]


    def _x(n=64):
        return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))


    def _y(n=64):
        return torch.arange(n) % 3


    def nan_tensors():
        x = _x(); x[5, 0, 1, 1] = float("nan")
        return x, _y()


    def inf_numpy_val():
        vx = _x(16).numpy(); vx[2, 0, 0, 0] = np.inf
        return _x().numpy(), _y().numpy(), vx, _y(16).numpy()


    def nan_dataset():
        x = _x(); x[7] = float("nan")
        return Pairs(x, _y()), None


    def float_labels():
        return _x(), torch.rand(64)


    def onehot_numpy():
        return _x().numpy(), np.eye(3, dtype=np.float32)[_y().numpy()]


    def onehot_dataset():
        return Pairs(_x(), torch.eye(3)[_y()]), None


    def negative_labels():
        return _x(), _y() - 1


    def whole_float_labels():
        return _x(), _y().float()


    def whole_float_dataset():
        return Pairs(_x(), _y().double()), None
''')


@pytest.fixture()
def funcs(tmp_path):
    (tmp_path / "trial_data.py").write_text(FUNCS)
    return tmp_path / "trial_data.py"


BAD = [("nan_tensors", "1 training sample(s) hold NaN/inf values (first: sample 5)"),
       ("inf_numpy_val", "1 held-out sample(s) hold NaN/inf values (first: sample 2)"),
       ("nan_dataset", "NaN/inf values (first: sample"),
       ("float_labels", "labels must be integer class indices"),
       ("onehot_numpy", "labels must be class indices of shape (N,), got (64, 3)"),
       ("onehot_dataset", "has 3 values; labels are class indices"),
       ("negative_labels", "labels must be class indices >= 0, got -1")]


@pytest.mark.parametrize("fn,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_or_labels_are_refused(funcs, fn, msg):
    with pytest.raises(DataError) as exc:
        load_data(f"{funcs}:{fn}")
    assert msg in exc.value.message


@pytest.mark.parametrize("fn", ["whole_float_labels", "whole_float_dataset"])
def test_whole_float_labels_are_class_indices(funcs, fn):
    b = load_data(f"{funcs}:{fn}")
    assert b.train_y.dtype == torch.int64 and b.train_y.tolist() == [i % 3 for i in range(64)]
    assert b.num_classes == 3


MODEL = textwrap.dedent('''
    import torch
    import torch.nn as nn

''') + SIGN_STE_SOURCE + "BinActive = SignSTE  # the user's STE, as XNOR-Net names it\n" + textwrap.dedent('''


    class XNORNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            x = BinActive.apply(self.bn(self.conv1(x)))
            return self.fc(self.conv2(x).flatten(1))
''')


def test_search_on_nan_data_exits_1_before_training(funcs, tmp_path):
    (tmp_path / "trial_xnor.py").write_text(MODEL)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["search", f"{tmp_path / 'trial_xnor.py'}:XNORNet", "--data", f"{funcs}:nan_tensors",
                                   "--shifts", "0,0.5", "--steps", "1", "--batch-size", "16", "--no-compile",
                                   "--out", str(out)])
    assert res.exit_code == 1, res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "NaN/inf" in errors[0], res.stderr
    assert not (out / "search.json").exists()
