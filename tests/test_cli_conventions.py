"""CLI conventions (issue 12): -h, shell completion, flags shown as flags, one meaning per option
name, a JSON error object on stdout with --json."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from bnnshift.cli import app

ERROR_SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "error.schema.json").read_text())
COMMANDS = ["scan", "zoo", "patch", "fold", "search", "export", "report"]
runner = CliRunner()


def help_of(*cmd) -> str:
    r = runner.invoke(app, [*cmd, "-h"], prog_name="bnnshift", env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("cmd", [[], *[[c] for c in COMMANDS]])
def test_dash_h_and_flags_shown_as_flags(cmd):
    text = help_of(*cmd)
    assert "Usage:" in text and "-h" in text
    assert "<bool>" not in text  # an on/off flag takes no value


def test_show_completion():
    """What a user runs, in a process of its own (typer fills its completion scripts when the
    command is built; an in-process runner shares that module state with every other test)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "plugins"),
                                                        os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", "import sys; from bnnshift.cli import main; sys.argv[0] = 'bnnshift'; main()",
                        "--show-completion", "bash"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "complete" in r.stdout and "bnnshift" in r.stdout, (r.stdout, r.stderr)


def test_hardtanh_shift_means_one_thing():
    assert "--hardtanh-shift" in help_of("patch")  # a number there
    assert "--hardtanh-shift" not in help_of("search")  # the flag is --hardtanh


@pytest.mark.parametrize("args,code", [
    (["scan", "zoo:no-such-model", "--json"], 2),
    (["fold", "/nonexistent/dir", "--json"], 1),
    (["export", "/nonexistent/dir", "--onnx", "/tmp/x.onnx", "--json"], 1),
])
def test_json_failure_is_a_json_error_object(args, code):
    r = runner.invoke(app, args)
    assert r.exit_code == code, r.output
    payload = json.loads(r.stdout)
    jsonschema.validate(payload, ERROR_SCHEMA)
    assert payload["exit_code"] == code and r.stderr.startswith("error: ")
    r = runner.invoke(app, [a for a in args if a != "--json"])
    assert r.stdout == ""  # without --json: only the line on stderr


@pytest.mark.parametrize("exc,code", [
    (OSError(28, "No space left on device", "/data/run/state.pt"), 1),
    (OSError(36, "File name too long", "x" * 300), 2),
    (MemoryError(), 1),
])
def test_json_failure_of_the_environment_is_a_json_error_object(exc, code, capsys):
    """An OSError or MemoryError under --json still prints the error object on stdout (issue 23:
    these two branches dropped json_mode and a script reading stdout got nothing)."""
    import typer

    from bnnshift.cli._errors import handle_errors

    @handle_errors
    def command(json_: bool = False):
        raise exc

    with pytest.raises(typer.Exit) as ended:
        command(json_=True)
    assert ended.value.exit_code == code
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    jsonschema.validate(payload, ERROR_SCHEMA)
    assert payload["exit_code"] == code and payload["hint"]
    assert captured.err.startswith("error: ") and len(captured.err.splitlines()) == 1
    with pytest.raises(typer.Exit):
        command(json_=False)
    assert capsys.readouterr().out == ""


def test_non_empty_out_suggests_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "journal.jsonl").write_text("")
    r = runner.invoke(app, ["search", "zoo:mlp", "--arg", "width=0.25", "--data", "synthetic:256",
                            "--input-shape", "1,28,28", "--shifts", "0", "--steps", "1", "--out", str(out)])
    assert r.exit_code == 1 and "--resume" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_local_module_named_like_an_alias_wins(tmp_path, monkeypatch):
    from bnnshift.data import load_data
    from bnnshift.data.spec import parse_data_spec

    (tmp_path / "fmnist.py").write_text(
        "import torch\n\ndef my_data():\n    return torch.zeros(8, 1, 4, 4), torch.arange(8) % 2\n")
    monkeypatch.chdir(tmp_path)
    kind, arg = parse_data_spec("fmnist:my_data")
    assert kind == "file" and arg == f"{tmp_path.resolve() / 'fmnist.py'}:my_data"
    assert load_data("fmnist:my_data").train_x.shape == (8, 1, 4, 4)
    assert parse_data_spec("fmnist")[0] == "fashion-mnist"  # no function: still the alias
    (tmp_path / "data").mkdir()
    assert parse_data_spec("fmnist:data")[0] == "fashion-mnist"  # an existing directory: a ROOT
