"""Seeded batch order: the same (seed, epoch) gives every candidate the same batches."""
from __future__ import annotations

import hashlib
from typing import Iterator

import torch

from ..errors import DataError
from .bundle import _mix_seed

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
