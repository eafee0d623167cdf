"""Run a bnnshift module in an isolated child process (as torch.onnx's ``_isolated.safe_call``).

The protocol, generic over the module that runs in the child:

* the child is ``python -I`` (no cwd / script directory on ``sys.path``, no ``PYTHON*``
  variables, no user site) with ``sys.path`` given explicitly (:func:`child_command`) and the
  ``bnnshift`` package loaded from this file's location, so a ``json.py`` planted in the cwd is
  never imported;
* the child writes one JSON report file (never a pickle) inside a temporary directory of the
  parent (:func:`child_dir`); the parent reads it and moves any output into place itself, so a
  child that outlives a killed parent can never write the destination;
* the child dies with its parent (Linux ``PR_SET_PDEATHSIG``, else a watcher thread:
  :func:`watch_parent`); Ctrl-C / SIGTERM in the parent end the child and propagate;
  a timeout ends it (:func:`run_child`);
* an error the child reports as ``{"error", "hint", "exit_code", "kind"}`` comes back as the
  exception class it was (:func:`child_error`), so its exit code and one line are those of the
  same failure in process.

Used by ``export`` (``python -m bnnshift.export``); torch-free.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

from .errors import BnnshiftError

__all__ = ["child_command", "child_dir", "run_child", "child_error", "error_payload", "watch_parent"]

_CHILD_BOOT = (
    "import sys, importlib.util as u\n"
    "sys.path[:] = [p for p in __import__('json').loads(sys.argv[1]) if p]\n"
    "spec = u.spec_from_file_location('bnnshift', sys.argv[2], submodule_search_locations=[sys.argv[3]])\n"
    "pkg = u.module_from_spec(spec); sys.modules['bnnshift'] = pkg; spec.loader.exec_module(pkg)\n"
    "mod = sys.argv[4]; del sys.argv[1:5]; sys.argv[0] = mod\n"
    "import runpy; runpy.run_module(mod, run_name='__main__', alter_sys=True)\n"
)

_STOP_SIGNALS = ("SIGINT", "SIGTERM")


def safe_sys_path(extra: Iterable[str] = ()) -> list[str]:
    """This process's ``sys.path`` without the caller's directory ('' or the cwd, which ``python
    -m`` / ``-c`` put first) and without bnnshift's own parent directory (the package is loaded
    by its location, so a source checkout's root adds nothing importable); ``extra`` appended."""
    cwd = os.path.realpath(os.getcwd())
    own_root = os.path.realpath(str(Path(__file__).resolve().parent.parent))
    keep: list[str] = []
    for p in sys.path:
        if not p or not os.path.isabs(p):
            continue  # '' and relative entries name the caller's directory
        rp = os.path.realpath(p)
        if rp in (cwd, own_root) or p in keep:
            continue
        keep.append(p)
    keep += [os.path.abspath(e) for e in extra if e and os.path.abspath(e) not in keep]
    return keep


def child_command(module: str, *, code_dirs: Iterable[str] = ()) -> list[str]:
    """``argv`` that runs ``python -m module`` isolated: ``python -I`` (no cwd / script
    directory, no ``PYTHON*`` variables, no user site) with ``sys.path`` set explicitly to this
    process's path minus the caller's directory, and the ``bnnshift`` package loaded from this
    file's location (so an editable install and a source checkout both work, and a ``json.py``
    or ``argparse.py`` lying in the cwd is never imported). ``code_dirs``: directories the
    user's own spec needs (a ``pkg.mod:fn`` spec resolved against the cwd), appended last so
    the standard library always wins. Append the module's own arguments to the list."""
    pkg_dir = Path(__file__).resolve().parent
    return [sys.executable, "-I", "-c", _CHILD_BOOT, json.dumps(safe_sys_path(code_dirs)),
            str(pkg_dir / "__init__.py"), str(pkg_dir), module]


def child_dir(prefix: str) -> tempfile.TemporaryDirectory:
    """The temporary directory a child writes in: ``<tmp>/<prefix><parent pid>-...``; leftovers
    of killed runs with the same ``prefix`` (their PID dead) are removed first."""
    from ._io import sweep_stale

    tmp_root = tempfile.gettempdir()
    sweep_stale(tmp_root, prefix=prefix)
    return tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-")


def run_child(cmd: list[str], timeout: float | None, *, error: type[BnnshiftError], what: str,
              hint: str | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` (text output captured); Ctrl-C / SIGTERM (``bnnshift._signals``) end the
    child and propagate.

    The signals are blocked while the child is forked (a Python handler raising inside the fork
    callbacks would be lost: "Exception ignored") and delivered right after; the child starts with
    them unblocked and dies with the parent. Raises ``error("<what> did not finish in Ns", hint)``
    after ``timeout`` seconds."""
    import signal

    block = {getattr(signal, n) for n in _STOP_SIGNALS if hasattr(signal, n)}
    can_mask = os.name == "posix" and hasattr(signal, "pthread_sigmask")
    child = None
    old = signal.pthread_sigmask(signal.SIG_BLOCK, block) if can_mask else None
    try:
        try:
            child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=_die_with_parent(os.getpid(), block if can_mask else ())
                                     if os.name == "posix" else None)
        finally:
            if can_mask:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a pending signal is raised here
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise error(f"{what} did not finish in {timeout:.0f}s", hint=hint) from None
    except BaseException:  # Ctrl-C / SIGTERM: end the child first, then unwind (temp dir removed)
        if child is not None:
            child.kill()
            child.wait()
        raise
    return subprocess.CompletedProcess(cmd, child.returncode, out, err)


def _die_with_parent(parent_pid: int, unblock: Iterable[int] = ()):
    """``preexec_fn`` for a child: SIGKILL it when the parent dies (Linux PR_SET_PDEATHSIG);
    exit at once if the parent is already gone (the race before prctl)."""

    def pre() -> None:
        import signal

        if unblock:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, set(unblock))

        if sys.platform.startswith("linux"):
            try:
                import ctypes

                ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
            except (OSError, AttributeError):
                pass
        if os.getppid() != parent_pid:
            os._exit(1)

    return pre


def watch_parent(parent_pid: int, interval: float = 0.5) -> None:
    """In the child: exit when the parent is gone (where PR_SET_PDEATHSIG does not exist)."""
    import threading
    import time

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(interval)

    threading.Thread(target=watch, daemon=True, name="bnnshift-parent-watch").start()


def error_payload(exc: BnnshiftError) -> dict[str, Any]:
    """In the child: the JSON the parent turns back into ``exc`` (:func:`child_error`)."""
    return {"error": exc.message, "hint": exc.hint, "exit_code": exc.exit_code, "kind": type(exc).__name__}


def child_error(data: dict[str, Any], *, extra: Iterable[type[BnnshiftError]] = (),
                default: type[BnnshiftError] = BnnshiftError,
                by_exit_code: dict[int, type[BnnshiftError]] | None = None) -> BnnshiftError:
    """The child's error as the exception it was: its class by name among bnnshift's
    (``errors``) and ``extra``, else the class ``by_exit_code`` gives its exit code, else
    ``default``; message and hint as the child wrote them."""
    from . import errors

    known = {c.__name__: c for c in vars(errors).values()
             if isinstance(c, type) and issubclass(c, BnnshiftError)}
    known.update({c.__name__: c for c in extra})
    cls = known.get(str(data.get("kind")))
    if cls is None:
        cls = (by_exit_code or {}).get(data.get("exit_code"), default)
    return cls(data["error"], hint=data.get("hint"))
