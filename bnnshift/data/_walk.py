"""Image-folder samples kept inside their data root: torchvision's ``ImageFolder`` walks with
``followlinks=True``, so a symlink loop in a class folder yields the same file many times and a
link to ``/`` reads files from anywhere. :func:`confine` keeps each file once (by real path)
and only files whose real path lies under the data root."""
from __future__ import annotations

import os
from typing import Any

__all__ = ["confine", "confine_note", "image_error", "IMAGE_ERRORS"]


def confine(ds: Any, root: str | os.PathLike[str]) -> dict[str, int]:
    """Filter ``ds.samples`` / ``ds.imgs`` / ``ds.targets`` of a torchvision ``DatasetFolder`` in
    place: one sample per real path (the first in torchvision's sorted order), none outside the
    real path of ``root``. Returns ``{"kept": n, "duplicates": n, "outside": n}`` (counts of
    samples). Labels are unchanged (class folders are the same)."""
    base = os.path.realpath(os.fspath(root))
    seen: set[str] = set()
    kept: list[tuple[str, int]] = []
    dup = outside = 0
    for path, target in ds.samples:
        real = os.path.realpath(path)
        if real != base and not real.startswith(base + os.sep):
            outside += 1
            continue
        if real in seen:
            dup += 1
            continue
        seen.add(real)
        kept.append((path, target))
    if dup or outside:
        ds.samples = kept
        if hasattr(ds, "imgs"):
            ds.imgs = kept
        if hasattr(ds, "targets"):
            ds.targets = [t for _, t in kept]
    return {"kept": len(kept), "duplicates": dup, "outside": outside}


def confine_note(name: str, counts: dict[str, int]) -> str | None:
    """One line for the search notes when :func:`confine` dropped samples, else None."""
    if not (counts["duplicates"] or counts["outside"]):
        return None
    parts = []
    if counts["duplicates"]:
        parts.append(f"{counts['duplicates']} repeated through symlinks")
    if counts["outside"]:
        parts.append(f"{counts['outside']} outside the data root through symlinks")
    return f"{name}: {counts['kept']} samples used ({', '.join(parts)} skipped)"


def _image_errors() -> tuple[type[BaseException], ...]:
    errs: tuple[type[BaseException], ...] = (OSError, ValueError)
    try:
        from PIL import Image

        errs += (Image.DecompressionBombError,)
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return errs


IMAGE_ERRORS = _image_errors()  # what decoding one image file may raise (caught and named)


def image_error(path: Any, exc: BaseException):
    """The ``DataError`` (exit 1) naming the image file that could not be decoded."""
    from ..errors import DataError

    if type(exc).__name__ == "DecompressionBombError":
        return DataError(f"image {path} is a decompression bomb: {exc}",
                         hint="remove the file, or raise PIL.Image.MAX_IMAGE_PIXELS if the image is genuine")
    return DataError(f"corrupt image {path}: {exc}", hint="remove or replace the file")
