"""The search journal: one JSON line per finished candidate, appended as soon as it ends.

Each line is written with a single ``write`` of a complete line, then flushed and fsynced,
so ``kill -9`` loses at most the candidate in flight. A torn last line (the process died
mid-write) and any line that is not a complete record are ignored when reading.
Records are keyed by ``(shift, seed, config_hash)``: a changed configuration never reuses
stale results.

Successive halving (``--schedule halving``) also writes *rung records*
(``"kind": "rung"``): a candidate's score after ``steps`` training steps, the path of its saved
training state (``states/...pt`` in the output directory, for continuing it) and whether it was
eliminated there. They are keyed by ``(shift, seed, config_hash, steps)`` and never count as
finished candidates (a full search does not mistake a half-trained candidate for a finished one).

One process owns an output directory at a time (``OutputLock``: an exclusive ``flock`` on
``OUT/.bnnshift.lock`` holding the owner's PID): a second search on the same ``--out`` is
refused before any work, so ``--force`` can never delete another run's journal.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from .errors import LockedError, OutputError
from ._io import LOCK_NAME, jsonable, sweep_stale

JOURNAL_NAME = "journal.jsonl"


def shift_key(shift: float) -> str:
    """A float-noise-free key for a shift (0.1 + 0.2 and 0.3 are the same candidate)."""
    v = round(float(shift), 9)
    return repr(0.0 if v == 0 else v)


def candidate_key(shift: float, seed: int, config_hash: str) -> tuple[str, int, str]:
    return (shift_key(shift), int(seed), str(config_hash))


def resolve_inside(directory: str | os.PathLike[str], rel: Any, what: str) -> Path:
    """``directory / rel`` for a path read from a journal, recipe or state record (data, not a
    path to act on): ``rel`` must be a relative string without ``..`` whose real path (symlinks
    resolved) stays inside ``directory``. Raises ``OutputError`` (exit 1) naming ``what`` (e.g.
    ``"journal OUT/journal.jsonl"``) otherwise, before anything is read, written or removed."""
    base = os.path.realpath(os.fspath(directory))
    bad = None
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        bad = "is not a relative path"
    elif os.path.isabs(rel) or Path(rel).is_absolute() or rel.startswith(("/", "\\")):
        bad = "is absolute"
    elif ".." in Path(rel).parts or ".." in rel.replace("\\", "/").split("/"):
        bad = "leaves its directory (..)"
    else:
        real = os.path.realpath(os.path.join(base, rel))
        if real != base and not real.startswith(base + os.sep):
            bad = "leaves its directory through a symlink"
    if bad is not None:
        raise OutputError(f"{what} names the path {str(rel)[:120]!r}, which {bad}; nothing was read or removed",
                          hint="the file was edited by hand: restore it, or start again without --resume")
    return Path(base) / rel


class Journal:
    """Append-only ``journal.jsonl`` in a search's output directory."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def records(self) -> Iterator[dict[str, Any]]:
        """Complete records in file order (torn or garbage lines skipped)."""
        try:
            text = self.path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise OutputError(f"cannot read journal {self.path}: {exc.strerror or exc}") from exc
        for line in text.split("\n"):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("result"), dict) and "config_hash" in rec:
                yield rec

    def finished(self, config_hash: str) -> dict[tuple[str, int, str], dict[str, Any]]:
        """Finished candidates of this configuration: key -> result record (last one wins)."""
        out: dict[tuple[str, int, str], dict[str, Any]] = {}
        for rec in self.records():
            if rec.get("config_hash") != config_hash or rec.get("kind") == "rung":
                continue
            try:
                key = candidate_key(rec["shift"], rec["seed"], rec["config_hash"])
            except (KeyError, TypeError, ValueError):
                continue
            out[key] = rec["result"]
        return out

    def rungs(self, config_hash: str) -> dict[tuple[str, int, str, int], dict[str, Any]]:
        """Rung records of this configuration: ``(shift_key, seed, config_hash, steps)`` -> record
        (``result``, ``rung``, ``state``, ``eliminated``; last one wins)."""
        out: dict[tuple[str, int, str, int], dict[str, Any]] = {}
        for rec in self.records():
            if rec.get("config_hash") != config_hash or rec.get("kind") != "rung":
                continue
            try:
                key = (*candidate_key(rec["shift"], rec["seed"], rec["config_hash"]), int(rec["steps"]))
            except (KeyError, TypeError, ValueError):
                continue
            out[key] = rec
        return out

    def append(self, shift: float, seed: int, config_hash: str, result: dict[str, Any]) -> None:
        self._write({"shift": float(shift), "seed": int(seed), "config_hash": config_hash, "result": result})

    def append_rung(self, shift: float, seed: int, config_hash: str, *, rung: int, steps: int,
                    result: dict[str, Any], state: str | None = None, eliminated: bool = False,
                    stop: dict[str, Any] | None = None) -> None:
        """One candidate reached rung ``rung`` (``steps`` training steps): its score so far, the
        saved training state (relative path, or None), and whether it stops there. ``stop``: the
        rung ended early (``--stop-when-stable``, ``bnnshift.search.stable_decision``'s record), so
        a resumed run ends it at the same step."""
        rec = {"kind": "rung", "shift": float(shift), "seed": int(seed), "config_hash": config_hash,
               "rung": int(rung), "steps": int(steps), "state": state, "eliminated": bool(eliminated),
               "result": result}
        if stop is not None:
            rec["stop"] = stop
        self._write(rec)

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), default=jsonable) + "\n"
        self._repair_tail()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                data = line.encode("utf-8")
                written = 0
                while written < len(data):
                    written += os.write(fd, data[written:])
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise OutputError(f"cannot append to journal {self.path}: {exc.strerror or exc}") from exc

    def _repair_tail(self) -> None:
        """A torn last line (no newline) would glue onto the next record: end it first."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                if fh.tell() == 0:
                    return
                fh.seek(-1, os.SEEK_END)
                last = fh.read(1)
        except FileNotFoundError:
            return
        if last != b"\n":
            with open(self.path, "ab") as fh:
                fh.write(b"\n")
                fh.flush()
                os.fsync(fh.fileno())

    def reset(self) -> None:
        """Start a fresh journal (a new search into a --force'd directory)."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass



class OutputLock:
    """Exclusive ownership of an output directory for the life of a search, ``patch -o``,
    ``fold`` or ``search --patch-out`` (one writer per output).

    ``fcntl.flock`` on ``<dir>/.bnnshift.lock`` (released by the kernel when the process dies,
    so a killed run never leaves a stale lock); the file holds the owner's PID for the error
    message. Reentrant within one process. Use as a context manager; ``directory=None`` is a
    no-op. Raises ``LockedError`` (exit 1) naming the holder's PID.
    """

    _held: dict[str, int] = {}  # realpath -> depth, for reentrancy within this process

    def __init__(self, directory: str | os.PathLike[str] | None, *, beside: bool = False):
        """``beside``: for outputs that are swapped in whole (``patch -o``, ``fold``,
        ``--patch-out``): the lock is ``.NAME.bnnshift.lock`` in the parent directory, so it
        survives the swap, a new OUT is not created before it is complete, and the file is
        removed when released (a taker checks, once it holds the lock, that the file it locked is
        still the one at the path, else it tries again)."""
        self.directory = Path(directory) if directory is not None else None
        self._fd: int | None = None
        self._key: str | None = None
        self._created = False
        self._remove = beside
        self._beside = beside

    def _lock_path(self) -> Path:
        d = self.directory
        assert d is not None
        if self._beside:
            name = Path(os.path.abspath(d)).name
            return Path(os.path.abspath(d)).parent / f".{name}.bnnshift.lock"
        return d / LOCK_NAME

    def __enter__(self) -> "OutputLock":
        if self.directory is None:
            return self
        where = self.directory.parent if self._beside else self.directory
        self._created = not where.exists()
        try:
            where.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create output directory {where}: {exc.strerror or exc}") from exc
        self._key = os.path.realpath(self.directory)
        if self._key in OutputLock._held:
            OutputLock._held[self._key] += 1
            return self
        path = self._lock_path()
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (documented)
            fcntl = None
        for _attempt in range(20):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise OutputError(f"cannot lock {self.directory}: {exc.strerror or exc}",
                                  hint="choose a directory you can write to") from exc
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_pid(fd)
                os.close(fd)
                who = f"pid {holder}" if holder else "another process"
                raise LockedError(f"{self.directory} is in use by another bnnshift process ({who}: search --out, "
                                  "patch -o, fold or --patch-out)",
                                  hint="wait for it to finish, or choose another output directory") from None
            try:  # the file locked is still the one at the path (a releasing owner may remove it)
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except OSError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise LockedError(f"{self.directory} is in use by another bnnshift process (its lock file keeps changing)",
                              hint="wait for it to finish, or choose another output directory")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        self._fd = fd
        OutputLock._held[self._key] = 1
        if self.directory.is_dir():
            sweep_stale(self.directory)  # we own it: leftovers of killed runs go
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._key is None:
            return
        OutputLock._held[self._key] -= 1
        if OutputLock._held[self._key] > 0:
            return
        del OutputLock._held[self._key]
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            if self._remove:  # unlinked while still held: a taker that opened it sees a new file and retries
                with contextlib.suppress(OSError):
                    if os.path.samestat(os.fstat(self._fd), os.stat(self._lock_path())):
                        self._lock_path().unlink()
            elif exc_type is not None and self._created:  # a failed run leaves no directory it made
                with contextlib.suppress(OSError):
                    (self.directory / LOCK_NAME).unlink()
                    self.directory.rmdir()
            os.close(self._fd)  # releases the flock
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def check_unlocked(directory: str | os.PathLike[str]) -> None:
    """Raise ``LockedError`` if another process holds ``directory``'s lock (a quick early check)."""
    d = Path(directory)
    if os.path.realpath(d) in OutputLock._held or not (d / LOCK_NAME).is_file():
        return
    with OutputLock(d):
        pass
