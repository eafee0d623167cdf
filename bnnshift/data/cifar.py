"""CIFAR-10 / CIFAR-100 through torchvision (extracted folder or the ``.tar.gz`` archive)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DataError
from .bundle import NORMALISATION, DataBundle, broadcast_norm, pixel_stats, _atomic_extract, _normalise_uint8, _source_key, _subset_indices, data_cache_dir

def _load_cifar(kind: str, root_arg: str | None, download: bool, train_limit, val_limit, seed,
                norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> DataBundle:
    """``norm``: the (mean, std) to normalise with; default the published constants (``NORMALISATION``)."""
    tx, ty, vx, vy, name = read_cifar_uint8(kind, root_arg, download, train_limit, val_limit, seed)
    mean, std = broadcast_norm(*norm, 3) if norm is not None else NORMALISATION[kind]
    pm, ps = pixel_stats(tx)
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
        norm_source="given" if norm is not None else "standard",
        pixel_mean=pm,
        pixel_std=ps,
    )


def read_cifar_uint8(kind: str, root_arg: str | None, download: bool, train_limit, val_limit, seed):
    """The raw images: ``(train_x, train_y, val_x, val_y, name)``, x uint8 (N, 3, 32, 32), y int64 (N,);
    val is None with ``val_limit=0``."""
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
    return tx, ty, vx, vy, name
