"""The streaming data path: images decoded and augmented per batch by DataLoader workers.

Used for ``imagefolder:PATH`` folders too large for memory, for any ``--augment`` other than
``none`` (``imagefolder``, ``cifar10``/``cifar100``, ``fashion-mnist``/``mnist``) and with
``--stream on``. Memory does not grow with the data set: an image folder holds only the list
of file paths (torchvision ``ImageFolder``), idx/CIFAR keep their uint8 arrays (what the files
hold, 4x smaller than the in-memory path's float32). With ``--stream auto`` an image folder
whose decoded images fit in :data:`bnnshift.data.decoded.CACHE_LIMIT_BYTES` is decoded once
and kept as uint8 (the same images; no decoding per epoch).

Common random numbers (paper claim 5: only ``t`` differs between candidates):

* the batch order is :func:`bnnshift.data.batches._batch_indices`, the same as the in-memory
  path's, a pure function of (n, batch size, seed, epoch);
* every sample's augmentation draws come from its own seed ``mix(seed, step, index)``, set on
  the torch RNG around its transform, so they do not depend on which worker decoded it, on the
  number of workers or on the global RNG (its state is restored after each sample);
* :class:`BatchHasher` hashes the indices, the labels and 4,096 evenly spaced values of every
  augmented batch that reaches the model: the candidate's ``batch_order_hash``. Equal hashes
  mean equal images, order and augmentation.

Under ``torchrun`` each rank takes ``global_batch[rank::world]`` of every global batch (the
sharding of ``DistributedSampler`` applied to bnnshift's seeded order: the ranks' shards
together are exactly the single-process batch of the same global size).

Transforms are torchvision transforms v2 (docs/search.md, "Streaming and augmentation"):

* ``imagenet``: ``RandomResizedCrop(H, W)`` + ``RandomHorizontalFlip``; eval: ``Resize(H / crop_pct)``
  + ``CenterCrop(H, W)`` (crop_pct 0.875, or the timm model's ``pretrained_cfg``);
* ``cifar``: ``RandomCrop(H, W, padding=H/8)`` + ``RandomHorizontalFlip``; eval: ``Resize(H, W)``;
* ``none``: ``Resize(H, W)`` for both.

Normalisation: ``--mean/--std``, else the timm model's ``pretrained_cfg``, else the data set's
constants (idx, CIFAR: :data:`bnnshift.data.bundle.NORMALISATION`), else (image folders) the
per-channel mean/std of a seeded sample of :data:`STATS_SAMPLES` training images.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..errors import DataError, UsageError
from ..validate import AUGMENTS, STREAM_MODES, check_stream_options, parse_floats  # noqa: F401
from ._walk import IMAGE_ERRORS, image_error
from .batches import _batch_indices
from .bundle import NORMALISATION, _as_shape, folder_splits, _mix_seed, _subset_indices

__all__ = [
    "AUGMENTS", "STREAM_MODES", "StreamOptions", "StreamSource", "SeededBatchSampler", "BatchHasher",
    "open_stream", "build_transforms", "should_stream", "make_loader", "eval_batches",
    "IN_MEMORY_LIMIT_BYTES", "STATS_SAMPLES", "STREAMABLE_KINDS",
]

# AUGMENTS, STREAM_MODES, parse_floats: in bnnshift.validate (the CLI checks them before importing torch)
STREAMABLE_KINDS = ("imagefolder", "cifar10", "cifar100", "fashion-mnist", "mnist")
# 'auto' streams an image folder whose float32 tensors at the model's input shape would take
# more than this (the in-memory path holds the whole training set as float32).
IN_MEMORY_LIMIT_BYTES = 2 << 30
STATS_SAMPLES = 256
HASH_VALUES = 4096  # values of each augmented batch that go into the batch hash
IMAGENET_CROP_PCT = 0.875
EVAL_WORKERS_FROM = 4096  # eval passes over fewer samples decode in the training process


@dataclass
class StreamOptions:
    """How the streaming path decodes, augments and normalises.

    ``augment`` in :data:`AUGMENTS`; ``mean``/``std`` per channel in [0, 1] pixel units (None:
    the defaults in the module docstring); ``workers`` DataLoader worker processes (None:
    ``min(4, cpus)``); ``crop_pct`` and ``interpolation`` of the eval transform (timm's names).
    """

    augment: str = "none"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    workers: int | None = None
    crop_pct: float = IMAGENET_CROP_PCT
    interpolation: str = "bilinear"
    cache: bool = False  # an image folder: decode once into memory when it fits (bnnshift.data.decoded)

    def __post_init__(self):
        check_stream_options(self.augment, self.mean, self.std, self.workers)

    def num_workers(self) -> int:
        if self.workers is not None:
            return int(self.workers)
        try:
            n = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            n = os.cpu_count() or 1
        return max(1, min(4, n))


# ------------------------------------------------------------------------------ sources


class _TensorImages(torch.utils.data.Dataset):
    """uint8 (N, C, H, W) images in memory (idx, CIFAR): item -> (uint8 CHW tensor, label)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def load(self, i: int):
        return self.x[i], int(self.y[i])


def _path_only(path: str) -> str:
    return path


class _FolderImages(torch.utils.data.Dataset):
    """Image files of a torchvision ``ImageFolder``: item -> (PIL image in ``mode``, label)."""

    def __init__(self, root: Path, mode: str, class_map: dict[int, int] | None = None,
                 indices: list[int] | None = None):
        from torchvision.datasets import ImageFolder

        try:
            self.folder = ImageFolder(str(root), loader=_path_only)  # paths only; decoding is ours
        except (FileNotFoundError, RuntimeError) as exc:
            raise DataError(f"no images found under {root}: {exc}",
                            hint="expected PATH/train/<class>/*.png (and optional PATH/val/ or PATH/test/<class>/...) "
                                 "or PATH/<class>/*.png") from None
        from ._walk import confine, confine_note

        # no file twice (symlink loops), none outside the data root (PATH, the parent of train/)
        data_root = root.parent if root.name in ("train", "val") else root
        self.walk_note = confine_note(f"imagefolder:{root}", confine(self.folder, data_root))
        self.mode = mode
        self.class_map = class_map
        self.indices = indices

    def __len__(self) -> int:
        return len(self.folder.samples) if self.indices is None else len(self.indices)

    def load(self, i: int):
        from PIL import Image

        j = i if self.indices is None else self.indices[i]
        path, target = self.folder.samples[j]
        try:
            with Image.open(path) as im:
                img = im.convert(self.mode)
        except IMAGE_ERRORS as exc:  # a decompression bomb too: named, exit 1
            raise image_error(path, exc) from None
        return img, (target if self.class_map is None else self.class_map[target])


class _Transformed(torch.utils.data.Dataset):
    """``dataset[(index, sample_seed)] -> (float32 CHW, label)``: the transform runs with the torch
    RNG seeded by ``sample_seed`` (restored afterwards), so its random draws are a function of
    the sample's seed alone."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        i, sample_seed = key if isinstance(key, tuple) else (key, None)
        img, label = self.images.load(int(i))
        if sample_seed is None:
            return self.transform(img), label
        # the CPU generator only: torch.manual_seed would also queue a lazy CUDA seeding with a
        # stack trace per call (a third of the per-sample time)
        gen = torch.default_generator
        saved = gen.get_state()
        gen.manual_seed(int(sample_seed))
        try:
            return self.transform(img), label
        finally:
            gen.set_state(saved)


@dataclass
class StreamSource:
    """A streamed data set: train/val images (decoded per item), the transforms, the normalisation.

    ``train``/``val`` are map-style datasets keyed by ``(index, sample_seed)`` yielding float32
    (C, H, W) normalised tensors and int labels; ``val`` is None without a held-out split.
    """

    train: _Transformed
    train_eval: _Transformed  # the training images through the eval transform (probes, BN stats)
    val: _Transformed | None
    input_shape: tuple[int, int, int]
    num_classes: int
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    options: StreamOptions
    identity: list[str] = field(default_factory=list)

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_val(self) -> int:
        return 0 if self.val is None else len(self.val)

    def fingerprint(self) -> str:
        """Short sha256 of the class count, shape, sizes, normalisation, augmentation and a sample of
        the items (relative file names and sizes, or pixel values); paths' parent dirs excluded."""
        h = hashlib.sha256()
        h.update(f"stream;classes={self.num_classes};shape={self.input_shape};n={self.num_train}/{self.num_val};"
                 f"mean={self.mean};std={self.std};augment={self.options.augment};"
                 f"crop={self.options.crop_pct};interp={self.options.interpolation}".encode())
        for s in self.identity:
            h.update(s.encode())
        return h.hexdigest()[:16]


def _sample_identity(images, k: int = 64) -> list[str]:
    n = len(images)
    if n == 0:
        return []
    out = []
    images = getattr(images, "source", images)  # decoded into memory: named by its files, as before
    for i in torch.linspace(0, n - 1, min(n, k)).round().long().tolist():
        if isinstance(images, _FolderImages):
            j = i if images.indices is None else images.indices[i]
            p, t = images.folder.samples[j]
            try:
                size = os.path.getsize(p)
            except OSError:
                size = -1
            out.append(f"{Path(p).parent.name}/{Path(p).name}:{size}:{t}")
        else:
            x, y = images.load(i)
            out.append(hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()[:12] + f":{y}")
    return out


def build_transforms(augment: str, shape: tuple[int, int, int], mean: Sequence[float], std: Sequence[float], *,
                     crop_pct: float = IMAGENET_CROP_PCT, interpolation: str = "bilinear"):
    """``(train_transform, eval_transform)``: torchvision v2 pipelines from a PIL image or a uint8
    (C, H, W) tensor to a normalised float32 (C, H, W) tensor of ``shape`` (see the module docstring)."""
    from torchvision.transforms import InterpolationMode, v2

    c, h, w = shape
    interp = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
              "nearest": InterpolationMode.NEAREST}.get(interpolation, InterpolationMode.BILINEAR)
    head = [v2.ToImage()]
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    fit = [v2.Resize((h, w), interpolation=interp, antialias=True)]
    if augment == "imagenet":
        train = [v2.RandomResizedCrop((h, w), interpolation=interp, antialias=True), v2.RandomHorizontalFlip()]
        short = int(math.floor(min(h, w) / crop_pct))
        evalt = [v2.Resize(short, interpolation=interp, antialias=True), v2.CenterCrop((h, w))]
    elif augment == "cifar":
        train = fit + [v2.RandomCrop((h, w), padding=max(1, round(min(h, w) / 8))), v2.RandomHorizontalFlip()]
        evalt = fit
    else:
        train = evalt = fit
    return v2.Compose(head + train + tail), v2.Compose(head + evalt + tail)


