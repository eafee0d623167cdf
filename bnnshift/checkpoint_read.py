"""Reading a checkpoint file safely into a flat ``{key: tensor}`` dict.

safetensors or ``torch.load(weights_only=True)`` with data-only globals; code-needing pickles
refused unless explicitly allowed, known code-execution gadgets always (picklescan + bnnshift's
own list); wrapper dicts, EMA layouts and shared key prefixes unwrapped. Public names are
re-exported by :mod:`bnnshift.load`.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .errors import CheckpointError, UnsafeCheckpointError
from .modelspec import exc_text, on_sys_path

_SAFETENSORS_SUFFIXES = (".safetensors", ".st")


def _looks_like_safetensors(path: Path) -> bool:
    """Header: 8-byte little-endian length then a JSON object."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= path.stat().st_size - 8


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
# Globals whose only use in a pickle is to run something: refused even with --unsafe-load.
_DANGEROUS_MODULES = ("os", "posix", "nt", "subprocess", "shutil", "socket", "pty", "runpy", "importlib", "sys",
                      "ctypes", "webbrowser", "pickle", "_pickle", "marshal", "code", "codeop", "commands",
                      "multiprocessing", "asyncio", "platform", "signal", "tempfile", "urllib", "http", "ftplib")
_DANGEROUS_BUILTINS = ("eval", "exec", "compile", "__import__", "getattr", "setattr", "delattr", "open",
                       "input", "breakpoint", "globals", "locals", "vars", "apply", "execfile")


def _is_dangerous(name: str) -> bool:
    mod, _, attr = name.rpartition(".")
    top = mod.split(".", 1)[0]
    if top in ("builtins", "__builtin__"):
        return attr in _DANGEROUS_BUILTINS
    return top in _DANGEROUS_MODULES


def _data_globals() -> list[Any]:
    """Classes and functions that only rebuild data (numpy scalars, dtypes and arrays,
    ``argparse.Namespace``): allowed to ``weights_only=True`` through ``safe_globals``."""
    import argparse

    allowed: list[Any] = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:
        return allowed
    allowed += [np.dtype, np.ndarray]
    for modname in ("numpy._core.multiarray", "numpy.core.multiarray"):
        with contextlib.suppress(Exception):
            mod = importlib.import_module(modname)
            allowed += [getattr(mod, n) for n in ("scalar", "_reconstruct") if hasattr(mod, n)]
    with contextlib.suppress(Exception):
        import numpy.dtypes as npd

        allowed += [getattr(npd, n) for n in dir(npd) if n.endswith("DType") and isinstance(getattr(npd, n), type)]
    return allowed


