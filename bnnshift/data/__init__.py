"""Data sets for the one-epoch candidate trainings: spec parsing, in-memory loading, batching.

A data spec is a string ``KIND[:ARG]``:

* ``fashion-mnist[:ROOT]`` (default ROOT ``/usr/share/datasets/fashion-mnist``, the Debian
  package ``dataset-fashion-mnist``) and ``mnist:ROOT``. ROOT may hold the ``*-idx?-ubyte.gz``
  files, the uncompressed ``*-idx?-ubyte`` files, or be a torchvision root with
  ``FashionMNIST/raw`` (``MNIST/raw``). Compressed files are extracted once into the cache
  (``$BNNSHIFT_CACHE/data``, default ``~/.cache/bnnshift/data``), atomically.
* ``cifar10[:ROOT]`` / ``cifar100[:ROOT]``: torchvision CIFAR (ROOT holds
  ``cifar-10-batches-py`` or the ``cifar-10-python.tar.gz`` archive). Downloaded only when
  ``download=True``.
* ``imagefolder:PATH``: torchvision ``ImageFolder`` with ``PATH/train`` and an optional
  ``PATH/val`` (else ``PATH/test``) as the held-out split, or ``PATH`` itself used as the training set. Images are converted to
  ``input_shape`` (C=1 grey, C=3 RGB, whatever the file's mode; H, W resized; without a shape
  C=1 for greyscale files, else 3) and normalised with ``mean``/``std``, else their own.
* ``module.name:function`` / ``path/to/file.py:function``: a user function returning a
  :class:`DataBundle`, a tuple ``(train_dataset, val_dataset_or_None)`` or tensors ``(x, y)``.
* ``synthetic[:N]``: N learnable random samples (default 512), deterministic from ``seed``.
* any name registered in :data:`bnnshift.registry.DATASETS` (``factory(root, **kw) -> DataBundle``).

Everything is loaded into memory as float32 ``(N, C, H, W)`` tensors, normalised. When the
model's ``input_shape`` differs from the data only in H, W the images are resized with
``F.interpolate`` (bilinear, antialiased when shrinking); a channel mismatch is a
:class:`DataError`. Nothing is ever downloaded unless ``download=True``.

One module per source (``idx``, ``cifar``, ``imagefolder``, ``user``, ``synthetic``), the
shared :class:`DataBundle` and helpers in ``bundle``, spec parsing in ``spec``, the seeded batch
order in ``batches``; :func:`load_data` below composes them.
"""
from __future__ import annotations

from typing import Sequence

from .. import registry
from ..errors import DataError, SpecError
from .batches import batch_order_hash, iterate_batches
from .bundle import NORMALISATION, DataBundle, broadcast_norm, normalisation_mismatch, _apply_limits, _as_shape, _fit_input_shape, _validate, data_cache_dir  # noqa: F401
from .cifar import _load_cifar
from .idx import DEFAULT_FASHION_MNIST_ROOT, _load_idx
from .imagefolder import _load_imagefolder
from .spec import BUILTIN_KINDS, describe_specs, parse_data_spec  # noqa: F401
from .synthetic import DEFAULT_SYNTHETIC_N, SYNTHETIC_CLASSES, SYNTHETIC_DEFAULT_SHAPE, _synthetic  # noqa: F401
from .user import _bundle_as_given, _call_with_supported, _load_user

__all__ = [
    "DataBundle",
    "parse_data_spec",
    "load_data",
    "iterate_batches",
    "batch_order_hash",
    "describe_specs",
    "data_cache_dir",
    "DEFAULT_FASHION_MNIST_ROOT",
]


def load_data(
    spec: str,
    *,
    input_shape: tuple[int, int, int] | None = None,
    download: bool = False,
    train_limit: int | None = None,
    val_limit: int | None = None,
    seed: int = 0,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
) -> DataBundle:
    """Load the data set ``spec`` into memory (see the module docstring for the specs).

    ``mean``/``std``: the model's input normalisation, per channel (or one value for every
    channel) in [0, 1] pixel units, applied to every source that reads pixels (fashion-mnist,
    mnist, cifar, imagefolder, integer or [0, 1] float tensors of a data function); default:
    the data set's published constants (fashion-mnist, mnist, cifar) or its training images'
    own statistics (imagefolder, integer tensors). Sources that return normalised data
    (synthetic, a DataBundle, float tensors outside [0, 1]) are used as they are and
    ``bundle.notes`` says that the normalisation was not applied. ``bundle.norm_source`` says
    which applied; a note is added when the images' own statistics differ clearly from the
    given ones (:func:`bnnshift.data.bundle.normalisation_mismatch`). Raises :class:`UsageError`
    for a mean without a std (or the reverse), a count that fits neither 1 nor the channels, or
    a std <= 0.

    ``train_limit`` / ``val_limit`` keep a random subset (fixed by ``seed``) of that many
    samples; ``val_limit=0`` drops the validation set. ``input_shape`` (C, H, W) is the
    model's: images are resized to H, W when only those differ, a channel mismatch raises
    :class:`DataError`. Nothing is downloaded unless ``download=True``.
    """
    kind, arg = parse_data_spec(spec)
    shape = _as_shape(input_shape)
    norm = None
    if mean is not None or std is not None:
        if (mean is None) != (std is None):
            from ..errors import UsageError

            raise UsageError("--mean and --std go together", hint="pass both, e.g. --mean 0.5 --std 0.25")
        norm = (mean, std)
    for label, lim in (("train_limit", train_limit), ("val_limit", val_limit)):
        if lim is not None and lim < 0:
            raise DataError(f"bad {label} {lim}", hint="use a non-negative number")
    if train_limit == 0:
        raise DataError("train_limit=0 leaves no training data", hint="use a positive number")

    if kind in ("fashion-mnist", "mnist"):
        bundle = _load_idx(kind, arg, download, train_limit, val_limit, seed, norm)
    elif kind in ("cifar10", "cifar100"):
        bundle = _load_cifar(kind, arg, download, train_limit, val_limit, seed, norm)
    elif kind == "imagefolder":
        assert arg is not None
        bundle = _load_imagefolder(arg, shape, train_limit, val_limit, seed, norm)
    elif kind == "synthetic":
        n = int(arg) if arg is not None else DEFAULT_SYNTHETIC_N
        bundle = _synthetic(n, shape, seed, val_limit)
        if norm is not None:
            bundle.notes.append(f"{bundle.name}: --mean/--std are not applied to synthetic data (already normalised)")
    elif kind in ("module", "file"):
        assert arg is not None
        bundle = _load_user(kind, arg, shape, download, train_limit, val_limit, seed, norm)
    else:  # registered by a plugin
        factory = registry.DATASETS.get(kind)
        try:
            bundle = _call_with_supported(
                factory, arg,
                input_shape=shape, download=download, train_limit=train_limit, val_limit=val_limit, seed=seed,
            )
        except (DataError, SpecError):
            raise
        except Exception as exc:
            raise DataError(f"data set {kind!r} failed to load: {type(exc).__name__}: {exc}") from exc
        if isinstance(bundle, DataBundle) and not bundle.name:
            bundle.name = kind if arg is None else f"{kind}:{arg}"
        if isinstance(bundle, DataBundle):
            _bundle_as_given(bundle, norm)

    bundle = _validate(bundle, f"data set {spec!r}")
    bundle = _apply_limits(bundle, train_limit, val_limit, seed)
    bundle = _fit_input_shape(bundle, shape)
    mismatch = normalisation_mismatch(bundle)
    if mismatch:
        bundle.notes.append(mismatch)
    return bundle
