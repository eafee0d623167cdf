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
import dataclasses
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
from .errors import CheckpointError, ModelLoadError, SpecError, UnsafeCheckpointError, UsageError

__all__ = [
    "KINDS",
    "ModelSpec",
    "LoadReport",
    "LoadedModel",
    "parse_model_spec",
    "parse_arg_pairs",
    "parse_arg_value",
    "build_model",
    "unwrap_model",
    "coerce_args",
    "default_input_shape",
    "declared_input_shape",
    "guess_input_shape",
    "choose_input_shape",
    "pick_logits",
    "load_state_dict_file",
    "load_checkpoint",
    "load_model",
]

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
            if inspect.ismodule(obj):  # what the file defines, not what it imports (torch, nn, F)
                names = [n for n in names if callable(getattr(obj, n, None))
                         and getattr(getattr(obj, n), "__module__", None) == obj.__name__] or names
            close = _close(part, names)
            hint = f"did you mean {', '.join(close)}?" if close else f"{scope} defines: {', '.join(names[:10]) or 'nothing'}"
            raise SpecError(f"{where} has no attribute {attr!r}", hint=hint) from None
    return obj


def _check_arg_names(obj: Any, args: dict[str, Any], label: str) -> None:
    """Raise ``SpecError`` (exit 2) for an ``--arg`` name the factory's signature does not take
    (no ``**kwargs``), naming the ones it takes; a signature that cannot be read is not checked."""
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in args if k not in names]
    if unknown:
        close = _close(unknown[0], names)
        raise SpecError(f"unknown --arg {unknown[0]!r} for {label}",
                        hint=(f"did you mean {', '.join(close)}? " if close else "")
                        + f"it takes: {', '.join(names) or 'no arguments'}")


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
    _check_arg_names(obj, args, label)
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


def _cfg_shape(model: nn.Module | None) -> tuple[int, ...] | None:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
    if size:
        with contextlib.suppress(TypeError, ValueError):
            return tuple(int(x) for x in size)
    return None


