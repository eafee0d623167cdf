"""The in-memory data set (:class:`DataBundle`) and the helpers every source shares.

Normalisation constants, the extraction cache (``$BNNSHIFT_CACHE/data``), seeded subsets,
uint8 -> normalised float32, resizing to the model's input shape and validation.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import DataError

# Per-dataset normalisation constants (mean, std), per channel.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


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
    # where ``mean``/``std`` came from: "given" (--mean/--std, patch.json's record or a timm
    # pretrained_cfg), "standard" (the data set's published constants, NORMALISATION), "own" (this
    # training set's per-channel statistics) or "as-is" (the data function's own transform; mean 0 /
    # std 1 are placeholders)
    norm_source: str = "as-is"
    # the training images' own per-channel pixel mean / std in [0, 1] units, where known
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None
    notes: list[str] = field(default_factory=list)  # said to the user (normalisation not applied, ...)
    # several inputs per sample (``forward(x, mask)``): train_x / val_x hold them packed as
    # (N, 1, 1, F) float32 and this is their layout (bnnshift.data.multi); None: one input
    inputs: list[dict[str, Any]] | None = None

    def normalisation_json(self) -> dict[str, Any]:
        """``{"mean", "std", "source", "pixel_mean", "pixel_std"}``: what the inputs were normalised with."""
        r = lambda v: None if v is None else [round(float(x), 6) for x in v]  # noqa: E731
        return {"mean": r(self.mean), "std": r(self.std), "source": self.norm_source,
                "pixel_mean": r(self.pixel_mean), "pixel_std": r(self.pixel_std)}

    def fingerprint(self) -> str:
        """Short sha256 of the shapes, the class count and an evenly spaced sample of the data.

        The sampled values are rounded to 1e-4 so the fingerprint does not depend on float
        noise; the ``name`` (a path) is not part of it, so the same data in another directory
        has the same fingerprint.
        """
        h = hashlib.sha256()
        h.update(f"classes={self.num_classes};shape={tuple(self.input_shape)}".encode())
        if self.inputs:
            h.update(f";inputs={[(d['shape'], d['dtype']) for d in self.inputs]}".encode())
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


HELDOUT_FOLDERS = ("val", "test")


def folder_splits(root: Path) -> tuple[Path, Path | None]:
    """The train and held-out folders of an image-folder data root.

    ``ROOT/train/<class>/...`` with ``ROOT/val/`` or, failing that, ``ROOT/test/`` as the held-out
    split (the layout CIFAR-10 and ImageNet come in); otherwise ``ROOT/<class>/...`` with no
    held-out split. Returns ``(train_dir, heldout_dir or None)``; raises nothing (a missing root is
    the caller's error).
    """
    train = root / "train"
    if not train.is_dir():
        return root, None
    for name in HELDOUT_FOLDERS:
        if (root / name).is_dir():
            return train, root / name
    return train, None


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


def broadcast_norm(mean: Any, std: Any, channels: int, what: str = "--mean/--std"
                   ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``mean``/``std`` (one value or one per channel, [0, 1] pixel units) as ``channels``-tuples.

    One value is used for every channel. Raises :class:`UsageError` (exit 2: the values are the
    user's) when both are not given together, a std is not positive or the count fits neither 1
    nor ``channels``."""
    from ..errors import UsageError  # a bad flag value, not bad data

    if (mean is None) != (std is None):
        raise UsageError(f"{what}: mean and std go together", hint="pass both, e.g. --mean 0.5 --std 0.25")
    m = tuple(float(v) for v in ([mean] if isinstance(mean, (int, float)) else mean))
    s = tuple(float(v) for v in ([std] if isinstance(std, (int, float)) else std))
    out = []
    for label, v in (("mean", m), ("std", s)):
        if len(v) == 1:
            v = v * channels
        if len(v) != channels:
            raise UsageError(f"{what}: {len(v)} {label} values for data with {channels} channel{'s' if channels != 1 else ''}",
                            hint=f"pass one value or {channels} comma-separated values")
        out.append(v)
    if any(not (v > 0) for v in out[1]):
        raise UsageError(f"{what}: std must be positive, got {out[1]}", hint="e.g. --std 0.229,0.224,0.225")
    return out[0], out[1]


def pixel_stats(x: torch.Tensor, limit: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean / std in [0, 1] units of uint8 (or [0, 1] float) images ``(N, C, H, W)``
    (an evenly spaced sample of at most ``limit`` images)."""
    n = int(x.shape[0])
    if n > limit:
        x = x[torch.linspace(0, n - 1, limit).round().long()]
    f = x.to(torch.float32)
    if not torch.is_floating_point(x):
        f = f.div_(255.0)
    return (tuple(float(v) for v in f.mean(dim=(0, 2, 3))),
            tuple(max(float(v), 1e-6) for v in f.std(dim=(0, 2, 3))))


# The normalised inputs of a data set "differ clearly" from what the normalisation expects when a
# channel's mean lands this many stds from 0, or its std is off by this factor (either way).
NORM_MEAN_OFF = 0.5
NORM_STD_RATIO = 2.0


def normalisation_mismatch(bundle: "DataBundle", where: str = "") -> str | None:
    """One line when the images' own pixel statistics differ clearly from the normalisation applied
    (``bundle.norm_source == "given"``); None when they fit or are unknown."""
    if bundle.norm_source != "given" or bundle.pixel_mean is None or bundle.pixel_std is None:
        return None
    zm = [(pm - m) / s for pm, m, s in zip(bundle.pixel_mean, bundle.mean, bundle.std)]
    zs = [ps / s for ps, s in zip(bundle.pixel_std, bundle.std)]
    if all(abs(v) <= NORM_MEAN_OFF for v in zm) and all(1 / NORM_STD_RATIO <= v <= NORM_STD_RATIO for v in zs):
        return None
    f = lambda v: ",".join(f"{x:.3f}" for x in v)  # noqa: E731
    return (f"{bundle.name}: its images' own pixel mean {f(bundle.pixel_mean)} / std {f(bundle.pixel_std)} differ "
            f"clearly from the normalisation used (mean {f(bundle.mean)} / std {f(bundle.std)}{where}): the inputs "
            f"have mean {f(zm)} / std {f(zs)}, not about 0 / 1; used as given (the model's normalisation)")


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
    if bundle.inputs and tuple(input_shape) != tuple(bundle.input_shape):
        raise DataError(f"data set {bundle.name} hands {len(bundle.inputs)} inputs per sample: an input shape "
                        f"{c},{h},{w} (--input-shape or the model's metadata) does not apply",
                        hint="drop --input-shape; the data function's inputs are used as they are")
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
