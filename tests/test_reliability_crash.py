"""kill -9 at several moments of `fold`, `patch --force` and `export`: afterwards the old
directory / file is intact and loads, or the new one is complete, or nothing is there; no file
appears after the parent died; the next run sweeps the temp files it owns. Two searches on one
--out: the second is refused (naming the first's PID) and the first's journal is complete.

Moments are exact fault points (``BNNSHIFT_FAULT=<point>`` makes the process SIGKILL itself
there: ``swap:before``, ``swap:exchanged``, ``swap:between``, ``export:before-move``) plus
kills timed on what the process has written so far.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bnnshift import _io, validate

pytestmark = pytest.mark.slow  # subprocesses killed at several moments: ~2-4 min on a loaded 2-core machine
from bnnshift.cli import app
from bnnshift.patch import load_patched, read_recipe

PATCH = ["patch", "zoo:mlp", "--arg", "width=0.25", "-q"]


def _cli(args, cwd: Path):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)


def _snapshot(d: Path) -> dict[str, bytes]:
    # the owner lock (.bnnshift.lock, not content) of a killed writer stays until the next one
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != ".bnnshift.lock"}


def _ours(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".bnnshift-"))


def _spawn(args, cwd: Path, fault: str | None = None, **env):
    e = dict(os.environ, OMP_NUM_THREADS="1", **env)
    if fault:
        e["BNNSHIFT_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-m", "bnnshift", *map(str, args)], cwd=cwd, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill_when(proc, cond, timeout=120.0) -> bool:
    """SIGKILL ``proc`` as soon as ``cond()`` holds; False if it ended first."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return False
        if cond():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("timed out")


def _old_or_new(d: Path, old: dict[str, bytes], new_shift: float | None, folded: bool | None = None) -> str:
    """The directory is exactly the old one, or a complete new one that loads; never anything else."""
    assert d.is_dir()
    snap = _snapshot(d)
    if snap == old:
        which = "old"
    else:
        assert set(snap) == {"model.safetensors", "patch.json"}, set(snap)
        rec = read_recipe(d)
        if new_shift is not None:
            assert {s["shift"] for s in rec.sites} == {new_shift}
        if folded is not None:
            assert any(s.get("folded_into") for s in rec.sites) == folded
        which = "new"
    load_patched(d)  # loads, sha256 matches
    return which


@pytest.mark.parametrize("moment,expect", [("swap:before", "old"), ("swap:exchanged", "new"), ("written", None)])
def test_kill_fold(patched_mlp, moment, expect):
    root = patched_mlp.parent
    old = _snapshot(patched_mlp)
    if moment == "written":  # kill as soon as the new directory holds its weights
        proc = _spawn(["fold", "p"], root)
        _kill_when(proc, lambda: any((root / n / "model.safetensors").exists() for n in _ours(root)))
    else:
        proc = _spawn(["fold", "p"], root, fault=moment)
        assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()
    which = _old_or_new(patched_mlp, old, None, folded=True)
    if expect:
        assert which == expect
    # the next run in that directory cleans up what the killed one owned (and completes)
    res = _cli(["fold", "p", "-q"] if which == "old" else PATCH + ["--shift", "0", "-o", "q"], root)
    assert res.exit_code == 0, res.stderr
    assert _ours(root) == []
    assert _old_or_new(patched_mlp, old, None, folded=True) == "new"


@pytest.mark.parametrize("moment,expect", [("swap:before", "old"), ("written", None)])
def test_kill_patch_force(patched_mlp, moment, expect):
    root = patched_mlp.parent
    old = _snapshot(patched_mlp)
    args = PATCH + ["--shift", "1.25", "-o", "p", "--force"]
    if moment == "written":
        proc = _spawn(args, root)
        _kill_when(proc, lambda: any((root / n / "model.safetensors").exists() for n in _ours(root)))
    else:
        proc = _spawn(args, root, fault=moment)
        assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()
    which = _old_or_new(patched_mlp, old, 1.25)
    if expect:
        assert which == expect
    assert _ours(root)  # the killed run's temp directory is still there...
    res = _cli(PATCH + ["--shift", "1.25", "-o", "p", "--force"], root)
    assert res.exit_code == 0, res.stderr
    assert _ours(root) == []  # ...and the next run removed it
    assert _old_or_new(patched_mlp, old, 1.25) == "new"


def test_kill_patch_new_dir_leaves_nothing(tmp_path):
    proc = _spawn(PATCH + ["--shift", "0.5", "-o", "fresh"], tmp_path, fault="swap:before")
    assert proc.wait() == -signal.SIGKILL
    assert not (tmp_path / "fresh").exists()


