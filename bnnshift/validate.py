"""Option checks that run before any expensive work (model build, data loading, training).

Each check raises one ``BnnshiftError`` whose one line says what is wrong and what to do:
``UsageError`` (exit 2) for a value the user typed wrong, ``OutputError`` /
``ResourceError`` (exit 1) for the environment (a directory that cannot be written, not
enough memory). The CLI calls them first; the library calls the same functions where the
value is used (``search.parse_shifts``, ``search.parse_seeds``...), so both refuse the same
inputs with the same words.

The catalogue of refused inputs and their exit codes is in docs/cli.md ("Bad input").
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import OutputError, ResourceError, UsageError

__all__ = [
    "MAX_GRID", "MAX_ABS_SHIFT", "MAX_SEED", "grid_size", "check_grid_size", "check_shift_bound", "check_seeds",
    "check_seed_count", "check_lr", "check_weight_decay", "check_momentum", "check_device",
    "check_batch_norm_batch", "check_input_memory", "available_memory", "check_path", "check_writable",
    "model_spec_paths", "data_spec_paths", "check_inputs", "check_output_dir", "check_output_file",
    "check_input_shape_text",
]

MAX_GRID = 10_000  # candidates in one --shifts grid (range or comma list) and seeds per shift
MAX_ABS_SHIFT = 1e4  # |t| in pre-activation units; BN-normalised pre-activations are O(1)
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit integer
PROBE_BYTES = 4096  # written (and fsynced) by the writability check: a full disk fails here


# ----------------------------------------------------------------------------- grids and seeds


def check_shift_bound(value: float, option: str = "--shifts") -> float:
    """A finite shift with ``|t| <= MAX_ABS_SHIFT``; returns it as float. Raises ``UsageError``."""
    v = float(value)
    if not math.isfinite(v):
        raise UsageError(f"{option}: shift {value!r} is not finite", hint="give finite numbers, e.g. -1:2:0.25")
    if abs(v) > MAX_ABS_SHIFT:
        raise UsageError(f"{option}: shift {v:g} is out of range", hint=f"shifts lie within ±{MAX_ABS_SHIFT:g} "
                         "pre-activation units; the paper searches -1..2")
    return v


def check_grid_size(n: int, option: str = "--shifts") -> int:
    """Refuse more than ``MAX_GRID`` points (the same cap for range and comma grids)."""
    if n > MAX_GRID:
        raise UsageError(f"{option}: {n} candidates, more than {MAX_GRID}", hint="use a coarser step or fewer values")
    return n


def grid_size(start: float, stop: float, step: float, option: str = "--shifts") -> int:
    """Number of points of ``START:STOP:STEP`` (stop included when on the grid), checked.

    Bounds must be finite and within ``±MAX_ABS_SHIFT``, ``step > 0``, ``stop >= start`` and
    the count at most ``MAX_GRID`` (computed without building the list: no OverflowError or
    MemoryError for huge grids). Raises ``UsageError``.
    """
    for v in (start, stop):
        check_shift_bound(v, option)
    if not math.isfinite(step) or not step > 0:
        raise UsageError(f"{option}: the step {step!r} must be a finite number > 0", hint="e.g. -1:2:0.25")
    if stop < start:
        raise UsageError(f"{option}: empty grid (stop < start)", hint="e.g. -1:2:0.25")
    q = (stop - start) / step
    if not math.isfinite(q) or q + 1 > MAX_GRID:
        shown = f"{q + 1:.3g}" if math.isfinite(q) else "too many"
        raise UsageError(f"{option}: {shown} candidates, more than {MAX_GRID}", hint="use a coarser step")
    return int(math.floor(q + 1e-9)) + 1


def check_seed_count(n: int, option: str = "--seeds") -> int:
    if n < 1:
        raise UsageError(f"bad {option} {n}", hint="use a positive number, e.g. --seeds 3")
    if n > MAX_GRID:
        raise UsageError(f"bad {option} {n}: more than {MAX_GRID} seeds", hint="use fewer seeds, e.g. --seeds 5")
    return n


def check_seeds(seeds: Sequence[int], option: str = "--seed-list") -> list[int]:
    """Seeds within ±``MAX_SEED``, at most ``MAX_GRID`` of them, at least one."""
    vals = list(seeds)
    if not vals:
        raise UsageError(f"empty {option}", hint="e.g. --seed-list 0,1,2, or --seeds N")
    check_seed_count(len(vals), option)
    bad = [s for s in vals if abs(int(s)) > MAX_SEED]
    if bad:
        raise UsageError(f"bad {option}: seed {bad[0]} does not fit in 64 bits", hint="use small seeds, e.g. 0,1,2")
    return vals


# ----------------------------------------------------------------------------- optimizer


def check_lr(lr: float | None, option: str = "--lr") -> float | None:
    if lr is None:
        return None
    if not math.isfinite(lr) or lr <= 0:
        raise UsageError(f"bad {option} {lr!r}: the learning rate must be a finite number > 0",
                         hint="e.g. --lr 1e-3, or leave it out for the optimizer's default")
    return float(lr)


def check_weight_decay(wd: float | None, option: str = "--weight-decay") -> float | None:
    if wd is not None and (not math.isfinite(wd) or wd < 0):
        raise UsageError(f"bad {option} {wd!r}: must be a finite number >= 0", hint="e.g. --weight-decay 5e-4")
    return wd


def check_momentum(m: float | None, option: str = "--momentum") -> float | None:
    if m is not None and (not math.isfinite(m) or not 0 <= m < 1):
        raise UsageError(f"bad {option} {m!r}: must be in [0, 1)", hint="e.g. --momentum 0.9")
    return m


# ----------------------------------------------------------------------------- schedule


def check_stop_when_stable(stop: bool, fraction: float, schedule: str) -> None:
    """``--stop-when-stable`` stops the rungs of ``--schedule halving`` (docs/search.md); with
    ``--schedule full`` every shift trains the whole epoch by definition, so it is refused."""
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0 < fraction <= 1):
        raise UsageError(f"bad --stable-fraction {fraction!r}: must be in (0, 1]",
                         hint="the share of a rung's steps the ranking must hold, e.g. 0.25")
    if stop and schedule != "halving":
        raise UsageError(f"--stop-when-stable stops the rungs of --schedule halving; --schedule {schedule} trains "
                         "every shift the whole epoch", hint="add --schedule halving, or drop --stop-when-stable")


# ----------------------------------------------------------------------------- device


def check_device(device: str, option: str = "--device") -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto``; CUDA must be available when asked for.

    Raises ``UsageError`` for anything else (``tpu``, ``meta``, ``''``...): the training loop
    copies real data to the device, which a meta device cannot hold.
    """
    d = (device or "").strip().lower()
    ok = d in ("cpu", "cuda", "auto") or (d.startswith("cuda:") and d[5:].isdigit())
    if not ok:
        raise UsageError(f"bad {option} {device!r}", hint="use cpu, cuda, cuda:N or auto")
    if d.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"{option} {device}: CUDA is not available here", hint="use --device cpu")
        if ":" in d and int(d[5:]) >= torch.cuda.device_count():
            raise UsageError(f"{option} {device}: only {torch.cuda.device_count()} CUDA devices",
                             hint="use --device cuda:0")
    return d


