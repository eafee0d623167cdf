"""``--stop-when-stable``: a successive-halving rung ends early once the shifts it keeps held for
``--stable-fraction`` of its steps and lead the eliminated ones beyond their paired noise; the
report says where and why; a resumed run repeats the decision; halving's report and progress
say which rung and how many steps each score covers."""
from __future__ import annotations

import io
import json
from types import SimpleNamespace

import jsonschema
import pytest
from rich.console import Console

from bnnshift.errors import UsageError
from bnnshift.journal import Journal
from bnnshift.search import SearchConfig, search, stable_decision

# learnable synthetic data, tiny MLP, float64 and eager: deterministic scores
TINY = dict(model="zoo:mlp", data="synthetic:640", model_args={"width": 0.25}, input_shape=(1, 28, 28),
            batch_size=32, steps=40, dtype="float64", compile="off", bn_recalib_batches=2,
            rung_min_samples=0)  # every planned rung ranks (tests/test_search_rungs.py: the minimum)


# ------------------------------------------------------------------------------ the criterion


def _steps(values, n=32):
    return [list(values)], [[n] * len(values)]


def test_clear_lead_stops_after_the_window():
    h, n = {}, {}
    for k, (t, v) in enumerate(((0.0, 28), (0.5, 24), (3.0, 8), (4.0, 6))):
        h[t], n[t] = _steps([v + (i + k) % 3 for i in range(20)])  # batch noise of +-1, out of phase
    assert stable_decision(h, n, keep=2, start=0, at=5, window=5) is None  # the window is not inside the rung yet
    got = stable_decision(h, n, keep=2, start=0, at=6, window=5)
    assert got is not None and got["kept"] == [0.0, 0.5] and got["steps"] == 6 and got["stable_from"] == 1
    assert got["tightest"]["ahead"] == 0.5 and got["tightest"]["behind"] == 3.0  # the adjacent pair at the cut
    assert got["tightest"]["z"] > 2


def test_a_ranking_that_never_changes_but_is_within_noise_does_not_stop():
    # t=0.5 is ahead after every step, by 1 sample in 32 per 2 steps, with +-3 per step of batch noise
    a = [19] + [12 if i % 2 else 18 for i in range(1, 40)]
    h = {0.0: [[15] * 40], 0.5: [a]}
    n = {0.0: [[32] * 40], 0.5: [[32] * 40]}
    assert all(sum(a[:j]) > 15 * j for j in range(1, 41))
    assert stable_decision(h, n, keep=1, start=0, at=40, window=10) is None


def test_a_ranking_that_changes_inside_the_window_does_not_stop():
    h = {0.0: [[20] * 10 + [10] * 10], 0.5: [[14] * 20]}
    n = {t: [[32] * 20] for t in h}
    # t=0 leads until step 16 (cumulative), then t=0.5: the decision changed 4 steps ago
    assert stable_decision(h, n, keep=1, start=0, at=20, window=8) is None


def test_seeds_are_averaged_per_step():
    h = {0.0: [[28] * 12, [26] * 12], 1.0: [[10] * 12, [12] * 12]}
    n = {t: [[32] * 12, [32] * 12] for t in h}
    got = stable_decision(h, n, keep=1, start=4, at=12, window=6)
    assert got["kept"] == [0.0] and got["tightest"]["z"] is None  # no spread at all: an exact lead
    assert abs(got["tightest"]["margin"] - 16 / 32) < 1e-12


# ------------------------------------------------------------------------------ the search


def test_clearly_stable_rungs_stop_early_with_the_same_pick(tmp_path):
    shifts = [0.0, 0.25, 3.0, 4.0]  # 3 and 4 leave almost every pre-activation below t: far behind
    plain = search(SearchConfig(schedule="halving", shifts=shifts, **TINY))
    stable = search(SearchConfig(schedule="halving", shifts=shifts, stop_when_stable=True, **TINY),
                    out_dir=tmp_path / "s")
    r0 = stable.rungs[0]
    assert r0["planned_steps"] == plain.rungs[0]["steps"] == 5 and r0["steps"] < 5, r0
    stop = r0["stopped_early"]
    assert stop["kept"] == r0["kept"] == plain.rungs[0]["kept"] and sorted(r0["kept"]) == [0.0, 0.25]
    assert stop["steps_saved"] == 2 * (5 - r0["steps"])
    assert stable.winner == plain.winner
    by_plain = {c.shift: c for c in plain.candidates}
    for c in stable.candidates:  # the survivors trained in turns, yet bitwise the uninterrupted epoch
        if c.steps == 40:
            assert c.score == by_plain[c.shift].score and c.loss == by_plain[c.shift].loss
    assert stable.cost["candidate_steps"] == plain.cost["candidate_steps"] - stable.cost["steps_saved_by_stable_stop"]
    assert stable.cost["steps_saved_by_stable_stop"] >= stop["steps_saved"] > 0
    data = json.loads((tmp_path / "s" / "search.json").read_text())
    jsonschema.validate(data, json.loads((__import__("pathlib").Path(__file__).parents[1] / "docs"
                                          / "search.schema.json").read_text()))
    assert data["rungs"][0]["stopped_early"]["steps"] == r0["steps"] and data["schedule"]["stop_when_stable"]
    md = (tmp_path / "s" / "search.md").read_text()
    assert f"stopped early at step {r0['steps']} of 5" in md and "candidate steps saved" in md
    recs = [r for r in Journal(tmp_path / "s" / "journal.jsonl").records() if r.get("kind") == "rung" and r["rung"] == 0]
    assert recs and all(r["steps"] == r0["steps"] and r["stop"]["planned_steps"] == 5 for r in recs)


