"""The console script's first code: signal handlers before any import, so that Ctrl-C or
SIGTERM at any moment (even while typer, rich or torch are being imported) ends in one line
and exit 130 / 143 instead of a traceback."""
from __future__ import annotations

import sys


def main() -> None:
    from . import _signals

    _signals.install_early()  # imports: one line and 130 / 143 at once (nothing to clean up yet)
    from ._io import fault_point

    fault_point("entry:imports")
    from .cli import main as cli_main

    cli_main()  # installs the unwinding handlers (bnnshift._signals.install)
