"""Model specs and model building: where the user's model comes from and how it is built.

A model spec names where the model comes from::

    zoo:NAME                      a built-in (or plugin) zoo model
    path/to/file.py:ATTR          a factory function or nn.Module class in a Python file
    package.module:ATTR           the same in an importable module
    timm:NAME                     timm.create_model(NAME, pretrained=False, **args)
    torchvision:NAME              torchvision.models.get_model(NAME, weights=None, **args)

Factory keyword arguments come separately (``--arg key=value``). Pretrained weights are never
downloaded. Public names are re-exported by :mod:`bnnshift.load`.
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
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from torch import nn

from . import registry
from .errors import ModelLoadError, SpecError

KINDS = ("zoo", "file", "module", "timm", "torchvision")
_PREFIX_KINDS = ("zoo", "timm", "torchvision")  # "KIND:NAME"
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


def exc_text(exc: BaseException) -> str:
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
def on_sys_path(directory: str) -> Iterator[None]:
    added = directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(directory)


def _forget_shadowed_siblings(folder: Path) -> None:
    """Drop from ``sys.modules`` the user modules (not stdlib, not installed packages) that a model
    file in ``folder`` would import by a sibling's name but that were imported from another folder
    (a second model file with its own ``layers.py`` in the same process): the file then imports its
    own sibling, as in a fresh process."""
    roots = {Path(x).resolve() for x in (sys.prefix, sys.base_prefix, sys.exec_prefix) if x}
    here = folder.resolve()
    try:
        names = [f.stem for f in here.glob("*.py")]
    except OSError:
        return
    for name in names:
        mod = sys.modules.get(name)
        file = getattr(mod, "__file__", None) if mod is not None else None
        if not file:
            continue
        where = Path(file).resolve()
        if where.parent == here or any(r in where.parents for r in roots):
            continue
        sys.modules.pop(name, None)


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
    _forget_shadowed_siblings(p.parent)
    try:
        with on_sys_path(str(p.parent)):
            module_spec.loader.exec_module(module)
    except BaseException as exc:  # SystemExit too: a script that parses argv at import
        sys.modules.pop(mod_name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ModelLoadError(
            f"importing {path} failed: {exc_text(exc)}",
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
        raise ModelLoadError(f"importing {name} failed: {exc_text(exc)}", hint="install the missing dependency") from exc
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise ModelLoadError(f"importing {name} failed: {exc_text(exc)}", hint=f"fix the error in {name}") from exc


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
        with on_sys_path(search_dir) if search_dir else contextlib.nullcontext():
            model = obj(**args)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        hint = "fix the factory or its --arg values"
        if isinstance(exc, TypeError):
            with contextlib.suppress(TypeError, ValueError):
                hint = f"check the --arg values against the signature {label.rsplit(':', 1)[-1]}{inspect.signature(obj)}"
        raise ModelLoadError(f"building {label} failed: {exc_text(exc)}", hint=hint) from exc
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
        raise ModelLoadError(f"building {spec.canonical()} failed: {exc_text(exc)}", hint="check the --arg values") from exc
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
        raise ModelLoadError(f"building {spec.canonical()} failed: {exc_text(exc)}", hint="check the --arg values") from exc
    return model


def unwrap_model(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The module inside ``nn.DataParallel`` / ``DistributedDataParallel`` (``.module``) and
    ``torch.compile`` (``OptimizedModule._orig_mod``), nested in any order; returns
    ``(inner, notes)`` with one note per wrapper removed (empty if none)."""
    notes: list[str] = []
    for _ in range(8):  # bounded: wrappers do not nest deeper in practice
        name = type(model).__name__
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif name == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
        notes.append(f"the factory returned {name}: using the module inside it")
    return model, notes


def _build(spec: ModelSpec) -> nn.Module:
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


def build_model(spec: ModelSpec | str, *, notes: list[str] | None = None) -> nn.Module:
    """Build (never download) the model a spec names; raises SpecError/ModelLoadError.

    A DataParallel / DistributedDataParallel / compiled wrapper returned by the factory is
    removed (:func:`unwrap_model`); what was removed is appended to ``notes``."""
    if isinstance(spec, str):
        spec = parse_model_spec(spec)
    model, removed = unwrap_model(_build(spec))
    if notes is not None:
        notes.extend(removed)
    return model


coerce_args = _coerce_args
