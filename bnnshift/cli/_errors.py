"""Map known exceptions to one-line messages with a fix and a documented exit code.

Set BNNSHIFT_DEBUG=1 to see tracebacks.
"""
from __future__ import annotations

import errno
import functools
import os
import sys
from typing import Callable

from ..errors import EXIT_ERROR, EXIT_USAGE, BnnshiftError


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


_OS_HINTS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space (disk quota)",
    errno.EACCES: "check the permissions or choose another path",
    errno.EPERM: "check the permissions or choose another path",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path",
    errno.EISDIR: "give a file path, not a directory",
    errno.ENAMETOOLONG: "choose a shorter file name (at most 255 bytes per name)",
    errno.EMFILE: "too many open files: raise `ulimit -n`",
}


def _os_error_line(exc: OSError) -> tuple[str, int]:
    """One line and an exit code for an OSError (2 for a name that is too long: usage)."""
    where = f"{exc.filename}: " if exc.filename else ""
    if len(where) > 80:
        where = where[:60] + "...: "
    hint = _OS_HINTS.get(exc.errno or -1, "check the path and the disk")
    code = EXIT_USAGE if exc.errno == errno.ENAMETOOLONG else EXIT_ERROR
    return f"{where}{exc.strerror or exc} ({hint})", code


def _known_failure(exc: BaseException) -> tuple[str, str] | None:
    """(line, hint) for failures of the environment that surface as a plain ``RuntimeError``: a
    killed DataLoader worker, a torchrun rank that stopped, an allocation torch refused. Exit 1."""
    text = str(exc).strip()
    first = (text.splitlines() or [""])[0]
    low = text.lower()
    import re

    m = re.search(r"DataLoader worker \(pid\(?s?\)? ?([\d, ]+)\)", text)
    if m or "dataloader worker" in low and ("exited unexpectedly" in low or "killed" in low):
        who = f"pid {m.group(1).strip()}" if m else "a worker"
        return (f"a DataLoader worker ({who}) was killed or exited unexpectedly",
                "often out of memory: lower --workers or --batch-size; the journal keeps every finished "
                "candidate (rerun with --resume)")
    dist = type(exc).__name__ in ("DistBackendError", "DistNetworkError", "DistError") or any(
        k in low for k in ("gloo", "nccl", "connection closed by peer", "connection reset by peer",
                           "broken pipe", "socket timeout", "heartbeat monitor"))
    if dist and os.environ.get("RANK") is not None:
        rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE", "?")
        return (f"rank {rank} of {world}: another torchrun rank stopped ({first[:120]})",
                "see the first failing rank's message; restart all ranks with --resume")
    if "can't allocate memory" in low or "defaultcpuallocator" in low or "out of memory" in low:
        return (f"out of memory: {first[:160]}",
                "lower --batch-size, --bn-recalib-batches, --input-shape or the model's size")
    return None


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
        except KeyboardInterrupt as exc:  # Ctrl-C (130) or SIGTERM (bnnshift._signals: 143)
            from .. import _signals

            code = _signals.exit_code(exc)
            # a search journals each finished candidate: say how to continue
            hint = ("finished candidates are in the journal: rerun the same command with --resume"
                    if "resume" in kwargs and kwargs.get("out_dir") else None)
            _print_error(_signals.interrupted_line(code, hint), json_mode, code, hint,
                         _signals.interrupted_line(code))
            raise typer.Exit(code) from None
        except MemoryError:
            if os.environ.get("BNNSHIFT_DEBUG"):
                raise
            _print_error("out of memory (lower --batch-size, --input-shape or the model's size)", json_mode,
                         EXIT_ERROR, "lower --batch-size, --input-shape or the model's size", "out of memory")
            raise typer.Exit(EXIT_ERROR) from None
        except OSError as exc:  # the environment: full disk, permissions, name too long...
            if os.environ.get("BNNSHIFT_DEBUG"):
                raise
            msg, code = _os_error_line(exc)
            _print_error(msg, json_mode, code, _OS_HINTS.get(exc.errno or -1, "check the path and the disk"))
            raise typer.Exit(code) from None
        except Exception as exc:  # noqa: BLE001 - last resort: still one line
            if os.environ.get("BNNSHIFT_DEBUG"):
                raise
            known = _known_failure(exc)
            if known is not None:
                _print_error(f"{known[0]} ({known[1]})", json_mode, EXIT_ERROR, known[1], known[0])
                raise typer.Exit(EXIT_ERROR) from None
            first = str(exc).splitlines()[0] if str(exc) else ""
            _print_error(f"{type(exc).__name__}: {first} (unexpected; rerun with BNNSHIFT_DEBUG=1 for a traceback "
                         "and report it)", json_mode, EXIT_ERROR)
            raise typer.Exit(EXIT_ERROR) from None

    return wrapper