# ----------------------------------------------------------------------------- model-dependent


def check_batch_norm_batch(model: Any, batch_size: int, option: str = "--batch-size") -> None:
    """BatchNorm in training mode needs more than one value per channel: refuse batch size 1."""
    from torch import nn

    if batch_size == 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise UsageError(f"{option} 1 cannot train a model with BatchNorm (one value per channel)",
                         hint=f"use {option} 2 or more")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def check_input_memory(shape: Iterable[int], batch: int, *, option: str = "--input-shape",
                       bytes_per_value: int = 4, available: int | None = None) -> int:
    """Refuse an input shape whose batch of ``batch`` float32 inputs alone exceeds the memory.

    This is a lower bound (activations come on top): it catches a typo such as
    ``1,100000,100000`` (200 GB at batch 5) before anything is allocated. Returns the estimate
    in bytes; raises ``ResourceError`` (exit 1).
    """
    numel = 1
    for v in shape:
        numel *= int(v)
    need = numel * max(1, int(batch)) * bytes_per_value
    avail = available_memory() if available is None else available
    if avail is not None and need > avail:
        raise ResourceError(f"{option} {','.join(str(int(v)) for v in shape)} needs at least {_gb(need)} for one "
                            f"batch of {batch}, {_gb(avail)} available",
                            hint="--input-shape is C,H,W of ONE sample; or lower --batch-size")
    return need


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


# ----------------------------------------------------------------------------- paths


def _name_max(path: Path) -> int:
    p = path
    while True:
        try:
            return int(os.pathconf(p, "PC_NAME_MAX"))
        except (OSError, ValueError):
            if p.parent == p:
                return 255
            p = p.parent


