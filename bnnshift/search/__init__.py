"""Phase 8: the first-epoch calibration search (paper claim 5).

Train ONE short epoch per candidate shift ``t`` and rank the candidates by train accuracy.
Every candidate starts from the same initial weights (seeded init, or the checkpoint) and
sees the same batches in the same order (fixed by the seed); only ``t`` differs. Each
candidate records the sha256 of its initial state_dict and the hash of its batch order, so
the report can show that this held.

The entry points (:mod:`.loop`):

* :func:`run_candidate` ``(cfg, shift, seed, context=None) -> CandidateResult``: a pure function
  of its arguments (a worker on another machine gets the same score). Given a
  :class:`SearchContext` (``SearchContext.open(cfg)``, kept by the caller) it reuses one patched
  model (weights and threshold buffers rewritten in place between candidates), so the compiled
  training step is built once.
* :func:`search_with` ``(model_factory, train_one_epoch, shifts, seeds, ...)``: the library
  entry point for teams with their own training code; patching, same init, journal, resume
  and report are done around their ``train_one_epoch(model, *, seed, shift)``.
* :func:`search` ``(cfg)``: the CLI's search with the default trainer
  (:class:`bnnshift.train.DefaultTrainer`), ``--schedule full`` or ``halving``, under torchrun too.
  ``search`` and ``search_with`` share the full schedule's loop (``loop._loop``) and the journal
  set-up (:func:`.outputs.open_journal`); neither calls the other.

The rooms: :mod:`.config` (``SearchConfig``, the hashed fields), :mod:`.results` (the result
types), :mod:`.context` (``SearchContext``), :mod:`.candidate` (one candidate),
:mod:`.schedule` (the pure decisions of the schedules), :mod:`.halving` (``HalvingLoop``),
:mod:`.states` (paused states), :mod:`.aggregate` (statistics and the verdict),
:mod:`.steppath` (``--compile auto``), :mod:`.outputs` (journal and report), :mod:`.progress`.
"""
from __future__ import annotations

import warnings
from typing import Any

from ..validate import METRICS, SCHEDULES, parse_seeds, parse_shifts
from .aggregate import rungs_from, step_cost, summarise
from .candidate import _measure_after, _measure_on_main, constant_sites, run_candidate
from .config import SearchConfig
from .context import PROBE_SAMPLES, SearchContext, _timm_data_defaults, config_key, init_hash
from .halving import HalvingLoop
from .loop import PREFLIGHT_RECALIB_BATCHES, preflight_degenerate, search, search_warnings, search_with
from .results import CandidateResult, SearchSummary, ShiftStats
from .schedule import (CHANCE_Z, STABLE_Z, Schedule, expected_steps, paired_gap, rung_decision, rung_min_steps, rung_steps,
                       stable_decision, stable_marks, survivors)
from .states import STATE_MEMORY_BUDGET, _StateStore
from .steppath import _choose_step_path

__all__ = [
    "SearchConfig", "CandidateResult", "ShiftStats", "SearchSummary", "SearchContext", "Schedule", "parse_shifts",
    "parse_seeds", "run_candidate", "search", "search_with", "init_hash", "rung_steps", "survivors",
    "stable_decision", "stable_marks", "rung_decision", "paired_gap", "summarise", "rungs_from", "expected_steps", "step_cost",
]

# old names of this package -> (new name, getter): one table, each use warns once per call site
_RENAMED: dict[str, tuple[str, Any]] = {
    "_context": ("SearchContext.open", lambda: SearchContext.open),
    "_Context": ("SearchContext", lambda: SearchContext),
    "_cost": ("step_cost", lambda: step_cost),
}


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        new, get = _RENAMED[name]
        warnings.warn(f"bnnshift.search.{name} is renamed bnnshift.search.{new}; the old name will go",
                      DeprecationWarning, stacklevel=2)
        return get()
    raise AttributeError(f"module 'bnnshift.search' has no attribute {name!r}")
