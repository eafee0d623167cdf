"""Data sets for the one-epoch candidate trainings: spec parsing, in-memory loading, batching.

A data spec is a string ``KIND[:ARG]``:

* ``fashion-mnist[:ROOT]`` (default ROOT ``/usr/share/datasets/fashion-mnist``, the Debian
  package ``dataset-fashion-mnist``) and ``mnist:ROOT``. ROOT may hold the ``*-idx?-ubyte.gz``
  files, the uncompressed ``*-idx?-ubyte`` files, or be a torchvision root with
  ``FashionMNIST/raw`` (``MNIST/raw``). Compressed files are extracted once into the cache
  (``$BNNSHIFT_CACHE/data``, default ``~/.cache/bnnshift/data``), atomically.
* ``cifar10[:ROOT]`` / ``cifar100[:ROOT]``: torchvision CIFAR (ROOT holds
  ``cifar-10-batches-py`` or the ``cifar-10-python.tar.gz`` archive). Downloaded only when
  ``download=True``.
* ``imagefolder:PATH``: torchvision ``ImageFolder`` with ``PATH/train`` and an optional
  ``PATH/val``, or ``PATH`` itself used as the training set. Images are converted to
  ``input_shape`` (C=1 grey, C=3 RGB; H, W resized) and normalised with their own mean/std.
* ``module.name:function`` / ``path/to/file.py:function``: a user function returning a
  :class:`DataBundle`, a tuple ``(train_dataset, val_dataset_or_None)`` or tensors ``(x, y)``.
* ``synthetic[:N]``: N learnable random samples (default 512), deterministic from ``seed``.
* any name registered in :data:`bnnshift.registry.DATASETS` (``factory(root, **kw) -> DataBundle``).

Everything is loaded into memory as float32 ``(N, C, H, W)`` tensors, normalised. When the
model's ``input_shape`` differs from the data only in H, W the images are resized with
``F.interpolate`` (bilinear, antialiased when shrinking); a channel mismatch is a
:class:`DataError`. Nothing is ever downloaded unless ``download=True``.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import shutil
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from . import registry
from .errors import DataError, SpecError

__all__ = [
    "DataBundle",
    "parse_data_spec",
    "load_data",
    "iterate_batches",
    "batch_order_hash",
    "describe_specs",
    "data_cache_dir",
    "DEFAULT_FASHION_MNIST_ROOT",
]

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
DEFAULT_SYNTHETIC_N = 512
SYNTHETIC_CLASSES = 10
SYNTHETIC_DEFAULT_SHAPE = (1, 28, 28)

# Per-dataset normalisation constants (mean, std), per channel.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

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


# --------------------------------------------------------------------------------------------
# DataBundle
# --------------------------------------------------------------------------------------------


@dataclass
class DataBundle:
    """An in-memory data set: normalised float32 images and int64 labels."""

    train_x: torch.Tensor  # float32 (N, C, H, W), already normalised
    train_y: torch.Tensor  # int64 (N,)
    val_x: torch.Tensor | None
    val_y: torch.Tensor | None
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    name: str  # canonical spec, e.g. "fashion-mnist:/usr/share/datasets/fashion-mnist"
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def fingerprint(self) -> str:
        """Short sha256 of the shapes, the class count and an evenly spaced sample of the data.

        The sampled values are rounded to 1e-4 so the fingerprint does not depend on float
        noise; the ``name`` (a path) is not part of it, so the same data in another directory
        has the same fingerprint.
        """
        h = hashlib.sha256()
        h.update(f"classes={self.num_classes};shape={tuple(self.input_shape)}".encode())
        for label, x, y in (("train", self.train_x, self.train_y), ("val", self.val_x, self.val_y)):
            if x is None or y is None:
                h.update(f";{label}=none".encode())
                continue
            h.update(f";{label}={tuple(x.shape)}/{tuple(y.shape)}".encode())
            n = int(x.shape[0])
            if n == 0:
                continue
            k = min(n, 64)
            idx = torch.linspace(0, n - 1, k).round().long()
            xs = (x[idx].detach().to(torch.float64) * 1e4).round().to(torch.int64).contiguous()
            h.update(xs.numpy().tobytes())
            h.update(y.detach().to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def num_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def num_val(self) -> int:
        return 0 if self.val_x is None else int(self.val_x.shape[0])


# --------------------------------------------------------------------------------------------
# Spec parsing
# --------------------------------------------------------------------------------------------


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
        "  imagefolder:PATH          PATH/train (+ optional PATH/val) or PATH itself, one folder per",
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


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def data_cache_dir() -> Path:
    """``$BNNSHIFT_CACHE/data`` or ``~/.cache/bnnshift/data``."""
    base = os.environ.get("BNNSHIFT_CACHE")
    root = Path(base).expanduser() if base else Path("~/.cache/bnnshift").expanduser()
    return root / "data"


def _subset_indices(n: int, limit: int | None, seed: int, salt: int) -> torch.Tensor | None:
    """Indices of a random subset of size ``limit`` (sorted), or None for 'all'."""
    if limit is None or limit >= n:
        return None
    if limit < 0:
        raise DataError(f"bad sample limit {limit}", hint="use a non-negative number")
    g = torch.Generator().manual_seed(_mix_seed(seed, salt))
    return torch.randperm(n, generator=g)[:limit].sort().values


def _mix_seed(*parts: int) -> int:
    h = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _normalise_uint8(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> normalised float32."""
    x = x.to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def _as_shape(input_shape: Any) -> tuple[int, int, int] | None:
    if input_shape is None:
        return None
    try:
        shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError):
        raise DataError(f"bad input shape {input_shape!r}", hint="expected C,H,W e.g. 1,28,28") from None
    if len(shape) != 3 or min(shape) <= 0:
        raise DataError(f"bad input shape {input_shape!r}", hint="expected three positive numbers C,H,W e.g. 1,28,28")
    return shape  # type: ignore[return-value]


