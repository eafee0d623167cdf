"""Fuzz the CLI with many command lines (default 1500) built from the real options of every
command; report how many ended in a traceback, an undocumented exit code or the catch-all
line (the target: 0), and the exit-code histogram. Results go in docs/reliability.md.

    PYTHONPATH=.:plugins OMP_NUM_THREADS=1 python3 benchmarks/fuzz_cli.py [--n 1500] [--seed 0]

Model building, data loading, exporting and studies are stubbed (tests/cli_fuzz.py): the run
measures every option check that happens before the expensive work.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from hypothesis import HealthCheck, given, settings  # noqa: E402

from cli_fuzz import command_line, run_line, stubbed_heavy_work  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    codes: collections.Counter = collections.Counter()
    per_cmd: collections.Counter = collections.Counter()
    problems: list[tuple[list[str], str]] = []
    reached = [0]  # lines that passed every option check (the stub raised)
    t0 = time.perf_counter()

    @settings(max_examples=a.n, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(argv=command_line())
    def one(argv):
        with tempfile.TemporaryDirectory() as cwd, stubbed_heavy_work():
            code, err, problem = run_line(argv, cwd)
        codes[code] += 1
        if "stub: expensive work reached" in err:
            reached[0] += 1
        per_cmd[argv[0]] += 1
        if problem:
            problems.append((argv, problem))

    import random

    random.seed(a.seed)
    one()
    total = sum(codes.values())
    summary = {"command_lines": total, "problems": len(problems), "passed_all_checks": reached[0], "exit_codes": dict(sorted(codes.items())),
               "per_command": dict(sorted(per_cmd.items())), "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(summary, indent=2))
    for argv, p in problems[:20]:
        print(f"PROBLEM {argv!r}: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
