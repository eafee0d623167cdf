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

from models import TINY_BNN as MODELS, invoke

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("own_trust_file")  # conftest: a trust record per test


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


# ------------------------------------------------------------------ 2. one writer of the trust record

HELPER_MODEL = '''
import torch.nn as nn
from helper_blocks import Sign, WIDTH


def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, WIDTH), nn.BatchNorm1d(WIDTH), Sign(), nn.Linear(WIDTH, 3))
'''
HELPER_BLOCKS = '''
import torch
import torch.nn as nn
WIDTH = 8


class Sign(nn.Module):
    def forward(self, x):
        return torch.sign(x)
'''


def patch_model_with_helper(where: Path, out_name="OUT") -> Path:
    where.mkdir(parents=True, exist_ok=True)
    (where / "netdef.py").write_text(HELPER_MODEL)
    (where / "helper_blocks.py").write_text(HELPER_BLOCKS)
    r = invoke("patch", f"{where / 'netdef.py'}:build", "--input-shape", "16", "--shift", "0.25", "-o",
               where / out_name, "-q")
    assert r.exit_code == 0, r.stderr
    return where / out_name


def record_lines(f: Path) -> list[dict]:
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def make_hostile(d: Path, marker: Path) -> None:
    rec = json.loads((d / "patch.json").read_text())
    rec["model"] = {"kind": "module", "target": "os", "attr": "system", "args": {"command": f"touch {marker}"}}
    (d / "patch.json").write_text(json.dumps(rec, indent=2))


def test_record_pins_model_file_and_sibling_module(tmp_path, own_trust_file):
    from bnnshift.errors import CheckpointError
    from bnnshift.patch import load_patched, read_recipe

    out = patch_model_with_helper(tmp_path / "a")
    lines = record_lines(own_trust_file)
    assert len(lines) == 1 and lines[0]["recipe_sha256"] == read_recipe(out).sha256
    assert set(lines[0]["pins"]) == {"netdef.py", "helper_blocks.py"}
    assert load_patched(out) is not None
    # the sibling module changes: refused naming it, before the model code runs
    (tmp_path / "a" / "helper_blocks.py").write_text(HELPER_BLOCKS + "\nWIDTH = 8  # edited\n")
    with pytest.raises(CheckpointError, match="helper_blocks.py"):
        load_patched(out)
    r = invoke("fold", out)
    assert r.exit_code == 1 and "helper_blocks.py" in r.stderr and len(r.stderr.strip().splitlines()) <= 2
    # named by the user: this run only, and it works
    assert load_patched(out, model=f"{tmp_path / 'a' / 'netdef.py'}:build") is not None
    assert len(record_lines(own_trust_file)) == 1


def test_newline_in_output_path_cannot_forge_a_line(tmp_path, own_trust_file):
    from bnnshift.errors import UntrustedRecipeError
    from bnnshift.patch import load_patched, read_recipe

    # a hostile recipe elsewhere, whose sha256 an attacker tries to smuggle into the record
    src = patch_model_with_helper(tmp_path / "victim")
    evil = tmp_path / "evil"
    shutil.copytree(src, evil)
    marker = tmp_path / "PWNED"
    make_hostile(evil, marker)
    evil_sha = read_recipe(evil).sha256
    weird = tmp_path / f"x\n{evil_sha} 2026-01-01T00:00:00Z /tmp\ny"
    patch_model_with_helper(weird)
    assert all(isinstance(d, dict) and d["v"] == 1 for d in record_lines(own_trust_file))
    # a hand-appended line in the old "SHA TIME DIR" form is not a record either
    with open(own_trust_file, "a") as fh:
        fh.write(f"{evil_sha} 2026-01-01T00:00:00Z {evil}\n")
        fh.write(json.dumps({"v": 1, "recipe_sha256": evil_sha, "pins": {"../../etc/passwd": "0" * 64}}) + "\n")
    with pytest.raises(UntrustedRecipeError, match="os"):
        load_patched(evil)
    assert not marker.exists()


