"""Fuzzed command lines for every command (real option names, legal / borderline / garbage
values): none may end in a traceback, an undocumented exit code or the catch-all line.
The in-suite run is small and deterministic; benchmarks/fuzz_cli.py runs >= 1000 lines
(the figure is in docs/reliability.md)."""
from __future__ import annotations

import tempfile

from hypothesis import HealthCheck, given, settings

from cli_fuzz import command_line, commands, run_line, stubbed_heavy_work


def test_every_command_is_fuzzed():
    assert {"scan", "search", "patch", "fold", "export", "report", "zoo"} <= set(commands())


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(argv=command_line())
def test_fuzzed_command_lines_end_in_one_documented_line(argv):
    with tempfile.TemporaryDirectory() as cwd, stubbed_heavy_work():
        code, err, problem = run_line(argv, cwd)
    assert problem is None, f"{argv!r}: {problem}"
    if code not in (0,) and err.strip():
        lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert len(lines) <= 1, err  # one error line (click's usage errors have their own format)
