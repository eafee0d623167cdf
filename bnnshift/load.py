"""Parse model specs, build the user's model and load its checkpoint safely.

A model spec names where the model comes from::

    zoo:NAME                      a built-in (or plugin) zoo model
    path/to/file.py:ATTR          a factory function or nn.Module class in a Python file
    package.module:ATTR           the same in an importable module
    timm:NAME                     timm.create_model(NAME, pretrained=False, **args)
    torchvision:NAME              torchvision.models.get_model(NAME, weights=None, **args)

Factory keyword arguments come separately (``--arg key=value``). Checkpoints are loaded with
``torch.load(weights_only=True)`` or safetensors; a checkpoint that needs code to unpickle is
refused unless the caller explicitly allows it (``--unsafe-load``). Pretrained weights are
never downloaded.
"""
from __future__ import annotations

import ast
import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from . import registry
from ._io import sha256_file
from .errors import CheckpointError, ModelLoadError, SpecError, UnsafeCheckpointError

__all__ = [
    "KINDS",
    "ModelSpec",
    "LoadReport",
    "LoadedModel",
    "parse_model_spec",
    "parse_arg_pairs",
    "parse_arg_value",
    "build_model",
    "default_input_shape",
    "load_state_dict_file",
    "load_checkpoint",
    "load_model",
]

KINDS = ("zoo", "file", "module", "timm", "torchvision")
_PREFIX_KINDS = ("zoo", "timm", "torchvision")  # "KIND:NAME"
_INNER_KEYS = ("state_dict", "model", "net", "module", "state_dict_ema", "model_ema")
_INNER_KEYS_EMA = ("state_dict_ema", "model_ema", "state_dict", "model", "net", "module")
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_SPEC_HINT = (
    "use zoo:NAME, path/to/file.py:FACTORY, package.module:FACTORY, timm:NAME or torchvision:NAME"
)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


# --------------------------------------------------------------------------- specs


@dataclass
class ModelSpec:
    """Where a model comes from. ``canonical()`` round-trips through :func:`parse_model_spec`
    (factory arguments travel separately in ``args``; file targets are absolute paths)."""

    kind: str
    target: str
    attr: str | None = None
    args: dict[str, Any] = field(default_factory=dict)

    def canonical(self) -> str:
        if self.kind in _PREFIX_KINDS:
            return f"{self.kind}:{self.target}"
        return f"{self.target}:{self.attr}"

    def __str__(self) -> str:
        return self.canonical()

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "target": self.target, "attr": self.attr, "args": dict(self.args)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ModelSpec":
        try:
            kind, target = d["kind"], d["target"]
        except (KeyError, TypeError) as exc:
            raise SpecError(f"bad model spec record: {d!r}", hint="expected keys kind, target, attr, args") from exc
        if kind not in KINDS:
            raise SpecError(f"bad model spec record: unknown kind {kind!r}", hint=f"kinds: {', '.join(KINDS)}")
        return cls(kind=kind, target=str(target), attr=d.get("attr"), args=dict(d.get("args") or {}))


def parse_arg_value(text: str) -> Any:
    """``--arg`` value: a Python literal (``3``, ``0.5``, ``(1, 2)``, ``'x'``, ``True``), or
    ``true``/``false``/``none``/``null`` in any case, else the string itself. ``1,2,3`` is a tuple."""
    s = text.strip()
    low = s.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def parse_arg_pairs(pairs: Iterable[str] | None) -> dict[str, Any]:
    """Parse ``["depth=18", "binary=true"]`` into ``{"depth": 18, "binary": True}``."""
    out: dict[str, Any] = {}
    for pair in pairs or ():
        if not isinstance(pair, str) or "=" not in pair:
            raise SpecError(f"bad --arg {pair!r}: expected key=value", hint="e.g. --arg num_classes=10")
        key, value = pair.split("=", 1)
        key = key.strip()
        if not _IDENT.match(key):
            raise SpecError(
                f"bad --arg {pair!r}: {key!r} is not a valid keyword name", hint="e.g. --arg num_classes=10"
            )
        out[key] = parse_arg_value(value)
    return out


