"""Atomic file writes, output-directory checks and stable hashes.

Every writer here writes to a temporary file in the destination's directory, flushes and
fsyncs it, then ``os.replace``-s it over the destination: readers see either the old file
or the complete new one, never a partial file. On any failure the temporary file is
removed and the destination is left untouched.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .errors import OutputError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_from",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_safetensors",
    "prepare_output_dir",
    "replace_dir",
    "sweep_stale",
    "sha256_file",
    "sha256_state_dict",
]

# Read the process umask once (os.umask can only be read by setting it) so that atomically
# written files get the same permissions as files created with open() (mkstemp uses 0600).
_UMASK = os.umask(0o022)
os.umask(_UMASK)

_CHUNK = 1 << 20
LOCK_NAME = ".bnnshift.lock"  # an output's owner lock (journal.OutputLock); not "content"
TMP_PREFIX = ".bnnshift-"  # + PID + "-": temp files and directories beside their destination


def jsonable(o: Any):
    """``json.dumps(default=...)`` for tensors/arrays (``tolist``), sets and tuples."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (best effort: not every platform/file system allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_hint(exc: OSError) -> str | None:
    import errno

    return {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space (disk quota)",
            errno.EFBIG: "the file is larger than this file system or ulimit allows",
            errno.EROFS: "the file system is read-only: write elsewhere",
            errno.EACCES: "check the permissions or write elsewhere"}.get(exc.errno or -1)


