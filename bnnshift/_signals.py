"""Signals: SIGTERM unwinds like SIGINT (Ctrl-C), and both end in one line and a documented code.

``install()`` makes SIGTERM raise :class:`bnnshift.errors.Terminated` (a ``KeyboardInterrupt``)
in the main thread, so every ``with`` / ``finally`` that cleans up after Ctrl-C (temporary
directories, the exporter child, DataLoader workers, the output lock) runs for SIGTERM too.
``interrupted_exit(exc)`` prints the one line and returns the exit code: 130 for SIGINT, 143
for SIGTERM (docs/reliability.md). Only the standard library is imported here, so the console
script installs it before anything else.
"""
from __future__ import annotations

import signal
import sys
import threading

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
_state = {"signum": None, "reported": False}  # the last signal received, and whether its line was printed


def _on_term(signum, frame):  # noqa: ARG001
    from .errors import Terminated

    _state["signum"] = signum
    raise Terminated(signum)


def _on_int(signum, frame):  # noqa: ARG001
    _state["signum"] = signum
    raise KeyboardInterrupt


def pending() -> int | None:
    """The signal received whose one line was not printed yet (None: none, or already said)."""
    return None if _state["reported"] else _state["signum"]


def _early(signum, frame):  # noqa: ARG001
    """Before the command runs (imports): nothing to clean up yet, so say it and leave."""
    import os

    code = EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED
    line = interrupted_line(code)
    try:
        os.write(2, f"error: {line}\n".encode())
        if "--json" in sys.argv[1:]:  # docs/error.schema.json, as every --json failure
            import json

            os.write(1, (json.dumps({"error": line, "hint": None, "exit_code": code}) + "\n").encode())
    except OSError:
        pass
    os._exit(code)


def install_early() -> None:
    """SIGINT / SIGTERM print the one line and exit 130 / 143 at once: for the console script's
    imports, before :func:`install` takes over (kept where the parent ignores the signal)."""
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler, None):
                signal.signal(sig, _early)
    except (ValueError, OSError, AttributeError):
        pass


def install() -> None:
    """SIGTERM -> ``Terminated`` in the main thread (no-op elsewhere, or where SIGTERM is ignored
    by the parent, e.g. ``nohup``); SIGINT keeps Python's ``KeyboardInterrupt``."""
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None, _early, _on_term):
            signal.signal(signal.SIGTERM, _on_term)
        if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, signal.SIG_DFL, _early):
            signal.signal(signal.SIGINT, _on_int)
    except (ValueError, OSError, AttributeError):  # not the main interpreter / no SIGTERM here
        pass


def exit_code(exc: BaseException | None) -> int:
    """143 for SIGTERM (``Terminated``, also as the cause of another exception, or the signal
    recorded when ``exc`` is None), else 130."""
    from .errors import Terminated

    if exc is None:
        return EXIT_TERMINATED if _state["signum"] == signal.SIGTERM else EXIT_INTERRUPTED
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, Terminated):
            return EXIT_TERMINATED
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return EXIT_INTERRUPTED


def interrupted_line(code: int, hint: str | None = None) -> str:
    """The message for exit ``code`` (marks the signal as reported)."""
    _state["reported"] = True
    what = "terminated (SIGTERM)" if code == EXIT_TERMINATED else "interrupted"
    return what + (f" ({hint})" if hint else "")


def interrupted_exit(exc: BaseException | None, hint: str | None = None) -> int:
    """Write the one line for an interrupt on stderr and return its exit code."""
    code = exit_code(exc)
    try:
        sys.stderr.write(f"error: {interrupted_line(code, hint)}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    return code