def _resize(x: torch.Tensor, hw: tuple[int, int], chunk: int = 2048) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) to ``hw``, antialiased when shrinking, in chunks."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    shrink = hw[0] < x.shape[-2] or hw[1] < x.shape[-1]
    out = torch.empty((x.shape[0], x.shape[1], hw[0], hw[1]), dtype=torch.float32)
    for i in range(0, x.shape[0], chunk):
        out[i : i + chunk] = F.interpolate(
            x[i : i + chunk].to(torch.float32), size=hw, mode="bilinear", align_corners=False, antialias=shrink
        )
    return out


def _fit_input_shape(bundle: DataBundle, input_shape: tuple[int, int, int] | None) -> DataBundle:
    """Resize H, W to ``input_shape``; a channel mismatch is a DataError."""
    if input_shape is None:
        return bundle
    c, h, w = input_shape
    dc, dh, dw = bundle.input_shape
    if c != dc:
        raise DataError(
            f"the model expects {c} input channel{'s' if c != 1 else ''} but data set "
            f"{bundle.name} has {dc}",
            hint=f"pass --input-shape {dc},{dh},{dw} or a model argument such as --arg in_chans={dc}",
        )
    if (h, w) != (dh, dw):
        bundle.train_x = _resize(bundle.train_x, (h, w))
        if bundle.val_x is not None:
            bundle.val_x = _resize(bundle.val_x, (h, w))
        bundle.input_shape = (c, h, w)
    return bundle


def _validate(bundle: Any, where: str) -> DataBundle:
    if not isinstance(bundle, DataBundle):
        raise DataError(f"{where} returned {type(bundle).__name__}, not a DataBundle")
    for label, x, y in (("train", bundle.train_x, bundle.train_y), ("val", bundle.val_x, bundle.val_y)):
        if x is None and y is None and label == "val":
            continue
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise DataError(f"{where}: {label}_x/{label}_y must be tensors")
        if x.dim() != 4:
            raise DataError(f"{where}: {label}_x must be (N, C, H, W), got shape {tuple(x.shape)}")
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"{where}: {label}_y must be (N,) matching {label}_x, got {tuple(y.shape)}")
        if tuple(x.shape[1:]) != tuple(bundle.input_shape):
            raise DataError(f"{where}: {label}_x has sample shape {tuple(x.shape[1:])}, input_shape says {bundle.input_shape}")
    if bundle.train_x.shape[0] == 0:
        raise DataError(f"{where}: the training set is empty")
    bundle.train_x = bundle.train_x.to(torch.float32)
    bundle.train_y = bundle.train_y.to(torch.int64)
    if bundle.val_x is not None and bundle.val_y is not None:
        bundle.val_x = bundle.val_x.to(torch.float32)
        bundle.val_y = bundle.val_y.to(torch.int64)
    ys = [bundle.train_y] + ([bundle.val_y] if bundle.val_y is not None else [])
    for y in ys:
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= bundle.num_classes):
            raise DataError(
                f"{where}: labels must be in [0, {bundle.num_classes}), found [{int(y.min())}, {int(y.max())}]"
            )
    bundle.input_shape = tuple(int(v) for v in bundle.input_shape)  # type: ignore[assignment]
    return bundle


