"""An image folder decoded once into memory, for the streaming path (``--augment`` with
``--stream auto``).

Streaming an image folder decodes every file again each epoch (PIL, in the DataLoader
workers). When the decoded images fit in :data:`CACHE_LIMIT_BYTES` (uint8, the size the files
decode to: CIFAR-10's 50,000 + 10,000 32x32 RGB images take 176 MB), they are decoded once, in
the search process, and the transforms run on the kept uint8 tensors. The images that reach
the model are bitwise those of the file path: the transforms' first step, ``v2.ToImage``, turns
a PIL image into exactly the uint8 (C, H, W) tensor :func:`decode_into_memory` keeps
(``pil_to_tensor``), so augmentation draws, batch hashes and scores do not change.
"""
from __future__ import annotations

import torch

CACHE_LIMIT_BYTES = 512 << 20  # the in-memory path's float32 limit (2 GiB) in uint8


class DecodedImages(torch.utils.data.Dataset):
    """Images decoded into memory: item -> (uint8 (C, H, W) tensor, label).

    ``images`` is one uint8 (N, C, H, W) tensor when every image has the same size, else a list
    of uint8 (C, H, W) tensors; ``source`` is the file dataset they came from (its file names
    identify the data set, as before decoding)."""

    def __init__(self, images, labels: list[int], source):
        self.images, self.labels, self.source = images, labels, source

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int):
        return self.images[i], self.labels[i]

    def nbytes(self) -> int:
        if isinstance(self.images, torch.Tensor):
            return int(self.images.numel())
        return sum(int(t.numel()) for t in self.images)


def decode_into_memory(sources: list, limit: int = CACHE_LIMIT_BYTES) -> list | None:
    """Decode every image of ``sources`` (datasets with ``len`` and ``load(i) -> (PIL image,
    label)``) into :class:`DecodedImages`, one per source, or None (nothing kept) as soon as the
    decoded uint8 bytes of all of them together would exceed ``limit``: an estimate from the
    first image of each before decoding the rest, then the running total. A file that cannot be
    decoded raises the :class:`bnnshift.errors.DataError` of ``load``."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    sources = [s for s in sources if s is not None]
    estimate = 0
    for s in sources:
        if len(s):
            estimate += len(s) * int(pil_to_tensor(s.load(0)[0]).numel())
    if estimate > limit:
        return None
    total, out = 0, []
    for s in sources:
        xs, ys = [], []
        for i in range(len(s)):
            img, y = s.load(i)
            t = pil_to_tensor(img)
            total += int(t.numel())
            if total > limit:
                return None
            xs.append(t)
            ys.append(int(y))
        same = bool(xs) and all(t.shape == xs[0].shape for t in xs)
        out.append(DecodedImages(torch.stack(xs) if same else xs, ys, s))
    return out
