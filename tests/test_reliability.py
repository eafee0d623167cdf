"""Bad-input catalogue: every refused input exits with its documented code and ONE line on
stderr that says what to do, before any expensive work, and leaves no partial output.
(Kill -9 tests: test_reliability_crash.py; fuzzing: test_reliability_fuzz.py.)"""
from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bnnshift import _io, validate
from bnnshift.cli import app
from bnnshift.errors import OutputError, UsageError

LONG = "n" * 300  # one path component longer than NAME_MAX (255 bytes)
SEARCH = ["search", "zoo:mlp", "--arg", "width=0.25", "--data", "synthetic:64", "--batch-size", "16", "--steps",
          "1", "--no-compile"]


def _invoke(args, cwd: Path):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)


def _one_line(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    assert "unexpected" not in line and "Traceback" not in line, line
    return line


# (id, argv, exit code, words the line must contain, paths that must not exist afterwards)
CATALOGUE = [
    ("grid-inf", SEARCH + ["--shifts", "0:inf:1", "--out", "o"], 2, "not finite", ["o"]),
    ("grid-nan-step", SEARCH + ["--shifts", "0:1:nan", "--out", "o"], 2, "step", ["o"]),
    ("grid-huge-bounds", SEARCH + ["--shifts", "0:1e300:1e-300", "--out", "o"], 2, "out of range", ["o"]),
    ("grid-too-many-range", SEARCH + ["--shifts", "0:1000:0.01", "--out", "o"], 2, "more than 10000", ["o"]),
    ("grid-too-many-comma", SEARCH + ["--shifts", ",".join(str(i / 1000) for i in range(20_000)), "--out", "o"], 2,
     "more than 10000", ["o"]),
    ("grid-comma-huge", SEARCH + ["--shifts", "0,1e308", "--out", "o"], 2, "out of range", ["o"]),
    ("seeds-huge", SEARCH + ["--seeds", "1000000000000", "--out", "o"], 2, "more than 10000 seeds", ["o"]),
    ("seed-list-empty", SEARCH + ["--seed-list", "", "--out", "o"], 2, "empty --seed-list", ["o"]),
    ("seed-list-commas", SEARCH + ["--seed-list", ",,", "--out", "o"], 2, "empty --seed-list", ["o"]),
    ("seed-list-64bit", SEARCH + ["--seed-list", "99999999999999999999999", "--out", "o"], 2, "64 bits", ["o"]),
    ("lr-nan", SEARCH + ["--lr", "nan", "--out", "o"], 2, "learning rate", ["o"]),
    ("lr-negative", SEARCH + ["--lr", "-1", "--out", "o"], 2, "learning rate", ["o"]),
    ("weight-decay-negative", SEARCH + ["--weight-decay", "-1", "--out", "o"], 2, "--weight-decay", ["o"]),
    ("momentum", SEARCH + ["--optimizer", "sgd", "--momentum", "5", "--out", "o"], 2, "--momentum", ["o"]),
    ("stop-when-stable-full", SEARCH + ["--stop-when-stable", "--out", "o"], 2, "--schedule halving", ["o"]),
    ("stable-fraction", SEARCH + ["--schedule", "halving", "--stop-when-stable", "--stable-fraction", "0", "--out",
                                  "o"], 2, "--stable-fraction", ["o"]),
    ("device-tpu", SEARCH + ["--device", "tpu", "--out", "o"], 2, "use cpu, cuda", ["o"]),
    ("device-meta", SEARCH + ["--device", "meta", "--out", "o"], 2, "use cpu, cuda", ["o"]),
    ("device-empty", SEARCH + ["--device", "", "--out", "o"], 2, "use cpu, cuda", ["o"]),
    ("batch-1-batchnorm", SEARCH[:-5] + ["--batch-size", "1", "--steps", "1", "--out", "o"], 2,
     "--batch-size 2 or more", ["o"]),
    ("scan-batch-1-batchnorm", ["scan", "zoo:mlp", "--arg", "width=0.25", "--data", "synthetic:64",
                                "--batch-size", "1"], 2, "--batch-size 2 or more", []),
    ("input-shape-model", ["scan", "zoo:mlp", "--input-shape", "1,16"], 2, "--input-shape 1,16", []),
    ("arg-unknown", ["scan", "zoo:mlp", "--arg", "widht=0.25"], 2, "did you mean width", []),
    ("site-unknown", ["patch", "zoo:mlp", "--arg", "width=0.25", "--site", "nosuch=0.5", "-o", "p"], 2,
     "'nosuch'", ["p"]),
    ("input-shape-memory", ["scan", "zoo:mlp", "--input-shape", "100000,100000,100000"], 1, "available", []),
    ("search-input-shape-memory", SEARCH + ["--input-shape", "100000,100000,100000", "--out", "o"], 1,
     "available", ["o"]),
    ("patch-o-long", ["patch", "zoo:mlp", "--shift", "0.5", "-o", LONG], 2, "255", [LONG]),
    ("search-out-long", SEARCH + ["--out", LONG], 2, "255", [LONG]),
    ("search-patch-out-long", SEARCH + ["--patch-out", LONG], 2, "255", [LONG]),
    ("checkpoint-long", ["scan", "zoo:mlp", "--checkpoint", LONG + ".pt"], 2, "--checkpoint", []),
    ("model-path-long", ["scan", LONG + ".py:build"], 2, "model spec", []),
    ("data-root-long", ["scan", "zoo:mlp", "--data", "fashion-mnist:" + LONG], 2, "--data", []),
    ("export-onnx-long", ["export", ".", "--onnx", LONG + ".onnx"], 2, "--onnx", [LONG + ".onnx"]),
    ("patch-onnx-long", ["patch", "zoo:mlp", "--shift", "0.5", "-o", "p", "--onnx", LONG + ".onnx"], 2, "--onnx",
     ["p"]),
    ("fold-long", ["fold", LONG], 2, "255", []),
    ("grid-all-degenerate", SEARCH + ["--shifts", "50,100", "--out", "o"], 2, "constant at the initial weights",
     ["o"]),
    ("out-not-writable", SEARCH + ["--out", "/proc/self/bnnshift-out"], 1, "cannot write", []),
    ("patch-o-not-writable", ["patch", "zoo:mlp", "--shift", "0.5", "-o", "/proc/self/bnnshift-p"], 1,
     "cannot write", []),
    ("onnx-not-writable", ["export", ".", "--onnx", "/proc/self/x.onnx"], 1, "cannot write", []),
    ("mean-without-std", ["scan", "zoo:mlp", "--mean", "0.5"], 2, "--mean and --std go together", []),
    ("mean-std-count", ["patch", "zoo:mlp", "--arg", "width=0.25", "--shift", "0.5", "-o", "p", "--mean", "0.5,0.5",
                        "--std", "0.2"], 2, "2 mean values", ["p"]),
]


@pytest.mark.parametrize("argv,code,words,absent", [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_bad_input_catalogue(tmp_path, argv, code, words, absent):
    t0 = time.perf_counter()
    key = next(c[0] for c in CATALOGUE if c[1] is argv)
    assert validate.CATALOGUE[key][1] == code  # the documented code (docs/cli.md "Bad input")
    res = _invoke(argv, tmp_path)
    line = _one_line(res)
    assert res.exit_code == code, line
    assert words in line, line
    for p in absent:
        assert p not in os.listdir(tmp_path), p
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bnnshift-")]
    assert time.perf_counter() - t0 < 60  # refused before training / data loading


def test_existing_out_is_kept_on_refusal(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "journal.jsonl").write_text("{}\n")
    res = _invoke(SEARCH + ["--lr", "nan", "--out", "o", "--force"], tmp_path)
    assert res.exit_code == 2 and "learning rate" in _one_line(res)
    assert (out / "journal.jsonl").read_text() == "{}\n"  # --force deletes nothing before validation


def test_non_empty_out_without_force(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    res = _invoke(SEARCH + ["--out", "o"], tmp_path)
    assert res.exit_code == validate.CATALOGUE["out-not-empty"][1] == 1
    assert "pass --force" in _one_line(res)
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["notes.txt"]


def test_every_catalogue_entry_is_tested():
    tested = {c[0] for c in CATALOGUE} | {"full-disk-search", "full-disk-patch", "out-not-empty",
                                         "model-not-copyable"}  # tests/test_site_identity.py
    tested |= {"out-locked"}  # tests/test_reliability_crash.py::test_second_search_on_same_out_is_refused
    tested |= {"fold-already-folded"}  # tests/test_fold_notes.py::test_fold_of_a_folded_directory_says_where...
    tested |= {"data-not-clean"}  # tests/test_data_checks.py
    tested |= {"data-own-statistics"}  # tests/test_bn_norm.py::test_data_with_its_own_statistics_and_nothing_recorded...
    tested |= {"output-locked", "journal-path-outside", "trust-pin-changed", "unsafe-load-gadget",  # issue 21:
               "search-one-class", "image-bomb", "state-disk-full", "worker-killed",  # tests/test_security.py
               "interrupted", "terminated"}
    assert set(validate.CATALOGUE) == tested


def test_full_disk_before_search_trains(tmp_path, monkeypatch):
    """The writability probe writes real bytes: a full disk fails in a second, not after a candidate."""
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    try:
        res = _invoke(SEARCH + ["--out", "o"], tmp_path)
    finally:
        monkeypatch.setattr(os, "write", real_write)
    line = _one_line(res)
    assert res.exit_code == validate.CATALOGUE["full-disk-search"][1] == 1
    assert "No space left on device" in line and "free some space" in line
    assert not (tmp_path / "o").exists()


def test_full_disk_during_patch_keeps_old_dir(tmp_path, monkeypatch):
    """safetensors reports ENOSPC as SafetensorError: one line, exit 1, the old OUT intact."""
    import safetensors.torch
    from safetensors import SafetensorError

    res = _invoke(["patch", "zoo:mlp", "--arg", "width=0.25", "--shift", "0.5", "-o", "p", "-q"], tmp_path)
    assert res.exit_code == 0, res.stderr
    before = {p.name: p.read_bytes() for p in (tmp_path / "p").iterdir()}

    def full(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    res = _invoke(["patch", "zoo:mlp", "--arg", "width=0.25", "--shift", "1", "-o", "p", "--force"], tmp_path)
    line = _one_line(res)
    assert res.exit_code == validate.CATALOGUE["full-disk-patch"][1] == 1
    assert "No space left" in line and "free some space" in line
    assert {p.name: p.read_bytes() for p in (tmp_path / "p").iterdir()} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".bnnshift-")]
    res = _invoke(["patch", "zoo:mlp", "--arg", "width=0.25", "--shift", "1", "-o", "q"], tmp_path)
    assert res.exit_code == 1 and not (tmp_path / "q").exists()  # no half directory either


# ----------------------------------------------------------------------------- the module itself


def test_grid_size_counts_without_building():
    assert validate.grid_size(-1, 2, 0.25) == 13
    assert validate.grid_size(0, 1, 0.1) == 11
    assert validate.grid_size(0, 0, 1) == 1
    with pytest.raises(UsageError, match="more than 10000"):
        validate.grid_size(0, 1, 1e-9)
    with pytest.raises(UsageError, match="step"):
        validate.grid_size(0, 1, 0)


def test_input_memory_estimate():
    assert validate.check_input_memory((1, 28, 28), 256, available=10**9) == 28 * 28 * 256 * 4
    with pytest.raises(Exception, match="needs at least 8.0 GB"):
        validate.check_input_memory((2, 1000, 1000), 1000, available=10**9)


def test_path_check_counts_bytes_not_characters():
    validate.check_path("é" * 127, "--out")  # 127 characters, 254 bytes
    with pytest.raises(UsageError, match="256 bytes"):
        validate.check_path("é" * 128, "--out")
    validate.check_path("x" * 255, "--out")


def test_writability_really_writes(tmp_path, monkeypatch):
    validate.check_writable(tmp_path / "new" / "dir", "--out")
    assert not list(tmp_path.iterdir())  # the probe is removed, nothing created
    with pytest.raises(OutputError, match="cannot write in /proc"):
        validate.check_writable("/proc/self/x", "--out")


def test_stale_temp_files_are_swept(tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    (tmp_path / f".bnnshift-{dead}-abc.tmp").write_text("x")
    (tmp_path / f".bnnshift-{dead}-abc.d").mkdir()
    live = tmp_path / f".bnnshift-{os.getppid()}-abc.tmp"
    live.write_text("x")
    legacy = tmp_path / ".model.safetensors.k3j_x9.tmp"
    legacy.write_text("x")
    fresh_legacy = tmp_path / ".patch.json.abcd1234.tmp"
    fresh_legacy.write_text("x")
    old = time.time() - 2 * _io.STALE_LEGACY_SECONDS
    os.utime(legacy, (old, old))
    user = tmp_path / "notes.tmp"
    user.write_text("mine")
    removed = set(_io.sweep_stale(tmp_path))
    assert removed == {f".bnnshift-{dead}-abc.tmp", f".bnnshift-{dead}-abc.d", legacy.name}
    assert live.exists() and fresh_legacy.exists() and user.exists()


def test_weights_replaced_hint_names_real_options(tmp_path):
    """A directory whose weights no longer match patch.json: the hint names a real command."""
    res = _invoke(["patch", "zoo:mlp", "--arg", "width=0.25", "--shift", "0.5", "-o", "p", "-q"], tmp_path)
    assert res.exit_code == 0, res.stderr
    w = tmp_path / "p" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    res = _invoke(["fold", "p"], tmp_path)
    line = _one_line(res)
    assert res.exit_code == 1 and "does not match the sha256" in line
    assert "bnnshift patch" in line and "--force" in line
    import re

    from cli_fuzz import commands

    opts = {o for c in commands().values() for p in c.params for o in getattr(p, "opts", [])}
    for opt in re.findall(r"(?<![\w(])--[a-z][a-z-]+", line):
        assert opt in opts, opt  # every option the hint names exists
