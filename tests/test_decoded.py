"""An image folder decoded once into memory on the streaming path (bnnshift.data.decoded): the
batches that reach the model are bitwise those decoded from the files, for RGB, grey and
mixed-size folders and every augmentation; too big a folder stays on the files; --stream on
never keeps it."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from bnnshift.cli import app
from bnnshift.data import decoded
from bnnshift.data.decoded import DecodedImages, decode_into_memory
from bnnshift.data.stream import BatchHasher, SeededBatchSampler, StreamOptions, make_loader, open_stream


def _folder(root: Path, n_train: int = 96, n_test: int = 24, sizes=((8, 8),)) -> Path:
    """train/ + test/ class folders of RGB PNGs (JPEG for every third one), sizes cycled."""
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            c = i % 3
            h, w = sizes[i % len(sizes)]
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            a = (rng.random((h, w, 3)) * 90 + c * 70).astype(np.uint8)
            if i % 3 == 2:
                Image.fromarray(a).save(d / f"{i}.jpg", quality=80)
            else:
                Image.fromarray(a).save(d / f"{i}.png", compress_level=0)
    return root


def _hash(src, seed: int = 0, steps: int = 3, batch: int = 16) -> str:
    sampler = SeededBatchSampler(src.num_train, batch)
    sampler.set_order(seed, steps=steps)
    h = BatchHasher(src.num_train, batch)
    for xb, yb in make_loader(src.train, sampler, workers=0, pin_memory=False, persistent=False):
        h.update(xb, yb)
    return h.hexdigest()


def _both(root: Path, shape, augment: str):
    spec = f"imagefolder:{root}"
    files = open_stream(spec, input_shape=shape, options=StreamOptions(augment=augment))
    mem = open_stream(spec, input_shape=shape, options=StreamOptions(augment=augment, cache=True))
    return files, mem


def _assert_same(files, mem):
    assert isinstance(mem.train.images, DecodedImages) and isinstance(mem.val.images, DecodedImages)
    assert not isinstance(files.train.images, DecodedImages)
    assert mem.fingerprint() == files.fingerprint()  # the same data set: resume and journals still match
    assert mem.mean == files.mean and mem.std == files.std  # statistics from the same pixels
    assert _hash(mem) == _hash(files)
    for i in (0, 5, len(files.val) - 1):
        a, b = files.val[i], mem.val[i]
        assert a[1] == b[1] and torch.equal(a[0], b[0])


@pytest.mark.parametrize("augment", ["cifar", "imagenet", "none"])
def test_decoded_rgb_folder_gives_the_batches_of_the_files(tmp_path, augment):
    files, mem = _both(_folder(tmp_path), (3, 8, 8), augment)
    _assert_same(files, mem)
    imgs = mem.train.images
    assert isinstance(imgs.images, torch.Tensor) and imgs.images.dtype == torch.uint8
    assert tuple(imgs.images.shape) == (96, 3, 8, 8) and imgs.nbytes() == 96 * 3 * 64


def test_decoded_grey_and_mixed_size_folders(tmp_path):
    # grey: the model takes 1 channel, the files are RGB (converted on load, as the file path does)
    files, mem = _both(_folder(tmp_path / "a"), (1, 8, 8), "cifar")
    _assert_same(files, mem)
    assert mem.train.images.images.shape[1] == 1
    # mixed sizes: kept as a list of tensors, resized by the transforms as from the files
    files, mem = _both(_folder(tmp_path / "b", sizes=((8, 8), (11, 9), (6, 13))), (3, 8, 8), "imagenet")
    _assert_same(files, mem)
    kept = mem.train.images.images
    assert isinstance(kept, list) and {tuple(t.shape) for t in kept} == {(3, 8, 8), (3, 11, 9), (3, 6, 13)}


def test_a_folder_over_the_limit_stays_on_the_files(tmp_path, monkeypatch):
    root = _folder(tmp_path)
    src = open_stream(f"imagefolder:{root}", input_shape=(3, 8, 8), options=StreamOptions(augment="cifar"))
    per = 3 * 8 * 8
    assert decode_into_memory([src.train.images], limit=95 * per) is None  # the estimate says no (96 images)
    assert len(decode_into_memory([src.train.images], limit=96 * per)[0]) == 96  # exactly fits
    # the estimate from the first image fits but the running total does not (a larger image later)
    big = _folder(tmp_path / "big", n_train=6, n_test=3, sizes=((8, 8), (8, 8), (64, 64)))
    s2 = open_stream(f"imagefolder:{big}", input_shape=(3, 8, 8), options=StreamOptions(augment="none"))
    assert decode_into_memory([s2.train.images], limit=6 * per + per) is None
    kept = decode_into_memory([s2.train.images], limit=10 ** 6)
    assert kept is not None and len(kept[0]) == 6
    monkeypatch.setattr(decoded, "CACHE_LIMIT_BYTES", 10 * per)
    monkeypatch.setattr(decoded.decode_into_memory, "__defaults__", (10 * per,))
    over = open_stream(f"imagefolder:{root}", input_shape=(3, 8, 8),
                       options=StreamOptions(augment="cifar", cache=True))
    assert not isinstance(over.train.images, DecodedImages)


TINY = textwrap.dedent('''
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            x = self.bn(self.conv(x))
            return self.fc((torch.sign(x) + x - x.detach()).flatten(1))

    def tiny():
        return Tiny()
''')


def test_search_keeps_the_folder_with_stream_auto_only(tmp_path, monkeypatch):
    """--augment cifar: --stream auto decodes once (the same batch hash and scores as --stream on,
    which decodes every epoch)."""
    root = _folder(tmp_path / "d")
    model = tmp_path / "tiny.py"
    model.write_text(TINY)
    calls = []
    real = decoded.decode_into_memory
    monkeypatch.setattr(decoded, "decode_into_memory", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = {}
    for mode in ("auto", "on"):
        res = CliRunner().invoke(app, ["search", f"{model}:tiny", "--data", f"imagefolder:{root}", "--augment", "cifar",
                                       "--stream", mode, "--workers", "0", "--shifts", "0,0.5", "--batch-size", "16",
                                       "--steps", "3", "--val", "--bn-recalib-batches", "1", "--no-compile",
                                       "--out", str(tmp_path / mode), "--json"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        runs[mode] = json.loads(res.stdout)["candidates"]
        assert len(calls) == 1  # auto decoded once; on never
    for a, b in zip(runs["auto"], runs["on"]):
        assert a["batch_order_hash"] == b["batch_order_hash"]
        assert a["train_acc"] == b["train_acc"] and a["val_acc"] == b["val_acc"] and a["loss"] == b["loss"]
