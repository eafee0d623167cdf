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
