"""Map known exceptions to one-line messages with a fix and a documented exit code.

Set BNNSHIFT_DEBUG=1 to see tracebacks.
"""
from __future__ import annotations

import errno
import functools
import os
import sys
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Failure:
    """What the user is told about one failure: ``line`` on stderr (after ``error: ``), and under
    ``--json`` ``{"error": message, "hint": hint, "exit_code": exit_code}`` on stdout."""

    line: str
    message: str
    hint: str | None
    exit_code: int


def _bnnshift(exc: BaseException, ctx: dict) -> Failure:
    return Failure(exc.one_line(), exc.message, exc.hint, exc.exit_code)  # type: ignore[attr-defined]


def _interrupted(exc: BaseException, ctx: dict) -> Failure:
    from .. import _signals

    code = _signals.exit_code(exc)
    # a search journals each finished candidate: say how to continue
    hint = ("finished candidates are in the journal: rerun the same command with --resume"
            if "resume" in ctx and ctx.get("out_dir") else None)
    return Failure(_signals.interrupted_line(code, hint), _signals.interrupted_line(code), hint, code)


_OOM_HINT = "lower --batch-size, --input-shape or the model's size"


def _memory(exc: BaseException, ctx: dict) -> Failure:
    return Failure(f"out of memory ({_OOM_HINT})", "out of memory", _OOM_HINT, EXIT_ERROR)


def _os_error(exc: BaseException, ctx: dict) -> Failure:
    line, code = _os_error_line(exc)  # type: ignore[arg-type]
    return Failure(line, line, _OS_HINTS.get(getattr(exc, "errno", None) or -1, "check the path and the disk"), code)


def _environment(exc: BaseException, ctx: dict) -> Failure | None:
    known = _known_failure(exc)
    if known is None:
        return None
    return Failure(f"{known[0]} ({known[1]})", known[0], known[1], EXIT_ERROR)


def _unexpected(exc: BaseException, ctx: dict) -> Failure:
    first = str(exc).splitlines()[0] if str(exc) else ""
    line = (f"{type(exc).__name__}: {first} (unexpected; rerun with BNNSHIFT_DEBUG=1 for a traceback "
            "and report it)")
    return Failure(line, line, None, EXIT_ERROR)


@dataclass(frozen=True)
class Row:
    """One row of :data:`TABLE`: the exception types it catches, how it is described (``None``:
    not this row, try the next), and whether ``BNNSHIFT_DEBUG=1`` re-raises it (a traceback)."""

    catches: tuple[type[BaseException], ...]
    describe: Callable[[BaseException, dict], Failure | None]
    debug_traceback: bool = True


# exception -> (line, hint, exit code), first matching row wins; the last resort is for real bugs
TABLE: tuple[Row, ...] = (
    Row((BnnshiftError,), _bnnshift),
    Row((KeyboardInterrupt,), _interrupted, debug_traceback=False),  # Ctrl-C 130, SIGTERM 143
    Row((MemoryError,), _memory),
    Row((OSError,), _os_error),  # the environment: full disk, permissions, name too long...
    Row((Exception,), _environment),  # a killed DataLoader worker, a stopped rank, torch's OOM
    Row((Exception,), _unexpected),
)


def describe_failure(exc: BaseException, ctx: dict | None = None) -> tuple[Failure, Row] | None:
    """The first row of :data:`TABLE` that catches ``exc`` and its :class:`Failure` (``ctx``: the
    command's keyword arguments); ``None`` for what no row catches (``SystemExit``)."""
    for row in TABLE:
        if isinstance(exc, row.catches):
            failure = row.describe(exc, ctx or {})
            if failure is not None:
                return failure, row
    return None


def handle_errors(fn: Callable) -> Callable:
    """Decorator for command functions: an exception -> :data:`TABLE`'s one line on stderr (and
    the JSON error object with ``json_=True``) + its exit code (``typer.Exit``)."""
    import typer

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except (Exception, KeyboardInterrupt) as exc:
            found = describe_failure(exc, kwargs)
            if found is None:  # pragma: no cover - the last row catches every Exception
                raise
            failure, row = found
            if row.debug_traceback and os.environ.get("BNNSHIFT_DEBUG"):
                raise
            _print_error(failure.line, bool(kwargs.get("json_")), failure.exit_code, failure.hint, failure.message)
            raise typer.Exit(failure.exit_code) from None

    return wrapper