def _estimate_stats(images, shape, seed: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std (pixel units in [0, 1]) of a seeded sample of images at ``shape``."""
    _, eval_raw = build_transforms("none", shape, [0.0] * shape[0], [1.0] * shape[0])
    idx = _subset_indices(len(images), STATS_SAMPLES, seed, 3)
    sel = range(len(images)) if idx is None else idx.tolist()
    xs = torch.stack([eval_raw(images.load(i)[0]) for i in sel])
    mean = tuple(float(v) for v in xs.mean(dim=(0, 2, 3)))
    std = tuple(max(float(v), 1e-6) for v in xs.std(dim=(0, 2, 3)))
    return mean, std


def _check_channels(shape, have: int, name: str):
    if shape is not None and shape[0] != have:
        raise DataError(f"the model expects {shape[0]} input channel{'s' if shape[0] != 1 else ''} but data set "
                        f"{name} has {have}",
                        hint=f"pass --input-shape {have},H,W or a model argument such as --arg in_chans={have}")


@dataclass
class _Opened:
    """The images of a streamed data set before transforms: train / val image sources, one
    sample's (C, H, W), classes, the data set's own normalisation (None: estimate it), name."""

    train: Any
    val: Any
    shape: tuple[int, ...]
    num_classes: int
    default_stats: Any
    name: str


def _open_tensor_set(kind: str, arg: str | None, shape, download: bool, train_limit: int | None,
                     val_limit: int | None, seed: int) -> _Opened:
    """fashion-mnist / mnist / cifar10 / cifar100 read as uint8 tensors (seeded subsets)."""
    if kind in ("fashion-mnist", "mnist"):
        from .idx import read_idx_uint8 as read
    else:
        from .cifar import read_cifar_uint8 as read
    tx, ty, vx, vy, name = read(kind, arg, download, train_limit, val_limit, seed)
    c = int(tx.shape[1])
    _check_channels(shape, c, name)
    shape = shape or (c, int(tx.shape[2]), int(tx.shape[3]))
    return _Opened(_TensorImages(tx, ty), _TensorImages(vx, vy) if vx is not None else None, shape,
                   10 if kind != "cifar100" else 100, NORMALISATION[kind], name)


def _open_folder_set(arg: str | None, shape, train_limit: int | None, val_limit: int | None, seed: int,
                     cache: bool) -> _Opened:
    """``imagefolder:PATH``: the files of ``PATH/train`` (+ val), seeded subsets, val classes
    mapped to the training set's; decoded once into memory when ``cache`` and it fits.
    Raises DataError (no folder, C other than 1 or 3, val classes not in train)."""
    path = Path(arg or "").expanduser()
    path = path.resolve() if path.exists() else path.absolute()
    name = f"imagefolder:{path}"
    if not path.is_dir():
        raise DataError(f"image folder not found: {path}", hint="pass imagefolder:PATH with one sub-folder per class")
    train_dir, val_dir = folder_splits(path)
    if shape is None:
        probe = _FolderImages(train_dir, "RGB")
        from PIL import Image

        try:
            with Image.open(probe.folder.samples[0][0]) as im:
                shape = (3, im.size[1], im.size[0])
        except IMAGE_ERRORS as exc:
            raise image_error(probe.folder.samples[0][0], exc) from None
    if shape[0] not in (1, 3):
        raise DataError(f"imagefolder can produce 1 (grey) or 3 (RGB) channels, the model expects {shape[0]}",
                        hint="pass --input-shape 3,H,W or 1,H,W")
    mode = "L" if shape[0] == 1 else "RGB"
    train_imgs = _FolderImages(train_dir, mode)
    sub = _subset_indices(len(train_imgs), train_limit, seed, 1)
    if sub is not None:
        train_imgs.indices = sub.tolist()
    val_imgs = None
    if val_dir is not None and val_limit != 0:
        val_imgs = _FolderImages(val_dir, mode)
        missing = [cl for cl in val_imgs.folder.classes if cl not in train_imgs.folder.class_to_idx]
        if missing:
            raise DataError(f"{val_dir} has classes not in {train_dir}: {', '.join(missing[:5])}")
        val_imgs.class_map = {val_imgs.folder.class_to_idx[cl]: train_imgs.folder.class_to_idx[cl]
                              for cl in val_imgs.folder.classes}
        sub = _subset_indices(len(val_imgs), val_limit, seed, 2)
        if sub is not None:
            val_imgs.indices = sub.tolist()
    num_classes = len(train_imgs.folder.classes)
    if cache:  # decoded once when it fits (bnnshift.data.decoded): the same images, no decoding per epoch
        from .decoded import decode_into_memory

        kept = decode_into_memory([train_imgs, val_imgs])
        if kept is not None:
            train_imgs, val_imgs = kept[0], (kept[1] if val_imgs is not None else None)
    return _Opened(train_imgs, val_imgs, shape, num_classes, None, name)


def _stream_norm(opts: StreamOptions, md: dict[str, Any], d: _Opened, seed: int
                 ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel: ``--mean/--std`` > the model's ``pretrained_cfg`` > the data
    set's own > estimated on the training images. Raises UsageError on a channel mismatch."""
    shape = d.shape
    mean, std = opts.mean, opts.std
    if mean is None and md.get("mean") is not None and len(md["mean"]) == shape[0]:
        mean, std = tuple(md["mean"]), tuple(md["std"])
    if mean is None:
        mean, std = d.default_stats or _estimate_stats(d.train, shape, seed)
    mean = tuple(mean) * shape[0] if len(mean) == 1 else tuple(mean)  # one value: every channel
    std = tuple(std) * shape[0] if len(std) == 1 else tuple(std)
    if len(mean) != shape[0] or len(std) != shape[0]:
        raise UsageError(f"--mean/--std have {len(mean)}/{len(std)} values but the data has {shape[0]} channels",
                         hint="give one value, or one per channel")
    return mean, std


def open_stream(spec: str, *, input_shape=None, options: StreamOptions | None = None, download: bool = False,
                train_limit: int | None = None, val_limit: int | None = None, seed: int = 0,
                model_defaults: dict[str, Any] | None = None) -> StreamSource:
    """Open ``spec`` (a kind in :data:`STREAMABLE_KINDS`) for streaming; nothing is decoded yet
    except, for an image folder without ``--mean/--std``, :data:`STATS_SAMPLES` images.

    ``model_defaults``: ``mean``, ``std``, ``crop_pct``, ``interpolation`` from a timm model's
    ``pretrained_cfg`` (used where ``options`` leaves them unset). ``train_limit``/``val_limit``
    keep seeded subsets as :func:`bnnshift.data.load_data`. Raises DataError / SpecError.
    """
    from .spec import parse_data_spec

    opts = options or StreamOptions()
    md = dict(model_defaults or {})
    kind, arg = parse_data_spec(spec)
    shape = _as_shape(input_shape)
    if kind not in STREAMABLE_KINDS:
        raise UsageError(f"data spec {spec!r} cannot be streamed",
                         hint=f"streaming (--stream on, --augment) supports {', '.join(STREAMABLE_KINDS)}")
    if kind in ("fashion-mnist", "mnist", "cifar10", "cifar100"):
        d = _open_tensor_set(kind, arg, shape, download, train_limit, val_limit, seed)
    else:
        d = _open_folder_set(arg, shape, train_limit, val_limit, seed, opts.cache)
    if len(d.train) == 0:
        raise DataError(f"data set {d.name}: the training set is empty")
    mean, std = _stream_norm(opts, md, d, seed)
    crop_pct = float(md.get("crop_pct") or opts.crop_pct)
    interp = str(md.get("interpolation") or opts.interpolation)
    opts = StreamOptions(augment=opts.augment, mean=tuple(mean), std=tuple(std), workers=opts.workers,
                         crop_pct=crop_pct, interpolation=interp, cache=opts.cache)
    train_tf, eval_tf = build_transforms(opts.augment, d.shape, mean, std, crop_pct=crop_pct, interpolation=interp)
    return StreamSource(
        train=_Transformed(d.train, train_tf), train_eval=_Transformed(d.train, eval_tf),
        val=_Transformed(d.val, eval_tf) if d.val is not None else None,
        input_shape=tuple(int(v) for v in d.shape), num_classes=d.num_classes, name=d.name,
        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std), options=opts,
        identity=_sample_identity(d.train))


