"""bnnshift.search as a package (issue 23, item 2): journal hashes pinned across the move (a
journal written before keeps resuming), the pure schedule functions without training, the
caller-owned context."""
from __future__ import annotations

import pytest

from bnnshift.search import SearchConfig, search_with

MLP = dict(model="zoo:mlp", data="fashion-mnist", model_args={"width": 0.25}, train_limit=1024, batch_size=128)
SYN = dict(model="zoo:mlp", data="synthetic", model_args={"width": 0.25}, train_limit=256, batch_size=64)

# config_hash values of bnnshift 0.x before search.py became a package (commit bdb7400): a journal
# keys its candidates by them, so a change here makes every earlier --resume start over
PINNED = [
    (dict(steps=6, **MLP), "4e8d3977567c8ed8"),
    (dict(steps=6, schedule="halving", eta=3.0, output_index=0, lr=0.01, **MLP), "de7294db4edc3485"),
    (dict(steps=4, **SYN), "feeec81f728d932b"),
]


def _open(cfg):
    from bnnshift.search import SearchContext

    return SearchContext.open(cfg)


@pytest.mark.parametrize("kw,expected", PINNED, ids=["mlp", "halving-output-index", "synthetic"])
def test_config_hash_is_pinned(kw, expected):
    assert _open(SearchConfig(**kw)).config_hash == expected


def _library_factory():
    from bnnshift_zoo.models_paper import mlp

    return mlp(width=0.25)


def _library_trainer(model, *, seed, shift):
    return 0.5 + 0.01 * seed - 0.001 * abs(shift)


def test_library_search_hash_is_pinned():
    s = search_with(_library_factory, _library_trainer, "0,0.5", (0,), input_shape=(1, 28, 28),
                    config={"lr": 0.001})
    assert s.config_hash == "68ad678613d0b3f8"


# ------------------------------------------------------------------------------ config_hash is pure


def test_config_hash_loads_nothing(monkeypatch):
    """SearchConfig.config_hash is a function of the config and the parts the data and the model
    give (data fingerprint, checkpoint sha256, input shape): no data or model is loaded for it."""
    import bnnshift.data as data_mod
    import bnnshift.load as load_mod

    def refuse(*a, **k):
        raise AssertionError("config_hash loaded data or a model")

    monkeypatch.setattr(load_mod, "load_model", refuse)
    monkeypatch.setattr(data_mod, "load_data", refuse)
    cfg = SearchConfig(steps=4, **SYN)
    h = cfg.config_hash(data_fingerprint="fp", checkpoint_sha256=None, input_shape=(1, 28, 28))
    assert h == "2c2f3dff1e09485d"  # pinned: the same recipe as SearchContext's (sha256 of the fields + parts)
    assert cfg.config_hash(data_fingerprint="fp2", checkpoint_sha256=None, input_shape=(1, 28, 28)) != h
    assert cfg.config_hash(data_fingerprint="fp", checkpoint_sha256="ab", input_shape=(1, 28, 28)) != h
    assert cfg.config_hash(data_fingerprint="fp", checkpoint_sha256=None, input_shape=[1, 28, 28]) == h
    with pytest.raises(TypeError, match="SearchContext.open"):
        cfg.config_hash()


def test_context_hash_is_the_configs_pure_hash_of_its_parts():
    from bnnshift.search import SearchContext

    cfg = SearchConfig(steps=4, **SYN)
    ctx = SearchContext.open(cfg)
    assert ctx.config_hash == cfg.config_hash(**ctx.hash_parts) == "feeec81f728d932b"
    assert ctx.total_steps == 4 and ctx.site_names == [s.name for s in ctx.sites] and ctx.site_names


# ------------------------------------------------------------------------------ the caller owns the context


def test_no_module_keeps_a_context_alive():
    """Dropping the caller's SearchContext frees it (data, models): nothing in the package caches it."""
    import gc
    import weakref

    from bnnshift.search import SearchContext, run_candidate

    cfg = SearchConfig(steps=2, compile="off", **SYN)
    ctx = SearchContext.open(cfg)
    r = run_candidate(cfg, 0.5, 0, context=ctx)
    assert r.ok and ctx.model is not None
    ref = weakref.ref(ctx)
    del ctx
    gc.collect()
    assert ref() is None


def test_a_context_of_another_configuration_is_refused():
    from bnnshift.errors import UsageError
    from bnnshift.search import SearchContext, run_candidate

    ctx = SearchContext.open(SearchConfig(steps=2, compile="off", **SYN))
    with pytest.raises(UsageError, match="another configuration"):
        run_candidate(SearchConfig(steps=3, compile="off", **SYN), 0.0, 0, context=ctx)
    # the grid and the schedule are not the context's: the same context serves them
    ctx.check_config(SearchConfig(steps=2, compile="off", shifts=[0.0, 1.0], seeds=[0, 1], schedule="halving", **SYN))


def test_old_private_names_warn_through_one_table():
    import bnnshift.search as search_mod

    with pytest.warns(DeprecationWarning, match="SearchContext.open"):
        assert search_mod._context == search_mod.SearchContext.open
    with pytest.warns(DeprecationWarning, match="step_cost"):
        assert search_mod._cost is search_mod.step_cost
    with pytest.raises(AttributeError):
        search_mod._no_such_name  # noqa: B018


# ------------------------------------------------------------------------------ the schedules, without training


