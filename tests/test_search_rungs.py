"""Halving rungs that can decide (issue 22 item 2): a rung ranks only after a minimum number of
samples per candidate (``--rung-min-samples``), not on scores at chance (extended, or the whole
schedule falls back to full), exact ties at the cut keep both; the report prints every rung's
scores, the decision and the wall time next to the step ratio."""
from __future__ import annotations

import json

import pytest

from bnnshift.search import SearchConfig, rung_decision, rung_steps, search

# labels independent of the inputs: every score stays at chance (10 classes)
NOISE_PY = '''
import torch

def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (1024,), generator=g)
    return x, y
'''


def test_rungs_under_the_sample_minimum_are_left_out():
    assert rung_steps(24, 2, 0.125) == [3, 6, 12, 24]
    assert rung_steps(24, 2, 0.125, 8) == [12, 24]  # 2,000 samples at batch 256: 8 steps
    assert rung_steps(24, 2, 0.125, 24) == [24]  # nothing left: the full schedule
    assert rung_steps(234, 2, 0.125, 8) == [29, 58, 117, 234]


def test_exact_tie_at_the_cut_keeps_both_and_chance_extends():
    means = {0.0: 0.30, 0.5: 0.25, 1.0: 0.25, 1.5: 0.20}
    ranked = sorted(means, key=lambda t: -means[t])
    keep, why = rung_decision(ranked, 2, means.get, samples=5000, chance=0.1)
    assert keep == [0.0, 0.5, 1.0] and why["action"] == "tie" and "0.5, 1" in why["why"]
    keep, why = rung_decision(ranked, 2, {**means, 1.0: 0.2499}.get, samples=5000, chance=0.1)
    assert keep == [0.0, 0.5] and why is None
    at_chance = {0.0: 0.102, 0.5: 0.099, 1.0: 0.098, 1.5: 0.095}
    ranked = sorted(at_chance, key=lambda t: -at_chance[t])
    keep, why = rung_decision(ranked, 2, at_chance.get, samples=768, chance=0.1)
    assert keep == ranked and why["action"] == "extended" and "chance 10.00%" in why["why"]
    keep, why = rung_decision(ranked, 2, at_chance.get, samples=768, chance=None)  # check off
    assert keep == ranked[:2] and why is None


@pytest.mark.parametrize("argv_order", ["samples_first", "schedule_first"])
def test_sample_minimum_leaves_out_early_rungs_and_says_so(tmp_path, argv_order):
    """24 steps of 32 (768 samples): rungs at 3 and 6 steps (96, 192 samples) are under a 300-sample
    minimum, the first rung is at 12 steps; the report says why; the wall time is reported."""
    kw = dict(model="zoo:mlp", data="synthetic:768", model_args={"width": 0.25}, input_shape=(1, 28, 28),
              batch_size=32, steps=24, compile="off", bn_recalib_batches=1, shifts=[0.0, 0.5, 1.0, 1.5])
    extra = dict(rung_min_samples=300, schedule="halving") if argv_order == "samples_first" else \
        dict(schedule="halving", rung_min_samples=300)
    s = search(SearchConfig(**kw, **extra), out_dir=tmp_path / "h")
    assert s.schedule["rung_steps"] == [12, 24] and "left out, the first rung is at 12 steps" in s.schedule["plan_note"]
    assert [r["steps"] for r in s.rungs] == [12, 24] and s.rungs[0]["samples"] == 384
    assert s.cost["wall_seconds"] > 0 and s.cost["full_grid_seconds_estimate"] > 0
    md = (tmp_path / "h" / "search.md").read_text()
    assert "left out" in md and "wall " in md and "scores t=0 " in md
    data = json.loads((tmp_path / "h" / "search.json").read_text())
    assert data["schedule"]["rung_min_samples"] == 300 and data["rungs"][0]["samples"] == 384
    assert set(data["rungs"][0]["scores"]) == {"0.0", "0.5", "1.0", "1.5"}


def test_first_rung_at_chance_is_extended_and_the_report_says_so(tmp_path):
    """Labels that carry no information: every rung's scores are at chance; no shift is dropped
    on them: the rungs are extended and the schedule falls back to full, said in the report."""
    (tmp_path / "noise.py").write_text(NOISE_PY)
    cfg = SearchConfig(model="zoo:mlp", data=f"{tmp_path / 'noise.py'}:data", model_args={"width": 0.25},
                       input_shape=(1, 28, 28), batch_size=64, steps=16, compile="off", bn_recalib_batches=1,
                       shifts=[0.0, 0.5, 1.0, 1.5], schedule="halving", min_fraction=0.25, rung_min_samples=200)
    s = search(cfg, out_dir=tmp_path / "h")
    assert s.schedule["rung_steps"] == [4, 8, 16]
    first = s.rungs[0]
    assert first["decision"]["action"] == "extended" and "at chance" in first["decision"]["why"]
    assert first["kept"] == [0.0, 0.5, 1.0, 1.5]  # nobody dropped on noise
    assert all(r["decision"]["action"] == "extended" for r in s.rungs[:-1])
    assert s.schedule["fallback"].startswith("full: every rung's scores were at chance")
    assert sorted(c.shift for c in s.candidates if c.steps == 16) == [0.0, 0.5, 1.0, 1.5]  # all finished
    md = (tmp_path / "h" / "search.md").read_text()
    assert "fell back to the full schedule" in md and "extended: scores at chance" in md


def test_exact_tie_in_a_search_keeps_both(tmp_path):
    """Two shifts beyond a hardtanh's range make the site constant the same way: their training is
    identical, their scores tie exactly; at the cut both go on (the tie is not broken silently)."""
    from test_degenerate import _model_file

    cfg = SearchConfig(model=f"{_model_file(tmp_path)}:build", data="synthetic:256", input_shape=(1, 8, 8),
                       batch_size=32, steps=8, compile="off", bn_recalib_batches=1, shifts=[0.0, 0.25, 1.5, 2.0],
                       schedule="halving", eta=1.5, min_fraction=0.5, rung_min_samples=0)
    s = search(cfg)
    first = s.rungs[0]
    assert first["scores"]["1.5"] == first["scores"]["2.0"]
    ranked = sorted(first["scores"], key=lambda k: -first["scores"][k])
    if {"1.5", "2.0"} <= set(ranked[2:]):  # the tie sits at the cut (3 of 4 go on): both kept
        assert first["decision"]["action"] == "tie" and first["kept"] == [0.0, 0.25, 1.5, 2.0]
    else:
        pytest.fail(f"the tied shifts are not at the cut: {first['scores']}")
