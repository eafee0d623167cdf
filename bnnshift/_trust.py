"""Which patch recipes may name code to run: a local trust record, like ssh's ``known_hosts``.

A recipe (``patch.json``) names the model it was made from. For ``zoo:``, ``timm:`` and
``torchvision:`` specs that is data: a registered name built as usual. A ``file.py:fn`` or
``pkg.mod:fn`` spec, however, is code that rebuilding the model imports and calls, so a patch
directory received from elsewhere could run anything (``subprocess:getoutput``). bnnshift
therefore imports such a spec only when

1. the user names the model on the command line (``--model``; ``load_patched(dir, model=...)``),
2. the user vouches for the directory (``--trust-recipe``; ``load_patched(dir, trust=True)``), or
3. the recipe was written by bnnshift for this user on this machine: ``save_patched`` appends
   the sha256 of the ``patch.json`` bytes it wrote to the trust record, and a recipe whose
   bytes hash to a recorded value is trusted. Editing one byte of ``patch.json`` (or copying in
   someone else's) makes it untrusted.

The record is ``$BNNSHIFT_TRUST_FILE``, else ``$XDG_STATE_HOME/bnnshift/trusted_recipes``, else
``~/.local/state/bnnshift/trusted_recipes``: one ``SHA256 UTC-TIME DIRECTORY`` line per recipe,
appended with one ``write`` (atomic for short lines on a local POSIX file system, so parallel
CI jobs do not interleave).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["trust_file", "is_trusted", "record_trusted", "CODE_KINDS"]

CODE_KINDS = ("file", "module")  # spec kinds whose rebuild imports and calls user code


def trust_file() -> Path:
    """Where the trust record lives (see the module docstring)."""
    explicit = os.environ.get("BNNSHIFT_TRUST_FILE")
    if explicit:
        return Path(explicit).expanduser()
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "bnnshift" / "trusted_recipes"


def is_trusted(recipe_sha256: str) -> bool:
    """True if ``recipe_sha256`` (hex sha256 of a patch.json's bytes) is in the trust record."""
    try:
        with open(trust_file(), encoding="utf-8") as fh:
            return any(line.split(" ", 1)[0].strip() == recipe_sha256 for line in fh)
    except OSError:
        return False


def record_trusted(recipe_sha256: str, directory: str | os.PathLike[str]) -> bool:
    """Append ``recipe_sha256`` to the trust record; False (and nothing raised) if it cannot be
    written, e.g. a read-only home: the recipe then needs ``--model`` or ``--trust-recipe``."""
    if is_trusted(recipe_sha256):
        return True
    path = trust_file()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    line = f"{recipe_sha256} {stamp} {os.path.abspath(directory)}\n".encode("utf-8", "replace")
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