@contextlib.contextmanager
def _atomic_target(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on normal exit fsync it and move it over ``path``.
    Missing parent directories are created (like ``mkdir -p``), as for output directories."""
    dest = Path(path)
    directory = dest.parent if str(dest.parent) else Path(".")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # a short name that does not grow with dest's (a legal 255-byte name still works) and
        # carries our PID, so that a later run can tell a dead writer's leftover (sweep_stale)
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"cannot write {dest}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        try:
            os.chmod(tmp, 0o666 & ~_UMASK)
        except OSError:
            pass
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {dest}: {exc.strerror or exc}", hint=_write_hint(exc)) from exc
        if type(exc).__name__ == "SafetensorError":  # safetensors' Rust writer: ENOSPC etc. arrive here
            text = (str(exc).splitlines() or [""])[0]
            raise OutputError(f"cannot write {dest}: {text}", hint="free some space or write elsewhere") from exc
        raise
    _fsync_dir(directory)


def _write_with(path: str | os.PathLike[str], writer: Callable[[Any], None], mode: str = "wb") -> Path:
    with _atomic_target(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as fh:
            writer(fh)
            fh.flush()
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Atomically replace ``path`` with ``data``."""
    data = bytes(data) if not isinstance(data, bytes) else data  # fail before touching disk
    return _write_with(path, lambda fh: fh.write(data))


def atomic_write_from(src: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Atomically replace ``path`` with a copy of the file ``src`` (e.g. from another file system)."""
    import shutil

    with _atomic_target(path) as tmp:
        shutil.copyfile(src, tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically replace ``path`` with ``text`` (UTF-8, newlines written as given)."""
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text expects str, got {type(text).__name__}")
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write ``obj`` as JSON (indent=2, key order kept, trailing newline)."""
    text = json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text)


def _safetensors_ready(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Detach, make contiguous, and clone tensors that share storage (safetensors refuses them)."""
    import torch

    out: dict[str, Any] = {}
    seen: set[tuple[str, int]] = set()
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"safetensors keys must be str, got {type(key).__name__}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"safetensors value for {key!r} is a {type(value).__name__}, not a tensor")
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.numel():
            storage_id = (t.device.type, t.untyped_storage().data_ptr())
            if storage_id in seen:
                t = t.clone()
            else:
                seen.add(storage_id)
        out[key] = t
    return out


def atomic_save_safetensors(
    tensors: Mapping[str, Any],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Atomically write ``tensors`` to a .safetensors file with optional string metadata."""
    from safetensors.torch import save_file

    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str (bad keys: {', '.join(map(str, bad))})")
        metadata = dict(metadata)
    with _atomic_target(path) as tmp:
        save_file(_safetensors_ready(tensors), str(tmp), metadata=metadata)
    return Path(path)


def prepare_output_dir(path: str | os.PathLike[str], force: bool = False) -> Path:
    """Create the output directory ``path`` and check that it can be written.

    An existing non-empty directory is refused unless ``force`` (whose files are then
    overwritten as they are written; nothing is deleted up front).
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is not a directory", hint="choose another --out")
    if out.is_dir():
        try:
            non_empty = any(c.name != LOCK_NAME for c in out.iterdir())
        except OSError as exc:
            raise OutputError(f"output directory {out} is not readable: {exc.strerror or exc}") from exc
        if non_empty and not force:
            raise OutputError(f"output directory {out} is not empty", hint="pass --force to overwrite")
    else:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create output directory {out}: {exc.strerror or exc}") from exc
    # os.access lies for root and on some network file systems: really try to write.
    try:
        fd, probe = tempfile.mkstemp(dir=out, prefix=".bnnshift-write-test.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"output directory {out} is not writable: {exc.strerror or exc}") from exc
    try:  # a few real bytes: an empty file still fits on a full disk
        os.write(fd, b"\0" * 4096)
        os.fsync(fd)
    except OSError as exc:
        raise OutputError(f"output directory {out} is not writable: {exc.strerror or exc}",
                          hint=_write_hint(exc)) from exc
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)
    return out


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _frame(h: "hashlib._Hash", data: bytes) -> None:
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def sha256_state_dict(sd: Mapping[str, Any]) -> str:
    """Stable hex SHA-256 over a state dict: sorted keys, dtypes, shapes and raw bytes.

    Independent of key insertion order, device, strides and whether values are Parameters;
    every field is length-framed so different dicts cannot produce the same byte stream.
    Non-tensor values (rare: extra state) are hashed through ``repr``.
    """
    import torch

    h = hashlib.sha256()
    h.update(b"bnnshift-state-dict-v1")
    for key in sorted(sd, key=str):
        value = sd[key]
        _frame(h, str(key).encode("utf-8"))
        if isinstance(value, torch.Tensor):
            t = value.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            if t.is_quantized:
                t = t.dequantize()
            t = t.contiguous()
            _frame(h, str(t.dtype).encode())
            _frame(h, repr(tuple(t.shape)).encode())
            raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
            _frame(h, raw.numpy().tobytes())
        else:
            _frame(h, b"<object>")
            _frame(h, repr(value).encode("utf-8"))
    return h.hexdigest()


# --------------------------------------------------------------------------- crash safety
# Directories are replaced whole: the new one is built beside the old one under a temp name,
# then swapped in with renames (one atomic renameat2(RENAME_EXCHANGE) on Linux). A killed run
# leaves the old directory intact plus a temp directory named with its PID, which the next run
# removes (sweep_stale).

STALE_LEGACY_SECONDS = 3600.0  # temp files of older versions (no PID in the name): removed after this age


def fault_point(name: str) -> None:
    """Die like ``kill -9`` here when ``BNNSHIFT_FAULT`` names this point; ``NAME:TERM`` /
    ``NAME:INT`` send this process SIGTERM / SIGINT there instead (crash and signal tests only)."""
    want = os.environ.get("BNNSHIFT_FAULT")
    if not want or not want.startswith(name):
        return
    import signal

    if want == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif want in (f"{name}:TERM", f"{name}:INT"):
        os.kill(os.getpid(), signal.SIGTERM if want.endswith("TERM") else signal.SIGINT)


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (a PID we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _stale_owner(name: str, prefix: str) -> int | None:
    """The PID in ``<prefix><pid>-...``, or None when the name is not ours."""
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split("-", 1)[0]
    return int(head) if head.isdigit() else None


_LEGACY_TMP = re.compile(r"^\.(model\.safetensors|patch\.json|journal\.jsonl|search\.(json|md|png)|recipe\.json"
                         r"|.+\.onnx)\.[A-Za-z0-9_]+\.tmp$|^\.bnnshift-write-test\..+\.tmp$")


def _remove(p: Path) -> bool:
    import shutil

    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    except OSError:
        return False
    return True


def sweep_stale(directory: str | os.PathLike[str], *, prefix: str = TMP_PREFIX,
                legacy_age: float = STALE_LEGACY_SECONDS) -> list[str]:
    """Remove what killed bnnshift runs left in ``directory``; returns the removed names.

    Ours: ``<prefix><pid>-*`` files and directories whose process is gone, and temp files of
    older versions (``.model.safetensors.XXXX.tmp``...) older than ``legacy_age`` seconds.
    Never touches a live process's temp files or anything else.
    """
    import time

    d = Path(directory)
    removed: list[str] = []
    try:
        entries = list(d.iterdir())
    except OSError:
        return removed
    now = time.time()
    for p in entries:
        pid = _stale_owner(p.name, prefix)
        if pid is not None:
            if p.name.endswith(".old"):
                continue  # an interrupted two-rename swap: the user's previous directory, never deleted
            if pid != os.getpid() and not pid_alive(pid) and _remove(p):
                removed.append(p.name)
        elif _LEGACY_TMP.match(p.name) or (prefix != TMP_PREFIX and p.name.startswith(prefix)):
            try:
                old = now - p.stat().st_mtime > legacy_age
            except OSError:
                continue
            if old and _remove(p):
                removed.append(p.name)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False when unsupported."""
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    import errno as _errno

    if err in (_errno.EINVAL, _errno.ENOSYS, _errno.EOPNOTSUPP, _errno.EPERM):
        return False  # file system without RENAME_EXCHANGE: the two-rename fallback
    raise OSError(err, os.strerror(err), str(b))


def _link_or_copy(src: str, dst: str) -> None:
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path) -> None:
    import shutil

    for p in old.iterdir():
        if p.name == LOCK_NAME or (new / p.name).exists() or os.path.lexists(new / p.name):
            continue
        if p.is_symlink():
            os.symlink(os.readlink(p), new / p.name)
        elif p.is_dir():
            shutil.copytree(p, new / p.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(p), str(new / p.name))


@contextlib.contextmanager
def replace_dir(path: str | os.PathLike[str], *, force: bool = False, carry_over: bool = True) -> Iterator[Path]:
    """Build a directory's new content beside it, then swap it in whole.

    Yields an empty temp directory ``<parent>/.bnnshift-<pid>-XXXX.d``; write everything there.
    On normal exit it replaces ``path``: one atomic exchange on Linux (then the old content is
    deleted), else ``path -> .bnnshift-<pid>-XXXX.old``, temp -> ``path``. Interrupted at any
    point (even ``kill -9``), ``path`` is the complete old directory or the complete new one
    (with the fallback, for an instant no directory); on an exception the temp directory is
    removed and ``path`` untouched. An existing non-empty ``path`` needs ``force``.
    ``carry_over``: files of the old directory that the new one does not have (a user's notes,
    an exported .onnx) are hard-linked (else copied) into it first, so only what was rewritten
    changes. Raises ``OutputError``.
    """
    import shutil

    dest = Path(path)
    parent = dest.parent if str(dest.parent) else Path(".")
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"output path {dest} exists and is not a directory", hint="choose another output directory")
    if dest.is_dir() and not force and any(dest.iterdir()):
        raise OutputError(f"output directory {dest} is not empty", hint="pass --force to overwrite")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {parent}: {exc.strerror or exc}", hint=_write_hint(exc)) from exc
    sweep_stale(parent)
    try:
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=".d"))
    except OSError as exc:
        raise OutputError(f"cannot write in {parent}: {exc.strerror or exc}", hint=_write_hint(exc)) from exc
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        if carry_over and dest.is_dir():
            _carry_over(dest, tmp)
        _fsync_dir(tmp)
        fault_point("swap:before")
        if dest.is_dir():
            if _exchange(tmp, dest):
                fault_point("swap:exchanged")
            else:
                old = Path(str(tmp)[:-2] + ".old")
                os.rename(dest, old)
                fault_point("swap:between")
                try:
                    os.rename(tmp, dest)
                except BaseException:
                    os.rename(old, dest)
                    raise
                tmp = old
            _fsync_dir(parent)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.rename(tmp, dest)
            _fsync_dir(parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot replace {dest}: {exc.strerror or exc}", hint=_write_hint(exc)) from exc
        raise
