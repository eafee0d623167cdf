"""``imagefolder:PATH``: a torchvision ``ImageFolder`` decoded into memory."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DataError
from ._walk import IMAGE_ERRORS, image_error
from .bundle import (DataBundle, _as_shape, _normalise_uint8, _subset_indices, broadcast_norm, folder_splits,
                     pixel_stats)

GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def _folder_channels(paths: list[str], sample: int = 64) -> int:
    """1 when every image of an evenly spaced sample is greyscale (PIL modes in GREY_MODES), else 3."""
    from PIL import Image

    n = len(paths)
    idx = sorted({round(i * (n - 1) / max(1, sample - 1)) for i in range(min(n, sample))})
    for i in idx:
        try:
            with Image.open(paths[i]) as im:
                if im.mode not in GREY_MODES:
                    return 3
        except OSError:
            continue  # a corrupt file is reported when it is decoded
    return 1


def _open_folder(d: Path, root: Path, notes: list[str]):
    """``torchvision.datasets.ImageFolder`` of ``d``, its samples confined to ``root`` (no file
    twice, none outside it; what was left out appended to ``notes``). Raises DataError."""
    from torchvision.datasets import ImageFolder

    from ._walk import confine, confine_note

    try:
        ds = ImageFolder(str(d))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(
            f"no images found under {d}: {exc}",
            hint="expected PATH/train/<class>/*.png (and optional PATH/val/ or PATH/test/<class>/...) or PATH/<class>/*.png",
        ) from None
    note = confine_note(f"imagefolder:{d}", confine(ds, root))  # no file twice, none outside PATH
    if note:
        notes.append(note)
    if not ds.samples:
        raise DataError(f"no images found under {d} (inside {root})", hint="check the symlinks in the class folders")
    return ds


def _folder_shape(train_ds, input_shape) -> tuple[int, int, int]:
    """(C, H, W): ``input_shape``, else C = 1 when the files are greyscale (else 3) and H, W of
    the first image. Raises DataError for C other than 1 or 3 or an unreadable first image."""
    from PIL import Image

    shape = _as_shape(input_shape)
    if shape is None:
        try:
            with Image.open(train_ds.samples[0][0]) as im:
                w0, h0 = im.size
        except IMAGE_ERRORS as exc:
            raise image_error(train_ds.samples[0][0], exc) from None
        shape = (_folder_channels([p for p, _ in train_ds.samples]), h0, w0)
    c, h, w = shape
    if c not in (1, 3):
        raise DataError(f"imagefolder can produce 1 (grey) or 3 (RGB) channels, the model expects {c}",
                        hint="pass --input-shape 3,H,W or 1,H,W")
    return c, h, w


def _decode_folder(ds, shape: tuple[int, int, int], limit: int | None, seed, salt: int,
                   class_map: dict[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of ``ds`` (a seeded subset of ``limit``) decoded to uint8 (N, C, H, W) (C = 1:
    greyscale, 3: RGB; resized bilinearly to H, W) and their int64 labels (``class_map``: the
    training set's index of each class). Raises DataError naming an undecodable file."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    c, h, w = shape
    mode = "L" if c == 1 else "RGB"
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
        except IMAGE_ERRORS as exc:  # a decompression bomb too: named, exit 1
            raise image_error(p, exc) from None
        ys[j] = t if class_map is None else class_map[t]
    return xs, ys


def _load_imagefolder(path_arg: str, input_shape, train_limit, val_limit, seed,
                      norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> DataBundle:
    """Decode ``PATH/train`` (+ ``PATH/val``) into memory at ``input_shape`` (C = 1: every image
    converted to greyscale, C = 3: to RGB, so RGBA / palette / greyscale files all load; without a
    shape, C = 1 when the files are greyscale, else 3, and H, W of the first image).

    ``norm``: (mean, std) in [0, 1] pixel units (one value or one per channel) to normalise
    with; default the training images' own per-channel statistics (``norm_source`` "own")."""
    path = Path(path_arg).expanduser()
    path = path.resolve() if path.exists() else path.absolute()
    name = f"imagefolder:{path}"
    if not path.is_dir():
        raise DataError(f"image folder not found: {path}", hint="pass imagefolder:PATH with one sub-folder per class")
    train_dir, val_dir = folder_splits(path)

    notes: list[str] = []
    train_ds = _open_folder(train_dir, path, notes)
    val_ds = _open_folder(val_dir, path, notes) if val_dir is not None and val_limit != 0 else None
    c, h, w = shape = _folder_shape(train_ds, input_shape)

    tx, ty = _decode_folder(train_ds, shape, train_limit, seed, 1, None)
    vx = vy = None
    if val_ds is not None:
        missing = [cl for cl in val_ds.classes if cl not in train_ds.class_to_idx]
        if missing:
            raise DataError(f"{val_dir} has classes not in {train_dir}: {', '.join(missing[:5])}")
        cmap = {val_ds.class_to_idx[cl]: train_ds.class_to_idx[cl] for cl in val_ds.classes}
        vx, vy = _decode_folder(val_ds, shape, val_limit, seed, 2, cmap)
    # Normalise with the given statistics, else the training set's own per-channel ones.
    pm, ps = pixel_stats(tx, limit=len(tx))
    mean, std = broadcast_norm(*norm, c) if norm is not None else (pm, ps)
    bundle = DataBundle(
        train_x=_normalise_uint8(tx, mean, std),
        train_y=ty,
        val_x=None if vx is None else _normalise_uint8(vx, mean, std),
        val_y=vy,
        input_shape=(c, h, w),
        num_classes=len(train_ds.classes),
        name=name,
        mean=mean,
        std=std,
        norm_source="given" if norm is not None else "own",
        pixel_mean=pm,
        pixel_std=ps,
    )
    bundle.walk_notes = notes  # reported by the search (bnnshift.data._walk)
    return bundle