def _coerce_args(args: Iterable[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    if args is None:
        return {}
    if isinstance(args, Mapping):
        bad = [k for k in args if not isinstance(k, str) or not _IDENT.match(k)]
        if bad:
            raise SpecError(f"bad factory argument name {bad[0]!r}", hint="argument names must be identifiers")
        return dict(args)
    if isinstance(args, str):
        return parse_arg_pairs([args])
    return parse_arg_pairs(list(args))


def _looks_like_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target or (os.altsep or "/") in target


def parse_model_spec(spec: str, args: Iterable[str] | Mapping[str, Any] | None = None) -> ModelSpec:
    """Parse a model spec string (see the module docstring); ``args`` are ``--arg`` pairs or a dict."""
    if not isinstance(spec, str):
        raise SpecError(f"bad model spec {spec!r}: expected a string", hint=_SPEC_HINT)
    s = spec.strip()
    kwargs = _coerce_args(args)
    if not s:
        raise SpecError("empty model spec", hint=_SPEC_HINT)
    if ":" not in s:
        raise SpecError(f"bad model spec {spec!r}: no ':'", hint=_SPEC_HINT)

    head, _, rest = s.partition(":")
    if head in _PREFIX_KINDS:
        name = rest.strip()
        if not name:
            raise SpecError(f"bad model spec {spec!r}: empty {head} model name", hint=f"e.g. {head}:NAME")
        return ModelSpec(kind=head, target=name, attr=None, args=kwargs)

    # path/to/file.py:attr or package.module:attr. Split on the last ':' (Windows drive letters).
    target, _, attr = s.rpartition(":")
    target, attr = target.strip(), attr.strip()
    if not target:
        raise SpecError(f"bad model spec {spec!r}: nothing before ':'", hint=_SPEC_HINT)
    if not attr:
        raise SpecError(
            f"bad model spec {spec!r}: no factory or class name after ':'", hint=f"e.g. {target}:build_model"
        )
    if not _DOTTED.match(attr):
        raise SpecError(f"bad model spec {spec!r}: {attr!r} is not a Python name", hint=_SPEC_HINT)
    if _looks_like_path(target):
        path = Path(target).expanduser()
        if path.suffix != ".py":
            raise SpecError(f"bad model spec {spec!r}: {target} is not a .py file", hint=_SPEC_HINT)
        if not path.is_file():
            raise SpecError(f"model file {target} does not exist", hint="check the path in the model spec")
        return ModelSpec(kind="file", target=str(path.resolve()), attr=attr, args=kwargs)
    if not _DOTTED.match(target):
        raise SpecError(f"bad model spec {spec!r}: {target!r} is neither a .py file nor a module path", hint=_SPEC_HINT)
    return ModelSpec(kind="module", target=target, attr=attr, args=kwargs)


# --------------------------------------------------------------------------- building


def _exc_text(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else ""
    if len(first) > 300:
        first = first[:297] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _close(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    cands = list(candidates)
    close = difflib.get_close_matches(name, cands, n=n, cutoff=0.5)
    if not close:
        low = name.lower()
        close = [c for c in cands if low in c.lower()][:n]
    return close


@contextlib.contextmanager
def _sys_path(directory: str) -> Iterator[None]:
    added = directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(directory)


_FILE_MODULES: dict[str, tuple[tuple[int, int], Any]] = {}


def _import_file(path: str) -> Any:
    """Import ``path`` under a unique module name (cached until the file changes)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise SpecError(f"model file {path} does not exist", hint="check the path in the model spec") from exc
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _FILE_MODULES.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    digest = hashlib.sha1(path.encode("utf-8")).hexdigest()[:12]
    stem = re.sub(r"\W", "_", p.stem)
    mod_name = f"bnnshift_user_{stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ModelLoadError(f"cannot import {path}", hint="the model file must be a Python source file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module  # dataclasses, pickling and typing need it registered
    try:
        with _sys_path(str(p.parent)):
            module_spec.loader.exec_module(module)
    except BaseException as exc:  # SystemExit too: a script that parses argv at import
        sys.modules.pop(mod_name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ModelLoadError(
            f"importing {path} failed: {_exc_text(exc)}",
            hint="fix the error in the model file (run `python " + path + "` to see the traceback)",
        ) from exc
    _FILE_MODULES[path] = (stamp, module)
    return module


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            raise SpecError(
                f"module {name} not found",
                hint="install the package, run from its directory, or use path/to/file.py:FACTORY",
            ) from exc
        raise ModelLoadError(f"importing {name} failed: {_exc_text(exc)}", hint="install the missing dependency") from exc
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise ModelLoadError(f"importing {name} failed: {_exc_text(exc)}", hint=f"fix the error in {name}") from exc


def _resolve_attr(module: Any, attr: str, where: str) -> Any:
    obj = module
    for i, part in enumerate(attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            scope = ".".join(attr.split(".")[:i]) or where
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = _close(part, names)
            hint = f"did you mean {', '.join(close)}?" if close else f"{scope} defines: {', '.join(names[:10]) or 'nothing'}"
            raise SpecError(f"{where} has no attribute {attr!r}", hint=hint) from None
    return obj


def _call_factory(obj: Any, args: dict[str, Any], label: str, search_dir: str | None = None) -> nn.Module:
    if isinstance(obj, nn.Module):
        if args:
            raise SpecError(
                f"{label} is a module instance, not a factory; it takes no --arg",
                hint="drop the --arg values or point the spec at a class or function",
            )
        return obj
    if not callable(obj):
        raise SpecError(f"{label} is a {type(obj).__name__}, not a class or function", hint=_SPEC_HINT)
    try:
        with _sys_path(search_dir) if search_dir else contextlib.nullcontext():
            model = obj(**args)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        hint = "fix the factory or its --arg values"
        if isinstance(exc, TypeError):
            with contextlib.suppress(TypeError, ValueError):
                hint = f"check the --arg values against the signature {label.rsplit(':', 1)[-1]}{inspect.signature(obj)}"
        raise ModelLoadError(f"building {label} failed: {_exc_text(exc)}", hint=hint) from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"building {label} returned a {type(model).__name__}, not a torch.nn.Module",
            hint="the factory must return the model (an nn.Module instance)",
        )
    return model


def _build_zoo(spec: ModelSpec) -> nn.Module:
    try:
        entry = registry.ZOO.get(spec.target)
    except KeyError:
        names = registry.ZOO.names()
        close = _close(spec.target, names)
        if close:
            hint = f"did you mean {', '.join('zoo:' + c for c in close)}?"
        elif names:
            hint = "known zoo models: " + ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        else:
            hint = "no zoo models are registered (is the bnnshift_zoo plugin installed?)"
        raise SpecError(f"unknown zoo model {spec.target!r}", hint=hint) from None
    return _call_factory(entry.factory, spec.args, spec.canonical())


def _build_timm(spec: ModelSpec) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise ModelLoadError("timm is not installed", hint="pip install timm") from exc
    name = spec.target
    if not name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        arch = name.split(".", 1)[0]  # "resnet18.a1_in1k" -> architecture + pretrained tag
        if not timm.is_model(arch):
            close = _close(arch, timm.list_models())
            raise SpecError(
                f"unknown timm model {name!r}",
                hint=f"did you mean {', '.join('timm:' + c for c in close)}?" if close else "see timm.list_models()",
            )
    args = dict(spec.args)
    if args.pop("pretrained", False):
        raise SpecError("pretrained weights are never downloaded", hint="load weights with --checkpoint instead")
    try:
        model = timm.create_model(name, pretrained=False, **args)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise ModelLoadError(f"building {spec.canonical()} failed: {_exc_text(exc)}", hint="check the --arg values") from exc
    return model


def _build_torchvision(spec: ModelSpec) -> nn.Module:
    try:
        import torchvision
    except ImportError as exc:
        raise ModelLoadError("torchvision is not installed", hint="pip install torchvision") from exc
    names = torchvision.models.list_models()
    if spec.target not in names:
        close = _close(spec.target, names)
        raise SpecError(
            f"unknown torchvision model {spec.target!r}",
            hint=f"did you mean {', '.join('torchvision:' + c for c in close)}?" if close else "see torchvision.models.list_models()",
        )
    args = dict(spec.args)
    if args.pop("weights", None) is not None or args.pop("pretrained", False):
        raise SpecError("pretrained weights are never downloaded", hint="load weights with --checkpoint instead")
    try:
        model = torchvision.models.get_model(spec.target, weights=None, **args)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise ModelLoadError(f"building {spec.canonical()} failed: {_exc_text(exc)}", hint="check the --arg values") from exc
    return model


def build_model(spec: ModelSpec | str) -> nn.Module:
    """Build (never download) the model a spec names; raises SpecError/ModelLoadError."""
    if isinstance(spec, str):
        spec = parse_model_spec(spec)
    if spec.kind == "zoo":
        return _build_zoo(spec)
    if spec.kind == "timm":
        return _build_timm(spec)
    if spec.kind == "torchvision":
        return _build_torchvision(spec)
    if spec.kind == "file":
        if not Path(spec.target).is_file():
            raise SpecError(f"model file {spec.target} does not exist", hint="check the path in the model spec")
        module = _import_file(spec.target)
        obj = _resolve_attr(module, spec.attr or "", spec.target)
        return _call_factory(obj, spec.args, spec.canonical(), search_dir=str(Path(spec.target).parent))
    if spec.kind == "module":
        module = _import_module(spec.target)
        obj = _resolve_attr(module, spec.attr or "", spec.target)
        return _call_factory(obj, spec.args, spec.canonical())
    raise SpecError(f"unknown model spec kind {spec.kind!r}", hint=f"kinds: {', '.join(KINDS)}")


def default_input_shape(spec: ModelSpec, model: nn.Module | None = None) -> tuple[int, ...] | None:
    """One sample's input shape (no batch dimension) if the spec's source knows it, else None."""
    if spec.kind == "zoo":
        try:
            shape = list(registry.ZOO.get(spec.target).input_shape)
        except KeyError:
            return None
        # the factory's own size arguments override the zoo default (e.g. vgg-small on 28x28x1)
        if "in_chans" in spec.args and len(shape) == 3:
            shape[0] = int(spec.args["in_chans"])
        if "input_size" in spec.args and len(shape) == 3:
            shape[1] = shape[2] = int(spec.args["input_size"])
        return tuple(shape)
    if spec.kind == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
        if size:
            shape = tuple(int(x) for x in size)
            in_chans = spec.args.get("in_chans")
            if isinstance(in_chans, int) and shape:
                shape = (in_chans,) + shape[1:]
            return shape
        return None
    if spec.kind == "torchvision":
        side = 299 if spec.target.startswith("inception") else 224
        return (3, side, side)
    return None


# --------------------------------------------------------------------------- checkpoints


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` matched; ``shape_mismatch`` is (key, ckpt shape, model shape)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    loaded: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def summary(self) -> str:
        mm = len(self.shape_mismatch)
        return (
            f"{len(self.missing)} missing{_few(self.missing)}, "
            f"{len(self.unexpected)} unexpected{_few(self.unexpected)}, "
            f"{mm} shape mismatch{'' if mm == 1 else 'es'}"
            + _few([f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.shape_mismatch])
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "shape_mismatch": [[k, list(a), list(b)] for k, a, b in self.shape_mismatch],
            "loaded": self.loaded,
        }


def _few(keys: list[str], n: int = 3) -> str:
    if not keys:
        return ""
    return " (" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + ")"


@dataclass
class LoadedModel:
    model: nn.Module
    spec: ModelSpec
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    load_report: LoadReport | None = None
    input_shape: tuple[int, ...] | None = None


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


def _is_globals_refusal(exc: BaseException) -> bool:
    msg = str(exc)
    return isinstance(exc, pickle.UnpicklingError) and (
        "Unsupported global" in msg or "was not an allowed global" in msg
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


def _corrupt(path: Path, exc: BaseException | None = None) -> CheckpointError:
    detail = f" ({_exc_text(exc)})" if exc is not None else ""
    err = CheckpointError(
        f"checkpoint {path} is corrupt or not a PyTorch/safetensors file",
        hint="re-save it with torch.save(model.state_dict(), ...) or safetensors" + detail,
    )
    return err


def _read_raw(path: Path, allow_unsafe: bool) -> Any:
    if path.suffix in _SAFETENSORS_SUFFIXES or _looks_like_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SafetensorError is not an Exception subclass in some versions
            raise _corrupt(path, exc) from exc
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _is_globals_refusal(exc):
            raise _corrupt(path, exc) from exc
        if not allow_unsafe:
            globs = _unsafe_globals(path, exc)
            raise UnsafeCheckpointError(
                f"checkpoint {path} needs unpickling of code (globals: {', '.join(globs) or 'unknown'})",
                hint="re-save it as a state_dict (torch.save(model.state_dict(), ...)) or, "
                "if you trust the file, pass --unsafe-load",
            ) from None
    except (PermissionError, IsADirectoryError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # zip/pickle/EOF/index errors from random or truncated bytes
        raise _corrupt(path, exc) from exc
    # Explicitly allowed: full unpickling (may run code from the file).
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} refers to code that cannot be imported: {_exc_text(exc)}",
            hint="make the module that defined the model importable, or re-save the checkpoint as a state_dict",
        ) from exc
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise _corrupt(path, exc) from exc


def _tensors_only(obj: Mapping[Any, Any]) -> dict[str, torch.Tensor]:
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _is_weights(value: Any, allow_unsafe: bool, depth: int = 3) -> bool:
    """A dict of tensors (or a module, when unsafe), possibly inside further wrapper keys."""
    if allow_unsafe and isinstance(value, nn.Module):
        return True
    if not isinstance(value, Mapping):
        return False
    if any(isinstance(v, torch.Tensor) for v in value.values()):
        return True
    return depth > 0 and any(k in value and _is_weights(value[k], allow_unsafe, depth - 1) for k in _INNER_KEYS)


def _unwrap(obj: Any, allow_unsafe: bool, use_ema: bool) -> Any:
    keys = _INNER_KEYS_EMA if use_ema else _INNER_KEYS
    for _ in range(4):  # e.g. {"model": {"state_dict": ...}}; bounded
        if isinstance(obj, nn.Module):
            return obj.state_dict()
        if not isinstance(obj, Mapping):
            return obj
        inner = next((obj[k] for k in keys if k in obj and _is_weights(obj[k], allow_unsafe)), None)
        if inner is None:
            return obj
        obj = inner
    return obj.state_dict() if isinstance(obj, nn.Module) else obj


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    while sd:
        for prefix in _STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                break
        else:
            return sd
    return sd


def load_state_dict_file(
    path: str | os.PathLike[str], *, allow_unsafe: bool = False, use_ema: bool = False
) -> dict[str, torch.Tensor]:
    """Read a checkpoint into a flat ``{key: tensor}`` dict on the CPU.

    safetensors or ``torch.load(weights_only=True)``; a file that needs code to unpickle raises
    UnsafeCheckpointError unless ``allow_unsafe``. Wrapper dicts (``state_dict``, ``model``,
    ``net``, ``module``, then ``state_dict_ema``/``model_ema``; EMA first with ``use_ema``) are
    unwrapped, ``module.``/``_orig_mod.`` prefixes shared by all keys stripped, non-tensors dropped.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} not found", hint="check the --checkpoint path")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} is not a file", hint="check the --checkpoint path")
    obj = _unwrap(_read_raw(p, allow_unsafe), allow_unsafe, use_ema)
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
    return _strip_prefixes(sd)


def _prefix_hint(report: LoadReport) -> str | None:
    """If the unexpected keys all share a first component whose removal explains the missing ones."""
    if not report.unexpected or not report.missing:
        return None
    heads = {k.split(".", 1)[0] for k in report.unexpected if "." in k}
    if len(heads) != 1 or not all("." in k for k in report.unexpected):
        return None
    head = heads.pop()
    stripped = {k.split(".", 1)[1] for k in report.unexpected}
    if set(report.missing) <= stripped:
        return f"the checkpoint's keys carry an extra {head + '.'!r} prefix; re-save the inner model's state_dict"
    return None


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    strict: bool = True,
    allow_unsafe: bool = False,
    use_ema: bool = False,
) -> LoadReport:
    """Load a checkpoint into ``model``; strict refuses any missing/unexpected/mis-shaped key
    (before touching the model); non-strict loads what fits but refuses a checkpoint of which
    nothing fits."""
    sd = load_state_dict_file(path, allow_unsafe=allow_unsafe, use_ema=use_ema)
    own = model.state_dict()
    report = LoadReport()
    report.missing = [k for k in own if k not in sd]
    report.unexpected = [k for k in sd if k not in own]
    for k, v in sd.items():
        if k in own and isinstance(own[k], torch.Tensor):
            target = own[k]
            if isinstance(target, nn.parameter.UninitializedParameter) or (
                hasattr(nn.parameter, "UninitializedBuffer") and isinstance(target, nn.parameter.UninitializedBuffer)
            ):
                continue
            if tuple(v.shape) != tuple(target.shape):
                report.shape_mismatch.append((k, tuple(v.shape), tuple(target.shape)))
    p = Path(path).expanduser()

    def fail(what: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {p} {what}: {report.summary()}",
            hint=_prefix_hint(report) or "check the model spec and --arg values, or pass --non-strict to load what fits",
        )

    if strict and not report.ok:
        raise fail("does not fit the model")
    bad = {k for k, _, _ in report.shape_mismatch}
    fitting = {k: v for k, v in sd.items() if k not in bad}
    report.loaded = sum(1 for k in fitting if k in own)
    if not strict and report.loaded == 0 and own:
        raise fail("has no key that fits the model")
    try:
        result = model.load_state_dict(fitting, strict=strict)
    except RuntimeError as exc:  # e.g. a module's own _load_from_state_dict refusing a value
        raise CheckpointError(
            f"checkpoint {p} could not be loaded into the model: {_exc_text(exc)}",
            hint="check the model spec and --arg values",
        ) from exc
    # load_state_dict's own view is authoritative for modules with custom loading hooks.
    report.missing = [k for k in result.missing_keys if k not in bad]
    report.unexpected = list(result.unexpected_keys)
    return report


def load_model(
    spec: str | ModelSpec,
    *,
    args: Iterable[str] | Mapping[str, Any] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    strict: bool = True,
    allow_unsafe: bool = False,
    use_ema: bool = False,
) -> LoadedModel:
    """Build the model, load its checkpoint (if any) and put it in eval mode."""
    if isinstance(spec, str):
        mspec = parse_model_spec(spec, args)
    else:
        mspec = ModelSpec(spec.kind, spec.target, spec.attr, {**spec.args, **_coerce_args(args)})
    model = build_model(mspec)
    report = None
    ckpt = None
    digest = None
    if checkpoint is not None:
        ckpt_path = Path(checkpoint).expanduser()
        report = load_checkpoint(model, ckpt_path, strict=strict, allow_unsafe=allow_unsafe, use_ema=use_ema)
        ckpt = str(ckpt_path.resolve())
        digest = sha256_file(ckpt_path)
    model.eval()
    return LoadedModel(
        model=model,
        spec=mspec,
        checkpoint=ckpt,
        checkpoint_sha256=digest,
        load_report=report,
        input_shape=default_input_shape(mspec, model),
    )