def should_stream(mode: str, spec: str, augment: str, input_shape=None) -> bool:
    """Whether a search streams: ``on``/``off`` as asked, ``auto`` when ``augment`` is not ``none``
    or an image folder's float32 tensors would exceed :data:`IN_MEMORY_LIMIT_BYTES`.
    Raises UsageError for ``--augment`` with ``--stream off`` or an unstreamable spec."""
    from .spec import parse_data_spec

    if mode not in STREAM_MODES:
        raise UsageError(f"bad --stream {mode!r}", hint="auto, on or off")
    kind, arg = parse_data_spec(spec)
    if augment != "none" and mode == "off":
        raise UsageError("--augment needs the streaming path", hint="drop --stream off (or use --augment none)")
    if mode == "on" or augment != "none":
        if kind not in STREAMABLE_KINDS:
            raise UsageError(f"data spec {spec!r} cannot be streamed",
                             hint=f"--stream on / --augment support {', '.join(STREAMABLE_KINDS)}")
        return True
    if mode == "off" or kind != "imagefolder" or arg is None:
        return False
    shape = _as_shape(input_shape)
    if shape is None:
        return False
    root = Path(arg).expanduser()
    train_dir, _ = folder_splits(root)
    n = sum(len(files) for _, _, files in os.walk(train_dir))  # cheap upper bound: every file
    return n * shape[0] * shape[1] * shape[2] * 4 > IN_MEMORY_LIMIT_BYTES


