"""One output object for every command: human (rich, on stderr), json (stdout only), quiet."""
from __future__ import annotations

import json
import sys
from typing import Any
from .._io import jsonable


_REDIRECTED: list = []  # the real stdout while --json sends everything else to stderr


def restore_stdout():
    """Undo the --json redirect (an error is reported after it); returns the real stdout."""
    if _REDIRECTED:
        sys.stdout = _REDIRECTED[0]
        _REDIRECTED.clear()
    return sys.stdout


class Output:
    """``json``: only JSON on stdout; everything else goes to stderr.

    Progress bars are on only for a human at a terminal (not with --json, not in CI logs).
    """

    def __init__(self, json_mode: bool = False, quiet: bool = False):
        from rich.console import Console

        self.json_mode = json_mode
        self.quiet = quiet
        import os

        # not a terminal (pipes, CI logs): wide enough that tables are not folded to nothing
        width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
        self.err = Console(stderr=True, highlight=False, soft_wrap=False, width=width)
        self.out = Console(highlight=False, soft_wrap=True, width=width)
        # --json promises only JSON on stdout: whatever the user's code prints while its model
        # is built and run (banners, shape traces) goes to stderr until the result is written
        if json_mode:
            if sys.stdout is not sys.stderr:  # not yet redirected: this is the real stdout
                _REDIRECTED[:] = [sys.stdout]
            sys.stdout = sys.stderr
        self._stdout = _REDIRECTED[0] if json_mode and _REDIRECTED else sys.stdout

    @property
    def progress_enabled(self) -> bool:
        return not (self.json_mode or self.quiet) and sys.stderr.isatty()

    def info(self, msg: str) -> None:
        if not self.quiet:
            self.err.print(msg)

    def warn(self, msg: str) -> None:
        self.err.print(f"[yellow]warning:[/yellow] {msg}")

    def table(self, table) -> None:
        """Human tables go to stdout when not in json mode."""
        if not (self.json_mode or self.quiet):
            self.out.print(table)

    def text(self, msg: str) -> None:
        """A human paragraph on stdout (not in json mode), wrapped at word boundaries."""
        if not (self.json_mode or self.quiet):
            self.out.print(msg, soft_wrap=False, overflow="fold")

    def result(self, payload: dict[str, Any], human: str | None = None) -> None:
        if self.json_mode:
            restore_stdout()
            sys.stdout = self._stdout
            self._stdout.write(json.dumps(payload, indent=2, default=jsonable) + "\n")
            self._stdout.flush()
        elif human and not self.quiet:
            self.out.print(human)



HEARTBEAT_SECONDS = 30.0  # plain progress lines when stderr is not a terminal (env BNNSHIFT_PROGRESS_EVERY)