def _is_globals_refusal(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return isinstance(exc, pickle.UnpicklingError) and (
        "unsupported global" in msg or "not an allowed global" in msg or "is blocked" in msg
    )


def _unsafe_globals(path: Path, exc: BaseException) -> list[str]:
    names: list[str] = []
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy (non-zip) format or a failing scan: fall back to the error text
        names = []
    if not names:
        names = _GLOBAL_RE.findall(str(exc))
    return sorted(dict.fromkeys(names))


def scan_pickle_globals(path: str | os.PathLike[str]) -> tuple[list[str], bool]:
    """``(dangerous globals, scanned)`` of a pickle / ``torch.save`` file by ``picklescan``
    (``picklescan.scanner.scan_bytes``; its ``Dangerous`` list: ``os.*``, ``subprocess.*``,
    ``builtins.eval/exec/open/getattr/compile``, ``timeit.*``, ``cProfile.*``, ``pydoc.*``, ``pdb.*``,
    ``runpy.*``, ``webbrowser.*``, ``socket.*``, ...) plus bnnshift's own list (``_is_dangerous``).
    ``scanned`` is False when the scanner could not parse the file. Raises ``ImportError`` when
    picklescan is not installed."""
    from picklescan import scanner

    with open(path, "rb") as fh:
        res = scanner.scan_bytes(fh, str(path), ".pt")
    bad = [f"{g.module}.{g.name}" for g in res.globals
           if g.safety == scanner.SafetyLevel.Dangerous or _is_dangerous(f"{g.module}.{g.name}")]
    return sorted(dict.fromkeys(bad)), not res.scan_err


def _refuse_gadgets(path: Path) -> None:
    """Before ``weights_only=False``: refuse a file whose pickle names a code-execution global."""
    try:
        bad, scanned = scan_pickle_globals(path)
    except ImportError:
        raise UnsafeCheckpointError(
            f"--unsafe-load of {path} needs the pickle scanner picklescan, which is not installed",
            hint="pip install picklescan (a bnnshift dependency), or re-save the weights as a state_dict") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    if bad:
        raise UnsafeCheckpointError(
            f"checkpoint {path} would call {', '.join(bad[:6])} when unpickled: refused, also with --unsafe-load",
            hint="this file runs code on load; do not use it (re-save the weights as a state_dict or safetensors)")
    if not scanned:
        raise UnsafeCheckpointError(
            f"checkpoint {path} could not be scanned for code-execution globals (picklescan): refused, "
            "also with --unsafe-load",
            hint="re-save the weights as a state_dict (torch.save(model.state_dict(), ...)) or safetensors")


def _corrupt(path: Path, exc: BaseException | None = None) -> CheckpointError:
    detail = f" ({exc_text(exc)})" if exc is not None else ""
    err = CheckpointError(
        f"checkpoint {path} is corrupt or not a PyTorch/safetensors file",
        hint="re-save it with torch.save(model.state_dict(), ...) or safetensors" + detail,
    )
    return err


def _read_raw(path: Path, allow_unsafe: bool, search_dirs: Iterable[str] = ()) -> Any:
    if path.suffix in _SAFETENSORS_SUFFIXES or _looks_like_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SafetensorError is not an Exception subclass in some versions
            raise _corrupt(path, exc) from exc
    try:
        with torch.serialization.safe_globals(_data_globals()):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _is_globals_refusal(exc):
            raise _corrupt(path, exc) from exc
        globs = _unsafe_globals(path, exc)
        bad = [g for g in globs if _is_dangerous(g)]
        if bad:
            raise UnsafeCheckpointError(
                f"checkpoint {path} would call {', '.join(bad)} when unpickled: refused, also with --unsafe-load",
                hint="this file runs code on load; do not use it (re-save the weights as a state_dict or safetensors)",
            ) from None
        if not allow_unsafe:
            raise UnsafeCheckpointError(
                f"checkpoint {path} needs unpickling of code (globals: {', '.join(globs) or 'unknown'})",
                hint="re-save it as a state_dict (torch.save(model.state_dict(), ...)) or, "
                "if you trust the file, pass --unsafe-load",
            ) from None
    except (PermissionError, IsADirectoryError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # zip/pickle/EOF/index errors from random or truncated bytes
        raise _corrupt(path, exc) from exc
    # Explicitly allowed: full unpickling (may run code from the file), after a scan of its
    # globals by picklescan (the scanner of the Hugging Face Hub): known code-execution gadgets refused.
    _refuse_gadgets(path)
    # Classes are found as `python` run from here would find them: the current folder and the model file's folder.
    dirs = [os.getcwd(), *search_dirs]
    try:
        with contextlib.ExitStack() as stack:
            for d in dict.fromkeys(dirs):
                stack.enter_context(on_sys_path(d))
            return torch.load(str(path), map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} refers to code that cannot be imported: {exc_text(exc)}",
            hint="make the module that defined the model importable, or re-save the checkpoint as a state_dict",
        ) from exc
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise _corrupt(path, exc) from exc


def _tensors_only(obj: Mapping[Any, Any]) -> dict[str, torch.Tensor]:
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


_INNER_KEYS = ("model_state_dict", "state_dict", "model", "net", "module", "network", "weights")
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema_model", "ema")
_STRIP_PREFIXES = ("module.", "_orig_mod.", "model.", "net.")
_LEGACY_PREFIXES = ("module.", "_orig_mod.")  # stripped when the model's keys are not known


def _is_weights(value: Any, allow_unsafe: bool, depth: int = 3) -> bool:
    """A dict of tensors (or a module, when unsafe), possibly inside further wrapper keys."""
    if allow_unsafe and isinstance(value, nn.Module):
        return True
    if not isinstance(value, Mapping):
        return False
    if any(isinstance(v, torch.Tensor) for v in value.values()):
        return True
    return depth > 0 and any(
        k in value and _is_weights(value[k], allow_unsafe, depth - 1) for k in _INNER_KEYS + _EMA_KEYS
    )


def _unwrap(obj: Any, allow_unsafe: bool, use_ema: bool, where: Path) -> tuple[Any, list[str], list[str]]:
    """Descend wrapper keys; returns (state dict or other, keys descended, notes). With
    ``use_ema`` a checkpoint without EMA weights is a CheckpointError."""
    path: list[str] = []
    notes: list[str] = []
    used_ema = False
    for _ in range(4):  # e.g. {"model": {"state_dict": ...}}; bounded
        if not isinstance(obj, Mapping):
            break
        plain = next((k for k in _INNER_KEYS if k in obj and _is_weights(obj[k], allow_unsafe)), None)
        ema = next((k for k in _EMA_KEYS if k in obj and _is_weights(obj[k], allow_unsafe)), None)
        if use_ema and ema is not None:
            key, used_ema = ema, True
            notes.append(f"EMA weights {ema!r} used (--use-ema)")
        elif plain is not None:
            key = plain
            if ema is not None:
                notes.append(f"the checkpoint also holds EMA weights {ema!r} (--use-ema to load them)")
        elif ema is not None:
            key, used_ema = ema, True
            notes.append(f"only EMA weights {ema!r} in the checkpoint: loaded them")
        else:
            break
        path.append(key)
        obj = obj[key]
    if use_ema and not used_ema:
        raise CheckpointError(f"--use-ema: checkpoint {where} holds no EMA weights ({' / '.join(_EMA_KEYS[:2])})",
                              hint="drop --use-ema")
    return (obj.state_dict() if isinstance(obj, nn.Module) else obj), path, notes


def _matches(keys: Iterable[str], model_keys: set[str]) -> int:
    return sum(1 for k in keys if k in model_keys)


def _strip_prefixes(sd: dict[str, torch.Tensor], model_keys: Iterable[str] | None = None
                    ) -> tuple[dict[str, torch.Tensor], str | None]:
    """Strip a prefix (``module.``, ``_orig_mod.``, ``model.``, ``net.``, repeatedly) when the
    model's keys lack it. Shared by every key: stripped when that fits no fewer keys. Carried by
    only some keys (a LightningModule's ``net.*`` next to its loss's ``criterion.weight``):
    stripped from those keys when that fits strictly more keys and clashes with no key already
    there; the other keys stay as they are (reported unexpected). Without the model's keys only
    ``module.`` / ``_orig_mod.`` shared by every key are stripped. Returns (dict, prefix or None)."""
    own = set(model_keys) if model_keys is not None else None
    prefixes = _STRIP_PREFIXES if own is not None else _LEGACY_PREFIXES
    stripped = ""
    while sd:
        for prefix in prefixes:
            carried = [k for k in sd if k.startswith(prefix)]
            if not carried:
                continue
            every = len(carried) == len(sd)
            if not every and own is None:
                continue
            if own is not None:
                if own and all(k.startswith(prefix) for k in own):
                    continue  # the model's own keys carry it (e.g. a top-level `model` child)
                cand = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
                if len(cand) != len(sd):
                    continue  # stripping would overwrite a key already there
                gain = _matches(cand, own) - _matches(sd, own)
                if gain < 0 or (not every and gain <= 0):
                    continue
            sd = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
            stripped += prefix
            break
        else:
            break
    return sd, (stripped or None)


# ema-pytorch's ``EMA(model).state_dict()``: ``ema_model.*`` (the averaged weights),
# ``online_model.*`` (the trained ones, unless include_online_model=False), and its counters.
_EMA_PYTORCH_EXTRA = ("initted", "step")


def _ema_pytorch_layout(sd: dict[str, torch.Tensor], use_ema: bool
                        ) -> tuple[dict[str, torch.Tensor], str, list[str]] | None:
    """The weights inside an ema-pytorch ``EMA`` state dict, or None when ``sd`` is not one.
    Returns (weights with the ``ema_model.`` / ``online_model.`` prefix removed, that prefix, notes)."""
    ema = {k: v for k, v in sd.items() if k.startswith("ema_model.")}
    online = {k: v for k, v in sd.items() if k.startswith("online_model.")}
    rest = set(sd) - set(ema) - set(online)
    if not ema or not rest <= set(_EMA_PYTORCH_EXTRA) or not rest:
        return None
    if use_ema or not online:
        note = ("EMA weights 'ema_model.' used (--use-ema)" if use_ema
                else "only EMA weights 'ema_model.' in the ema-pytorch checkpoint: loaded them")
        return {k[len("ema_model."):]: v for k, v in ema.items()}, "ema_model.", [note]
    return ({k[len("online_model."):]: v for k, v in online.items()}, "online_model.",
            ["the ema-pytorch checkpoint also holds EMA weights 'ema_model.' (--use-ema to load them)"])


@dataclass
class StateDictRead:
    """What :func:`read_state_dict` found: the flat state dict (``{key: tensor}``, CPU), the
    wrapper keys descended (``"state_dict"``, None), the prefix stripped, notes (EMA)."""

    sd: dict[str, torch.Tensor]
    inner_key: str | None
    prefix: str | None
    notes: list[str]


def read_state_dict(path: str | os.PathLike[str], *, allow_unsafe: bool, use_ema: bool,
                    model_keys: Iterable[str] | None, search_dirs: Iterable[str] = ()) -> StateDictRead:
    """:func:`load_state_dict_file` with where the tensors were found (``StateDictRead``);
    ``search_dirs``: folders on ``sys.path`` while unpickling with ``allow_unsafe``. Raises
    CheckpointError / UnsafeCheckpointError."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} not found", hint="check the --checkpoint path")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} is not a file", hint="check the --checkpoint path")
    raw = _read_raw(p, allow_unsafe, search_dirs)
    try:
        obj, keys, notes = _unwrap(raw, allow_unsafe, use_ema, p)
    except CheckpointError:
        if not use_ema:
            raise
        obj, keys, notes = _unwrap(raw, allow_unsafe, False, p)  # an ema-pytorch layout inside?
        if not (isinstance(obj, Mapping) and _ema_pytorch_layout(_tensors_only(obj), True)):
            raise
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint {p} holds a {type(obj).__name__}, not a state dict",
            hint="save it with torch.save(model.state_dict(), ...)",
        )
    sd = _tensors_only(obj)
    if not sd:
        top = ", ".join(map(str, list(obj)[:8])) or "none"
        raise CheckpointError(
            f"checkpoint {p} holds no tensors (top-level keys: {top})",
            hint="save it with torch.save(model.state_dict(), ...)",
        )
    ema = _ema_pytorch_layout(sd, use_ema)
    ema_prefix = None
    if ema is not None:
        sd, ema_prefix, more = ema
        notes = [n for n in notes if "EMA" not in n] + more
    sd, prefix = _strip_prefixes(sd, model_keys)
    if ema_prefix:
        prefix = ema_prefix + (prefix or "")
    return StateDictRead(sd, "/".join(keys) or None, prefix, notes)


def load_state_dict_file(
    path: str | os.PathLike[str], *, allow_unsafe: bool = False, use_ema: bool = False,
    model_keys: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Read a checkpoint into a flat ``{key: tensor}`` dict on the CPU.

    safetensors or ``torch.load(weights_only=True)`` with data-only globals allowed (numpy
    scalars, dtypes and arrays, ``argparse.Namespace``); a file that needs code to unpickle
    raises UnsafeCheckpointError unless ``allow_unsafe``, and one that would call a dangerous
    global (``os.system``, ``subprocess.*``, ``builtins.eval``...) always. Wrapper dicts
    (``model_state_dict``, ``state_dict``, ``model``, ``net``, ``module``; EMA weights
    ``state_dict_ema`` / ``model_ema`` with ``use_ema`` or when alone) are unwrapped, a prefix
    shared by all keys stripped (see ``_strip_prefixes``; ``model_keys`` are the model's
    state_dict keys), non-tensors dropped.
    """
    return read_state_dict(path, allow_unsafe=allow_unsafe, use_ema=use_ema, model_keys=model_keys).sd