def check_path(path: str | os.PathLike[str], option: str) -> Path:
    """Every name in ``path`` fits the file system (255 bytes) and the whole fits PATH_MAX.

    Raises ``UsageError`` (exit 2) naming the option. Does not touch the file system
    otherwise.
    """
    p = Path(os.fspath(path))
    raw = os.fsencode(os.fspath(path))
    if not raw:
        raise UsageError(f"{option}: empty path", hint=f"give a path to {option}")
    if b"\0" in raw:
        raise UsageError(f"{option}: the path contains a NUL byte", hint="give a plain file name")
    limit = _name_max(p.parent if str(p.parent) else Path("."))
    for part in p.parts:
        n = len(os.fsencode(part))
        if n > limit:
            raise UsageError(f"{option}: a name in the path is {n} bytes long, the limit is {limit}",
                             hint=f"choose a shorter name for {option}")
    if len(raw) >= 4096:
        raise UsageError(f"{option}: the path is {len(raw)} bytes long, the limit is 4095",
                         hint=f"choose a shorter path for {option}")
    return p


def _nearest_existing_dir(p: Path) -> Path:
    cur = p.absolute()
    while not cur.exists():
        if cur.parent == cur:
            break
        cur = cur.parent
    return cur


def check_writable(path: str | os.PathLike[str], option: str, *, is_dir: bool = True) -> Path:
    """Write (and fsync) a few bytes where ``path`` will be written, then remove them.

    ``is_dir``: ``path`` is an output directory (it, or its nearest existing ancestor, must
    take a file); otherwise a file whose parent directory must. ``os.access`` is not enough
    (root, read-only mounts, full disks, network file systems). Raises ``OutputError`` (exit 1)
    with the system's reason, or ``UsageError`` when a file path names a directory.
    """
    p = check_path(path, option)
    if is_dir and p.exists() and not p.is_dir():
        raise OutputError(f"{option} {p} exists and is not a directory", hint=f"choose another {option}")
    if not is_dir and p.is_dir():
        raise UsageError(f"{option} {p} is a directory", hint=f"give a file path to {option}")
    where = _nearest_existing_dir(p if is_dir else (p.parent if str(p.parent) else Path(".")))
    if not where.is_dir():
        raise OutputError(f"{option}: {where} is not a directory", hint=f"choose another {option}")
    probe = where / f".bnnshift-probe-{os.getpid()}.tmp"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        hint = {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space (quota)",
                errno.EROFS: f"the file system is read-only: choose another {option}"}.get(
                    exc.errno, f"choose a directory you can write to for {option}")
        raise OutputError(f"{option}: cannot write in {where}: {exc.strerror or exc}", hint=hint) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)
    return p


# ----------------------------------------------------------------------------- paths inside specs


def model_spec_paths(spec: str) -> list[str]:
    """The file path inside a model spec (``path/to/file.py:ATTR``), if any."""
    target, sep, _ = (spec or "").rpartition(":")
    if sep and target.endswith(".py"):
        return [target]
    return []


def data_spec_paths(spec: str) -> list[str]:
    """The root / folder / file path inside a data spec (``fashion-mnist:ROOT``, ``x.py:fn``...)."""
    s = (spec or "").strip()
    head, sep, rest = s.partition(":")
    if not sep or not rest:
        return []
    if head.lower() in ("synthetic",):
        return []
    target = s.rpartition(":")[0]
    if target.endswith(".py"):
        return [target]
    if "/" in rest or head.lower().replace("_", "-") in ("fashion-mnist", "fmnist", "fashionmnist", "mnist",
                                                          "cifar10", "cifar100", "imagefolder"):
        return [rest]
    return []


def check_inputs(*, model: str | None = None, checkpoint: str | None = None, data: str | None = None,
                 config: str | None = None) -> None:
    """Path-length checks of every path the user passed in (model file, checkpoint, data root)."""
    for p in model_spec_paths(model or ""):
        check_path(p, "model spec")
    if checkpoint:
        check_path(checkpoint, "--checkpoint")
    for p in data_spec_paths(data or ""):
        check_path(p, "--data")
    if config:
        check_path(config, "--config")


OWN_FILES = (".bnnshift.lock",)  # files of ours that do not make an output directory "non-empty"


def check_output_dir(path: str | os.PathLike[str], option: str, *, force: bool = False,
                     reuse: bool = False, hint: str = "pass --force to overwrite") -> Path:
    """An output directory: short enough names, writable (a few bytes written), and empty
    unless ``force`` (overwrite) or ``reuse`` (resume) — without creating anything.
    Raises ``UsageError`` / ``OutputError``."""
    p = check_writable(path, option, is_dir=True)
    if p.is_dir():
        from .journal import check_unlocked

        check_unlocked(p)  # another search owns it: say so (with its PID) before "not empty"
    if p.is_dir() and not (force or reuse):
        try:
            non_empty = any(c.name not in OWN_FILES for c in p.iterdir())
        except OSError as exc:
            raise OutputError(f"{option} {p} is not readable: {exc.strerror or exc}") from None
        if non_empty:
            raise OutputError(f"output directory {p} is not empty", hint=hint)
    return p


