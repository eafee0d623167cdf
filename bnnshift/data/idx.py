"""MNIST / Fashion-MNIST from idx files (plain, ``.gz`` or a torchvision ``raw/`` tree)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DataError
from .bundle import NORMALISATION, DataBundle, broadcast_norm, pixel_stats, _atomic_extract, _normalise_uint8, _source_key, _subset_indices, data_cache_dir

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _has_all(d: Path, suffix: str = "") -> bool:
    return all((d / (f + suffix)).is_file() for f in _IDX_FILES)


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


def _load_idx(kind: str, root_arg: str | None, download: bool, train_limit, val_limit, seed,
              norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> DataBundle:
    """``norm``: the (mean, std) to normalise with (one value or one per channel); default the data
    set's published constants (``NORMALISATION``)."""
    tx, ty, vx, vy, name = read_idx_uint8(kind, root_arg, download, train_limit, val_limit, seed)
    mean, std = broadcast_norm(*norm, 1) if norm is not None else NORMALISATION[kind]
    pm, ps = pixel_stats(tx)
    return DataBundle(
        train_x=_normalise_uint8(tx, mean, std),
        train_y=ty,
        val_x=None if vx is None else _normalise_uint8(vx, mean, std),
        val_y=vy,
        input_shape=(1, int(tx.shape[2]), int(tx.shape[3])),
        num_classes=10,
        name=name,
        mean=mean,
        std=std,
        norm_source="given" if norm is not None else "standard",
        pixel_mean=pm,
        pixel_std=ps,
    )


def read_idx_uint8(kind: str, root_arg: str | None, download: bool, train_limit, val_limit, seed):
    """The raw images: ``(train_x, train_y, val_x, val_y, name)``, x uint8 (N, 1, H, W), y int64 (N,);
    val is None with ``val_limit=0``. Subsets as :func:`bnnshift.data.load_data`."""
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
    if val_limit == 0:
        return tx.unsqueeze(1), ty, None, None, name
    return tx.unsqueeze(1), ty, vx.unsqueeze(1), vy, name