def _hms(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


class SearchProgress:
    """The search's progress on stderr: the hooks ``start / step / end / skip`` of ``search``.

    At a terminal (rich): one overall bar across candidates with its ETA (fractional: the
    current candidate's steps count), one bar for the current candidate's steps labelled
    "compiling / first step" until its first step reports, and one line per finished candidate.
    Not at a terminal (CI logs, pipes): one line per finished candidate and a heartbeat line
    every ``BNNSHIFT_PROGRESS_EVERY`` seconds (default 30) from a background thread, so a long
    compile or epoch is never silent. Nothing with --json / --quiet.
    """

    def __init__(self, out: Output, every: float | None = None):
        import os
        import threading
        import time

        self.out = out
        self.enabled = out.progress_enabled
        self.plain = not self.enabled and not (out.json_mode or out.quiet)
        env = os.environ.get("BNNSHIFT_PROGRESS_EVERY")
        self.every = every if every is not None else (float(env) if env else HEARTBEAT_SECONDS)
        self.bar = self.total_task = self.task = None
        self._clock = time.monotonic
        self._t0 = self._clock()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self.n = 0
        self.finished = 0  # candidates trained in this run
        self.skipped = 0  # from the journal
        self.current: tuple | None = None  # (shift, seed, i)
        self.done = 0
        self.steps: int | None = None
        self._last_line = self._t0
        self._first: tuple[float, float] | None = None  # (time, fraction) at the first step report
        self.rung_at: tuple[int, int, int] | None = None  # successive halving: (rung, its steps, epoch steps)
        self.between: tuple[int, int, int] | None = None  # halving between rungs: (rung, measured, eliminated)
        self.note: str | None = None  # work after a candidate's last step (its paused state saved, its measures)

    # ------------------------------------------------------------------ context
    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), TaskProgressColumn(),
                                MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                console=self.out.err, transient=False)
            self.bar.__enter__()
        elif self.plain and self.every > 0:
            import threading

            self._thread = threading.Thread(target=self._beat, name="bnnshift-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        if self.bar is not None:
            self.bar.__exit__(*exc)

    # ------------------------------------------------------------------ state
    def fraction(self) -> float:
        """Share of this run's candidates done, the current one's steps included."""
        todo = max(1, self.n - self.skipped)
        cur = (self.done / self.steps) if self.steps else 0.0
        return min(1.0, (self.finished + (cur if self.current else 0.0)) / todo)

    def eta(self) -> float | None:
        """Seconds left at the rate measured since the first training step (a compile before it
        would make the first candidate look slow)."""
        f = self.fraction()
        if self._first is None or f <= self._first[1]:
            return None
        t1, f1 = self._first
        return (1.0 - f) * (self._clock() - t1) / (f - f1)

    def _rung_label(self) -> str:
        """``rung 1 (to step 58 of 234) `` in a successive-halving search (rungs numbered as in the
        report), else empty."""
        if self.rung_at is None:
            return ""
        r, steps, total = self.rung_at
        return f"rung {r} (to step {steps} of {total}) "

    def status_line(self) -> str:
        with self._lock:
            elapsed = _hms(self._clock() - self._t0)
            if self.current is None:
                if self.between is not None:
                    r, k, n = self.between
                    return (f"search: rung {r} done, measuring eliminated shifts {k}/{n} (BN re-estimation, "
                            f"+1 share probe), {elapsed}")
                if self.n == 0:  # before the first candidate: data, the model's scan, --compile auto's timing
                    return f"search: preparing (loading data, scanning the model, choosing the training step), {elapsed}"
                return f"search: {self.finished + self.skipped}/{self.n} candidates, {elapsed}"
            shift, seed, i = self.current
            what = ("compiling / first step" if self.steps is None else f"step {self.done}/{self.steps}")
            if self.note:
                what += f", {self.note}"
            return (f"[{i + 1}/{self.n}] {self._rung_label()}t={shift:+g} seed={seed}: {what}; search "
                    f"{self.fraction() * 100:.0f}% done, {elapsed} elapsed, ETA {_hms(self.eta())}")

    def rung(self, r, n_rungs, steps, total):
        """Successive halving: rung ``r`` (0-based, as in the report) trains its shifts to ``steps``
        of the epoch's ``total``."""
        with self._lock:
            self.rung_at = (int(r), int(steps), int(total))

    def transition(self, r, k, n):
        """Successive halving between rungs: the ``k``-th of ``n`` eliminated candidates of rung
        ``r`` is measured (BN re-estimation, +1 share probe); the bar and the heartbeat say so."""
        with self._lock:
            self.between = (int(r), int(k), int(n))
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, description=f"rung {r} done: measuring eliminated shifts {k}/{n}",
                            completed=k, total=max(1, n))

    def phase(self, text):
        """Work on the current candidate after its last step (successive halving: its paused state
        saved, its +1 shares measured): the bar and the heartbeat say ``text`` until the next hook."""
        with self._lock:
            self.note = str(text)
            cur = self.current
        if self.bar is not None and self.task is not None and cur is not None:
            self.bar.update(self.task, description=f"[{cur[2] + 1}/{self.n}] {self._rung_label()}t={cur[0]:+g} "
                                                   f"seed={cur[1]}: {text}")

    def _beat(self) -> None:
        while not self._stop.wait(min(self.every, 1.0)):
            if self._clock() - self._last_line >= self.every:
                self._last_line = self._clock()
                self.out.info(self.status_line())

    # ------------------------------------------------------------------ hooks
    def start(self, shift, seed, i, n):
        with self._lock:
            self.n, self.current, self.done, self.steps = n, (shift, seed, i), 0, None
            self.between = self.note = None
        if self.bar is not None:
            if self.total_task is None:
                self.total_task = self.bar.add_task("search", total=n - self.skipped)
            desc = f"[{i + 1}/{n}] {self._rung_label()}t={shift:+g} seed={seed}: compiling / first step"
            if self.task is None:
                self.task = self.bar.add_task(desc, total=None)
            else:
                self.bar.reset(self.task, description=desc, total=None)

    def step(self, done, total):
        with self._lock:
            first = self.steps is None
            self.done, self.steps = done, total
            if self._first is None:
                self._first = (self._clock(), self.fraction())
            cur = self.current
        if self.bar is not None and self.task is not None:
            kw = {}
            if first and cur is not None:
                kw["description"] = f"[{cur[2] + 1}/{self.n}] {self._rung_label()}t={cur[0]:+g} seed={cur[1]}"
            self.bar.update(self.task, completed=done, total=total, **kw)
            if self.total_task is not None:
                self.bar.update(self.total_task, completed=self.fraction() * max(1, self.n - self.skipped))

    def end(self, r, i, n):
        with self._lock:
            self.n = n
            self.finished += 1
            self.current = self.note = None
        line = f"[{i + 1}/{n}] {_result_rung(r, self.rung_at)}t={r.shift:+g} seed={r.seed}: " + (
            f"{r.score * 100:.2f}%{_result_steps(r, self.rung_at)} ({(r.seconds or 0):.1f}s)" if r.ok
            else f"failed: {r.error}")
        if self.bar is not None:
            from rich.markup import escape

            self.bar.console.print(escape(line) if r.ok else escape(line).replace("failed", "[red]failed[/red]", 1))
            if self.total_task is not None:
                self.bar.update(self.total_task, completed=self.finished)
        elif self.plain:
            self._last_line = self._clock()
            self.out.info(line + f"; ETA {_hms(self.eta())}")

    def skip(self, r, i, n):
        with self._lock:
            self.n = n
            self.skipped += 1
        if not self.out.json_mode and not self.out.quiet:
            self.out.info(f"[{i + 1}/{n}] {_result_rung(r, self.rung_at)}t={r.shift:+g} seed={r.seed}: from the journal")


