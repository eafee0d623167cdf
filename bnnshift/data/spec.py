"""Data spec strings ``KIND[:ARG]``: parsing and the help text."""
from __future__ import annotations

import inspect
import re

from .. import registry
from ..errors import SpecError
from .idx import DEFAULT_FASHION_MNIST_ROOT
from .synthetic import DEFAULT_SYNTHETIC_N, SYNTHETIC_CLASSES

BUILTIN_KINDS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "image-folder": "imagefolder",
    "image_folder": "imagefolder",
}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _known_kinds_text() -> str:
    try:
        extra = [n for n in registry.DATASETS.names() if n not in BUILTIN_KINDS]
    except Exception:  # registry problems must not hide the real error
        extra = []
    kinds = list(BUILTIN_KINDS) + extra + ["module:function", "path/to/file.py:function"]
    return ", ".join(kinds)


def _looks_like_python_ref(spec: str) -> bool:
    target, sep, func = spec.rpartition(":")
    if not sep or not _IDENT.match(func) or not target:
        return False
    return target.endswith(".py") or bool(_DOTTED.match(target))


def _local_module_file(module: str, func: str) -> str | None:
    """``MODULE:FUNC`` where MODULE.py is a file in the current directory and FUNC an identifier
    that is not an existing path: the user's own module (returns its path), not a data-set alias."""
    import os

    if not (module.isidentifier() and func.isidentifier()) or os.path.exists(func):
        return None
    path = os.path.join(os.path.realpath(os.getcwd()), f"{module}.py")
    return path if os.path.isfile(path) else None


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """Split a data spec into ``(kind, argument)``.

    ``"fashion-mnist"`` -> ``("fashion-mnist", None)``; ``"mnist:/data"`` -> ``("mnist", "/data")``;
    ``"synthetic:256"`` -> ``("synthetic", "256")``; ``"pkg.mod:make"`` -> ``("module", "pkg.mod:make")``;
    ``"x/y.py:make"`` -> ``("file", "x/y.py:make")``; a registered data set name -> ``(name, root)``.
    Raises :class:`SpecError` for an empty spec or an unknown kind (listing the known ones).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError("empty data spec", hint=f"known kinds: {_known_kinds_text()}")
    spec = spec.strip()
    head, sep, rest = spec.partition(":")
    kind = _ALIASES.get(head.lower(), head.lower())
    arg: str | None = rest if sep and rest != "" else None

    local = _local_module_file(head, arg) if kind in BUILTIN_KINDS and arg is not None else None
    if local is not None:
        return "file", f"{local}:{arg}"  # the user's own fmnist.py:my_data wins over the alias
    if kind in BUILTIN_KINDS:
        if kind == "synthetic" and arg is not None:
            try:
                n = int(arg)
            except ValueError:
                n = -1
            if n <= 0:
                raise SpecError(
                    f"bad data spec {spec!r}: synthetic:N needs a positive integer N",
                    hint="e.g. synthetic:512",
                )
        if kind in ("imagefolder", "mnist") and arg is None:
            raise SpecError(f"data spec {spec!r} needs a path", hint=f"use {kind}:PATH")
        return kind, arg

    if head in registry.DATASETS:
        return head, arg

    if _looks_like_python_ref(spec):
        target = spec.rpartition(":")[0]
        return ("file" if target.endswith(".py") else "module"), spec

    raise SpecError(f"unknown data spec {spec!r}", hint=f"known kinds: {_known_kinds_text()}")


def describe_specs() -> str:
    """Help text listing the supported data specs (and registered data sets)."""
    lines = [
        "Data specs:",
        f"  fashion-mnist[:ROOT]      Fashion-MNIST idx files (default ROOT {DEFAULT_FASHION_MNIST_ROOT},",
        "                            apt-get install -y dataset-fashion-mnist); ROOT may hold the .gz",
        "                            files, the uncompressed files or a torchvision FashionMNIST/raw tree",
        "  mnist:ROOT                MNIST, same layouts as fashion-mnist",
        "  cifar10[:ROOT]            torchvision CIFAR-10 (downloaded only with download=True)",
        "  cifar100[:ROOT]           torchvision CIFAR-100 (downloaded only with download=True)",
        "  imagefolder:PATH          PATH/train (+ optional PATH/val or PATH/test) or PATH itself, one folder per",
        "                            class; resized to the model's input shape, loaded into memory",
        "  module.name:function      a function returning a DataBundle, (train_ds, val_ds|None) or (x, y)",
        "  path/to/file.py:function  same, from a Python file",
        f"  synthetic[:N]             N learnable random samples (default {DEFAULT_SYNTHETIC_N}), "
        f"{SYNTHETIC_CLASSES} classes, deterministic from the seed",
    ]
    try:
        extra = [(n, f) for n, f in registry.DATASETS.items() if n not in BUILTIN_KINDS]
    except Exception:
        extra = []
    if extra:
        lines.append("Registered by plugins:")
        for n, f in extra:
            doc = (inspect.getdoc(f) or "").strip().splitlines()
            lines.append(f"  {n + '[:ROOT]':<25} {doc[0] if doc else ''}".rstrip())
    lines.append(
        "Images whose H, W differ from the model's input shape are resized (F.interpolate); "
        "a channel mismatch is an error."
    )
    return "\n".join(lines)
