"""Nothing runs that the user did not name (issue 21): isolated exporter child, one writer of
the trust record, journal paths kept inside their directory, one writer per output, signals,
pickle gadgets, data sanity."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bnnshift.cli import app

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(__file__).resolve().parent / "models" / "tiny_bnn.py"
runner = CliRunner()


@pytest.fixture(autouse=True)
def own_trust_file(tmp_path, monkeypatch):
    f = tmp_path / "state" / "trusted_recipes"
    monkeypatch.setenv("BNNSHIFT_TRUST_FILE", str(f))
    return f


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def plant(where: Path, names=("json", "argparse", "onnx", "typing_extensions", "runpy")) -> list[Path]:
    """A module per name in ``where`` that creates a marker file when imported."""
    markers = []
    for n in names:
        m = where / f"MARK_{n}"
        (where / f"{n}.py").write_text(f"open({str(m)!r}, 'w').write('ran')\n")
        markers.append(m)
    return markers


# ------------------------------------------------------------------ 1. isolated child processes


def test_child_command_ignores_planted_modules_in_cwd(tmp_path):
    from bnnshift.export import child_command

    markers = plant(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # -I: not even PYTHONPATH reaches the child's path
    proc = subprocess.run(child_command("bnnshift.export") + ["--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "python -m bnnshift.export" in proc.stdout  # argparse ran: the standard library's
    assert not [m.name for m in markers if m.exists()]


def test_child_path_is_explicit_and_excludes_cwd(tmp_path, monkeypatch):
    from bnnshift import export as ex

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", str(tmp_path), *sys.path])
    cmd = ex.child_command("bnnshift.export")
    assert cmd[1] == "-I"
    path = json.loads(cmd[4])
    assert str(tmp_path) not in path and "" not in path
    assert Path(cmd[5]) == Path(ex.__file__).resolve().parent / "__init__.py"
    # a pkg.mod:fn spec the user names is resolved against the cwd, appended after the stdlib
    assert ex._module_spec_dirs(tmp_path, "mypkg.nets:build") == [str(tmp_path)]
    assert ex._module_spec_dirs(tmp_path, "zoo:mlp") == []
    assert ex._module_spec_dirs(tmp_path, f"{tmp_path / 'nets.py'}:build") == []


def test_export_of_zoo_model_never_imports_cwd_modules(tmp_path, monkeypatch):
    r = invoke("patch", "zoo:mlp", "--arg", "width=0.25", "--shift", "0.5", "-o", tmp_path / "p", "-q")
    assert r.exit_code == 0, r.stderr
    work = tmp_path / "work"
    work.mkdir()
    markers = plant(work)
    monkeypatch.chdir(work)
    r = invoke("export", tmp_path / "p", "--onnx", "m.onnx", "--batches", "1", "-q")
    assert r.exit_code == 0, r.stderr
    assert (work / "m.onnx").is_file()
    assert not [m.name for m in markers if m.exists()]