def _first_layer_shape(model: nn.Module) -> tuple[tuple[int, ...], str] | None:
    """(shape, what it came from) from the first conv / linear in registration order."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            side = (64,) if isinstance(m, nn.Conv1d) else (16, 16, 16) if isinstance(m, nn.Conv3d) else (32, 32)
            return (int(m.in_channels), *side), f"in_channels={m.in_channels} of the first conv {name}"
        if isinstance(m, nn.Linear) and not isinstance(m, nn.LazyLinear):
            return (int(m.in_features),), f"in_features={m.in_features} of the first linear layer {name}"
    return None


def _forward_ok(model: nn.Module, shape: tuple[int, ...]) -> bool:
    """Does a forward of zeros of ``shape`` run? On a copy: a forward may write in place."""
    import copy

    try:
        probe = copy.deepcopy(model).eval()
        with torch.no_grad():
            probe(torch.zeros((2, *shape)))
        return True
    except Exception:  # noqa: BLE001 - any failure means the guess is wrong
        return False


def declared_input_shape(spec: ModelSpec, model: nn.Module | None = None) -> tuple[tuple[int, ...] | None, str | None]:
    """The input shape the model declares (no batch dimension) and where from, or (None, None):
    zoo metadata (with the factory's ``in_chans`` / ``input_size`` arguments), torchvision's 224
    (299 for inception), a ``pretrained_cfg`` / ``default_cfg`` ``input_size`` (timm or any
    model carrying one)."""
    shape = default_input_shape(spec, model)
    if shape is not None:
        return shape, f"{spec.kind} metadata"
    cfg = _cfg_shape(model)
    if cfg is not None:
        return cfg, "the model's pretrained_cfg input_size"
    return None, None


def guess_input_shape(model: nn.Module) -> tuple[tuple[int, ...] | None, str]:
    """A guess from the first conv's ``in_channels`` at 32x32 (or the first linear layer's
    ``in_features``), kept only if a forward pass of zeros on a copy accepts it; (None, reason)."""
    first = _first_layer_shape(model)
    if first is not None and _forward_ok(model, first[0]):
        return first
    return None, "no zoo metadata, pretrained_cfg or first conv/linear layer that accepts a guessed size"


def choose_input_shape(explicit: Iterable[int] | None, loaded: "LoadedModel", data: str | None = None, *,
                       seed: int = 0) -> tuple[tuple[int, ...], str]:
    """The input shape a command uses, and where it came from (said to the user).

    Precedence: ``explicit`` (``--input-shape``, already parsed) > the model's declared size
    (zoo metadata, ``pretrained_cfg``, torchvision; data are resized to it) > the sample shape of
    ``data`` (not ``synthetic``, which follows the model) > a guess from the first conv /
    linear layer that a forward pass accepts. Raises UsageError (exit 2) when none applies.
    """
    if explicit is not None:
        return tuple(int(v) for v in explicit), "--input-shape"
    if loaded.input_shape is not None:
        return tuple(loaded.input_shape), loaded.input_shape_source or "the model's metadata"
    if data:
        from .data import load_data, parse_data_spec

        if parse_data_spec(data)[0] != "synthetic":
            bundle = load_data(data, input_shape=None, train_limit=8, val_limit=0, seed=seed)
            shape = tuple(int(v) for v in bundle.input_shape)
            first = _first_layer_shape(loaded.model)
            if (first is not None and len(first[0]) == 3 and len(shape) == 3 and first[0][0] != shape[0]
                    and _forward_ok(loaded.model, (first[0][0], *shape[1:]))):
                # e.g. greyscale files for an RGB model: the model's channels, the data's H, W (an image
                # folder converts each image; other data sets say the channels differ, naming --input-shape)
                return ((first[0][0], *shape[1:]),
                        f"the samples of --data {bundle.name} (H, W) and {first[1]} (channels)")
            return shape, f"the samples of --data {bundle.name}"
    guess, source = guess_input_shape(loaded.model)
    if guess is not None:
        return tuple(guess), f"guessed from {source} (pass --input-shape to set it)"
    raise UsageError("the model's input shape is unknown",
                     hint="pass --input-shape C,H,W (e.g. 3,32,32); scan and search also take it from --data samples")


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
        shape = _cfg_shape(model)
        if shape:
            in_chans = spec.args.get("in_chans")
            if isinstance(in_chans, int) and shape:
                shape = (in_chans,) + shape[1:]
            return shape
        return None
    if spec.kind == "torchvision":
        side = 299 if spec.target.startswith("inception") else 224
        return (3, side, side)
    return None


# --------------------------------------------------------------------------- outputs


def pick_logits(out: Any, index: int | None = None, key: str | None = None) -> tuple[torch.Tensor, str | None]:
    """The logits ``(N, classes)`` in a model's output, and a note saying how they were chosen.

    A tensor is the logits (note None). A tuple/list (e.g. a distillation model's
    ``(logits, features)``): element ``index``, default the first tensor. A dict (or a
    ``ModelOutput``) or a ``@dataclass``: item / field ``key``, default ``"logits"``. Raises
    UsageError (exit 2) naming the output's structure and ``--output-index`` / ``--output-key`` when none fits.
    """
    if isinstance(out, torch.Tensor):
        return out, None
    if dataclasses.is_dataclass(out) and not isinstance(out, type) and not isinstance(out, Mapping):
        # a plain @dataclass output: its fields, like the items of a dict (default field "logits")
        items = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        k = key if key is not None else ("logits" if "logits" in items else None)
        if k is None or k not in items or not isinstance(items[k], torch.Tensor):
            raise UsageError(f"the model returns a dataclass {type(out).__name__} (fields: "
                             f"{', '.join(list(items)[:8])}); "
                             f"{'no tensor in field ' + repr(key) if key is not None else 'which field are the logits?'}",
                             hint="pass --output-key FIELD")
        return items[k], (f"the model returns a dataclass {type(out).__name__}: field {k!r} used as the logits "
                          "(--output-key to change)")
    if isinstance(out, Mapping):
        k = key if key is not None else ("logits" if "logits" in out else None)
        if k is None or k not in out or not isinstance(out[k], torch.Tensor):
            raise UsageError(f"the model returns a dict (keys: {', '.join(map(str, list(out)[:8]))}); "
                             f"{'no tensor under ' + repr(key) if key is not None else 'which item are the logits?'}",
                             hint="pass --output-key KEY")
        return out[k], f"the model returns a dict: item {k!r} used as the logits (--output-key to change)"
    if isinstance(out, (tuple, list)):
        kind = type(out).__name__
        if index is not None:
            if not (0 <= index < len(out)) or not isinstance(out[index], torch.Tensor):
                raise UsageError(f"the model returns a {kind} of {len(out)}; element {index} is not a tensor",
                                 hint="pass --output-index N of the logits")
            return out[index], f"the model returns a {kind} of {len(out)}: element {index} used as the logits"
        first = next((i for i, v in enumerate(out) if isinstance(v, torch.Tensor)), None)
        if first is None:
            raise UsageError(f"the model returns a {kind} of {len(out)} without a tensor at its top level",
                             hint="pass --output-index N of the logits")
        return out[first], (f"the model returns a {kind} of {len(out)}: element {first} used as the logits "
                            "(--output-index to change; a --train-config loss_fn receives the whole output)")
    raise UsageError(f"the model returns a {type(out).__name__}, not a tensor of logits",
                     hint="return the logits, a tuple/list (--output-index) or a dict (--output-key)")


def logits_picker(index: int | None = None, key: str | None = None):
    """``out -> logits`` for :func:`pick_logits` with fixed ``index`` / ``key``."""

    def pick(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else pick_logits(out, index, key)[0]

    return pick


def _float32_if_half(model: nn.Module) -> str | None:
    """A float16/bfloat16 model runs here in float32 (CPU analysis and training); returns the note."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    low = sorted(str(d).replace("torch.", "") for d in dtypes if d in (torch.float16, torch.bfloat16))
    if not low:
        return None
    model.float()
    return f"the model's parameters are {', '.join(low)}: running it in float32 (the shifts are the same)"


