"""``bnnshift search`` end to end: JSON, report files, shared init/batches, resume after
SIGKILL, bad inputs (one-line errors, exit codes, nothing half-written)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from bnnshift.cli import app

BASE = ["search", "zoo:mlp", "--arg", "width=0.25", "--data", "fashion-mnist", "--train-limit", "1024",
        "--batch-size", "128", "--no-compile"]


def _run(args, **kw):
    return CliRunner().invoke(app, args, catch_exceptions=False, **kw)


def _stderr(res) -> str:
    try:
        return res.stderr
    except ValueError:
        return res.output


def _no_partial_files(d: Path) -> None:
    if d.exists():
        assert not [p.name for p in d.iterdir() if p.name.endswith(".tmp")]
        assert not (d / "search.json").exists()


def test_three_candidate_search_end_to_end(tmp_path):
    out = tmp_path / "run"
    res = _run(BASE + ["--shifts", "0,0.5,1", "--steps", "6", "--out", str(out), "--json"])
    assert res.exit_code == 0, _stderr(res)
    data = json.loads(res.stdout)
    cands = data["candidates"]
    assert [c["shift"] for c in cands] == [0.0, 0.5, 1.0]
    assert all(c["status"] == "ok" and 0.0 <= c["score"] <= 1.0 for c in cands)
    best = max(s["mean"] for s in data["stats"])
    assert best == max(c["score"] for c in cands)
    assert next(s for s in data["stats"] if s["shift"] == data["winner"])["mean"] == best
    assert len({c["init_hash"] for c in cands}) == 1 and cands[0]["init_hash"]
    assert len({c["batch_order_hash"] for c in cands}) == 1 and cands[0]["batch_order_hash"]
    assert data["shared_init"] is True and data["shared_batches"] is True
    assert all(set(c["plus_fraction"]) == set(data["sites"]) for c in cands)
    for name in ("search.json", "search.md", "search.png", "journal.jsonl"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "search.json").read_text())["winner"] == data["winner"]
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "search.md").read_text()
    assert "verdict" in md and "| 0.5 |" in md
    # a repeated candidate with the same t gives the same score (fresh output dir)
    res2 = _run(BASE + ["--shifts", "0.5", "--steps", "6", "--out", str(tmp_path / "again"), "--json"])
    assert res2.exit_code == 0, _stderr(res2)
    again = json.loads(res2.stdout)["candidates"][0]
    assert again["score"] == cands[1]["score"] and again["first_losses"] == cands[1]["first_losses"]
    assert again["init_hash"] == cands[1]["init_hash"]


def test_human_output_and_patch_out(tmp_path):
    res = _run(BASE + ["--shifts", "0,1", "--steps", "3", "--out", str(tmp_path / "r"),
                       "--patch-out", str(tmp_path / "p")])
    assert res.exit_code == 0, _stderr(res)
    assert "search: train_acc after 3 steps" in res.stdout and "verdict:" in res.stdout
    p = tmp_path / "p"
    files = {f.name for f in p.iterdir()}
    assert files and not any(f.endswith(".tmp") for f in files)
    assert json.loads((tmp_path / "r" / "search.json").read_text())["patch_out"] == str(p)


def test_kill_after_first_candidate_then_resume(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bnnshift", *BASE, "--shifts", "0,0.5,1,1.5", "--steps", "30",
           "--out", str(out), "--json"]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    journal = out / "journal.jsonl"
    deadline = time.time() + 180
    try:
        while time.time() < deadline:
            if journal.exists() and journal.read_text().count("\n") >= 1:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the search ended before it could be killed"
    before = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    assert 1 <= len(before) < 4
    assert not (out / "search.json").exists()
    res = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["resumed"] == len(before)
    assert [c["shift"] for c in data["candidates"]] == [0.0, 0.5, 1.0, 1.5]
    assert all(c["status"] == "ok" for c in data["candidates"])
    lines = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    keys = [(r["shift"], r["seed"]) for r in lines]
    assert len(keys) == len(set(keys)) == 4, "a finished candidate was recomputed"
    for rec in before:  # the journaled results are the ones reported
        got = next(c for c in data["candidates"] if c["shift"] == rec["shift"])
        assert got["score"] == rec["result"]["score"]
    # a changed config does not reuse stale results
    res = _run(BASE + ["--shifts", "0", "--steps", "31", "--out", str(out), "--resume", "--json"])
    assert res.exit_code == 0, _stderr(res)
    assert json.loads(res.stdout)["resumed"] == 0


def test_unknown_data_spec(tmp_path):
    out = tmp_path / "o"
    res = _run(["search", "zoo:mlp", "--data", "nosuchdata", "--shifts", "0,1", "--steps", "2", "--out", str(out)])
    assert res.exit_code == 2
    err = _stderr(res).strip()
    assert err.count("\n") == 0 and "unknown data spec" in err
    _no_partial_files(out)


def test_missing_data_root(tmp_path):
    out = tmp_path / "o"
    res = _run(BASE[:4] + ["--data", f"fashion-mnist:{tmp_path}/missing", "--shifts", "0,1", "--steps", "2",
                           "--out", str(out)])
    assert res.exit_code == 1
    err = _stderr(res).strip()
    assert err.count("\n") == 0 and "not found" in err
    _no_partial_files(out)


def test_bad_grids_exit_2(tmp_path):
    for bad in ("2:1:0.5", "0:1:0", "zero", ""):
        res = _run(BASE + ["--shifts", bad, "--steps", "2", "--out", str(tmp_path / "o")])
        assert res.exit_code == 2, (bad, _stderr(res))
        assert _stderr(res).strip().count("\n") == 0
    _no_partial_files(tmp_path / "o")
    res = _run(BASE + ["--shifts", "-1:1:0.5", "--steps", "1", "--json"])  # negative start parses
    assert res.exit_code == 0, _stderr(res)
    assert [c["shift"] for c in json.loads(res.stdout)["candidates"]] == [-1.0, -0.5, 0.0, 0.5, 1.0]


def test_input_shape_mismatch(tmp_path):
    out = tmp_path / "o"
    res = _run(BASE + ["--input-shape", "3,32,32", "--shifts", "0,1", "--steps", "2", "--out", str(out)])
    assert res.exit_code == 2  # a bad --input-shape is a usage error (README exit codes)
    err = _stderr(res).strip()
    assert err.count("\n") == 0 and "bad --input-shape 3,32,32" in err and "runs on 1,28,28" in err
    _no_partial_files(out)
    # H, W that the data can be resized to but the model cannot take
    res = _run(BASE + ["--input-shape", "1,32,32", "--shifts", "0,1", "--steps", "2", "--out", str(out)])
    assert res.exit_code == 2
    err = _stderr(res).strip()
    assert "bad --input-shape 1,32,32" in err and "runs on 1,28,28" in err and err.count("\n") == 0
    _no_partial_files(out)


NAN_MODEL = '''
import torch
from bnnshift_zoo.models_paper import BinaryMLP


class NanMLP(BinaryMLP):
    def forward(self, x):
        out = super().forward(x)
        return out * float("nan") if self.training else out


def build():
    return NanMLP(width=0.25)
'''

HUGE_LR = '''
import torch


def setup(model, config):
    return torch.optim.SGD(model.parameters(), lr=1e30)
'''


def test_nan_in_first_step_is_a_recorded_failure(tmp_path):
    (tmp_path / "nanmodel.py").write_text(NAN_MODEL)
    out = tmp_path / "o"
    res = _run(["search", f"{tmp_path}/nanmodel.py:build", "--input-shape", "1,28,28", "--data", "fashion-mnist",
                "--train-limit", "512", "--batch-size", "128", "--no-compile", "--shifts", "0,1", "--steps", "3",
                "--out", str(out)])
    assert res.exit_code == 1
    errors = [ln for ln in _stderr(res).splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "all 2 candidates failed" in errors[0]
    assert "failed" in _stderr(res).splitlines()[0]  # each failure is reported as it happens
    data = json.loads((out / "search.json").read_text())
    assert [c["status"] for c in data["candidates"]] == ["failed", "failed"]
    assert all(c["failed_step"] == 1 for c in data["candidates"])
    assert data["winner"] is None and "failed" in (out / "search.md").read_text()


def test_huge_lr_train_config_fails_candidates_search_goes_on(tmp_path):
    (tmp_path / "hugelr.py").write_text(HUGE_LR)
    res = _run(BASE + ["--train-config", f"{tmp_path}/hugelr.py:setup", "--shifts", "0,1", "--steps", "8",
                       "--out", str(tmp_path / "o"), "--json"])
    data = json.loads((tmp_path / "o" / "search.json").read_text())
    statuses = [c["status"] for c in data["candidates"]]
    assert len(statuses) == 2  # both candidates ran although the first diverged
    failed = [c for c in data["candidates"] if c["status"] == "failed"]
    assert failed and all(c["failed_step"] >= 2 for c in failed)  # step 1 is finite, the update blows up
    assert res.exit_code == (1 if len(failed) == 2 else 0)


def test_distributed_missing_module_is_one_line(tmp_path, monkeypatch):
    import bnnshift

    monkeypatch.setitem(sys.modules, "bnnshift.distributed", None)  # as if not installed
    monkeypatch.delattr(bnnshift, "distributed", raising=False)
    res = _run(BASE + ["--shifts", "0", "--steps", "1", "--storage", "postgresql://x/y", "--study", "s"])
    assert res.exit_code == 1
    errors = [ln for ln in _stderr(res).splitlines() if ln.strip()]
    assert len(errors) == 1 and "pip install bnnshift[distributed]" in errors[0]
    res = _run(BASE + ["--shifts", "0", "--steps", "1", "--storage", "postgresql://x/y"])
    assert res.exit_code == 2


def test_patch_out_says_when_its_shift_is_not_resolved(tmp_path):
    """--patch-out writes the best mean; when that shift is not ahead of t = 0 beyond the noise
    (here: t = 0 not in the grid) the search says so in its warnings and search.json."""
    res = _run(BASE + ["--shifts", "0.5,1", "--steps", "2", "--out", str(tmp_path / "r"),
                       "--patch-out", str(tmp_path / "p"), "--json"])
    assert res.exit_code == 0, _stderr(res)
    data = json.loads(res.stdout)
    assert data["winner"] in (0.5, 1.0)
    assert any("--patch-out wrote t = " in w and "not in the grid" in w for w in data["warnings"])
    saved = json.loads((tmp_path / "r" / "search.json").read_text())
    assert saved["warnings"] == data["warnings"]


def test_patch_out_warning_rule():
    from dataclasses import replace

    from bnnshift.search.loop import patch_out_warning
    from bnnshift.search.results import SearchSummary

    base = SearchSummary(config={}, config_hash="h", metric="train_acc", sites=[], seeds=[0, 1, 2], shifts=[0, 0.5],
                         candidates=[], stats=[], winner=0.5, baseline=0.8, noise_note="", ahead_of_baseline=False,
                         seconds=1.0)
    assert "not ahead of t = 0 beyond the seed noise" in patch_out_warning(base)
    assert patch_out_warning(replace(base, ahead_of_baseline=True)) is None      # resolved: no warning
    assert patch_out_warning(replace(base, winner=0.0)) is None                   # the model as it is
    assert "not in the grid" in patch_out_warning(replace(base, baseline=None, ahead_of_baseline=None))
