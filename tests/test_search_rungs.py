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


# ------------------------------------------------------------------ t = 0 reaches the last rung; the noise rule


def _gaps(z_of: dict[tuple[float, float], float]):
    """A ``gap(a, b)`` whose z is given per pair (default far apart), margin 1 point."""
    return lambda a, b: {"margin": 0.01, "se": 0.01 / max(z_of.get((a, b), 50.0), 1e-9), "z": z_of.get((a, b), 50.0)}


@pytest.mark.parametrize("ranked", [[0.5, 1.0, 1.5, 0.0], [1.0, 0.5, 0.0, -0.5], [-1.0, -0.5, 0.0, 2.0, 3.0]])
def test_the_baseline_goes_on_whatever_its_rank(ranked):
    """t = 0 ranked below the cut (last, just below the cut, in a 5-shift grid with negatives) is
    kept as the verdict's baseline, one candidate more, said in the decision; it is not a reason to
    keep anything else."""
    means = {t: 0.5 - 0.01 * i for i, t in enumerate(ranked)}
    keep, why = rung_decision(ranked, 2, means.get, samples=5000, chance=0.1, baseline=0.0)
    assert keep == ranked[:2] + [0.0] and "baseline" in why["baseline"] and why["action"] == "baseline"
    keep, why = rung_decision(ranked, 2, means.get, samples=5000, chance=0.1, gap=_gaps({}), baseline=0.0)
    assert keep == ranked[:2] + [0.0] and why["action"] == "separated" and "verdict's baseline" in why["baseline"]
    keep, why = rung_decision(ranked, 2, means.get, samples=5000, chance=0.1, baseline=None)  # no t = 0 in the grid
    assert keep == ranked[:2] and why is None


def test_a_cut_within_the_paired_noise_is_widened_or_extended():
    ranked = [0.5, 1.0, 1.5, 2.0]
    means = {0.5: 0.40, 1.0: 0.39, 1.5: 0.385, 2.0: 0.30}
    # separated: the plain cut, the tightest pair said
    keep, why = rung_decision(ranked, 2, means.get, samples=5000, chance=0.1, gap=_gaps({(1.0, 1.5): 2.5}))
    assert keep == [0.5, 1.0] and why["action"] == "separated" and why["tightest"]["behind"] == 1.5
    assert "2.5 paired SE" in why["why"]
    # 1.5 within the noise of the kept 1.0 (z 1.2 <= 2): kept too; 2.0 far behind every kept one: out
    keep, why = rung_decision(ranked, 2, means.get, samples=5000, chance=0.1, gap=_gaps({(1.0, 1.5): 1.2}))
    assert keep == [0.5, 1.0, 1.5] and why["action"] == "widened" and "3 of 4 go on" in why["why"]
    assert why["tightest"] == {"ahead": 1.0, "behind": 1.5, "margin": 0.01, "se": pytest.approx(0.01 / 1.2), "z": 1.2}
    # 2.0 within the noise of 1.5 once 1.5 is kept: nothing can be eliminated, every shift goes on
    keep, why = rung_decision(ranked, 2, means.get, samples=5000, chance=0.1,
                              gap=_gaps({(1.0, 1.5): 1.2, (1.5, 2.0): 0.3}))
    assert keep == ranked and why["action"] == "extended" and "within the paired noise" in why["why"]


def test_paired_gap_matches_stable_decision_and_refuses_a_short_history():
    from bnnshift.search import paired_gap, stable_decision

    ha, hb = [[20, 22, 25, 21], [19, 24, 23, 22]], [[18, 21, 22, 20], [20, 20, 21, 19]]
    n = [[32] * 4, [32] * 4]
    g = paired_gap(ha, n, hb, n, 4)
    assert g["margin"] == pytest.approx((88 / 128 + 88 / 128) / 2 - (81 / 128 + 80 / 128) / 2)
    st = stable_decision({0.0: ha, 1.0: hb}, {0.0: n, 1.0: n}, keep=1, start=0, at=4, window=1, z=0.5)
    assert st["tightest"]["margin"] == g["margin"] and st["tightest"]["se"] == g["se"]
    with pytest.raises(ValueError):
        paired_gap(ha, n, [[1, 2]], [[32, 32]], 4)


SEARCH = dict(model="zoo:mlp", data="synthetic:512", model_args={"width": 0.25}, input_shape=(1, 28, 28),
              batch_size=32, steps=16, compile="off", bn_recalib_batches=1, schedule="halving", min_fraction=0.25,
              rung_min_samples=32)


def test_shifts_within_noise_are_not_cut_and_the_search_falls_back_to_full(tmp_path):
    """Four shifts that train the same model up to rounding: no rung's cut is beyond the paired
    noise, every shift goes on, the schedule falls back to full; the JSON record and the report
    say which and why; the candidate steps are the full grid's, never more."""
    shifts = [0.0, 0.001, 0.002, 0.003]
    seen = []

    class P:  # the progress count follows the extended rungs (12 candidates, not the planned 7)
        def start(self, t, seed, i, n):
            seen.append((i, n))

    s = search(SearchConfig(**SEARCH, shifts=shifts), out_dir=tmp_path / "h", progress=P())
    assert len(seen) == 12 and all(i < n for i, n in seen) and seen[-1] == (11, 12), seen
    assert [r["steps"] for r in s.rungs] == [4, 8, 16]
    for r in s.rungs[:-1]:
        assert r["decision"]["action"] == "extended" and "paired noise" in r["decision"]["why"], r
        assert r["kept"] == shifts
    assert s.schedule["fallback"].startswith("full: no rung could decide")
    assert s.cost["candidate_steps"] == s.cost["full_grid_candidate_steps"] == 4 * 16
    data = json.loads((tmp_path / "h" / "search.json").read_text())
    assert data["rungs"][0]["decision"]["tightest"]["z"] is None or data["rungs"][0]["decision"]["tightest"]["z"] <= 2
    md = (tmp_path / "h" / "search.md").read_text()
    assert "fell back to the full schedule" in md and "within the paired noise" in md


def test_a_clearly_separated_rung_ends_on_plan_and_t0_finishes(tmp_path):
    """Shifts 3 and 4 leave almost every pre-activation below t: far behind from the first rung;
    the rung ends on plan (separated, the tightest pair said); t = 0 reaches the last rung."""
    import jsonschema
    from pathlib import Path

    s = search(SearchConfig(**SEARCH, shifts=[0.0, 0.25, 3.0, 4.0]), out_dir=tmp_path / "h")
    r0 = s.rungs[0]
    assert r0["steps"] == 4 and r0["kept"] == [0.0, 0.25] and r0["decision"]["action"] == "separated"
    assert r0["decision"]["tightest"]["behind"] in (3.0, 4.0)
    assert any(c.shift == 0.0 and c.steps == 16 for c in s.candidates)  # the baseline finished the epoch
    assert "fallback" not in s.schedule and s.cost["candidate_steps"] < s.cost["full_grid_candidate_steps"]
    data = json.loads((tmp_path / "h" / "search.json").read_text())
    schema = json.loads((Path(__file__).parents[1] / "docs" / "search.schema.json").read_text())
    jsonschema.validate(data, schema)
    assert "separated: every kept shift leads every eliminated one" in (tmp_path / "h" / "search.md").read_text()
