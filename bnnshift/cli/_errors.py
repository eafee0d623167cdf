"""Map known exceptions to one-line messages with a fix and a documented exit code.

Set BNNSHIFT_DEBUG=1 to see tracebacks.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable

from ..errors import EXIT_ERROR, EXIT_INTERRUPTED, BnnshiftError


def _print_error(msg: str, json_mode: bool = False, exit_code: int = EXIT_ERROR, hint: str | None = None,
                 message: str | None = None) -> None:
    """One line on stderr; with --json also ``{"error", "hint", "exit_code"}`` on stdout
    (docs/error.schema.json), so a script reading stdout never gets nothing."""
    sys.stderr.write(f"error: {msg}\n")
    sys.stderr.flush()
    if json_mode:
        import json

        from ._output import restore_stdout

        out = restore_stdout()
        out.write(json.dumps({"error": message if message is not None else msg, "hint": hint,
                              "exit_code": exit_code}) + "\n")
        out.flush()


def handle_errors(fn: Callable) -> Callable:
    """Decorator for command functions: exceptions -> one line on stderr + exit code."""
    import typer

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        json_mode = bool(kwargs.get("json_"))
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except BnnshiftError as exc:
            if os.environ.get("BNNSHIFT_DEBUG"):
                raise
            _print_error(exc.one_line(), json_mode, exc.exit_code, exc.hint, exc.message)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            # a search journals each finished candidate: say how to continue
            hint = ("finished candidates are in the journal: rerun the same command with --resume"
                    if "resume" in kwargs and kwargs.get("out_dir") else None)
            _print_error("interrupted" + (f" ({hint})" if hint else ""), json_mode, EXIT_INTERRUPTED, hint,
                         "interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:  # noqa: BLE001 - last resort: still one line
            if os.environ.get("BNNSHIFT_DEBUG"):
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            _print_error(f"{type(exc).__name__}: {first} (unexpected; rerun with BNNSHIFT_DEBUG=1 for a traceback "
                         "and report it)", json_mode, EXIT_ERROR)
            raise typer.Exit(EXIT_ERROR) from None

    return wrapper
