"""Docs that must follow the code (issue 23, item 6): docs/cli.md is exactly what
scripts/gen_cli_docs.py prints today, and docs/architecture.md names every module of the package."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_generated():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_cli_docs.py")], capture_output=True, text=True,
                       env=env, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout == (ROOT / "docs" / "cli.md").read_text(), \
        "docs/cli.md is stale: run `python scripts/gen_cli_docs.py > docs/cli.md`"


def test_architecture_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    skip = {"__init__", "__main__", "_version"}
    missing = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "bnnshift").rglob("*.py"))
               if p.stem not in skip and p.stem not in text]
    assert not missing, f"docs/architecture.md does not name: {missing}"
