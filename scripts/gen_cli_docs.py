"""Regenerate docs/cli.md from the commands' own --help (so the reference cannot drift)."""
import os
import subprocess
import sys

COMMANDS = ["scan", "search", "patch", "fold", "export", "report", "pack", "zoo"]
env = dict(os.environ, COLUMNS="110", NO_COLOR="1", TERM="dumb")
print("# CLI reference\n")
print("Generated from `bnnshift COMMAND --help` (`python scripts/gen_cli_docs.py > docs/cli.md`).")
print("Exit codes for every command: 0 ok, 1 error, 2 usage / bad spec, 3 no binary activation found,")
print("4 verification failed, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). With `--json`, stdout")
print("holds only JSON; messages go to stderr. `BNNSHIFT_DEBUG=1` shows tracebacks. JSON schema of")
print("`scan --json`: docs/scan.schema.json.\n")
for cmd in COMMANDS:
    out = subprocess.run([sys.executable, "-m", "bnnshift", cmd, "--help"], capture_output=True, text=True, env=env)
    print(f"## bnnshift {cmd}\n\n```\n{out.stdout.rstrip()}\n```\n")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bnnshift.validate import CATALOGUE  # noqa: E402

print("## Bad input\n")
print("Each is refused before any expensive work (model build, data loading, training) with one line")
print("on stderr that says what to do, and leaves no partial output (tests/test_reliability.py).")
print("Grids, seeds, learning rate, choices, paths and `--device` are checked before torch is even")
print("imported (docs/reliability.md). An entry with exit 0 is not refused: it is said in one line.\n")
print("| input | exit |\n|---|---|")
for what, code in CATALOGUE.values():
    print(f"| {what} | {code} |")
print()
