"""``synthetic[:N]``: learnable random data, deterministic from the seed."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .bundle import DataBundle, _as_shape, _mix_seed

DEFAULT_SYNTHETIC_N = 512
SYNTHETIC_CLASSES = 10
SYNTHETIC_DEFAULT_SHAPE = (1, 28, 28)


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