def test_shifts_within_noise_run_the_whole_rung():
    shifts = [0.0, 0.001, 0.002, 0.003]  # the same model four times, up to rounding noise
    s = search(SearchConfig(schedule="halving", shifts=shifts, stop_when_stable=True, **TINY))
    assert [r["steps"] for r in s.rungs] == [r["planned_steps"] for r in s.rungs] == [5, 10, 20, 40]
    assert all(r["stopped_early"] is None for r in s.rungs)
    assert s.cost["steps_saved_by_stable_stop"] == 0


def test_resume_repeats_a_journaled_early_stop(tmp_path):
    """A journal whose rung 0 stopped early at another step (say, decided under other float
    rounding): the resumed run ends rung 0 there too and keeps the shifts the journal named."""
    shifts = [0.0, 0.25, 3.0, 4.0]
    cfg = SearchConfig(schedule="halving", shifts=shifts, stop_when_stable=True, **TINY)
    first = search(cfg, out_dir=tmp_path / "a")
    stop = first.rungs[0]["stopped_early"]
    assert stop is not None and not (tmp_path / "a" / "states").exists()  # paused states are cleaned at the end
    rec = next(r for r in Journal(tmp_path / "a" / "journal.jsonl").records()
               if r.get("kind") == "rung" and r["rung"] == 0 and r["shift"] in first.rungs[0]["kept"])
    other = 4 if stop["steps"] < 4 else 3
    (tmp_path / "b").mkdir()
    journaled = {**stop, "steps": other}
    (tmp_path / "b" / "journal.jsonl").write_text(json.dumps({**rec, "steps": other, "state": None,
                                                              "stop": journaled}) + "\n")
    resumed = search(cfg, out_dir=tmp_path / "b", resume=True)
    assert resumed.rungs[0]["steps"] == other and resumed.rungs[0]["stopped_early"]["steps"] == other
    assert resumed.rungs[0]["kept"] == first.rungs[0]["kept"] == sorted(stop["kept"])
    assert resumed.winner == first.winner
    finished = {c.shift: c.score for c in first.candidates if c.steps == 40}
    assert finished and all(c.score == finished[c.shift] for c in resumed.candidates if c.steps == 40)
    steps = [(r["shift"], r["steps"]) for r in Journal(tmp_path / "b" / "journal.jsonl").records()
             if r.get("kind") == "rung" and r["rung"] == 0]
    assert {st for _, st in steps} == {other}  # every candidate's rung 0 ended at the journaled step


def test_stop_when_stable_needs_halving():
    with pytest.raises(UsageError, match="--schedule halving"):
        SearchConfig(stop_when_stable=True, **TINY)
    with pytest.raises(UsageError, match="--stable-fraction"):
        SearchConfig(schedule="halving", stop_when_stable=True, stable_fraction=1.5, **TINY)


# ------------------------------------------------------------------------------ report and progress


def test_halving_report_ranks_survivors_first_and_says_each_scores_steps(tmp_path):
    from bnnshift.report import render_table

    s = search(SearchConfig(schedule="halving", shifts=[0.0, 0.25, 3.0, 4.0], **TINY), out_dir=tmp_path / "h")
    md = (tmp_path / "h" / "search.md").read_text()
    lines = md.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| # | t | score | after steps | rung"))
    rows = lines[head + 2:head + 6]
    assert not lines[head + 6].startswith("|")
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [c[0] for c in cells] == ["1", "2", "3", "4"]
    assert cells[0][3] == "40/40" and cells[0][4] == "3" and cells[0][-1] == "finished"
    assert "(winner)" in cells[0][1] or "(best)" in cells[0][1]
    # t = 0 is kept at every rung (the verdict's baseline): it finishes next to the winner
    assert cells[1][3] == "40/40" and cells[1][-1] == "finished" and "0" == cells[1][1].split()[0]
    assert {c[3] for c in cells[2:]} == {"5/40"} and {c[-1] for c in cells[2:]} == {"eliminated at rung 0"}
    assert "compare scores within one rung" in md
    # rung 1 ranked 0.25 first and kept t = 0 as the baseline: said in the record and the report
    r1 = s.rungs[1]
    assert r1["kept"] == [0.0, 0.25] and "baseline" in r1["decision"]["baseline"] and "verdict's baseline" in md
    # the verdict compares the winner with t = 0 at the whole epoch, not at an early rung
    from bnnshift.report import verdict

    assert s.winner == 0.25 and "vs t = 0 at rung" not in verdict(s)["text"]
    buf = io.StringIO()
    Console(file=buf, width=200, color_system=None).print(render_table(s))
    text = buf.getvalue()
    assert "after steps" in text and "eliminated at rung 0" in text and "finished shifts first" in text
    lines = [line for line in text.splitlines() if "finished" in line or "eliminated at rung" in line]
    assert "finished" in lines[0] and "finished" in lines[1] and "eliminated at rung 0" in lines[2]