def _apply_limits(bundle: DataBundle, train_limit: int | None, val_limit: int | None, seed: int) -> DataBundle:
    idx = _subset_indices(bundle.num_train, train_limit, seed, 1)
    if idx is not None:
        bundle.train_x, bundle.train_y = bundle.train_x[idx], bundle.train_y[idx]
    if bundle.val_x is not None and bundle.val_y is not None:
        if val_limit == 0:
            bundle.val_x = bundle.val_y = None
        else:
            idx = _subset_indices(bundle.num_val, val_limit, seed, 2)
            if idx is not None:
                bundle.val_x, bundle.val_y = bundle.val_x[idx], bundle.val_y[idx]
    return bundle


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST
# --------------------------------------------------------------------------------------------

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _has_all(d: Path, suffix: str = "") -> bool:
    return all((d / (f + suffix)).is_file() for f in _IDX_FILES)


def _atomic_extract(sources: list[Path], final: Path, subdir: str = "") -> Path:
    """Extract ``sources`` into ``final/subdir`` via a temp dir in ``final.parent`` + os.replace."""
    from torchvision.datasets.utils import extract_archive

    if final.is_dir():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    except OSError as exc:
        raise DataError(
            f"cannot create the data cache {final.parent}: {exc.strerror or exc}",
            hint="set BNNSHIFT_CACHE to a writable directory",
        ) from None
    try:
        dest = tmp / subdir if subdir else tmp
        dest.mkdir(parents=True, exist_ok=True)
        for src in sources:
            try:
                extract_archive(str(src), str(dest))
            except (OSError, EOFError, zlib.error, gzip.BadGzipFile, RuntimeError, ValueError) as exc:
                raise DataError(f"corrupt or unreadable archive {src}: {exc}", hint="reinstall or re-download it") from None
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real error
                raise
    except OSError as exc:
        raise DataError(f"cannot extract into the data cache {final}: {exc}", hint="set BNNSHIFT_CACHE to a writable directory") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _source_key(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _locate_idx(kind: str, root: Path, download: bool) -> tuple[str, Path | None]:
    """Return ('torchvision', tv_root) or ('flat', raw_dir) for a usable idx layout.

    Compressed files are extracted into the cache, which is then a torchvision root.
    """
    cls_dir = "FashionMNIST" if kind == "fashion-mnist" else "MNIST"
    candidates = [root / cls_dir / "raw", root / "raw", root]
    for d in candidates:
        if _has_all(d):
            if d == root / cls_dir / "raw":
                return "torchvision", root
            return "flat", d
    for d in candidates:
        if _has_all(d, ".gz"):
            gz = [d / (f + ".gz") for f in _IDX_FILES]
            final = data_cache_dir() / f"{kind}-{_source_key(gz)}"
            _atomic_extract(gz, final, subdir=f"{cls_dir}/raw")
            if not _has_all(final / cls_dir / "raw"):
                raise DataError(f"extracted cache {final} is incomplete", hint=f"delete {final} and retry")
            return "torchvision", final
    return "missing", None


def _load_idx(kind: str, root_arg: str | None, download: bool, train_limit, val_limit, seed) -> DataBundle:
    from torchvision.datasets import MNIST, FashionMNIST
    from torchvision.datasets.mnist import read_image_file, read_label_file

    root = Path(root_arg or DEFAULT_FASHION_MNIST_ROOT).expanduser()
    root = root.resolve() if root.exists() else root.absolute()
    name = f"{kind}:{root}"
    cls = FashionMNIST if kind == "fashion-mnist" else MNIST
    layout, where = ("missing", None)
    if root.is_dir():
        layout, where = _locate_idx(kind, root, download)
    if layout == "missing" and download:
        where = data_cache_dir() / f"{kind}-download"
        layout = "download"
    if layout == "missing":
        names = ", ".join(f + "[.gz]" for f in _IDX_FILES)
        if kind == "fashion-mnist":
            hint = (
                "install it with `apt-get install -y dataset-fashion-mnist` or pass fashion-mnist:ROOT "
                f"with a directory holding {names}"
            )
        else:
            hint = f"pass mnist:ROOT with a directory holding {names}, or allow downloading"
        what = "does not exist" if not root.exists() else "does not contain the idx files"
        raise DataError(f"{kind} data not found: {root} {what}", hint=hint)

    def load(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            if layout == "flat":
                prefix = "train" if train else "t10k"
                assert where is not None
                x = read_image_file(str(where / f"{prefix}-images-idx3-ubyte"))
                y = read_label_file(str(where / f"{prefix}-labels-idx1-ubyte"))
            else:
                ds = cls(str(where), train=train, download=(layout == "download"))
                x, y = ds.data, ds.targets
        except DataError:
            raise
        except Exception as exc:  # torchvision asserts / TypeError / RuntimeError on bad files
            raise DataError(
                f"corrupt {kind} file under {where}: {type(exc).__name__}: {exc}".rstrip(": "),
                hint="reinstall the data set (apt-get install --reinstall dataset-fashion-mnist) or pass another ROOT"
                if kind == "fashion-mnist"
                else "replace the files or pass another ROOT",
            ) from None
        if x.dim() != 3 or y.dim() != 1 or x.shape[0] != y.shape[0] or x.dtype != torch.uint8:
            raise DataError(
                f"corrupt {kind} files under {where}: images {tuple(x.shape)}, labels {tuple(y.shape)}",
                hint="replace the files or pass another ROOT",
            )
        return x, y.to(torch.int64)

    mean, std = NORMALISATION[kind]
    tx, ty = load(True)
    vx, vy = load(False)
    ti = _subset_indices(tx.shape[0], train_limit, seed, 1)
    if ti is not None:
        tx, ty = tx[ti], ty[ti]
    vi = _subset_indices(vx.shape[0], val_limit, seed, 2)
    if vi is not None:
        vx, vy = vx[vi], vy[vi]
    if ty.numel() and (int(ty.min()) < 0 or int(ty.max()) > 9):
        raise DataError(f"corrupt {kind} labels under {where}: values outside 0..9")
    h, w = int(tx.shape[1]), int(tx.shape[2])
    return DataBundle(
        train_x=_normalise_uint8(tx.unsqueeze(1), mean, std),
        train_y=ty,
        val_x=None if val_limit == 0 else _normalise_uint8(vx.unsqueeze(1), mean, std),
        val_y=None if val_limit == 0 else vy,
        input_shape=(1, h, w),
        num_classes=10,
        name=name,
        mean=mean,
        std=std,
    )


# --------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------


def _load_cifar(kind: str, root_arg: str | None, download: bool, train_limit, val_limit, seed) -> DataBundle:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if kind == "cifar10" else CIFAR100
    folder = cls.base_folder  # cifar-10-batches-py / cifar-100-python
    archive = cls.filename  # cifar-10-python.tar.gz / cifar-100-python.tar.gz
    root = Path(root_arg).expanduser() if root_arg else data_cache_dir() / kind
    root = root.resolve() if root.exists() else root.absolute()
    name = f"{kind}:{root}"
    tv_root: Path | None = None
    if (root / folder).is_dir():
        tv_root = root
    elif root.name == folder and root.is_dir():
        tv_root = root.parent
    elif (root / archive).is_file():
        final = data_cache_dir() / f"{kind}-{_source_key([root / archive])}"
        tv_root = _atomic_extract([root / archive], final)
    elif download:
        tv_root = root
    if tv_root is None:
        what = "does not exist" if not root.exists() else f"contains neither {folder}/ nor {archive}"
        raise DataError(
            f"{kind} data not found: {root} {what}",
            hint=f"pass {kind}:ROOT with the extracted {folder}/ (or {archive}), or allow downloading",
        )

    def load(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            ds = cls(str(tv_root), train=train, download=download)
        except Exception as exc:
            raise DataError(
                f"cannot load {kind} from {tv_root}: {type(exc).__name__}: {exc}",
                hint=f"check {tv_root / folder} (corrupt or incomplete?) or pass another ROOT",
            ) from None
        x = torch.as_tensor(ds.data)  # uint8 (N, H, W, 3)
        return x.permute(0, 3, 1, 2).contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64)

    mean, std = NORMALISATION[kind]
    tx, ty = load(True)
    ti = _subset_indices(tx.shape[0], train_limit, seed, 1)
    if ti is not None:
        tx, ty = tx[ti], ty[ti]
    vx = vy = None
    if val_limit != 0:
        vx, vy = load(False)
        vi = _subset_indices(vx.shape[0], val_limit, seed, 2)
        if vi is not None:
            vx, vy = vx[vi], vy[vi]
    return DataBundle(
        train_x=_normalise_uint8(tx, mean, std),
        train_y=ty,
        val_x=None if vx is None else _normalise_uint8(vx, mean, std),
        val_y=vy,
        input_shape=(3, int(tx.shape[2]), int(tx.shape[3])),
        num_classes=10 if kind == "cifar10" else 100,
        name=name,
        mean=mean,
        std=std,
    )


# --------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------


def _load_imagefolder(path_arg: str, input_shape, train_limit, val_limit, seed) -> DataBundle:
    from PIL import Image
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    path = Path(path_arg).expanduser()
    path = path.resolve() if path.exists() else path.absolute()
    name = f"imagefolder:{path}"
    if not path.is_dir():
        raise DataError(f"image folder not found: {path}", hint="pass imagefolder:PATH with one sub-folder per class")
    train_dir = path / "train" if (path / "train").is_dir() else path
    val_dir = path / "val" if train_dir != path and (path / "val").is_dir() else None

    def open_folder(d: Path):
        try:
            return ImageFolder(str(d))
        except (FileNotFoundError, RuntimeError) as exc:
            raise DataError(
                f"no images found under {d}: {exc}",
                hint="expected PATH/train/<class>/*.png (and optional PATH/val/<class>/...) or PATH/<class>/*.png",
            ) from None

    train_ds = open_folder(train_dir)
    val_ds = open_folder(val_dir) if val_dir is not None and val_limit != 0 else None

    shape = _as_shape(input_shape)
    if shape is None:
        with Image.open(train_ds.samples[0][0]) as im:
            w0, h0 = im.size
        shape = (3, h0, w0)
    c, h, w = shape
    if c not in (1, 3):
        raise DataError(f"imagefolder can produce 1 (grey) or 3 (RGB) channels, the model expects {c}",
                        hint="pass --input-shape 3,H,W or 1,H,W")
    mode = "L" if c == 1 else "RGB"

    def load(ds, limit: int | None, salt: int, class_map: dict[int, int] | None):
        idx = _subset_indices(len(ds.samples), limit, seed, salt)
        sel = range(len(ds.samples)) if idx is None else idx.tolist()
        xs = torch.empty((len(sel), c, h, w), dtype=torch.uint8)
        ys = torch.empty(len(sel), dtype=torch.int64)
        for j, i in enumerate(sel):
            p, t = ds.samples[i]
            try:
                with Image.open(p) as im:
                    im = im.convert(mode)
                    if im.size != (w, h):
                        im = im.resize((w, h), Image.BILINEAR)
                    xs[j] = pil_to_tensor(im)
            except (OSError, ValueError) as exc:
                raise DataError(f"corrupt image {p}: {exc}", hint="remove or replace the file") from None
            ys[j] = t if class_map is None else class_map[t]
        return xs, ys

    tx, ty = load(train_ds, train_limit, 1, None)
    vx = vy = None
    if val_ds is not None:
        missing = [cl for cl in val_ds.classes if cl not in train_ds.class_to_idx]
        if missing:
            raise DataError(f"{val_dir} has classes not in {train_dir}: {', '.join(missing[:5])}")
        cmap = {val_ds.class_to_idx[cl]: train_ds.class_to_idx[cl] for cl in val_ds.classes}
        vx, vy = load(val_ds, val_limit, 2, cmap)
    # Normalise with the training set's own per-channel statistics.
    f = tx.to(torch.float32).div_(255.0)
    mean = tuple(float(v) for v in f.mean(dim=(0, 2, 3)))
    std = tuple(max(float(v), 1e-6) for v in f.std(dim=(0, 2, 3)))
    return DataBundle(
        train_x=_normalise_uint8(tx, mean, std),
        train_y=ty,
        val_x=None if vx is None else _normalise_uint8(vx, mean, std),
        val_y=vy,
        input_shape=(c, h, w),
        num_classes=len(train_ds.classes),
        name=name,
        mean=mean,
        std=std,
    )


# --------------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------------


def _synthetic(n: int, input_shape, seed: int, val_limit: int | None) -> DataBundle:
    """Learnable random data: a class-dependent +-1 pattern (smooth, 4x4-pixel blocks) plus noise.

    Train has N samples, validation N // 4 (at least 1), both balanced over 10 classes. The
    pattern and the noise have unit variance; their sum is scaled by 1/sqrt(2), so the data
    is roughly mean 0, std 1. Per pixel the signal-to-noise ratio is 1, which a linear model
    (or a small conv net) separates easily.
    """
    c, h, w = _as_shape(input_shape) or SYNTHETIC_DEFAULT_SHAPE
    g = torch.Generator().manual_seed(_mix_seed(seed, 0x5EED))
    ph, pw = max(1, (h + 3) // 4), max(1, (w + 3) // 4)
    coarse = torch.randint(0, 2, (SYNTHETIC_CLASSES, c, ph, pw), generator=g).to(torch.float32) * 2 - 1
    patterns = F.interpolate(coarse, size=(h, w), mode="nearest")

    def draw(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = (torch.arange(m) % SYNTHETIC_CLASSES)[torch.randperm(m, generator=g)]
        noise = torch.randn((m, c, h, w), generator=g)
        return (patterns[y] + noise) / (2.0**0.5), y.to(torch.int64)

    tx, ty = draw(n)
    vx, vy = draw(max(1, n // 4))
    return DataBundle(
        train_x=tx,
        train_y=ty,
        val_x=None if val_limit == 0 else vx,
        val_y=None if val_limit == 0 else vy,
        input_shape=(c, h, w),
        num_classes=SYNTHETIC_CLASSES,
        name=f"synthetic:{n}",
        mean=(0.0,) * c,
        std=(1.0,) * c,
    )


# --------------------------------------------------------------------------------------------
# User functions
# --------------------------------------------------------------------------------------------


def _resolve_function(kind: str, ref: str) -> tuple[Callable[..., Any], str]:
    target, _, func_name = ref.rpartition(":")
    if kind == "file":
        path = Path(target).expanduser()
        path = path.resolve() if path.exists() else path.absolute()
        if not path.is_file():
            raise DataError(f"data file not found: {path}", hint="pass path/to/file.py:function")
        mod_name = "_bnnshift_data_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise DataError(f"cannot import {path}", hint="is it a Python file?")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise DataError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
        canonical = f"{path}:{func_name}"
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            if exc.name and target.startswith(exc.name):
                raise SpecError(
                    f"unknown data spec {ref!r}: no module named {exc.name!r}",
                    hint=f"known kinds: {_known_kinds_text()}",
                ) from None
            raise DataError(f"importing {target} failed: {exc}") from exc
        except Exception as exc:
            raise DataError(f"importing {target} failed: {type(exc).__name__}: {exc}") from exc
        canonical = f"{target}:{func_name}"
    fn = getattr(module, func_name, None)
    if fn is None or not callable(fn):
        raise SpecError(f"{target} has no function {func_name!r}", hint=f"check the data spec {ref!r}")
    return fn, canonical


def _call_with_supported(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Call ``fn(*args, ...)`` passing only the keyword arguments it accepts."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn(*args)
    params = list(sig.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return fn(*args, **kw)
    names = {p.name for p in params[len(args):] if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return fn(*args, **{k: v for k, v in kw.items() if k in names})


def _to_tensor(v: Any) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    try:
        from PIL import Image

        if isinstance(v, Image.Image):
            from torchvision.transforms.functional import pil_to_tensor

            return pil_to_tensor(v)
    except ImportError:  # pragma: no cover
        pass
    return torch.as_tensor(v)


def _dataset_to_tensors(ds: Any, limit: int | None, seed: int, salt: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        n = len(ds)
    except TypeError:
        raise DataError(f"{where}: the data set has no len(); return a map-style Dataset or tensors") from None
    idx = _subset_indices(n, limit, seed, salt)
    sel = range(n) if idx is None else idx.tolist()
    xs, ys = [], []
    for i in sel:
        item = ds[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DataError(f"{where}: data set items must be (x, y) pairs, got {type(item).__name__}")
        xs.append(_to_tensor(item[0]))
        ys.append(int(_to_tensor(item[1]).reshape(-1)[0]))
    if not xs:
        raise DataError(f"{where}: the data set is empty")
    try:
        x = torch.stack(xs)
    except RuntimeError as exc:
        raise DataError(f"{where}: samples have different shapes ({exc})", hint="resize them in the data set's transform") from None
    return x, torch.tensor(ys, dtype=torch.int64)


def _finish_user_tensors(
    tx: torch.Tensor, ty: torch.Tensor, vx: torch.Tensor | None, vy: torch.Tensor | None, name: str
) -> DataBundle:
    """Make (N, C, H, W) float32; integer images are scaled to [0, 1] and normalised with their own stats."""

    def nchw(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return x.unsqueeze(1)
        if x.dim() == 2:  # flat features -> (N, 1, 1, F)
            return x.view(x.shape[0], 1, 1, x.shape[1])
        if x.dim() != 4:
            raise DataError(f"{name}: images must be (N, C, H, W) or (N, H, W), got {tuple(x.shape)}")
        return x

    tx = nchw(tx)
    vx = nchw(vx) if vx is not None else None
    ty = ty.reshape(-1).to(torch.int64)
    vy = vy.reshape(-1).to(torch.int64) if vy is not None else None
    c = int(tx.shape[1])
    if not torch.is_floating_point(tx):
        f = tx.to(torch.float32) / 255.0
        mean = tuple(float(v) for v in f.mean(dim=(0, 2, 3)))
        std = tuple(max(float(v), 1e-6) for v in f.std(dim=(0, 2, 3)))
        tx = _normalise_uint8(tx, mean, std)
        vx = _normalise_uint8(vx, mean, std) if vx is not None else None
    else:  # float data is used as the user's transform left it
        mean, std = (0.0,) * c, (1.0,) * c
        tx = tx.to(torch.float32)
        vx = vx.to(torch.float32) if vx is not None else None
    labels = torch.cat([ty] + ([vy] if vy is not None else []))
    num_classes = int(labels.max()) + 1 if labels.numel() else 0
    return DataBundle(tx, ty, vx, vy, (c, int(tx.shape[2]), int(tx.shape[3])), num_classes, name, mean, std)


def _load_user(kind: str, ref: str, input_shape, download, train_limit, val_limit, seed) -> DataBundle:
    fn, canonical = _resolve_function(kind, ref)
    where = f"data function {canonical}"
    try:
        out = _call_with_supported(
            fn, input_shape=input_shape, seed=seed, download=download, train_limit=train_limit, val_limit=val_limit
        )
    except (DataError, SpecError):
        raise
    except Exception as exc:
        raise DataError(f"{where} failed: {type(exc).__name__}: {exc}") from exc
    if isinstance(out, DataBundle):
        out.name = out.name or canonical
        return out
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 4):
        raise DataError(
            f"{where} returned {type(out).__name__}",
            hint="return a DataBundle, (train_dataset, val_dataset_or_None) or tensors (x, y)",
        )

    def is_array(v: Any) -> bool:
        return isinstance(v, torch.Tensor) or type(v).__module__ == "numpy"

    if len(out) == 4 and all(is_array(v) or v is None for v in out):  # (x, y, val_x, val_y)
        tx, ty, vx, vy = (None if v is None else _to_tensor(v) for v in out)
    elif len(out) == 2 and is_array(out[0]) and is_array(out[1]):
        tx, ty, vx, vy = _to_tensor(out[0]), _to_tensor(out[1]), None, None
    elif len(out) == 2:
        tx, ty = _dataset_to_tensors(out[0], train_limit, seed, 1, where)
        vx = vy = None
        if out[1] is not None and val_limit != 0:
            vx, vy = _dataset_to_tensors(out[1], val_limit, seed, 2, where)
    else:
        raise DataError(f"{where} returned a 4-tuple that is not tensors (x, y, val_x, val_y)")
    if tx is None or ty is None or tx.shape[0] != ty.reshape(-1).shape[0]:
        raise DataError(f"{where}: x and y have different lengths")
    return _finish_user_tensors(tx, ty, vx, vy, canonical)


# --------------------------------------------------------------------------------------------
# load_data
# --------------------------------------------------------------------------------------------


def load_data(
    spec: str,
    *,
    input_shape: tuple[int, int, int] | None = None,
    download: bool = False,
    train_limit: int | None = None,
    val_limit: int | None = None,
    seed: int = 0,
) -> DataBundle:
    """Load the data set ``spec`` into memory (see the module docstring for the specs).

    ``train_limit`` / ``val_limit`` keep a random subset (fixed by ``seed``) of that many
    samples; ``val_limit=0`` drops the validation set. ``input_shape`` (C, H, W) is the
    model's: images are resized to H, W when only those differ, a channel mismatch raises
    :class:`DataError`. Nothing is downloaded unless ``download=True``.
    """
    kind, arg = parse_data_spec(spec)
    shape = _as_shape(input_shape)
    for label, lim in (("train_limit", train_limit), ("val_limit", val_limit)):
        if lim is not None and lim < 0:
            raise DataError(f"bad {label} {lim}", hint="use a non-negative number")
    if train_limit == 0:
        raise DataError("train_limit=0 leaves no training data", hint="use a positive number")

    if kind in ("fashion-mnist", "mnist"):
        bundle = _load_idx(kind, arg, download, train_limit, val_limit, seed)
    elif kind in ("cifar10", "cifar100"):
        bundle = _load_cifar(kind, arg, download, train_limit, val_limit, seed)
    elif kind == "imagefolder":
        assert arg is not None
        bundle = _load_imagefolder(arg, shape, train_limit, val_limit, seed)
    elif kind == "synthetic":
        n = int(arg) if arg is not None else DEFAULT_SYNTHETIC_N
        bundle = _synthetic(n, shape, seed, val_limit)
    elif kind in ("module", "file"):
        assert arg is not None
        bundle = _load_user(kind, arg, shape, download, train_limit, val_limit, seed)
    else:  # registered by a plugin
        factory = registry.DATASETS.get(kind)
        try:
            bundle = _call_with_supported(
                factory, arg,
                input_shape=shape, download=download, train_limit=train_limit, val_limit=val_limit, seed=seed,
            )
        except (DataError, SpecError):
            raise
        except Exception as exc:
            raise DataError(f"data set {kind!r} failed to load: {type(exc).__name__}: {exc}") from exc
        if isinstance(bundle, DataBundle) and not bundle.name:
            bundle.name = kind if arg is None else f"{kind}:{arg}"

    bundle = _validate(bundle, f"data set {spec!r}")
    bundle = _apply_limits(bundle, train_limit, val_limit, seed)
    return _fit_input_shape(bundle, shape)


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(_mix_seed(seed, epoch))


def _batch_indices(
    n: int, batch_size: int, *, seed: int, epoch: int = 0, drop_last: bool = True, steps: int | None = None
) -> Iterator[torch.Tensor]:
    """Index tensors of the batches; the order is a pure function of (n, batch_size, seed, epoch)."""
    if batch_size <= 0:
        raise DataError(f"bad batch size {batch_size}", hint="use a positive --batch-size")
    if n <= 0:
        raise DataError("cannot iterate over an empty data set")
    per_epoch = n // batch_size if drop_last else -(-n // batch_size)
    if per_epoch == 0:
        raise DataError(
            f"the data set has {n} samples, fewer than one batch of {batch_size}",
            hint="lower --batch-size or use more data",
        )
    if steps is not None and steps < 0:
        raise DataError(f"bad number of steps {steps}")
    remaining = per_epoch if steps is None else steps
    e = epoch
    while remaining > 0:
        perm = torch.randperm(n, generator=_epoch_generator(seed, e))
        for b in range(per_epoch):
            if remaining == 0:
                return
            yield perm[b * batch_size : (b + 1) * batch_size]
            remaining -= 1
        e += 1


def iterate_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    seed: int,
    epoch: int = 0,
    drop_last: bool = True,
    steps: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(xb, yb)`` shuffled in an order fixed by ``(seed, epoch)``.

    The permutation comes from a private ``torch.Generator``, so it is independent of the
    global RNG state. Without ``steps`` one epoch is yielded; with ``steps`` exactly that many
    batches, continuing into epochs ``epoch + 1, epoch + 2...`` (each freshly shuffled) if one
    epoch has fewer batches. Raises :class:`DataError` if not even one batch fits.
    """
    if x.shape[0] != y.shape[0]:
        raise DataError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    for idx in _batch_indices(int(x.shape[0]), batch_size, seed=seed, epoch=epoch, drop_last=drop_last, steps=steps):
        yield x[idx], y[idx]


def batch_order_hash(
    n: int, batch_size: int, *, seed: int, epoch: int = 0, steps: int | None = None, drop_last: bool = True
) -> str:
    """Short sha256 of the sample order :func:`iterate_batches` uses for the same arguments."""
    h = hashlib.sha256(f"n={n};bs={batch_size};".encode())
    for idx in _batch_indices(n, batch_size, seed=seed, epoch=epoch, drop_last=drop_last, steps=steps):
        h.update(idx.to(torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]