# ------------------------------------------------------------------------------ order and loader


class SeededBatchSampler(torch.utils.data.Sampler):
    """Batches of ``(index, sample_seed)`` in bnnshift's seeded order; set with :meth:`set_order`.

    Global batch b of the order fixed by (n, ``global_batch``, seed) is
    ``_batch_indices(...)[b]``; this rank yields its shard ``global[rank::world]``; a sample's
    seed is ``mix(seed, b, index)`` (its augmentation draws). Mutable so that one DataLoader
    with persistent workers serves every candidate.
    """

    def __init__(self, n: int, global_batch: int, *, rank: int = 0, world: int = 1, drop_last: bool = True):
        if global_batch % world:
            raise UsageError(f"--batch-size {global_batch} is not divisible by the {world} processes",
                             hint=f"use a multiple of {world}")
        self.n, self.global_batch, self.rank, self.world, self.drop_last = n, global_batch, rank, world, drop_last
        self.seed, self.epoch, self.steps, self.start, self.stop = 0, 0, None, 0, None

    def set_order(self, seed: int, *, epoch: int = 0, steps: int | None = None, start: int = 0,
                  stop: int | None = None) -> None:
        """The order of ``seed``; yield only global batches ``start .. stop - 1`` (a paused run
        continues at its data position without decoding the batches before it)."""
        self.seed, self.epoch, self.steps, self.start, self.stop = int(seed), int(epoch), steps, int(start), stop

    def _total(self) -> int:
        if self.steps is not None:
            return int(self.steps)
        return self.n // self.global_batch if self.drop_last else -(-self.n // self.global_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        stop = self._total() if self.stop is None else min(self.stop, self._total())
        for b, idx in enumerate(_batch_indices(self.n, self.global_batch, seed=self.seed, epoch=self.epoch,
                                               drop_last=self.drop_last, steps=self.steps)):
            if b >= stop:
                return
            if b < self.start:
                continue
            local = idx[self.rank::self.world].tolist()
            yield [(i, _mix_seed(self.seed, 0xA06, self.epoch, b, i)) for i in local]

    def __len__(self) -> int:
        stop = self._total() if self.stop is None else min(self.stop, self._total())
        return max(0, stop - self.start)


