"""CLI: scan --json, exit codes and one-line errors for bad input."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch
from typer.testing import CliRunner

from bnnshift.cli import app

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "scan.schema.json").read_text())

MODEL_PY = '''
import torch, torch.nn as nn

class Sign(nn.Module):
    def forward(self, x):
        return torch.sign(x)

class Net(nn.Module):
    def __init__(self, hidden=16):
        super().__init__()
        self.fc1 = nn.Linear(12, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.act = Sign()
        self.fc2 = nn.Linear(hidden, 3)
    def forward(self, x):
        return self.fc2(self.act(self.bn(self.fc1(x.flatten(1)))))

def plain():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
'''


def run(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture
def model_file(tmp_path):
    p = tmp_path / "net.py"
    p.write_text(MODEL_PY)
    return p


def _one_line_error(stderr: str) -> str:
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_scan_json_of_a_zoo_model_is_only_json_and_valid():
    code, out, err = run("scan", "zoo:mlp", "--arg", "width=0.25", "--json")
    assert code == 0, err
    payload = json.loads(out)
    jsonschema.validate(payload, SCHEMA)
    assert payload["num_sites"] == 2 and payload["weight_binarizers"] == 2


def test_scan_with_synthetic_data_reports_plus_fractions():
    code, out, err = run("scan", "zoo:lenet5", "--data", "synthetic:64", "--batch-size", "32", "--data-batches", "2",
                         "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["data"] and all(0 <= s["plus_fraction"] <= 1 for s in payload["sites"])


def test_scan_human_output_shows_a_table(model_file):
    code, out, err = run("scan", f"{model_file}:Net", "--input-shape", "12")
    assert code == 0, err
    assert "act" in out and "BatchNorm" in out


def test_checkpoint_round_trip_and_wrong_architecture(tmp_path, model_file):
    import importlib.util

    spec = importlib.util.spec_from_file_location("netmod_for_test", model_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    good = tmp_path / "good.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in mod.Net().state_dict().items()}}, good)
    code, out, err = run("scan", f"{model_file}:Net", "--input-shape", "12", "--checkpoint", good, "--json")
    assert code == 0, err
    bad = tmp_path / "wider.pt"
    torch.save(mod.Net(hidden=32).state_dict(), bad)
    code, out, err = run("scan", f"{model_file}:Net", "--input-shape", "12", "--checkpoint", bad)
    assert code == 1
    assert "does not fit" in _one_line_error(err)


def test_missing_checkpoint_file(model_file, tmp_path):
    code, _, err = run("scan", f"{model_file}:Net", "--input-shape", "12", "--checkpoint", tmp_path / "nope.pt")
    assert code == 1 and "nope.pt" in _one_line_error(err)


def test_corrupt_checkpoint(model_file, tmp_path):
    p = tmp_path / "corrupt.pt"
    p.write_bytes(b"\x00garbage" * 100)
    code, _, err = run("scan", f"{model_file}:Net", "--input-shape", "12", "--checkpoint", p)
    assert code == 1 and "corrupt" in _one_line_error(err)


def test_pickled_module_is_refused_with_the_unsafe_globals(model_file, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("netmod_pickled", model_file)
    mod = importlib.util.module_from_spec(spec)
    import sys

    sys.modules["netmod_pickled"] = mod
    spec.loader.exec_module(mod)
    p = tmp_path / "whole.pt"
    torch.save(mod.Net(), p)
    code, _, err = run("scan", f"{model_file}:Net", "--input-shape", "12", "--checkpoint", p)
    line = _one_line_error(err)
    assert code == 1 and "unpickling" in line and "--unsafe-load" in line and "Net" in line


@pytest.mark.parametrize("spec", ["nocolon", "zoo:", "zoo:not-a-model", "does/not/exist.py:f", "timm:"])
def test_bad_spec_strings_exit_2(spec):
    code, _, err = run("scan", spec, "--input-shape", "1,28,28")
    assert code == 2, err
    _one_line_error(err)


def test_bad_input_shape_exit_2():
    code, _, err = run("scan", "zoo:mlp", "--input-shape", "a,b")
    assert code == 2 and "--input-shape" in _one_line_error(err)


def test_model_without_binary_activation_exit_3(model_file):
    code, _, err = run("scan", f"{model_file}:plain", "--input-shape", "12")
    assert code == 3
    assert "register_detector" in _one_line_error(err)


def test_unknown_data_spec_is_a_usage_error():
    code, _, err = run("scan", "zoo:mlp", "--data", "nonsense-data")
    assert code == 2, err
    _one_line_error(err)


def test_zoo_lists_models_as_json():
    code, out, err = run("zoo", "--json")
    assert code == 0
    names = {m["name"] for m in json.loads(out)["models"]}
    assert {"mlp", "lenet5", "vgg-small", "reactnet-a", "style-control-flow"} <= names


def test_scan_with_fashion_mnist_shows_the_paper_fig4_view():
    code, out, err = run("scan", "zoo:mlp", "--arg", "width=0.25", "--data", "fashion-mnist", "--batch-size", "128",
                         "--data-batches", "2", "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["data"].startswith("fashion-mnist")
    for s in payload["sites"]:
        assert 0 < s["plus_fraction"] < 1
        assert {"mean", "median", "skew"} <= set(s["preact"])


def test_scan_of_a_full_precision_torchvision_model_exits_3():
    code, _, err = run("scan", "torchvision:resnet18", "--input-shape", "3,64,64")
    assert code == 3
    _one_line_error(err)


PRINTING_PY = '''
import torch, torch.nn as nn

class SignSTE(nn.Module):
    def forward(self, x):
        c = x.clamp(-1, 1)
        return (torch.sign(x) - c).detach() + c

def _cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), SignSTE(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

def print_at_build():
    print("banner from the factory")
    net = _cnn()
    for m in net.modules():
        print(type(m).__name__)
    return net

class PrintInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _cnn()
    def forward(self, x):
        print("forward", tuple(x.shape))
        return self.net(x)
'''


@pytest.mark.parametrize("factory", ["print_at_build", "PrintInForward"])
def test_json_stays_pure_json_when_user_code_prints(tmp_path, factory):
    """--json: the user's print() goes to stderr, stdout parses as JSON (scan and patch)."""
    p = tmp_path / "printing.py"
    p.write_text(PRINTING_PY)
    code, out, err = run("scan", f"{p}:{factory}", "--input-shape", "3,8,8", "--json")
    assert code == 0, err
    assert json.loads(out)["num_sites"] == 1
    assert "forward (" in err or "banner from the factory" in err
    code, out, err = run("patch", f"{p}:{factory}", "--input-shape", "3,8,8", "--shift", "0.5",
                         "-o", tmp_path / f"out_{factory}", "--json")
    assert code == 0, err
    assert len(json.loads(out)["sites"]) == 1