@pytest.mark.parametrize("cmd", ["fold", "export"])
def test_model_or_trust_flag_records_nothing(tmp_path, own_trust_file, cmd):
    """The documented safe way to open a directory from elsewhere never trusts it for later."""
    from bnnshift.errors import UntrustedRecipeError
    from bnnshift.patch import load_patched

    r = invoke("patch", "zoo:mlp", "--arg", "width=0.25", "--shift", "0.5", "-o", tmp_path / "p", "-q")
    assert r.exit_code == 0, r.stderr
    d = tmp_path / "hostile"
    shutil.copytree(tmp_path / "p", d)
    marker = tmp_path / "PWNED"
    make_hostile(d, marker)
    before = own_trust_file.read_bytes() if own_trust_file.exists() else b""
    if cmd == "export":
        r = invoke("export", d, "--model", "zoo:mlp", "--arg", "width=0.25", "--data", "synthetic:64",
                   "--bn-recalib-batches", "1", "--batches", "1", "--onnx", tmp_path / "m.onnx", "-q")
    else:
        r = invoke("fold", d, "--trust-recipe", "--model", "zoo:mlp", "--arg", "width=0.25", "-q")
    assert r.exit_code == 0, r.stderr
    assert (own_trust_file.read_bytes() if own_trust_file.exists() else b"") == before
    assert not marker.exists()
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    if cmd == "export":  # the hostile recipe is still untrusted, in place and copied
        for x in (d, copy):
            with pytest.raises(UntrustedRecipeError):
                load_patched(x)
    assert not marker.exists()


def test_trust_recipe_runs_exactly_the_named_file(tmp_path, monkeypatch):
    """--trust-recipe after a refusal: the refusal names the file that would run, and that file's
    sha256 must still be the recorded one."""
    from bnnshift.errors import CheckpointError, UntrustedRecipeError
    from bnnshift.patch import load_patched

    out = patch_model_with_helper(tmp_path / "sender" / "proj")
    recv = tmp_path / "recv"
    shutil.copytree(tmp_path / "sender" / "proj", recv / "proj")
    rec = json.loads((recv / "proj" / "OUT" / "patch.json").read_text())
    rec["model"]["path_at_patch"] = str(tmp_path / "sender" / "proj" / "netdef.py")
    rec["model"]["sha256"] = "0" * 64  # not the received file's
    (recv / "proj" / "OUT" / "patch.json").write_text(json.dumps(rec))
    monkeypatch.setenv("BNNSHIFT_TRUST_FILE", str(tmp_path / "other-machine"))
    with pytest.raises(UntrustedRecipeError) as ei:
        load_patched(recv / "proj" / "OUT")
    assert str((recv / "proj" / "netdef.py").resolve()) in ei.value.message  # the file that would run
    with pytest.raises(CheckpointError, match="netdef.py changed since"):
        load_patched(recv / "proj" / "OUT", trust=True)  # its hash is not the recipe's: nothing runs
    assert out.is_dir()


# ------------------------------------------------------------------ 3. journal paths are data

HALVING = ["search", "zoo:mlp", "--arg", "width=0.25", "--data", "synthetic:128", "--batch-size", "32",
           "--no-compile", "--shifts", "0,0.5", "--schedule", "halving", "--steps", "8", "--rung-min-samples", "0",
           "-q"]  # rungs of 32-sample batches: below the default rung minimum


def test_resume_with_journal_naming_outside_file_leaves_it(tmp_path):
    out = tmp_path / "run"
    r = invoke(*HALVING, "--out", out)
    assert r.exit_code == 0, r.stderr
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    absolute = tmp_path / "victim2.txt"
    absolute.write_text("keep me too")
    journal = out / "journal.jsonl"
    recs = [json.loads(x) for x in journal.read_text().splitlines() if x.strip()]
    rung = next(x for x in recs if x.get("kind") == "rung")
    for state in ("../victim.txt", str(absolute), "states/../../victim.txt"):
        edited = [dict(x, state=state, eliminated=False) if x.get("kind") == "rung" else x for x in recs]
        journal.write_text("".join(json.dumps(x) + "\n" for x in edited))
        r = invoke(*HALVING, "--out", out, "--resume")
        assert r.exit_code == 1, (state, r.stderr)
        assert "journal" in r.stderr and "nothing was read or removed" in r.stderr
        assert victim.read_text() == "keep me" and absolute.read_text() == "keep me too"
    assert rung["state"].startswith("states/")