def test_progress_lines_name_the_rung_and_the_steps():
    from bnnshift.cli._output import Output, SearchProgress

    o = Output()
    buf = io.StringIO()
    o.err = Console(file=buf, width=200)
    p = SearchProgress(o, every=0)
    p.enabled, p.plain = False, True
    assert p.status_line().startswith("search: preparing")  # not "0/0 candidates" before the first one
    p.rung(1, 4, 10, 40)
    p.start(0.5, 0, 4, 7)
    assert "[5/7] rung 1 (to step 10 of 40) t=+0.5 seed=0" in p.status_line()
    p.end(SimpleNamespace(shift=0.5, seed=0, ok=True, score=0.5, seconds=1.0, error=None, rung=1, steps=10), 4, 7)
    assert "[5/7] rung 1 t=+0.5 seed=0: 50.00% after 10/40 steps" in buf.getvalue()


def test_the_benchmark_simulates_the_stop_exactly():
    """benchmarks/bench_halving.py's --report simulates --stop-when-stable from a full search's
    per-step counts (docs/search.md's numbers): the same pick and steps as the real search."""
    import importlib.util
    from pathlib import Path

    from bnnshift.search import SearchContext

    spec = importlib.util.spec_from_file_location("bench_halving", Path(__file__).parents[1] / "benchmarks"
                                                  / "bench_halving.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    shifts = [0.0, 0.25, 3.0, 4.0]
    ctx = SearchContext.open(SearchConfig(shifts=shifts, **TINY))  # its trainer records the curves
    trainer = ctx.trainer
    trainer.record_curve = True
    try:
        full = search(SearchConfig(shifts=shifts, **TINY), context=ctx)
    finally:
        trainer.record_curve = False
    curves = {c.shift: c.extra["correct_curve"] for c in full.candidates}
    real = search(SearchConfig(schedule="halving", shifts=shifts, stop_when_stable=True, **TINY))
    pick, steps = bench.simulate_halving(curves, 32, 40, 2.0, 0.125, stable_fraction=0.25)
    assert (pick, steps) == (real.winner, real.cost["candidate_steps"])
    assert steps < bench.simulate_halving(curves, 32, 40, 2.0, 0.125)[1]  # it did stop a rung early


def test_interrupted_mid_schedule_resumes_to_the_same_result(tmp_path):
    """Stopped after rung 1's first record (the rungs' states left in --out, as after kill -9):
    --resume reuses the journaled early stop of rung 0 and ends where an uninterrupted run ends."""
    shifts = [0.0, 0.25, 3.0, 4.0]
    cfg = SearchConfig(schedule="halving", shifts=shifts, stop_when_stable=True, **TINY)
    clean = search(cfg)

    class Killed(Exception):
        pass

    class KillAfter:
        def __init__(self, n):
            self.n = n

        def end(self, result, i, n):
            self.n -= 1
            if self.n == 0:
                raise Killed

    with pytest.raises(Killed):
        search(cfg, out_dir=tmp_path / "o", progress=KillAfter(5))  # rung 0's four records, then rung 1's first
    recs = [r for r in Journal(tmp_path / "o" / "journal.jsonl").records() if r.get("kind") == "rung"]
    assert {r["rung"] for r in recs} == {0, 1} and all(r["steps"] == clean.rungs[0]["steps"] for r in recs
                                                      if r["rung"] == 0)
    assert list((tmp_path / "o" / "states").glob("*.pt"))  # the paused states are in --out
    resumed = search(cfg, out_dir=tmp_path / "o", resume=True)
    assert resumed.rungs == clean.rungs and resumed.winner == clean.winner
    assert [(c.shift, c.steps, c.score) for c in resumed.candidates] == [(c.shift, c.steps, c.score)
                                                                         for c in clean.candidates]
    assert resumed.resumed >= 1