# --------------------------------------------------------------------------- checkpoints


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` read and matched; ``to_json()`` is the ``checkpoint`` object
    of every ``--json`` output, ``patch.json`` and ``search.json``.

    ``path``/``sha256``: the file; ``inner_key``: the wrapper keys descended (``"state_dict"``,
    ``"model/state_dict"``, None for a bare state_dict); ``prefix``: what was stripped from every
    key (``"module."``, ``"_orig_mod.module."``, None); ``tensors``: tensors found under the
    inner key; ``loaded`` of ``total`` (the model's state_dict entries) were loaded;
    ``shape_mismatch`` is (key, ckpt shape, model shape); ``notes``: EMA present / used,
    wrappers removed, non-finite values allowed.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    loaded: int = 0
    total: int = 0
    path: str | None = None
    sha256: str | None = None
    inner_key: str | None = None
    prefix: str | None = None
    tensors: int = 0
    strict: bool = True
    notes: list[str] = field(default_factory=list)

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

    def line(self) -> str:
        """The one stderr line: ``checkpoint F: loaded K of N (key 'state_dict', prefix 'module.'
        stripped)`` plus, when not everything fitted, the key summary."""
        where = []
        if self.inner_key:
            where.append(f"key {self.inner_key!r}")
        if self.prefix:
            where.append(f"prefix {self.prefix!r} stripped")
        text = f"checkpoint {self.path}: loaded {self.loaded} of {self.total}"
        if where:
            text += " (" + ", ".join(where) + ")"
        if not self.ok:
            text += "; " + self.summary()
        for n in self.notes:
            text += f"; {n}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "inner_key": self.inner_key,
            "prefix": self.prefix,
            "tensors": self.tensors,
            "loaded": self.loaded,
            "total": self.total,
            "strict": self.strict,
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "shape_mismatch": [[k, list(a), list(b)] for k, a, b in self.shape_mismatch],
            "notes": list(self.notes),
        }


def _few(keys: list[str], n: int = 3) -> str:
    if not keys:
        return ""
    return " (" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + ")"


@dataclass
class LoadedModel:
    """A built model with its checkpoint loaded. ``input_shape``: one sample's shape if known
    (``input_shape_source`` says from where); ``notes``: wrappers removed and the like."""

    model: nn.Module
    spec: ModelSpec
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    load_report: LoadReport | None = None
    input_shape: tuple[int, ...] | None = None
    input_shape_source: str | None = None
    notes: list[str] = field(default_factory=list)

    def checkpoint_json(self) -> dict[str, Any] | None:
        """The ``checkpoint`` object of JSON outputs (None without a checkpoint)."""
        return self.load_report.to_json() if self.load_report is not None else None


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
    detail = f" ({_exc_text(exc)})" if exc is not None else ""
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
                stack.enter_context(_sys_path(d))
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
class _Read:
    sd: dict[str, torch.Tensor]
    inner_key: str | None
    prefix: str | None
    notes: list[str]


def _read_state_dict(path: str | os.PathLike[str], *, allow_unsafe: bool, use_ema: bool,
                     model_keys: Iterable[str] | None, search_dirs: Iterable[str] = ()) -> _Read:
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
    return _Read(sd, "/".join(keys) or None, prefix, notes)


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
    return _read_state_dict(path, allow_unsafe=allow_unsafe, use_ema=use_ema, model_keys=model_keys).sd


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


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """State-dict keys that name one and the same tensor (``conv2.weight = conv1.weight``), in
    registration order; only groups of two or more."""
    groups: dict[int, list[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        if t is not None:
            groups.setdefault(id(t), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _bn_counter(model: nn.Module, key: str) -> bool:
    """``key`` is a BatchNorm's ``num_batches_tracked``: torch's ``load_state_dict(strict=True)``
    keeps the model's own counter when a plain dict lacks it."""
    owner, _, leaf = key.rpartition(".")
    if leaf != "num_batches_tracked":
        return False
    try:
        mod = model.get_submodule(owner) if owner else model
    except AttributeError:
        return False
    return isinstance(mod, nn.modules.batchnorm._BatchNorm)


def _fill_as_torch_does(model: nn.Module, sd: dict[str, torch.Tensor]
                        ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keys that are absent but that torch's own ``load_state_dict(strict=True)`` does not miss:
    a tensor tied to a key that is present (safetensors' ``save_model`` stores one name per
    shared tensor) is given that key's value; a missing BatchNorm ``num_batches_tracked`` is left
    to torch, which keeps the model's own. Returns (the dict, notes saying what was accepted)."""
    sd = dict(sd)
    notes: list[str] = []
    tied: list[str] = []
    for group in _tied_groups(model):
        present = [k for k in group if k in sd]
        if not present:
            continue
        for k in group:
            if k not in sd:
                sd[k] = sd[present[0]]
                tied.append(f"{k} = {present[0]}")
    if tied:
        notes.append(f"tied weights loaded from the key they share a tensor with: {', '.join(tied[:3])}"
                     + (", ..." if len(tied) > 3 else ""))
    counters = [k for k in model.state_dict() if k not in sd and _bn_counter(model, k)]
    if counters:
        notes.append(f"{len(counters)} BatchNorm num_batches_tracked absent: the model's own kept "
                     "(as torch's load_state_dict does)")
    return sd, notes


def _nonfinite(sd: Mapping[str, torch.Tensor]) -> list[str]:
    return [k for k, v in sd.items() if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all())]


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    strict: bool = True,
    allow_unsafe: bool = False,
    use_ema: bool = False,
    allow_nonfinite: bool = False,
    search_dirs: Iterable[str] = (),
) -> LoadReport:
    """Load a checkpoint into ``model`` and return the :class:`LoadReport`.

    Strict refuses any missing/unexpected/mis-shaped key (before touching the model); non-strict
    loads what fits but refuses a checkpoint of which no parameter fits. NaN/inf values in the
    keys to load are refused naming them unless ``allow_nonfinite``. ``search_dirs``: folders
    put on ``sys.path`` (after the current one) while unpickling with ``allow_unsafe``.
    Raises CheckpointError / UnsafeCheckpointError.
    """
    own = model.state_dict()
    read = _read_state_dict(path, allow_unsafe=allow_unsafe, use_ema=use_ema, model_keys=own.keys(),
                            search_dirs=search_dirs)
    sd = read.sd
    p = Path(path).expanduser()
    report = LoadReport(path=str(p), inner_key=read.inner_key, prefix=read.prefix, tensors=len(sd),
                        total=len(own), strict=strict, notes=list(read.notes))
    sd, accepted = _fill_as_torch_does(model, sd)
    report.notes.extend(accepted)
    report.missing = [k for k in own if k not in sd and not _bn_counter(model, k)]
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

    def fail(what: str) -> CheckpointError:
        where = [f"under {read.inner_key!r}"] if read.inner_key else []
        if read.prefix:
            where.append(f"prefix {read.prefix!r} stripped")
        where = f" ({', '.join(where)})" if where else ""
        return CheckpointError(
            f"checkpoint {p}{where} {what}: {report.summary()}",
            hint=_prefix_hint(report) or "check the model spec and --arg values, or pass --non-strict to load what fits",
        )

    if strict and not report.ok:
        raise fail("does not fit the model")
    bad = {k for k, _, _ in report.shape_mismatch}
    fitting = {k: v for k, v in sd.items() if k not in bad}
    report.loaded = sum(1 for k in fitting if k in own)
    params = {k for k, _ in model.named_parameters()}
    if not strict and own and (report.loaded == 0 or (params and not any(k in params for k in fitting))):
        raise fail(f"has no parameter that fits the model (loaded {report.loaded} of {len(own)})")
    nonfinite = _nonfinite({k: v for k, v in fitting.items() if k in own})
    if nonfinite:
        if not allow_nonfinite:
            raise CheckpointError(
                f"checkpoint {p} holds NaN/inf values in {len(nonfinite)} tensor(s){_few(nonfinite)}",
                hint="the training diverged before this checkpoint; use an earlier one, or pass --allow-nonfinite",
            )
        report.notes.append(f"non-finite values loaded (--allow-nonfinite) in {', '.join(nonfinite[:3])}")
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
    allow_nonfinite: bool = False,
) -> LoadedModel:
    """Build the model (wrappers removed), load its checkpoint (if any) and put it in eval mode.

    The result carries the :class:`LoadReport` (``load_report``), the input shape the model's
    metadata declares (:func:`declared_input_shape`) and notes for the user (wrappers removed, ...)."""
    if isinstance(spec, str):
        mspec = parse_model_spec(spec, args)
    else:
        mspec = ModelSpec(spec.kind, spec.target, spec.attr, {**spec.args, **_coerce_args(args)})
    notes: list[str] = []
    model = build_model(mspec, notes=notes)
    half = _float32_if_half(model)
    if half:
        notes.append(half)
    report = None
    ckpt = None
    digest = None
    if checkpoint is not None:
        ckpt_path = Path(checkpoint).expanduser()
        dirs = [str(Path(mspec.target).parent)] if mspec.kind == "file" else []
        report = load_checkpoint(model, ckpt_path, strict=strict, allow_unsafe=allow_unsafe, use_ema=use_ema,
                                 allow_nonfinite=allow_nonfinite, search_dirs=dirs)
        ckpt = str(ckpt_path.resolve())
        digest = sha256_file(ckpt_path)
        report.path, report.sha256 = ckpt, digest
    model.eval()
    shape, source = declared_input_shape(mspec, model)
    return LoadedModel(
        model=model,
        spec=mspec,
        checkpoint=ckpt,
        checkpoint_sha256=digest,
        load_report=report,
        input_shape=shape,
        input_shape_source=source,
        notes=notes,
    )
