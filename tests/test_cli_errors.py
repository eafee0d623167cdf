"""One exception -> (line, hint, exit code) table applied in one place (issue 23 item 5): every
row of ``cli._errors.TABLE`` under ``--json`` prints the error object on stdout and one line on
stderr, with its documented exit code; commands are registered at the root and never import
``app`` (no import loop) nor another command module's private helpers."""
from __future__ import annotations

import ast
import errno
import json
from pathlib import Path

import jsonschema
import pytest
import typer
from typer.testing import CliRunner

from bnnshift.cli import COMMANDS, _errors, app
from bnnshift.errors import NoSitesError, Terminated, UsageError, VerificationError

ROOT = Path(__file__).resolve().parents[1]
ERROR_SCHEMA = json.loads((ROOT / "docs" / "error.schema.json").read_text())

# (exception, exit code, a piece of the stderr line, the row's describe function)
CASES = [
    (UsageError("bad --shift 'x'", hint="e.g. --shift 0.5"), 2, "bad --shift", "_bnnshift"),
    (NoSitesError("no binary activation found in zoo:x"), 3, "no binary activation", "_bnnshift"),
    (VerificationError("ONNX verification failed"), 4, "verification failed", "_bnnshift"),
    (KeyboardInterrupt(), 130, "interrupted", "_interrupted"),
    (Terminated(), 143, "terminated", "_interrupted"),
    (MemoryError(), 1, "out of memory", "_memory"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/x"), 1, "No space left", "_os_error"),
    (OSError(errno.ENAMETOOLONG, "File name too long", "y" * 300), 2, "File name too long", "_os_error"),
    (RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly"), 1, "DataLoader worker", "_environment"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory"), 1, "out of memory",
     "_environment"),
    (ValueError("a bug"), 1, "ValueError: a bug (unexpected;", "_unexpected"),
]


def _command(exc):
    def command(json_: bool = typer.Option(False, "--json")):
        raise exc

    one = typer.Typer()
    one.command()(_errors.handle_errors(command))
    return one


@pytest.mark.parametrize("exc,code,line,row", CASES, ids=[f"{type(c[0]).__name__}-{c[1]}" for c in CASES])
@pytest.mark.parametrize("json_mode", [True, False])
def test_each_row_one_line_exit_code_and_json(exc, code, line, row, json_mode):
    found = _errors.describe_failure(exc)
    assert found is not None and found[1].describe.__name__ == row
    r = CliRunner().invoke(_command(exc), ["--json"] if json_mode else [])
    assert r.exit_code == code, r.output
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert line in r.stderr
    if json_mode:
        payload = json.loads(r.stdout)
        jsonschema.validate(payload, ERROR_SCHEMA)
        assert payload["exit_code"] == code and payload["error"]
        assert payload["hint"] == found[0].hint
    else:
        assert r.stdout == ""


def test_every_row_of_the_table_is_exercised():
    hit = {_errors.describe_failure(c[0])[1].describe.__name__ for c in CASES}
    assert hit == {row.describe.__name__ for row in _errors.TABLE}


def test_debug_reraises_except_interrupts(monkeypatch):
    monkeypatch.setenv("BNNSHIFT_DEBUG", "1")
    wrapped = _errors.handle_errors(lambda: (_ for _ in ()).throw(ValueError("x")))
    with pytest.raises(ValueError):
        wrapped()

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as ended:
        _errors.handle_errors(interrupted)()
    assert ended.value.exit_code == 130


def test_interrupted_search_with_out_says_resume():
    failure, _ = _errors.describe_failure(KeyboardInterrupt(), {"resume": False, "out_dir": "runs/a"})
    assert "--resume" in failure.hint and "--resume" in failure.line
    assert _errors.describe_failure(KeyboardInterrupt(), {"out_dir": None})[0].hint is None


def test_every_command_is_registered_once_behind_the_handler():
    names = [c.name for c in app.registered_commands]
    assert names == [name for name, _, _ in COMMANDS]
    for c in app.registered_commands:
        assert getattr(c.callback, "__wrapped__", None) is not None, c.name  # functools.wraps of handle_errors


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield node.level, node.module or "", [a.name for a in node.names]


@pytest.mark.parametrize("module", sorted({m for _, m, _ in COMMANDS}))
def test_command_modules_import_neither_app_nor_private_helpers_of_other_commands(module):
    commands = {m for _, m, _ in COMMANDS}
    for level, mod, names in _imports(ROOT / "bnnshift" / "cli" / f"{module}.py"):
        inside_cli = level == 1 or mod.startswith("bnnshift.cli")
        target = mod.rsplit(".", 1)[-1] if mod else ""
        if inside_cli and (target in ("", "cli")):
            assert "app" not in names, f"cli/{module}.py imports app (an import loop)"
        if inside_cli and target in commands and target != module:
            private = [n for n in names if n.startswith("_")]
            assert not private, f"cli/{module}.py imports private helpers of cli/{target}.py: {private}"