def check_output_file(path: str | os.PathLike[str], option: str) -> Path:
    """An output file: short enough names and a writable parent directory."""
    return check_writable(path, option, is_dir=False)


def check_input_shape_text(text: str | None, batch: int, option: str = "--input-shape") -> None:
    """Parse ``--input-shape`` (if given) and check its memory estimate at ``batch``."""
    if not text:
        return
    from .scan import resolve_input_shape

    check_input_memory(resolve_input_shape(text, None), batch, option=option)


# ----------------------------------------------------------------------------- the catalogue
# Every refused input, its exit code and where the one line points (docs/cli.md "Bad input" and
# README are generated / written from this; tests/test_reliability.py checks each entry).

CATALOGUE: dict[str, tuple[str, int]] = {
    "grid-inf": ("`--shifts 0:inf:1` (a bound or step not finite)", 2),
    "grid-nan-step": ("`--shifts 0:1:nan` (step not a finite number > 0)", 2),
    "grid-huge-bounds": (f"`--shifts 0:1e300:1e-300` (a bound beyond ±{MAX_ABS_SHIFT:g})", 2),
    "grid-too-many-range": (f"`--shifts 0:1000:0.01` (more than {MAX_GRID} candidates)", 2),
    "grid-too-many-comma": (f"a comma list of more than {MAX_GRID} shifts (the same cap)", 2),
    "grid-comma-huge": (f"`--shifts 0,1e308` (a shift beyond ±{MAX_ABS_SHIFT:g})", 2),
    "seeds-huge": (f"`--seeds 1000000000000` (more than {MAX_GRID} seeds)", 2),
    "seed-list-empty": ("`--seed-list ''` (no seed; was silently seed 0)", 2),
    "seed-list-commas": ("`--seed-list ,,`", 2),
    "seed-list-64bit": ("`--seed-list 99999999999999999999999` (not a 64-bit integer)", 2),
    "lr-nan": ("`--lr nan`", 2),
    "lr-negative": ("`--lr -1` (the learning rate must be > 0)", 2),
    "weight-decay-negative": ("`--weight-decay -1`", 2),
    "momentum": ("`--momentum 5` (not in [0, 1))", 2),
    "stop-when-stable-full": ("`search --stop-when-stable` without `--schedule halving` (it stops halving rungs)", 2),
    "stable-fraction": ("`--stable-fraction 0` (not in (0, 1])", 2),
    "device-tpu": ("`--device tpu` (cpu, cuda, cuda:N, auto)", 2),
    "device-meta": ("`--device meta`", 2),
    "device-empty": ("`--device ''`", 2),
    "batch-1-batchnorm": ("`search --batch-size 1` on a model with BatchNorm", 2),
    "scan-batch-1-batchnorm": ("`scan --data ... --batch-size 1` on a model with BatchNorm", 2),
    "input-shape-memory": ("`--input-shape 100000,100000,100000` (one batch exceeds the available memory)", 1),
    "search-input-shape-memory": ("the same for `search`", 1),
    "patch-o-long": ("`patch -o NAME` with a name over 255 bytes", 2),
    "search-out-long": ("`search --out NAME` over 255 bytes", 2),
    "search-patch-out-long": ("`search --patch-out NAME` over 255 bytes", 2),
    "checkpoint-long": ("`--checkpoint NAME` over 255 bytes", 2),
    "model-path-long": ("a model spec `NAME.py:fn` over 255 bytes", 2),
    "data-root-long": ("`--data fashion-mnist:ROOT` with a name over 255 bytes", 2),
    "export-onnx-long": ("`export --onnx NAME` over 255 bytes (242-255 bytes work)", 2),
    "patch-onnx-long": ("`patch --onnx NAME` over 255 bytes", 2),
    "fold-long": ("`fold DIR` over 255 bytes", 2),
    "out-not-writable": ("`--out` where nothing can be written (a few bytes are written first)", 1),
    "patch-o-not-writable": ("`patch -o` where nothing can be written", 1),
    "onnx-not-writable": ("`--onnx` in a directory that cannot be written", 1),
    "full-disk-search": ("a full disk at `search --out` (found before any training)", 1),
    "full-disk-patch": ("a full disk while `patch` writes (the old OUT stays whole)", 1),
    "out-locked": ("`search --out DIR` while another search owns DIR (the line names its PID)", 1),
    "out-not-empty": ("an existing non-empty output directory without `--force`", 1),
}
