"""The search package (temporary during the move: everything lives in loop.py)."""
from . import loop as _loop_mod
from .loop import *  # noqa: F401,F403
from .loop import (  # noqa: F401
    _CONTEXTS, PROBE_SAMPLES, _choose_step_path, _context, _cost, _measure_after, _measure_on_main, _StateStore,
    _timm_data_defaults, expected_steps, rung_decision, rungs_from, summarise,
)
