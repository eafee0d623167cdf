"""Degenerate and lossy set-ups are said, never silent (issue 9, item 5; cases 08 and 25).

A binarizer behind a hardtanh sees a pre-activation in [-1, 1]: sign(h - t) is constant for
t >= 1. scan's advice is bounded by that range, patch warns naming the site, search marks
the candidate degenerate.
"""
from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from bnnshift.cli import app
from bnnshift.scan import scan_model
from models import SIGN_STE_SOURCE

HARDTANH_PY = '''
import torch, torch.nn as nn, torch.nn.functional as F
''' + SIGN_STE_SOURCE + '''
class BinConv(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(SignSTE.apply(x), SignSTE.apply(self.weight), None, self.stride, self.padding)

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.htanh0 = nn.Hardtanh()
        self.conv1 = BinConv(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 10)
    def forward(self, x):
        x = self.htanh0(self.bn0(self.conv0(x)))
        x = F.hardtanh(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(x, 1))

def build():
    return Net()
'''


def _model_file(tmp_path):
    p = tmp_path / "htanh.py"
    p.write_text(HARDTANH_PY)
    return p


def _load(p):
    import importlib.util

    spec = importlib.util.spec_from_file_location("htanh_for_test", p)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scan_advice_is_bounded_by_the_hardtanh_range(tmp_path):
    report = scan_model(_load(_model_file(tmp_path)).build(), (1, 8, 8))
    (site,) = report.sites
    assert site.name == "conv1:input" and site.producer == "hardtanh"
    assert any("bounded to [-1, 1]" in a and "(-1, 1)" in a for a in site.advice), site.advice
    assert not any(a.startswith("search t in [-1, 2]") for a in site.advice)


def test_patch_warns_naming_a_site_it_makes_constant(tmp_path):
    p = _model_file(tmp_path)
    runner = CliRunner()
    r = runner.invoke(app, ["patch", f"{p}:build", "--input-shape", "1,8,8", "--shift", "1.5", "-o",
                            str(tmp_path / "t15"), "--json"])
    assert r.exit_code == 0, r.stderr
    warned = [w for w in json.loads(r.stdout)["warnings"] if "constant" in w]
    assert len(warned) == 1 and "conv1:input" in warned[0] and "[-1, 1]" in warned[0]
    r = runner.invoke(app, ["patch", f"{p}:build", "--input-shape", "1,8,8", "--shift", "0.5", "-o",
                            str(tmp_path / "t05"), "--json"])
    assert r.exit_code == 0, r.stderr
    assert not any("constant" in w for w in json.loads(r.stdout)["warnings"])


def test_search_marks_a_candidate_whose_site_is_constant_degenerate(tmp_path):
    from bnnshift.search import SearchConfig, SearchContext, run_candidate

    p = _model_file(tmp_path)
    cfg = SearchConfig(model=f"{p}:build", data="synthetic:128", input_shape=(1, 8, 8), steps=2, batch_size=32,
                       train_limit=128, compile="off")
    ctx = SearchContext.open(cfg)
    ok = run_candidate(cfg, 0.0, 0, context=ctx)
    dead = run_candidate(cfg, 1.5, 0, context=ctx)
    assert ok.degenerate == [] and 0 < ok.plus_fraction["conv1:input"] < 1
    assert dead.degenerate == ["conv1:input"] and dead.plus_fraction["conv1:input"] == 0.0
    assert dead.to_json()["degenerate"] == ["conv1:input"]


def test_search_says_grid_points_outside_the_range_and_layers_that_cannot_learn(tmp_path):
    from bnnshift.search import SearchConfig, search

    p = _model_file(tmp_path)
    cfg = SearchConfig(model=f"{p}:build", data="synthetic:64", input_shape=(1, 8, 8), steps=1, batch_size=32,
                       train_limit=64, compile="off", shifts=[0.0, 1.5])
    summary = search(cfg)
    ws = summary.to_json()["warnings"]
    assert any("1.5" in w and "outside (-1, 1)" in w and "conv1:input" in w for w in ws), ws
    assert any("t = 1.5" in w and "degenerate" in w for w in ws), ws
    assert not any("t = 0 " in w for w in ws)

    nograd = tmp_path / "nograd.py"
    nograd.write_text(HARDTANH_PY.replace("SignSTE.apply(x)", "torch.sign(x)"))
    summary = search(SearchConfig(model=f"{nograd}:build", data="synthetic:64", input_shape=(1, 8, 8), steps=1,
                                  batch_size=32, train_limit=64, compile="off", shifts=[0.0]))
    assert any("no gradient reaches conv1:input" in w and "conv0.weight" in w for w in summary.warnings)


# ------------------------------------------------------------------------------ before the first candidate (issue 22)


RELU_PY = HARDTANH_PY.replace("self.htanh0 = nn.Hardtanh()", "self.htanh0 = nn.ReLU()")  # sign(relu(h) - t)


def _search_cli(tmp_path, model, shifts, *extra):
    runner = CliRunner()
    return runner.invoke(app, ["search", f"{model}:build", "--input-shape", "1,8,8", "--data", "synthetic:64",
                               "--batch-size", "32", "--steps", "1", "--no-compile", "--shifts", shifts,
                               "--out", str(tmp_path / "o"), *extra])


def _one_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "unexpected" not in lines[0], r.stderr
    return lines[0]


def test_search_whose_every_candidate_is_degenerate_stops_before_training(tmp_path, monkeypatch):
    """t >= 1 behind a hardtanh: every candidate would be constant; the search says so in one
    line before the first candidate (no training, no output) and exits 2."""
    import bnnshift.train as train_mod

    def no_training(*a, **k):
        raise AssertionError("a candidate trained")

    monkeypatch.setattr(train_mod.DefaultTrainer, "start", no_training)
    r = _search_cli(tmp_path, _model_file(tmp_path), "1.5,2")
    line = _one_line(r)
    assert r.exit_code == 2, line
    assert "conv1:input" in line and "constant at the initial weights" in line and "[-1, 1]" in line
    assert not (tmp_path / "o").exists()


def test_search_with_a_relu_producer_and_a_negative_grid_stops_too(tmp_path):
    """Another producer, another side: sign(relu(h) - t) with t < 0 is always +1."""
    p = tmp_path / "relu.py"
    p.write_text(RELU_PY)
    r = _search_cli(tmp_path, p, "-1,-0.5", "--seeds", "2")
    line = _one_line(r)
    assert r.exit_code == 2 and "conv1:input" in line and "constant" in line, line


def test_search_with_some_degenerate_candidates_runs_and_says_which_before(tmp_path):
    from bnnshift.search import SearchConfig, search

    p = _model_file(tmp_path)
    summary = search(SearchConfig(model=f"{p}:build", data="synthetic:64", input_shape=(1, 8, 8), steps=1,
                                  batch_size=32, compile="off", shifts=[0.0, 1.5, 2.0]))
    assert len(summary.candidates) == 3
    pre = [w for w in summary.warnings if w.startswith("before training")]
    assert pre == ["before training: t = 1.5, 2 make conv1:input constant at the initial weights: those "
                   "candidates would be degenerate"], summary.warnings