class _SequentialBatches(torch.utils.data.Sampler):
    """Fixed batches of plain indices (eval: no augmentation draws)."""

    def __init__(self, indices: list[int], batch_size: int):
        self.batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def make_loader(dataset, batch_sampler, *, workers: int, pin_memory: bool, persistent: bool = True):
    """A DataLoader over ``dataset`` with ``batch_sampler``: ``workers`` processes (persistent when
    ``persistent`` and > 0), pinned memory (for CUDA), its own generator (the global RNG is not
    touched when an epoch starts, so dropout draws stay the same for every candidate)."""
    kw: dict[str, Any] = {}
    if workers > 0:
        kw.update(persistent_workers=persistent, prefetch_factor=4)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                                       pin_memory=pin_memory, generator=torch.Generator().manual_seed(0), **kw)


class eval_batches:  # noqa: N801 - used like a function returning a re-iterable
    """Re-iterable batches of ``dataset`` (eval transform) at fixed ``indices``, moved to ``device``.

    Yields ``x`` (with ``labels=False``, for BN re-estimation) or ``(x, y)``; ``len()`` is the
    number of batches. Streams with a non-persistent DataLoader: nothing is kept in memory.
    """

    def __init__(self, dataset, indices: list[int], batch_size: int, *, device, dtype=torch.float32,
                 workers: int = 0, pin_memory: bool = False, labels: bool = True):
        self.dataset, self.indices, self.batch_size = dataset, list(indices), batch_size
        self.device, self.dtype, self.workers, self.pin, self.labels = device, dtype, workers, pin_memory, labels

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self):
        # starting worker processes costs more than decoding a few thousand images in place
        workers = self.workers if len(self.indices) >= EVAL_WORKERS_FROM else 0
        loader = make_loader(self.dataset, _SequentialBatches(self.indices, self.batch_size),
                             workers=workers, pin_memory=self.pin, persistent=False)
        for xb, yb in loader:
            xb = xb.to(device=self.device, dtype=self.dtype, non_blocking=True)
            yield (xb, yb.to(self.device, non_blocking=True)) if self.labels else xb


class BatchHasher:
    """sha256 over the batches a candidate trains on: sample count, batch size, and per batch a
    digest of its labels and :data:`HASH_VALUES` evenly spaced values of the (augmented) input,
    taken on the CPU tensor before it moves to the device. ``digests`` (one 16-hex string per
    batch) is plain data, so a paused run's hash survives a snapshot. 16 hex digits."""

    def __init__(self, n: int, batch_size: int, digests: list[str] | None = None):
        self.header = f"stream;n={n};bs={batch_size};"
        self.digests = digests if digests is not None else []

    def update(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        flat = xb.detach().reshape(-1)
        k = min(HASH_VALUES, flat.numel())
        pick = flat[torch.linspace(0, flat.numel() - 1, k).round().long()] if k else flat
        h = hashlib.sha256(pick.to(torch.float32).contiguous().numpy().tobytes())
        h.update(yb.detach().to(torch.int64).contiguous().numpy().tobytes())
        self.digests.append(h.hexdigest()[:16])

    def hexdigest(self) -> str:
        return hashlib.sha256((self.header + "|".join(self.digests)).encode()).hexdigest()[:16]
