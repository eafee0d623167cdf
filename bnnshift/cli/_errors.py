"""Map known exceptions to one-line messages with a fix and a documented exit code.

Set BNNSHIFT_DEBUG=1 to see tracebacks.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable

from ..errors import EXIT_ERROR, EXIT_INTERRUPTED, BnnshiftError


def _print_error(msg: str) -> None:
    sys.stderr.write(f"error: {msg}\n")
    sys.stderr.flush()


def handle_errors(fn: Callable) -> Callable:
    """Decorator for command functions: exceptions -> one line on stderr + exit code."""
    import typer

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except BnnshiftError as exc:
            if os.environ.get("BNNSHIFT_DEBUG"):
                raise
            _print_error(exc.one_line())
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _print_error("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:  # noqa: BLE001 - last resort: still one line
            if os.environ.get("BNNSHIFT_DEBUG"):
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            _print_error(f"{type(exc).__name__}: {first} (unexpected; rerun with BNNSHIFT_DEBUG=1 for a traceback "
                         "and report it)")
            raise typer.Exit(EXIT_ERROR) from None

    return wrapper