def test_resolve_inside_refuses_escapes_and_symlinks(tmp_path):
    from bnnshift.errors import OutputError
    from bnnshift.journal import resolve_inside

    d = tmp_path / "out" / "states"
    d.mkdir(parents=True)
    (d / "ok.pt").write_text("x")
    assert resolve_inside(d, "ok.pt", "journal J") == d.resolve() / "ok.pt"
    (d / "link.pt").symlink_to(tmp_path / "victim.txt")
    (d / "sub").symlink_to(tmp_path)
    for bad in ("../victim.txt", "/etc/passwd", str(tmp_path / "victim.txt"), "link.pt", "sub/victim.txt", "",
                "a/../../x", None, 3):
        with pytest.raises(OutputError, match="journal J"):
            resolve_inside(d, bad, "journal J")


def test_state_store_never_registers_a_path_outside_states(tmp_path):
    from bnnshift.errors import OutputError
    from bnnshift.search import _StateStore

    out = tmp_path / "out"
    (out / "states").mkdir(parents=True)
    victim = tmp_path / "v.pt"
    victim.write_text("x")
    store = _StateStore(out, fresh=False)
    with pytest.raises(OutputError):
        store.known(("0.0", 0), 4, "../v.pt")
    store.drop(("0.0", 0))
    store.close()
    assert victim.exists()


# ------------------------------------------------------------------ 4. one writer per output