def test_schedule_enum_is_the_validated_choices_and_serialises_as_strings():
    import json

    from bnnshift.search import Schedule
    from bnnshift.validate import SCHEDULES

    assert tuple(s.value for s in Schedule) == SCHEDULES
    assert json.dumps({"name": Schedule.HALVING}) == '{"name": "halving"}'
    assert Schedule("full") == "full" and str(Schedule.FULL) == "full"


def test_rung_min_steps_and_plan_note():
    from bnnshift.search.schedule import _plan_note, rung_min_steps

    kw = dict(SYN, train_limit=None)
    assert rung_min_steps(SearchConfig(rung_min_samples=2000, **{**kw, "batch_size": 256})) == 8
    assert rung_min_steps(SearchConfig(rung_min_samples=0, **kw)) == 1
    cfg = SearchConfig(schedule="halving", rung_min_samples=2000, **{**kw, "batch_size": 256})
    note = _plan_note(cfg, 24)  # raw rungs [3, 6, 12, 24], 8 steps at least
    assert "rungs at 3, 6 steps" in note and "the first rung is at 12 steps" in note
    assert _plan_note(cfg, 10).startswith("fell back to the full schedule")  # [1, 2, 5, 10]: none left
    assert _plan_note(SearchConfig(schedule="halving", rung_min_samples=0, **kw), 24) is None


def test_expected_steps_counts_the_survivors():
    from bnnshift.search import expected_steps, survivors

    kw = dict(SYN, shifts=[0.0, 0.5, 1.0, 1.5], seeds=[0, 1], rung_min_samples=0)
    # halving over 16 steps: rungs [4, 8, 16]; 4, then 2, then 1 shifts, 2 seeds each
    assert expected_steps(SearchConfig(schedule="halving", min_fraction=0.25, **kw), 16) == 4 * 2 * 4 + 2 * 2 * 4 + 1 * 2 * 8
    assert expected_steps(SearchConfig(**kw), 16) == 4 * 2 * 16
    assert [survivors(n, 2.0) for n in (1, 2, 3, 4, 5)] == [1, 1, 2, 2, 3]
    assert survivors(9, 3.0) == 3 and survivors(10, 3.0) == 4


def test_stable_marks_inside_a_later_rung():
    from bnnshift.search import stable_marks

    assert stable_marks(0, 29, 0.25) == (8, [9, 13, 17, 21, 25, 29])
    assert stable_marks(29, 58, 0.25) == (8, [37, 41, 45, 49, 53, 57, 58])
    assert stable_marks(0, 2, 0.25) == (1, [2])


def test_stable_decision_never_stops_blind_or_outside_the_rung():
    from bnnshift.search import stable_decision

    hits = {0.0: [[9] * 10], 1.0: [[1] * 10]}
    seen = {0.0: [[10] * 10], 1.0: [[10] * 10]}
    assert stable_decision(hits, seen, keep=1, start=0, at=10, window=4)["kept"] == [0.0]
    assert stable_decision(hits, seen, keep=1, start=8, at=10, window=4) is None  # window reaches before the rung
    short = {0.0: [[9] * 5], 1.0: [[1] * 10]}
    assert stable_decision(short, seen, keep=1, start=0, at=10, window=4) is None  # a history is missing
    assert stable_decision(hits, seen, keep=2, start=0, at=10, window=4) is None  # nothing to drop


def test_rung_decision_keeps_the_best_unless_at_chance_or_tied():
    from bnnshift.search import rung_decision

    means = {0.5: 0.8, 0.0: 0.6, 1.0: 0.4}
    assert rung_decision([0.5, 0.0, 1.0], 1, means.get, samples=1000, chance=0.1) == ([0.5], None)
    assert rung_decision([0.5, 0.0, 1.0], 1, means.get, samples=1000, chance=None) == ([0.5], None)
    low = {0.5: 0.11, 0.0: 0.10, 1.0: 0.09}  # within 3 binomial standard errors of 10%
    keep, why = rung_decision([0.5, 0.0, 1.0], 1, low.get, samples=1000, chance=0.1)
    assert keep == [0.5, 0.0, 1.0] and why["action"] == "extended"
    assert rung_decision([], 1, means.get, samples=10, chance=0.5) == ([], None)


def test_results_module_is_torch_free_and_imports_no_other_room():
    """report and distributed read search.results; it imports only the standard library."""
    import ast
    from pathlib import Path

    import bnnshift.search.results as res

    tree = ast.parse(Path(res.__file__).read_text())
    mods = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert mods <= {"__future__", "dataclasses", "typing", "_version"}, mods


@pytest.mark.parametrize("module", ["distributed", "report", "cli/search"])
def test_no_module_imports_private_names_of_the_search(module):
    import ast
    from pathlib import Path

    import bnnshift

    path = Path(bnnshift.__file__).parent / f"{module}.py"
    tree = ast.parse(path.read_text())
    private = [f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
               and n.module and "search" in n.module.split(".") for a in n.names if a.name.startswith("_")]
    assert not private, private


def test_set_threads_only_lowers_the_callers_thread_count(monkeypatch):
    """A search opened after the caller chose its threads (a benchmark's ``--threads 1``) keeps
    them; a count above the CPUs this process may use is lowered to them."""
    import os

    import torch

    from bnnshift.train import set_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        set_threads("cpu")
        assert torch.get_num_threads() == 1
        torch.set_num_threads(cpus + 3)
        set_threads("cpu")
        assert torch.get_num_threads() == cpus
    finally:
        torch.set_num_threads(before)
