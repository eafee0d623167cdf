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
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .errors import OutputError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_safetensors",
    "prepare_output_dir",
    "sha256_file",
    "sha256_state_dict",
]

# Read the process umask once (os.umask can only be read by setting it) so that atomically
# written files get the same permissions as files created with open() (mkstemp uses 0600).
_UMASK = os.umask(0o022)
os.umask(_UMASK)

_CHUNK = 1 << 20


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


@contextlib.contextmanager
def _atomic_target(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on normal exit fsync it and move it over ``path``."""
    dest = Path(path)
    directory = dest.parent if str(dest.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{dest.name}.", suffix=".tmp")
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
            raise OutputError(f"cannot write {dest}: {exc.strerror or exc}") from exc
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
            non_empty = any(out.iterdir())
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