def _result_rung(r, rung_at) -> str:
    """``rung 1 `` for a successive-halving candidate's line (its own rung), else empty."""
    rung = getattr(r, "rung", None)
    return f"rung {rung} " if rung is not None and rung_at is not None else ""


def _result_steps(r, rung_at) -> str:
    """`` after 58/234 steps`` when a halving score covers part of the epoch: a score after fewer
    steps is not comparable with one after the whole epoch."""
    steps = getattr(r, "steps", None)
    if rung_at is None or steps is None:
        return ""
    return f" after {steps}/{rung_at[2]} steps"


def print_export(out: Output, r) -> None:
    """The export's line (and its warnings) for a human."""
    flips = "not checked" if r.sign_flip_share is None else f"{r.sign_flip_share:.2e} over {r.sites_checked} sites"
    ties = getattr(r, "tie_flips", 0) or 0
    if ties:  # flips at |x - t| within float tolerance: counted apart, not failures
        flips += f" ({ties} ties at the threshold and {getattr(r, 'flips_after_tie', 0)} flips after them not counted)"
    out.text(f"ONNX {r.path}: opset {r.opset}, {r.nodes} nodes ({r.exporter}, optimizer {'on' if r.optimize else 'off'}); "
             f"onnxruntime vs torch: max |dlogit| {r.max_abs_diff:.2e}, top-1 agreement {r.top1_agreement:.3f}, "
             f"sign flips {flips}")
    for w in r.warnings:
        out.warn(w)
