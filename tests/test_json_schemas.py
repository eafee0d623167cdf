"""Every --json output validates against its JSON Schema in docs/ (issue 12), failures too."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from bnnshift.cli import app

DOCS = Path(__file__).resolve().parents[1] / "docs"
runner = CliRunner()


def schema(name):
    s = json.loads((DOCS / f"{name}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(s)
    return s


def ok(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_every_command_has_a_schema():
    for cmd in ("scan", "zoo", "patch", "fold", "export", "search", "error"):
        schema(cmd)


def test_zoo():
    jsonschema.validate(ok("zoo", "--json"), schema("zoo"))


def test_patch_fold_export(tmp_path):
    out = tmp_path / "P"
    jsonschema.validate(ok("patch", "zoo:style-conv-input", "--shift", "0.6", "-o", out, "--json"), schema("patch"))
    fold = ok("fold", out, "--json")
    jsonschema.validate(fold, schema("fold"))
    assert fold["folded"]
    jsonschema.validate(ok("export", out, "--onnx", tmp_path / "m.onnx", "--batches", "1", "--json"), schema("export"))


def test_search(tmp_path):
    payload = ok("search", "zoo:mlp", "--arg", "width=0.25", "--data", "synthetic:512", "--input-shape", "1,28,28",
                 "--shifts", "0,1", "--steps", "3", "--compile", "off", "--out", tmp_path / "s", "--json")
    jsonschema.validate(payload, schema("search"))
    jsonschema.validate(json.loads((tmp_path / "s" / "search.json").read_text()), schema("search"))


def test_parser_usage_error_with_json():
    """An unknown option is refused by the parser before any command runs (the console script)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "bnnshift", "zoo", "--json", "--bad-option"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "No such option" in proc.stderr
    payload = json.loads(proc.stdout)
    jsonschema.validate(payload, schema("error"))
    assert payload["exit_code"] == 2


@pytest.mark.parametrize("args", [
    ["patch", "zoo:mlp", "-o", "/nonexistent/x/y", "--json"],
    ["search", "zoo:mlp", "--data", "no-such-data", "--json"],
])
def test_failures(args):
    r = runner.invoke(app, args)
    assert r.exit_code != 0
    payload = json.loads(r.stdout)
    jsonschema.validate(payload, schema("error"))
    assert payload["exit_code"] == r.exit_code
