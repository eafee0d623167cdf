"""Search progress (issue 12): overall bar with ETA and the current candidate's steps with a
"compiling" label at a terminal; heartbeat lines off a terminal; no CUDA_HOME noise."""
from __future__ import annotations

import io
import time
from types import SimpleNamespace

from rich.console import Console

from bnnshift.cli._output import Output, SearchProgress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def result(shift, seed):
    return SimpleNamespace(shift=shift, seed=seed, ok=True, score=0.5, seconds=1.0, error=None)


def test_eta_counts_steps_and_ignores_the_compile():
    o = Output(quiet=True)
    p = SearchProgress(o, every=0)
    p._clock = clock = Clock()
    p.start(0.0, 0, 0, 4)
    assert "compiling / first step" in p.status_line() and p.eta() is None
    clock.t = 20.0  # a 20 s compile before the first step
    p.step(1, 100)
    clock.t = 21.0
    p.step(51, 100)  # 50 steps per second: 3.5 candidates left = 350 steps = 7 s
    assert abs(p.eta() - 7.0) < 0.05 and "step 51/100" in p.status_line()
    p.end(result(0.0, 0), 0, 4)
    p.skip(result(0.5, 0), 1, 4)  # from the journal: not counted as work left
    assert abs(p.fraction() - 1 / 3) < 1e-9


def test_rich_bars_at_a_terminal():
    o = Output()
    buf = io.StringIO()
    o.err = Console(file=buf, force_terminal=True, color_system=None, width=120)
    p = SearchProgress(o)
    p.enabled, p.plain = True, False
    with p:
        p.start(0.5, 0, 0, 2)
        p.bar.refresh()
        p.step(3, 10)
        p.bar.refresh()
        p.end(result(0.5, 0), 0, 2)
    text = buf.getvalue()
    assert "compiling / first step" in text and "ETA" in text and "[1/2] t=+0.5 seed=0: 50.00%" in text
    assert len(p.bar.tasks) == 2  # the overall bar and one reused bar for the current candidate


def test_heartbeat_lines_off_a_terminal():
    o = Output()
    buf = io.StringIO()
    o.err = Console(file=buf, width=200)
    p = SearchProgress(o, every=0.2)
    p.enabled, p.plain = False, True
    with p:
        p.start(0.0, 0, 0, 1)
        time.sleep(0.9)
    lines = [line for line in buf.getvalue().splitlines() if "compiling / first step" in line]
    assert len(lines) >= 2, buf.getvalue()


def test_no_cuda_home_warning_from_the_cli():
    import logging

    from typer.testing import CliRunner

    from bnnshift.cli import app

    CliRunner().invoke(app, ["zoo", "--json"])
    assert logging.getLogger("torch.utils.cpp_extension").getEffectiveLevel() >= logging.ERROR


def test_progress_advances_between_halving_rungs():
    """Between rungs the eliminated shifts are measured (BN re-estimation, probe): the status line
    and the bar say so and advance, instead of freezing on the last candidate (issue 22)."""
    o = Output(quiet=True)
    p = SearchProgress(o, every=0)
    p.start(0.0, 0, 0, 6)
    p.step(5, 5)
    p.end(result(0.0, 0), 0, 6)
    p.transition(0, 1, 2)
    assert "rung 0 done, measuring eliminated shifts 1/2" in p.status_line()
    p.transition(0, 2, 2)
    assert "2/2" in p.status_line()
    p.start(0.5, 0, 4, 6)  # the next rung's first candidate
    assert "measuring" not in p.status_line() and "t=+0.5" in p.status_line()


def test_halving_search_reports_each_transition(tmp_path):
    from bnnshift.search import SearchConfig, search

    calls = []

    class P:
        def transition(self, r, k, n):
            calls.append((r, k, n))

    search(SearchConfig(model="zoo:mlp", data="synthetic:256", model_args={"width": 0.25}, input_shape=(1, 28, 28),
                        batch_size=32, steps=8, compile="off", bn_recalib_batches=1, shifts=[0.0, 0.5, 1.0, 1.5],
                        schedule="halving", min_fraction=0.5, rung_min_samples=0), progress=P())
    assert calls == [(0, 1, 2), (0, 2, 2)]  # rung 0 at 4 steps keeps 2 of 4: two measured between rungs


def test_halving_search_reports_the_work_after_a_candidates_steps():
    """Between one candidate's last step and the next one's first (its paused state saved, the
    next one's restored, the finishers' +1 shares measured) the search calls ``phase``; the
    status line shows it (issue 22: the bar froze between rungs)."""
    from bnnshift.search import SearchConfig, search

    calls = []

    class P:
        def start(self, s, seed, i, n):
            calls.append(("start", s))

        def phase(self, text):
            calls.append(("phase", text))

    search(SearchConfig(model="zoo:mlp", data="synthetic:256", model_args={"width": 0.25}, input_shape=(1, 28, 28),
                        batch_size=32, steps=8, compile="off", bn_recalib_batches=1, shifts=[0.0, 0.5, 1.0, 1.5],
                        schedule="halving", min_fraction=0.5, rung_min_samples=0), progress=P())
    texts = [c[1] for c in calls if c[0] == "phase"]
    assert sum("saving its state" in t for t in texts) == 4  # rung 0: four candidates paused
    assert sum("restoring its state paused at step 4" in t for t in texts) == 2  # rung 1: two go on
    assert sum("+1 shares" in t for t in texts) == 2  # the finishers measured
    o = Output(quiet=True)
    p = SearchProgress(o, every=0)
    p.start(0.5, 0, 0, 6)
    p.step(4, 4)
    p.phase("pausing at step 4: saving its state for the next rung")
    assert "step 4/4, pausing at step 4" in p.status_line()
    p.start(1.0, 0, 1, 6)
    assert "pausing" not in p.status_line()
