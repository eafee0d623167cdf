"""Successive halving over shifts (``--schedule halving``): paired candidates, survivors' scores
equal the full search's, rung records, resume after SIGKILL mid-schedule, cost in search.json."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from bnnshift.cli import app
from bnnshift.errors import UsageError
from bnnshift.journal import Journal
from bnnshift.search import SearchConfig, rung_steps, search, survivors

# rung_min_samples=0: these tests check the halving mechanics at tiny budgets, every planned rung ranking
# (the sample minimum and the chance check: tests/test_search_rungs.py)
MLP = dict(model="zoo:mlp", data="fashion-mnist", model_args={"width": 0.25}, train_limit=1024, batch_size=128,
           rung_min_samples=0)
SHIFTS = [0.0, 0.5, 1.0, 1.5]


def test_rung_plan():
    assert rung_steps(234, 2, 0.125) == [29, 58, 117, 234]
    assert rung_steps(16, 2, 0.125) == [2, 4, 8, 16]
    assert rung_steps(100, 3, 0.1) == [10, 30, 90, 100]
    assert rung_steps(4, 2, 0.1) == [1, 2, 3, 4]  # 0.1 and 0.2 of 4 steps are both 1 step: one rung
    assert rung_steps(50, 2, 1.0) == [50]
    assert [survivors(n, 2) for n in (8, 4, 3, 2, 1)] == [4, 2, 2, 1, 1]
    assert survivors(9, 3) == 3


@pytest.mark.parametrize("bad", [dict(schedule="quick"), dict(schedule="halving", eta=1),
                                 dict(schedule="halving", min_fraction=0),
                                 dict(schedule="halving", min_fraction=1.5),
                                 dict(schedule="halving", val=True, metric="val_acc")])
def test_bad_schedules_are_usage_errors(bad):
    with pytest.raises(UsageError):
        SearchConfig(**MLP, **bad)


def test_halving_k4_is_paired_and_survivors_match_full_float64(tmp_path):
    kw = dict(MLP, steps=16, dtype="float64", compile="off", shifts=SHIFTS)
    full = search(SearchConfig(**kw))
    half = search(SearchConfig(schedule="halving", **kw), out_dir=tmp_path / "h")
    by_full = {c.shift: c for c in full.candidates}
    # paired: every candidate of the seed starts from the same weights and sees the same batches
    assert len({c.init_hash for c in half.candidates}) == 1 and half.shared_init
    assert len({c.batch_order_hash for c in half.candidates}) == 1 and half.shared_batches
    assert {c.init_hash for c in half.candidates} == {c.init_hash for c in full.candidates}
    finished = [c for c in half.candidates if c.steps == 16]
    assert finished and all(c.rung == 3 for c in finished)
    for c in finished:  # paused and continued at every rung, yet bitwise the uninterrupted epoch
        f = by_full[c.shift]
        assert c.score == f.score and c.loss == f.loss and c.first_losses == f.first_losses
        assert c.last_acc == f.last_acc and c.plus_fraction == f.plus_fraction
        assert c.rung_scores[-1] == c.score and len(c.rung_scores) == 4
    assert half.winner == max(finished, key=lambda c: c.score).shift
    # rung 0 trains all four to 2 steps, the best two continue; eliminated ones keep their rung score
    assert [r["steps"] for r in half.rungs] == [2, 4, 8, 16]
    assert len(half.rungs[0]["candidates"]) == 4 and len(half.rungs[0]["kept"]) == 2
    r0 = half.rungs[0]["scores"]
    assert sorted(half.rungs[0]["kept"]) == sorted(sorted(SHIFTS, key=lambda t: -r0[repr(t)])[:2])
    dropped = [c for c in half.candidates if c.rung == 0]
    assert len(dropped) == 2 and all(c.steps == 2 and c.score == c.rung_scores[0] for c in dropped)
    assert all(c.plus_fraction_mean is not None for c in half.candidates)
    data = json.loads((tmp_path / "h" / "search.json").read_text())
    assert data["cost"]["candidate_steps"] == 4 * 2 + 2 * 2 + 1 * 4 + 1 * 8 == 24
    assert data["cost"]["full_grid_candidate_steps"] == 64
    assert data["schedule"]["name"] == "halving" and data["schedule"]["rung_steps"] == [2, 4, 8, 16]
    assert json.loads(json.dumps(full.to_json()))["cost"]["candidate_steps"] == 64
    assert not (tmp_path / "h" / "states").exists()  # paused states are cleaned up at the end
    recs = Journal(tmp_path / "h" / "journal.jsonl")
    assert len(recs.rungs(half.config_hash)) == 4 + 2 + 1  # rung records of rungs 0-2 (the last is 'finished')
    md = (tmp_path / "h" / "search.md").read_text()
    assert "| rung |" in md and "rung 0 (2 steps, 12.5% of the epoch): 4 shifts" in md


BASE = ["search", "zoo:mlp", "--arg", "width=0.5", "--data", "fashion-mnist", "--train-limit", "1024",
        "--batch-size", "64", "--no-compile", "--shifts", "0,0.5,1,1.5", "--schedule", "halving", "--steps", "128",
        "--rung-min-samples", "0", "--json"]


def test_halving_resumes_after_kill_9_mid_rung(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "bnnshift", *BASE, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    journal = out / "journal.jsonl"
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            if journal.exists() and journal.read_text().count("\n") >= 1:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the search ended before it could be killed"
    before = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    assert before and all(r["kind"] == "rung" and r["rung"] == 0 for r in before) and len(before) < 4
    assert all((out / r["state"]).is_file() for r in before)  # paused states are in --out
    assert not (out / "search.json").exists()
    res = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    lines = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    trained = [(r["shift"], r["seed"], r.get("steps"), r.get("eliminated", False)) for r in lines]
    assert len(trained) == len(set(trained)), "a finished rung was recomputed"
    for rec in before:  # the rung-0 scores from before the kill are the ones the schedule used
        assert data["rungs"][0]["scores"][repr(rec["shift"])] == rec["result"]["score"]
    assert data["cost"]["trained_steps_this_run"] == data["cost"]["candidate_steps"] - 16 * len(before)
    # the same schedule without a kill gives the same ranking and the same survivor scores
    # (in a subprocess with the same environment: float32 scores depend on the thread count)
    clean = subprocess.run([sys.executable, "-m", "bnnshift", *BASE], capture_output=True, text=True, env=env,
                           timeout=300)
    assert clean.returncode == 0, clean.stderr
    ref = json.loads(clean.stdout)
    assert ref["winner"] == data["winner"] and ref["rungs"] == data["rungs"]
    assert [c["score"] for c in ref["candidates"]] == [c["score"] for c in data["candidates"]]
    assert not (out / "states").exists()


def test_cli_schedule_usage_errors(tmp_path):
    res = CliRunner().invoke(app, ["search", "zoo:mlp", "--data", "fashion-mnist", "--schedule", "fast"])
    assert res.exit_code == 2
    res = CliRunner().invoke(app, ["search", "zoo:mlp", "--data", "fashion-mnist", "--schedule", "halving",
                                   "--eta", "0.5"])
    assert res.exit_code == 2


# ------------------------------------------------------------------------------ --compile auto


def _tiny_model():
    import torch

    from bnnshift_zoo.models_paper import mlp

    torch.manual_seed(0)
    return mlp(width=0.25)


def test_compile_auto_pays_back_or_stays_eager(tmp_path, monkeypatch):
    import torch

    from bnnshift.train import choose_step_path, record_compile

    monkeypatch.setenv("BNNSHIFT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = SearchConfig(**MLP)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    few = choose_step_path(cfg, _tiny_model, x, y, expected_steps=10, has_conv=False, key="k")
    many = choose_step_path(cfg, _tiny_model, x, y, expected_steps=10 ** 9, has_conv=False, key="k")
    assert few.compile is False and "<= compile 60.0s" in few.reason and "no compile recorded" in few.reason
    assert many.compile is True and few.eager_step_seconds["contiguous"] > 0
    # a recorded compile replaces the priors: a slow compile that saves nothing is never chosen
    record_compile("k", compile_seconds=500.0, compiled_step_seconds=10.0)
    rec = choose_step_path(cfg, _tiny_model, x, y, expected_steps=10 ** 9, has_conv=False, key="k")
    assert rec.compile is False and rec.record["compile_seconds"] == 500.0 and "last compile here 500.0s" in rec.reason
    record_compile("k", compile_seconds=0.5, compiled_step_seconds=0.0)
    assert choose_step_path(cfg, _tiny_model, x, y, expected_steps=10 ** 6, has_conv=False, key="k").compile
    # a conv model measures both memory formats and keeps the faster one
    from bnnshift_zoo.models_paper import lenet5

    conv = choose_step_path(cfg, lambda: lenet5(), x, y, expected_steps=10, has_conv=True, key="c")
    assert set(conv.eager_step_seconds) == {"channels_last", "contiguous"}
    faster = min(conv.eager_step_seconds, key=conv.eager_step_seconds.get)
    assert conv.channels_last == (faster == "channels_last")


def test_search_reports_the_step_path_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("BNNSHIFT_CACHE_DIR", str(tmp_path / "cache"))
    s = search(SearchConfig(steps=6, shifts=[0.0, 0.5], **MLP), out_dir=tmp_path / "few")
    assert s.compiled is False and s.step_path["compile"] is False and "only 12 steps" in s.step_path["reason"]
    s = search(SearchConfig(steps=40, shifts=[0.0, 0.5], **MLP), out_dir=tmp_path / "more")
    assert s.compiled is False and s.step_path["expected_steps"] == 80 and "no compile recorded" in s.step_path["reason"]
    assert json.loads((tmp_path / "more" / "search.json").read_text())["step_path"]["compile"] is False
    assert "--compile auto chose eager" in (tmp_path / "more" / "search.md").read_text()
    from bnnshift.search import expected_steps

    assert expected_steps(SearchConfig(schedule="halving", shifts=[0.0, 0.5, 1.0, 1.5], **MLP), 16) == 24
    assert expected_steps(SearchConfig(shifts=[0.0, 0.5, 1.0, 1.5], seeds=[0, 1], **MLP), 16) == 128


# ------------------------------------------------------------------------------ distributed


def test_distributed_halving_prunes_at_rungs_with_local_scores(tmp_path):
    """--storage with --schedule halving: Optuna's SuccessiveHalvingPruner stops trials at the
    local schedule's rungs; a stopped candidate's rung scores are the local halving's (paired)."""
    pytest.importorskip("optuna")
    from optuna.trial import TrialState

    from bnnshift import distributed
    from bnnshift.search import SearchContext, run_candidate

    cfg = SearchConfig(steps=16, compile="off", shifts=SHIFTS, schedule="halving", **MLP)
    storage = f"journal:{tmp_path / 'study.log'}"
    mine = distributed.run_worker(cfg, storage, "h", tmp_path / "rep")
    assert len(mine) == 4
    st = distributed._load_study(distributed._optuna(), distributed.open_storage(storage), "h")
    states = [t.state for t in st.get_trials(deepcopy=False)]
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states
    summary, _ = distributed.study_summary(storage, "h")
    stopped = [c for c in summary.candidates if c.steps < 16]
    assert stopped and all(c.steps in (2, 4, 8) and c.rung_scores[-1] == c.score for c in stopped)
    finished = [c for c in summary.candidates if c.steps == 16]
    assert summary.winner in [c.shift for c in finished]
    local = SearchConfig(steps=16, compile="off", **MLP)
    ctx = SearchContext.open(local)
    full = {t: run_candidate(local, t, 0, context=ctx) for t in [c.shift for c in finished]}
    assert all(c.score == full[c.shift].score for c in finished)  # paired with the local search
    data = json.loads((tmp_path / "rep" / "search.json").read_text())
    assert data["schedule"]["name"] == "halving" and data["cost"]["candidate_steps"] < 64
    assert data["cost"]["full_grid_candidate_steps"] == 64 and data["rungs"][0]["steps"] == 2