def test_two_rename_fallback(tmp_path, monkeypatch):
    """Without RENAME_EXCHANGE: old -> .old, new -> dest; killed in between, the old directory
    is kept (never swept) and nothing half-written is at dest."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "a").write_text("old")
    monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    with _io.replace_dir(d, force=True) as tmp:
        (tmp / "a").write_text("new")
    assert (d / "a").read_text() == "new" and _ours(tmp_path) == []
    code = ("import sys; from bnnshift import _io; _io._exchange = lambda a, b: False\n"
            "with _io.replace_dir(sys.argv[1], force=True) as t:\n    (t / 'a').write_text('newer')\n")
    p = subprocess.run([sys.executable, "-c", code, str(d)], env=dict(os.environ, BNNSHIFT_FAULT="swap:between"))
    assert p.returncode == -signal.SIGKILL
    assert not d.exists()
    olds = [n for n in _ours(tmp_path) if n.endswith(".old")]
    assert len(olds) == 1 and (tmp_path / olds[0] / "a").read_text() == "new"
    _io.sweep_stale(tmp_path)
    assert (tmp_path / olds[0] / "a").read_text() == "new"  # the user's data is never swept


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def test_kill_export_parent_kills_child_and_writes_nothing(patched_mlp, tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    onnx = tmp_path / "m.onnx"
    proc = _spawn(["export", "p", "--onnx", onnx], tmp_path, TMPDIR=str(tmpdir))
    kids: list[int] = []

    def child_running():
        kids[:] = _children(proc.pid)
        return bool(kids) and Path(f"/proc/{kids[0]}/cmdline").read_bytes().count(b"bnnshift.export") > 0

    assert _kill_when(proc, child_running)
    deadline = time.time() + 10
    while time.time() < deadline and _io.pid_alive(kids[0]) and not _zombie(kids[0]):
        time.sleep(0.05)
    assert not _io.pid_alive(kids[0]) or _zombie(kids[0]), "the exporter outlived its parent"
    time.sleep(1.0)
    assert not onnx.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bnnshift-")]
    assert [p.name for p in tmpdir.iterdir() if p.name.startswith(f"bnnshift-export-{proc.pid}-")]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


def test_kill_export_before_move_then_legal_long_name(patched_mlp, tmp_path):
    """Killed after the child wrote its file: nothing at the destination. The next export (a
    253-byte name: the temp names are short) sweeps the dead run's temp dir and writes it."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    onnx = tmp_path / "m.onnx"
    proc = _spawn(["export", "p", "--onnx", onnx], tmp_path, fault="export:before-move", TMPDIR=str(tmpdir))
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()
    assert not onnx.exists() and _ours(tmp_path) == []
    stale = [p.name for p in tmpdir.iterdir() if p.name.startswith("bnnshift-export-")]
    assert stale and all(n.startswith(f"bnnshift-export-{proc.pid}-") for n in stale)
    long_name = tmp_path / ("x" * 248 + ".onnx")  # 253 bytes
    p = subprocess.run([sys.executable, "-m", "bnnshift", "export", "p", "--onnx", str(long_name), "--json"],
                       cwd=tmp_path, env=dict(os.environ, TMPDIR=str(tmpdir), OMP_NUM_THREADS="1"),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["path"] == str(long_name) and long_name.stat().st_size > 1000
    import onnx as onnx_mod

    onnx_mod.checker.check_model(str(long_name))
    assert not [p for p in tmpdir.iterdir() if p.name.startswith("bnnshift-export-")] and _ours(tmp_path) == []


SEARCH = ["search", "zoo:mlp", "--arg", "width=0.25", "--data", "synthetic:512", "--batch-size", "32",
          "--steps", "6", "--no-compile", "--shifts", "0,0.5,1,1.5"]


def test_second_search_on_same_out_is_refused(tmp_path):
    out = tmp_path / "run"
    first = _spawn(SEARCH + ["--out", out, "--json"], tmp_path)
    lock = out / _io.LOCK_NAME
    t0 = time.time()
    while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
        assert first.poll() is None, first.stderr.read().decode()
        assert time.time() - t0 < 120
        time.sleep(0.02)
    for extra in (["--force"], ["--resume"], []):
        res = _cli(SEARCH + ["--out", "run"] + extra, tmp_path)
        line = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(line) == 1 and f"pid {first.pid}" in line[0], res.stderr
        assert res.exit_code == validate.CATALOGUE["out-locked"][1] == 1
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr.decode()
    lines = (out / "journal.jsonl").read_text().splitlines()
    assert len(lines) == 4 and sorted(json.loads(ln)["shift"] for ln in lines) == [0, 0.5, 1, 1.5]
    assert len(json.loads(stdout)["candidates"]) == 4
    # released: the next search may take the directory (--resume reuses all 4)
    res = _cli(SEARCH + ["--out", "run", "--resume", "--json"], tmp_path)
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["resumed"] == 4