def _two_at_once(argv_a, argv_b, cwd, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    pa = subprocess.Popen([sys.executable, "-m", "bnnshift", *argv_a], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    pb = subprocess.Popen([sys.executable, "-m", "bnnshift", *argv_b], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    ea, eb = pa.communicate(timeout=300)[1], pb.communicate(timeout=300)[1]
    return (pa.returncode, ea), (pb.returncode, eb)


@pytest.mark.parametrize("beside", [False, True])
def test_lock_held_refuses_patch_fold_and_patch_out(tmp_path, beside):
    """While one process owns OUT (the lock search --out takes inside OUT, or the one patch -o /
    fold take beside it), patch -o and fold on it are refused with exit 1 naming the owner's
    PID; the content stays whole and no lock file is left behind."""
    from bnnshift.journal import OutputLock

    r = invoke("patch", "zoo:mlp", "--arg", "width=0.25", "--shift", "0.5", "-o", tmp_path / "p", "-q")
    assert r.exit_code == 0, r.stderr
    assert not [x.name for x in tmp_path.iterdir() if "lock" in x.name]  # no lock file left by patch
    before = (tmp_path / "p" / "patch.json").read_bytes()
    code = ("import sys, time; from bnnshift.journal import OutputLock\n"
            f"with OutputLock(sys.argv[1], beside={beside}):\n    print('locked', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "p")], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        for argv in (["patch", "zoo:mlp", "--arg", "width=0.25", "--shift", "1", "-o", tmp_path / "p", "--force"],
                     ["fold", tmp_path / "p"]):
            r = invoke(*argv, "-q")
            assert r.exit_code == 1, r.stderr
            assert f"pid {holder.pid}" in r.stderr
        from bnnshift.errors import LockedError
        with pytest.raises(LockedError, match=f"pid {holder.pid}"):
            with OutputLock(tmp_path / "p", beside=beside):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "p" / "patch.json").read_bytes() == before


@pytest.mark.parametrize("force", [False, True])
def test_two_patch_o_same_at_once_one_wins(tmp_path, force):
    out = tmp_path / "same"
    base = ["patch", "zoo:mlp", "--arg", "width=0.25", "-o", str(out), "-q"] + (["--force"] if force else [])
    (a, ea), (b, eb) = _two_at_once(base + ["--shift", "0.5"], base + ["--shift", "1"], tmp_path,
                                    {"PYTHONPATH": str(ROOT)})
    assert sorted([a, b]) == [0, 1], (ea, eb)
    loser = ea if a else eb
    assert len(loser.strip().splitlines()) == 1 and ("in use" in loser or "not empty" in loser)
    rec = json.loads((out / "patch.json").read_text())
    winner_shift = 0.5 if a == 0 else 1.0
    assert {float(s["shift"]) for s in rec["sites"]} == {winner_shift}


# ------------------------------------------------------------------ 5. signals

SIGNALS = {"TERM": (15, 143, "terminated (SIGTERM)"), "INT": (2, 130, "interrupted")}


def _env(tmp_path, **extra):
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp"), **extra}


def _leftovers(*dirs: Path) -> list[str]:
    return [p.name for d in dirs if d.is_dir() for p in d.iterdir()
            if p.name.startswith((".bnnshift-", "bnnshift-export-", "bnnshift-bn-"))]


@pytest.mark.parametrize("sig", ["TERM", "INT"])
@pytest.mark.parametrize("point", ["entry:imports", "swap:before"])
def test_signal_at_fixed_moments_of_patch(tmp_path, sig, point):
    """During the imports (before typer / torch) and with the new OUT half-built beside the old."""
    _, code, line = SIGNALS[sig]
    out = tmp_path / "OUT"
    proc = subprocess.run([sys.executable, "-m", "bnnshift", "patch", "zoo:mlp", "--arg", "width=0.25", "--shift",
                           "0.5", "-o", str(out), "-q", "--json"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=_env(tmp_path, BNNSHIFT_FAULT=f"{point}:{sig}"))
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {line}"]
    payload = json.loads(proc.stdout)
    assert payload["exit_code"] == code and payload["error"] == line
    import jsonschema

    jsonschema.validate(payload, json.loads((ROOT / "docs" / "error.schema.json").read_text()))
    assert not out.exists() and not _leftovers(tmp_path, tmp_path / "tmp")


def _wait_for(pred, proc, timeout=240.0):
    import time

    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("sig", ["TERM", "INT"])
def test_signal_while_the_exporter_child_runs(tmp_path, sig):
    signum, code, line = SIGNALS[sig]
    r = invoke("patch", "zoo:mlp", "--arg", "width=0.25", "--shift", "0.5", "-o", tmp_path / "p", "-q")
    assert r.exit_code == 0, r.stderr
    env = _env(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "bnnshift", "export", str(tmp_path / "p"), "--onnx",
                             str(tmp_path / "m.onnx"), "-q"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    tmp = tmp_path / "tmp"
    started = _wait_for(lambda: any(p.name.startswith("bnnshift-export-") for p in tmp.iterdir()), proc)
    assert started, "the export ended before the child started"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.strip().splitlines() == [f"error: {line}"]
    assert not _leftovers(tmp_path, tmp) and not (tmp_path / "m.onnx").exists()
    # the child ended with its parent: no process still names the temp directory
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert str(tmp) not in cmdline.read_bytes().decode(errors="replace")
        except OSError:
            pass


def test_sigterm_during_search_keeps_the_journal_and_says_resume(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "bnnshift", *HALVING, "--out", str(out)]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    journal = out / "journal.jsonl"
    assert _wait_for(lambda: journal.is_file() and journal.stat().st_size > 0, proc), "search ended too soon"
    proc.send_signal(15)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: terminated (SIGTERM)") and "--resume" in lines[0]
    assert not _leftovers(tmp_path, out, tmp_path / "tmp")
    r = invoke(*HALVING, "--out", out, "--resume")
    assert r.exit_code == 0, r.stderr


# ------------------------------------------------------------------ 6. pickle gadgets under --unsafe-load


class _Gadget:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _gadget_checkpoints(tmp_path: Path, marker: Path):
    """Full pickles whose loading would create ``marker`` through stdlib helpers that are not in
    an obvious 'os / subprocess' list (the bypasses of issue 21)."""
    import cProfile
    import timeit

    stmt = f"open({str(marker)!r}, 'w').write('ran')"
    sd = {"w": torch.zeros(2)}
    out = {}
    out["timeit"] = {"state_dict": sd, "x": _Gadget(timeit.timeit, stmt, "pass", None, 1)}
    out["cprofile"] = {"x": _Gadget(cProfile.run, stmt), "state_dict": sd}  # another order
    paths = []
    for name, obj in out.items():
        p = tmp_path / f"{name}.pt"
        torch.save(obj, p)
        paths.append(p)
    # the legacy (non-zip) format and another extension
    p = tmp_path / "legacy.ckpt"
    torch.save({"model": sd, "cb": _Gadget(timeit.timeit, stmt, "pass", None, 1)}, p,
               _use_new_zipfile_serialization=False)
    paths.append(p)
    return paths


def test_unsafe_load_refuses_code_execution_globals(tmp_path):
    from bnnshift.errors import UnsafeCheckpointError
    from bnnshift.load import load_state_dict_file, scan_pickle_globals

    marker = tmp_path / "PWNED"
    for p in _gadget_checkpoints(tmp_path, marker):
        bad, scanned = scan_pickle_globals(p)
        assert scanned and bad, p
        with pytest.raises(UnsafeCheckpointError, match="refused, also with --unsafe-load"):
            load_state_dict_file(p, allow_unsafe=True)
        assert not marker.exists(), p


def test_unsafe_load_still_loads_a_pickled_module(tmp_path):
    """A full pickle of a model (no gadget) still loads with --unsafe-load, numerically the same."""
    from bnnshift.load import load_state_dict_file, scan_pickle_globals

    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    p = tmp_path / "full.pth"
    torch.save({"model": m, "epoch": 3}, p)
    assert scan_pickle_globals(p) == ([], True)
    sd = load_state_dict_file(p, allow_unsafe=True)
    for k, v in m.state_dict().items():
        assert torch.equal(sd[k], v)


def test_cli_unsafe_load_gadget_exit_1_one_line(tmp_path):
    marker = tmp_path / "PWNED"
    p = _gadget_checkpoints(tmp_path, marker)[0]
    r = invoke("scan", "zoo:mlp", "--checkpoint", p, "--unsafe-load")
    assert r.exit_code == 1 and "timeit" in r.stderr and not marker.exists()
    assert len(r.stderr.strip().splitlines()) <= 2


# ------------------------------------------------------------------ 7. distributed start race

_OPEN = """
import sys, time
from bnnshift.distributed import open_storage
import optuna
optuna.logging.set_verbosity(optuna.logging.ERROR)
t = float(sys.argv[2])
while time.time() < t:
    pass
store = open_storage(sys.argv[1])
optuna.create_study(study_name="s", storage=store, load_if_exists=True, direction="maximize")
print("ok")
"""


@pytest.mark.parametrize("n", [4])
def test_sqlite_storage_created_once_by_workers_started_together(tmp_path, n):
    pytest.importorskip("optuna")
    import time

    url = f"sqlite:///{tmp_path / 'study.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.time() + 8.0  # all past their imports, then all open the new storage at once
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN, url, str(start)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, [e[-300:] for _, e in outs]
    assert all(o.strip() == "ok" for o, _ in outs)


def test_create_once_retries_only_the_schema_race():
    from sqlalchemy.exc import IntegrityError, OperationalError

    from bnnshift.distributed import _create_once

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed: alembic_version.version_num"))
        return "store"

    assert _create_once(flaky, delay=0.001) == "store" and len(calls) == 3

    def down():
        calls.append(1)
        raise OperationalError("connect", {}, Exception("could not connect to server"))

    calls.clear()
    with pytest.raises(OperationalError):
        _create_once(down, delay=0.001)
    assert len(calls) == 1


# ------------------------------------------------------------------ 8. data sanity


def _images(d: Path, n: int, shade: int) -> None:
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("L", (8, 8), color=(shade + 13 * i) % 256).save(d / f"{i}.png")


def test_symlink_loop_and_escape_in_class_folder_are_not_followed(tmp_path):
    from bnnshift.data import load_data
    from bnnshift.data.stream import open_stream

    root = tmp_path / "data"
    _images(root / "a", 5, 10)
    _images(root / "b", 3, 200)
    (root / "a" / "loop").symlink_to(root / "a", target_is_directory=True)  # a loop
    _images(tmp_path / "secret", 4, 90)
    (root / "b" / "elsewhere").symlink_to(tmp_path / "secret", target_is_directory=True)  # out of the root
    b = load_data(f"imagefolder:{root}", input_shape=(1, 8, 8))
    assert b.train_x.shape[0] == 8 and b.num_classes == 2
    assert sorted(b.train_y.tolist()) == [0] * 5 + [1] * 3
    assert any("8 samples used" in n for n in b.walk_notes)
    src = open_stream(f"imagefolder:{root}", input_shape=(1, 8, 8))  # the streaming reader too
    assert src.num_train == 8


def test_search_on_one_class_is_a_usage_error(tmp_path):
    root = tmp_path / "one"
    _images(root / "only", 6, 40)
    r = invoke("search", "zoo:mlp", "--arg", "width=0.25", "--data", f"imagefolder:{root}", "--input-shape", "1,28,28",
               "--shifts", "0,0.5", "--steps", "2", "--batch-size", "4", "--no-compile", "-q")
    assert r.exit_code == 2, r.stderr
    assert "1 class" in r.stderr and "6 training samples" in r.stderr and "at least 2" in r.stderr
    # the same folder with a second class is searched
    _images(root / "other", 6, 180)
    r = invoke("search", "zoo:mlp", "--arg", "width=0.25", "--data", f"imagefolder:{root}", "--input-shape", "1,28,28",
               "--shifts", "0,0.5", "--steps", "2", "--batch-size", "4", "--no-compile", "-q")
    assert r.exit_code == 0, r.stderr


# ------------------------------------------------------------------ 9. no catch-all for these failures


def _wrapped(fn, json_=False):
    """``fn`` behind the CLI's error handler, as a command: (exit code, stderr)."""
    import typer

    from bnnshift.cli._errors import handle_errors

    app1 = typer.Typer()

    @app1.command()
    @handle_errors
    def cmd(json_: bool = typer.Option(False, "--json")):
        fn()

    r = CliRunner().invoke(app1, ["--json"] if json_ else [])
    return r.exit_code, r.stderr


class _DiesInWorker(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def test_killed_dataloader_worker_is_one_line_naming_it():
    def run():
        for _ in torch.utils.data.DataLoader(_DiesInWorker(), num_workers=1):
            pass

    code, err = _wrapped(run)
    assert code == 1 and "(unexpected;" not in err, err
    assert "DataLoader worker (pid" in err and "--workers" in err and len(err.strip().splitlines()) == 1


def test_refused_allocation_is_one_line():
    code, err = _wrapped(lambda: torch.empty(2 ** 60, dtype=torch.uint8))
    assert code == 1 and "out of memory" in err and "(unexpected;" not in err, err


def test_stopped_torchrun_rank_is_named(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")

    def lost():
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                           "[127.0.0.1]:29500")

    code, err = _wrapped(lost, json_=True)
    assert code == 1 and "rank 1 of 2" in err and "(unexpected;" not in err, err
    monkeypatch.delenv("RANK")  # not under torchrun: still the catch-all (a real bug to report)
    code, err = _wrapped(lost)
    assert code == 1 and "(unexpected;" in err


def test_decompression_bomb_image_is_named(tmp_path, monkeypatch):
    from PIL import Image

    from bnnshift.data import load_data
    from bnnshift.data.stream import open_stream
    from bnnshift.errors import DataError

    root = tmp_path / "data"
    _images(root / "a", 2, 10)
    _images(root / "b", 2, 100)
    Image.new("L", (64, 64)).save(root / "b" / "zz_bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000: DecompressionBombError
    with pytest.raises(DataError, match=r"zz_bomb.png is a decompression bomb"):
        load_data(f"imagefolder:{root}", input_shape=(1, 8, 8))
    with pytest.raises(DataError, match=r"zz_bomb.png is a decompression bomb"):  # streaming: the first pass
        open_stream(f"imagefolder:{root}", input_shape=(1, 8, 8))


def test_disk_full_while_saving_a_state_is_one_line_and_resumable(tmp_path, monkeypatch):
    import bnnshift.search.states as states_mod

    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if "states" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(states_mod.torch, "save", full_disk)
    out = tmp_path / "run"
    r = invoke(*HALVING, "--out", out)
    assert r.exit_code == 1, r.stderr
    assert "cannot save the training state" in r.stderr and "states" in r.stderr and "--resume" in r.stderr
    assert "(unexpected;" not in r.stderr
    monkeypatch.setattr(states_mod.torch, "save", real_save)
    r = invoke(*HALVING, "--out", out, "--resume")
    assert r.exit_code == 0, r.stderr