# ------------------------------------------------------------------------------ readable at 100 columns


def _render_100(fn, report) -> str:
    import io

    from rich.console import Console

    from bnnshift.cli._output import Output

    o = Output()
    buf = io.StringIO()
    o.out = Console(file=buf, width=100, force_terminal=False, highlight=False, soft_wrap=True)
    fn(report, o)
    return buf.getvalue()


def test_scan_table_fits_100_columns_without_breaking_words():
    from bnnshift.cli.scan import render_layer_summary, render_report
    from bnnshift.scan import scan_model
    from conftest import zoo_small

    model, shape = zoo_small("xnor-resnet18")
    report = scan_model(model, shape, name="zoo:xnor-resnet18")
    text = _render_100(render_report, report)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100, text
    for s in report.sites:  # each name whole on one line: the name --site takes
        assert any(s.name in line.split() for line in lines), s.name
    assert "\u2026" not in text  # nothing cut short
    advice = {a for s in report.sites for a in s.advice}
    for i, a in enumerate(sorted(advice, key=lambda a: text.index(a)), 1):
        assert f"[{i}] {a}"[:60] in text.replace("\n", " ")
    header = next(line for line in lines if line.split()[:2] == ["site", "kind"])
    assert "pool" in header and "+1 share" not in header  # no data: the +1 share column is dropped, pool is not

    summary = _render_100(render_layer_summary, report)
    assert max(len(line) for line in summary.splitlines()) <= 100 and "\u2026" not in summary
    longest = max((r["layer"] for r in report.layer_summary["layers"]), key=len)
    assert longest in summary and "compression" in summary


def test_scan_summary_json_totals(model_file):
    code, out, err = run("scan", f"{model_file}:Net", "--input-shape", "12", "--summary", "--json")
    assert code == 0, err
    payload = json.loads(out)
    jsonschema.validate(payload, SCHEMA)
    ls = payload["layer_summary"]
    rows = {r["layer"]: r for r in ls["layers"]}
    assert rows["fc1"]["params_32bit"] == 12 * 16 + 16 and rows["fc1"]["output_shape"] == [16]
    assert rows["fc1"]["float_macs"] == 12 * 16 and rows["fc2"]["float_macs"] == 16 * 3
    t = ls["totals"]
    assert t["params_32bit"] == sum(r["params_32bit"] for r in ls["layers"]) == payload["summary"]["params"]
    assert t["memory_fp32_bytes"] == 4 * payload["summary"]["params"]
    code, out, _ = run("scan", f"{model_file}:Net", "--input-shape", "12", "--json")
    assert "layer_summary" not in json.loads(out)
