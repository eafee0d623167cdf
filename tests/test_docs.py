"""The docs' code runs as written: fenced ``python`` / ``bash`` blocks of each runnable page are
executed in order in one empty directory (``python file=NAME`` blocks are written to NAME
first, as the reader would save them). ``bnnshift`` on the PATH is this checkout's CLI."""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import bnnshift

DOCS = Path(__file__).resolve().parent.parent / "docs"
ROOT = Path(bnnshift.__file__).resolve().parent.parent
RUNNABLE = ["finetune.md", "your-model.md"]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.S | re.M)


def blocks(text: str) -> list[tuple[str, dict[str, str], str]]:
    """(language, {key: value} from the info string, code) of each fenced block."""
    out = []
    for m in FENCE.finditer(text):
        info = m.group(1).split()
        lang = info[0] if info else ""
        opts = dict(w.split("=", 1) for w in info[1:] if "=" in w)
        out.append((lang, opts, m.group(2)))
    return out


def test_fence_parser():
    text = "a\n```python file=x.py\nprint(1)\n```\n```bash\necho hi\n```\n```\nplain\n```\n"
    assert blocks(text) == [("python", {"file": "x.py"}, "print(1)\n"), ("bash", {}, "echo hi\n"), ("", {}, "plain\n")]


def run_page(name: str, workdir: Path) -> None:
    shim = workdir / ".bin"
    shim.mkdir()
    (shim / "bnnshift").write_text(f"#!/bin/sh\nexec {sys.executable} -m bnnshift \"$@\"\n")
    (shim / "bnnshift").chmod(stat.S_IRWXU)
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), str(ROOT / "plugins"), os.environ.get("PYTHONPATH"))
                                         if p),
           "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    ran = 0
    for i, (lang, opts, code) in enumerate(blocks((DOCS / name).read_text())):
        if lang == "python" and "file" in opts:
            (workdir / opts["file"]).write_text(code)
            continue
        if lang == "python":
            cmd = [sys.executable, "-c", code]
        elif lang == "bash":
            cmd = ["bash", "-euo", "pipefail", "-c", code]
        else:
            continue  # output, TOML, JSON: not commands
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{name} block {i} ({lang}) failed:\n{code}\n--- stderr:\n{proc.stderr[-3000:]}"
        ran += 1
    assert ran, f"{name}: no runnable block"


@pytest.mark.parametrize("name", RUNNABLE)
def test_doc_runs(name, tmp_path):
    run_page(name, tmp_path)
