"""The packed op ``bnnshift::bconv2d``, registered with ``torch.library`` (a fake kernel gives
its output shape, so ``torch.compile`` / ``torch.export`` trace through it).

Its CPU implementation is a C++ kernel (``_kernel.cpp``: XNOR + ``__builtin_popcountll``,
``at::parallel_for``) built with ``torch.utils.cpp_extension.load`` at first use and cached
under ``$BNNSHIFT_CACHE`` or ``~/.cache/bnnshift/torch_extensions`` (keyed by the source and
flags, so a changed kernel rebuilds). ``-O3 -march=native`` where the compiler accepts it
(AVX2 / AVX-512 VPOPCNTQ used when the CPU has them), always ``-ffp-contract=off`` so its float
rounding is the reference's. Without a compiler (or ``BNNSHIFT_RUNTIME_REFERENCE=1``) the pure
torch reference (``ref.py``, identical results, slower) runs instead and a warning says so once.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from . import ref

_SRC = Path(__file__).with_name("_kernel.cpp")
_lock = threading.Lock()
_state: dict[str, object] = {}


def _native_ok(cxx: str) -> bool:
    try:
        r = subprocess.run([cxx, "-march=native", "-x", "c++", "-E", "-"], input=b"", capture_output=True, timeout=30)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def cache_dir() -> Path:
    """Where the compiled kernel is cached (``$BNNSHIFT_CACHE/torch_extensions`` or
    ``~/.cache/bnnshift/torch_extensions``)."""
    root = os.environ.get("BNNSHIFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bnnshift")
    return Path(root) / "torch_extensions"


def _build():
    import logging

    from torch.utils import cpp_extension

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx or not shutil.which("ninja"):
        raise RuntimeError("no C++ compiler or ninja found (bash scripts/setup.sh installs them)")
    flags = ["-O3", "-ffp-contract=off", "-fopenmp"] + (["-march=native"] if _native_ok(cxx) else [])
    key = hashlib.sha256(_SRC.read_bytes() + " ".join(flags).encode() + torch.__version__.encode()).hexdigest()[:12]
    build = cache_dir() / f"bnnshift_rt_{key}"
    build.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", "1")
    if not any(build.glob("*.so")):
        import sys

        print(f"bnnshift: building the packed kernel (first use, about a minute; cached in {build})", file=sys.stderr)
    return cpp_extension.load(name=f"bnnshift_rt_{key}", sources=[str(_SRC)], extra_cflags=flags,
                              extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)


def extension():
    """The compiled kernel module, or None (the reference runs; warned once). Thread-safe."""
    with _lock:
        if "ext" not in _state:
            ext = None
            if os.environ.get("BNNSHIFT_RUNTIME_REFERENCE") != "1":
                try:
                    ext = _build()
                except Exception as exc:  # noqa: BLE001 -- any build failure means: use the reference
                    warnings.warn(f"bnnshift runtime: the C++ kernel could not be built ({str(exc).splitlines()[0][:200]});"
                                  " using the pure-torch reference (same results, slower)", RuntimeWarning, stacklevel=3)
            _state["ext"] = ext
        return _state["ext"]


def backend() -> str:
    """``"cpp"`` when the compiled kernel is in use, else ``"reference"``."""
    return "cpp" if extension() is not None else "reference"


@torch.library.custom_op("bnnshift::bconv2d", mutates_args=())
def bconv2d(x: torch.Tensor, wwords: torch.Tensor, wtrans: torch.Tensor, popw: torch.Tensor, alpha: torch.Tensor,
            bias: Optional[torch.Tensor], stride: list[int], padding: list[int], dilation: list[int], groups: int,
            zero_one: bool) -> torch.Tensor:
    """Packed binary conv2d: ``x`` (N, C, H, W) float32/float64 read as bits ``x > 0``; ``wtrans``:
    ``ref.transpose_weight(wwords, groups)``; the rest as in ``ref.bconv2d``. Returns (N, O, Ho, Wo)
    in x's dtype."""
    ext = extension()
    if ext is None:
        return ref.bconv2d(x, wwords, popw, alpha, bias, stride, padding, dilation, groups, zero_one)
    return ext.bconv2d(x, wwords, wtrans, popw, alpha, bias, stride, padding, dilation, groups, zero_one)


@bconv2d.register_fake
def _(x, wwords, wtrans, popw, alpha, bias, stride, padding, dilation, groups, zero_one):
    n, _, h, w = x.shape
    o, kh, kw, _ = wwords.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((n, o, ho, wo))


@torch.library.custom_op("bnnshift::bconv2d_bits", mutates_args=())
def bconv2d_bits(x: torch.Tensor, wwords: torch.Tensor, wtrans: torch.Tensor, popw: torch.Tensor, thr: torch.Tensor,
                 flip: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int], groups: int,
                 zero_one: bool, pool: list[int], pool_first: bool, lo: float, hi: float) -> torch.Tensor:
    """Packed binary conv2d + BatchNorm + binarizer (+ MaxPool) as one integer threshold per
    channel: ``x`` (N, C, H, W) float32/float64 read as bits ``x > 0``; ``thr`` int64 (O,),
    ``flip`` bool (O,), ``pool`` ``[kh, kw, sh, sw]`` or ``[]``: as in ``ref.bconv2d_bits``.
    Returns the binary activation (N, O, Hp, Wp) in x's dtype (values ``lo`` / ``hi``)."""
    ext = extension()
    if ext is None:
        return ref.bconv2d_bits(x, wwords, popw, thr, flip, stride, padding, dilation, groups, zero_one, pool,
                                pool_first, lo, hi)
    return ext.bconv2d_bits(x, wwords, wtrans, popw, thr, flip, stride, padding, dilation, groups, zero_one, pool,
                            pool_first, lo, hi)


@bconv2d_bits.register_fake
def _(x, wwords, wtrans, popw, thr, flip, stride, padding, dilation, groups, zero_one, pool, pool_first, lo, hi):
    n, _, h, w = x.shape
    o, kh, kw, _ = wwords.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if pool:
        ho, wo = (ho - pool[0]) // pool[2] + 1, (wo - pool[1]) // pool[3] + 1
    return x.new_empty((n, o, ho, wo))


def reference_bconv2d(*args) -> torch.Tensor:
    """The pure-torch reference with the op's arguments (for tests and comparisons)."""
    return ref.bconv2d(*args)
