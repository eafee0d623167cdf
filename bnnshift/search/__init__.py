"""Phase 6: the first-epoch calibration search (paper claim 5).

(being split; see loop.py)
"""
from __future__ import annotations

from ..validate import METRICS, SCHEDULES, parse_seeds, parse_shifts
from .aggregate import _cost, rungs_from, summarise
from .candidate import _measure_after, _measure_on_main, constant_sites, run_candidate
from .config import SearchConfig
from .context import _CONTEXTS, PROBE_SAMPLES, _context, _timm_data_defaults, init_hash
from .loop import preflight_degenerate, search, search_warnings, search_with
from .results import CandidateResult, SearchSummary, ShiftStats
from .schedule import (CHANCE_Z, STABLE_Z, expected_steps, rung_decision, rung_min_steps, rung_steps, stable_decision,
                       stable_marks, survivors)
from .states import _StateStore
from .steppath import _choose_step_path

__all__ = [
    "SearchConfig", "CandidateResult", "ShiftStats", "SearchSummary", "parse_shifts", "parse_seeds",
    "run_candidate", "search", "search_with", "init_hash", "rung_steps", "survivors", "stable_decision",
    "stable_marks",
]
