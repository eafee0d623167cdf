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
RUNNABLE = sorted(p.name for p in DOCS.glob("*.md"))
# (page, index among its python/bash blocks) -> where that block is executed instead, and why
ELSEWHERE = {
    ("search.md", 0): "tests/test_search.py::test_docs_example_runs executes it (with its own OUT_DIR)",
    ("reproduction.md", 0): "the full study takes about 95 minutes; tests/test_reproduce_quick.py runs the quick modes",
    ("plugins.md", 0): "a third party's package (mybnn); the same register(api) calls are made by "
                       "plugins/bnnshift_zoo and checked by tests/test_zoo.py",
}
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
    ran = k = 0
    for i, (lang, opts, code) in enumerate(blocks((DOCS / name).read_text())):
        if lang == "python" and "file" in opts:
            (workdir / opts["file"]).write_text(code)
            continue
        if lang in ("python", "bash"):
            k += 1
            if (name, k - 1) in ELSEWHERE:
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
    return ran


@pytest.mark.parametrize("name", RUNNABLE)
def test_doc_runs(name, tmp_path):
    run_page(name, tmp_path)


def test_every_doc_code_block_is_run_somewhere():
    """Code a reader copies is python or bash and runs here, or is listed in ELSEWHERE with the
    test that runs it; pages without code are fine (text, TOML and output blocks are not code)."""
    code = {(p.name, k) for p in DOCS.glob("*.md")
            for k, _ in enumerate([b for b in blocks(p.read_text()) if b[0] in ("python", "bash")
                                   and "file" not in b[1]])}
    assert set(ELSEWHERE) <= code, set(ELSEWHERE) - code  # no stale exemption
    assert len(ELSEWHERE) <= 3
    for page in ("finetune.md", "your-model.md", "patch.md"):
        assert any(p == page for p, _ in code) and not any(p == page for p, _ in ELSEWHERE)
