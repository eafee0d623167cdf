"""Which patch recipes may name code to run: a local trust record, like ssh's ``known_hosts``.

A recipe (``patch.json``) names the model it was made from. For ``zoo:``, ``timm:`` and
``torchvision:`` specs that is data: a registered name built as usual. A ``file.py:fn`` or
``pkg.mod:fn`` spec, however, is code that rebuilding the model imports and calls, so a patch
directory received from elsewhere could run anything (``subprocess:getoutput``). bnnshift
therefore imports such a spec only when

1. the user names the model on the command line (``--model``; ``load_patched(dir, model=...)``):
   trusted for this run only, nothing recorded;
2. the user vouches for the directory (``--trust-recipe``; ``load_patched(dir, trust=True)``):
   this run only, nothing recorded, and exactly the file the refusal named is run (its sha256
   must still be the one in ``patch.json``); or
3. the recipe was written by bnnshift for this user on this machine from a model the user named:
   ``bnnshift patch``, ``search --patch-out`` and the library's ``build_recipe`` +
   ``save_patched`` append one line to the trust record (``fold`` carries the line forward when
   it rewrites a recipe that was trusted by the record). The line pins the sha256 of the
   ``patch.json`` bytes, of the model file and of every local module it imported from its
   folder. A recipe whose bytes hash to a recorded value is trusted, but each pinned file must
   still hash to its recorded value, else the load is refused naming the file.

The record is ``$BNNSHIFT_TRUST_FILE``, else ``$XDG_STATE_HOME/bnnshift/trusted_recipes``, else
``~/.local/state/bnnshift/trusted_recipes``: one JSON object per line (JSON escapes a newline in
a path, so no path can inject a line), appended with one ``write`` (atomic for short lines on a
local POSIX file system, so parallel CI jobs do not interleave). Lines are validated on read; a
line that is not a well-formed record (including the space-separated lines of bnnshift < 0.9)
is ignored, so such a recipe needs ``--model`` or ``--trust-recipe`` once (``bnnshift patch``
again records it).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping

__all__ = ["trust_file", "is_trusted", "trusted_entry", "record_trusted", "local_modules", "CODE_KINDS"]

CODE_KINDS = ("file", "module")  # spec kinds whose rebuild imports and calls user code
RECORD_VERSION = 1
_HEX64 = re.compile(r"[0-9a-f]{64}")


def trust_file() -> Path:
    """Where the trust record lives (see the module docstring)."""
    explicit = os.environ.get("BNNSHIFT_TRUST_FILE")
    if explicit:
        return Path(explicit).expanduser()
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "bnnshift" / "trusted_recipes"


def _valid_pins(pins: Any) -> bool:
    if not isinstance(pins, dict):
        return False
    for rel, sha in pins.items():
        if not isinstance(rel, str) or not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            return False
        p = Path(rel)
        if not rel or p.is_absolute() or ".." in p.parts or "\n" in rel:
            return False
    return True


def _parse(line: str) -> dict[str, Any] | None:
    """One record line, or None when it is not a well-formed version-1 record."""
    try:
        d = json.loads(line)
    except ValueError:
        return None
    if not isinstance(d, dict) or d.get("v") != RECORD_VERSION:
        return None
    sha = d.get("recipe_sha256")
    if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
        return None
    if not isinstance(d.get("dir", ""), str) or not _valid_pins(d.get("pins", {})):
        return None
    return d


def trusted_entry(recipe_sha256: str | None) -> dict[str, Any] | None:
    """The (last) record line for ``recipe_sha256`` (hex sha256 of a patch.json's bytes) as a dict
    ``{"v": 1, "recipe_sha256", "time", "dir", "pins": {path relative to the model file's folder:
    sha256}}``, or None when not recorded (or the record cannot be read)."""
    if not recipe_sha256:
        return None
    found = None
    try:
        with open(trust_file(), encoding="utf-8", errors="replace") as fh:
            for line in fh:
                d = _parse(line)
                if d is not None and d["recipe_sha256"] == recipe_sha256:
                    found = d
    except OSError:
        return None
    return found


def is_trusted(recipe_sha256: str | None) -> bool:
    """True if ``recipe_sha256`` (hex sha256 of a patch.json's bytes) is in the trust record."""
    return trusted_entry(recipe_sha256) is not None


def local_modules(model_file: str | os.PathLike[str]) -> dict[str, str]:
    """``{path relative to the folder of model_file: sha256}`` of ``model_file`` itself (key its
    name) and of every module imported in this process whose source lies in that folder or below
    (outside ``site-packages`` / ``dist-packages`` and bnnshift itself): what the trust record
    pins besides the recipe. Paths are POSIX strings; unreadable files are skipped."""
    from ._io import sha256_file

    folder = os.path.realpath(os.path.dirname(os.path.abspath(model_file)))
    own = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
    files = {os.path.realpath(os.path.abspath(model_file))}
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if not isinstance(f, str) or not f.endswith(".py"):
            continue
        rf = os.path.realpath(f)
        if not rf.startswith(folder + os.sep) or rf.startswith(own + os.sep):
            continue
        parts = Path(os.path.relpath(rf, folder)).parts
        if any(p in ("site-packages", "dist-packages") for p in parts):
            continue
        files.add(rf)
    pins: dict[str, str] = {}
    for rf in sorted(files):
        rel = Path(os.path.relpath(rf, folder)).as_posix()
        if "\n" in rel or rel.startswith("../"):
            continue  # not a name a record line may hold (never importable anyway)
        try:
            pins[rel] = sha256_file(rf)
        except OSError:
            continue
    return pins


def record_trusted(recipe_sha256: str, directory: str | os.PathLike[str],
                   pins: Mapping[str, str] | None = None) -> bool:
    """Append a record line for ``recipe_sha256`` with ``pins`` (see :func:`local_modules`);
    False (and nothing raised) if it cannot be written, e.g. a read-only home: the recipe then
    needs ``--model`` or ``--trust-recipe``. Raises ValueError for a malformed sha256 / pin."""
    pins = dict(pins or {})
    if not _HEX64.fullmatch(str(recipe_sha256)) or not _valid_pins(pins):
        raise ValueError("record_trusted: recipe_sha256 must be 64 lower-case hex digits and pins relative paths")
    old = trusted_entry(recipe_sha256)
    if old is not None and old.get("pins", {}) == pins:
        return True
    path = trust_file()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rec = {"v": RECORD_VERSION, "recipe_sha256": recipe_sha256, "time": stamp,
           "dir": os.path.abspath(directory), "pins": pins}
    line = (json.dumps(rec, ensure_ascii=True, sort_keys=True) + "\n").encode("ascii")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError:
        return False
    return True
