"""``python -m bnnshift``: the console script. ``-m`` puts the caller's directory first on
``sys.path``, so a ``json.py`` or ``typing_extensions.py`` lying there would shadow the standard
library; it is moved to the end (a ``pkg.mod:fn`` spec in the cwd still resolves, after the
standard library and the installed packages; docs/reliability.md)."""
import os
import sys


def _cwd_last() -> None:
    if not sys.path:
        return
    first = sys.path[0]
    try:
        is_cwd = first == "" or os.path.realpath(first) == os.path.realpath(os.getcwd())
    except OSError:
        is_cwd = first == ""
    if is_cwd:
        sys.path.append(sys.path.pop(0))


_cwd_last()

from bnnshift._entry import main  # noqa: E402

main()
