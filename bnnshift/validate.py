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
from .vocab import Schedule

__all__ = [
    "MAX_GRID", "MAX_ABS_SHIFT", "MAX_SEED", "MIN_VERDICT_SEEDS", "few_seeds_warning", "grid_size",
    "check_grid_size", "check_shift_bound", "check_seeds",
    "check_seed_count", "check_lr", "check_weight_decay", "check_momentum", "check_device",
    "check_batch_norm_batch", "check_input_memory", "available_memory", "check_path", "check_writable",
    "model_spec_paths", "data_spec_paths", "check_inputs", "check_output_dir", "check_output_file",
    "check_input_shape_text", "parse_shifts", "parse_seeds", "parse_floats", "resolve_input_shape",
    "check_search_config", "check_stream_options", "parse_shift_value", "METRICS", "SCHEDULES", "AUGMENTS", "STREAM_MODES", "PRECISIONS",
]

MAX_GRID = 10_000  # candidates in one --shifts grid (range or comma list) and seeds per shift
MAX_ABS_SHIFT = 1e4  # |t| in pre-activation units; BN-normalised pre-activations are O(1)
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit integer
# seeds per shift below which a search cannot tell a shift from seed noise: its verdict
# comparing a shift with t = 0 is "not resolved" (report.verdict, search.aggregate._noise_note)
MIN_VERDICT_SEEDS = 3
PROBE_BYTES = 4096  # written (and fsynced) by the writability check: a full disk fails here

# the choices of `search` options (used by SearchConfig, the streaming path and the trainer too)
METRICS = ("train_acc", "last_acc", "val_acc")
SCHEDULES = tuple(m.value for m in Schedule)  # ("full", "halving")
AUGMENTS = ("none", "cifar", "imagenet")
STREAM_MODES = ("auto", "on", "off")
PRECISIONS = ("fp32", "bf16", "fp16")


# ----------------------------------------------------------------------------- grids and seeds


def parse_shift_value(value: Any, where: str) -> float:
    """A shift as a finite float; anything else is a UsageError naming ``where``."""
    if isinstance(value, bool):
        raise UsageError(f"{where}: shift {value!r} is not a number", hint="give a number, e.g. 0.5")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: shift {value!r} is not a number", hint="give a number, e.g. 0.5") from None
    if not math.isfinite(v):
        raise UsageError(f"{where}: shift {value!r} is not finite", hint="give a finite number")
    return v


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


def few_seeds_warning(n: int) -> str:
    """The one warning of a search with fewer than ``MIN_VERDICT_SEEDS`` seeds per shift."""
    return (f"{n} seed{'s' if n != 1 else ''} per shift: too few to tell a shift from seed noise, so the "
            f"verdict is 'not resolved' (use --seeds {MIN_VERDICT_SEEDS} or more to judge a difference)")


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


def parse_shifts(text: str | Sequence[float]) -> list[float]:
    """``"-1:2:0.25"`` (start:stop:step, stop included when it lands on the grid) or ``"0,0.5,1"``.

    Float steps are counted, not accumulated (``0:1:0.1`` has 11 points ending at 1.0); values
    are de-duplicated by ``journal.shift_key``. Raises ``UsageError`` for an empty grid, a step
    <= 0 or garbage. No torch: the CLI refuses a bad grid before importing it.
    """
    from .journal import shift_key

    if not isinstance(text, str):
        vals = [float(v) for v in text]
    else:
        s = text.strip()
        if not s:
            raise UsageError("empty --shifts", hint="e.g. --shifts -1:2:0.25 or --shifts 0,0.5,1")
        try:
            if ":" in s:
                parts = s.split(":")
                if len(parts) != 3:
                    raise ValueError
                a, b, st = (float(p) for p in parts)
                n = grid_size(a, b, st, f"bad --shifts {text[:40]!r}") - 1
                vals = [round(a + i * st, 10) for i in range(n + 1)]
            else:
                items = [p for p in s.split(",") if p.strip()]
                check_grid_size(len(items), f"bad --shifts {text[:40]!r}")
                vals = [float(p) for p in items]
        except UsageError:
            raise
        except ValueError:
            raise UsageError(f"bad --shifts {text!r}", hint="use START:STOP:STEP or a comma list, "
                                                           "e.g. -1:2:0.25 or 0,0.5,1") from None
    if not vals:
        raise UsageError("empty shift grid", hint="e.g. --shifts -1:2:0.25 or --shifts 0,0.5,1")
    if any(not math.isfinite(v) for v in vals):
        raise UsageError("shifts must be finite numbers")
    check_grid_size(len(vals))
    for v in vals:
        check_shift_bound(v)
    out: list[float] = []
    seen: set[str] = set()
    for v in vals:
        k = shift_key(v)
        if k not in seen:
            seen.add(k)
            out.append(float(k))
    return out


def parse_seeds(n: int | None = None, seed_list: str | Sequence[int] | None = None) -> list[int]:
    """``--seeds N`` -> [0..N-1]; ``--seed-list 0,3`` -> [0, 3]. Raises ``UsageError``."""
    if isinstance(seed_list, str) and not seed_list.strip():
        raise UsageError("empty --seed-list", hint="e.g. --seed-list 0,1,2, or --seeds N")
    if seed_list is not None and seed_list != "":
        try:
            vals = [int(v) for v in (seed_list.split(",") if isinstance(seed_list, str) else seed_list)
                    if str(v).strip() != ""]
        except ValueError:
            raise UsageError(f"bad --seed-list {seed_list!r}", hint="e.g. --seed-list 0,1,2") from None
        return check_seeds(list(dict.fromkeys(vals)))
    n = 1 if n is None else int(n)
    check_seed_count(n)
    return list(range(n))


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
    if stop and schedule != Schedule.HALVING:
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
    check_input_memory(resolve_input_shape(text, None), batch, option=option)


# ----------------------------------------------------------------------------- option values


def resolve_input_shape(input_shape: Iterable[int] | str | None, default: tuple[int, ...] | None) -> tuple[int, ...]:
    """``--input-shape 1,3,32,32`` or ``3,32,32`` -> (3, 32, 32); falls back to ``default``.
    Raises ``UsageError``."""
    if input_shape is None or input_shape == "":
        if default is None:
            raise UsageError("the model's input shape is unknown", hint="pass --input-shape C,H,W (e.g. 3,32,32)")
        return tuple(default)
    if isinstance(input_shape, str):
        try:
            vals = tuple(int(v) for v in input_shape.replace("x", ",").split(",") if v.strip())
        except ValueError:
            raise UsageError(f"bad --input-shape {input_shape!r}", hint="use C,H,W or N,C,H,W, e.g. 1,28,28") from None
    else:
        vals = tuple(int(v) for v in input_shape)
    if not vals or any(v <= 0 for v in vals):
        raise UsageError(f"bad --input-shape {input_shape!r}", hint="use C,H,W or N,C,H,W, e.g. 1,28,28")
    if len(vals) == 4:
        vals = vals[1:]
    return vals


def parse_floats(text: str | Sequence[float] | None, what: str) -> tuple[float, ...] | None:
    """``"0.5,0.5,0.5"`` -> (0.5, 0.5, 0.5); None stays None. Raises UsageError."""
    if text is None or text == "":
        return None
    try:
        vals = tuple(float(v) for v in (text.split(",") if isinstance(text, str) else text))
    except ValueError:
        raise UsageError(f"bad {what} {text!r}", hint="comma-separated numbers, e.g. 0.485,0.456,0.406") from None
    if not vals or any(not math.isfinite(v) for v in vals):
        raise UsageError(f"bad {what} {text!r}", hint="comma-separated finite numbers")
    return vals


def check_search_config(c: Any) -> None:
    """The checks of a ``search.SearchConfig`` that need neither torch nor the model: choices
    (metric, schedule, compile, memory format, dtype, optimizer, augment, stream, precision),
    counts (epochs, steps, batch size, limits), successive halving's eta and first rung, the
    optimizer's numbers, ``--mean`` / ``--std``. ``c``: any object with SearchConfig's field
    names (the CLI passes its options before importing torch). Raises ``UsageError``."""
    if c.metric not in METRICS:
        raise UsageError(f"unknown metric {c.metric!r}", hint=f"use one of {', '.join(METRICS)}")
    if c.metric == "val_acc" and not c.val:
        raise UsageError("metric val_acc needs --val")
    if c.batch_size <= 0:
        raise UsageError(f"bad --batch-size {c.batch_size}")
    if c.steps is not None and c.steps <= 0:
        raise UsageError(f"bad --steps {c.steps}", hint="use a positive number")
    if c.epochs <= 0:
        raise UsageError(f"bad --epochs {c.epochs}", hint="use a positive number")
    if c.dtype not in ("float32", "float64"):
        raise UsageError(f"bad dtype {c.dtype!r}", hint="float32 or float64")
    if c.compile not in ("auto", "on", "off"):
        raise UsageError(f"bad compile mode {c.compile!r}", hint="auto, on or off")
    if c.memory_format not in ("auto", "channels_last", "contiguous"):
        raise UsageError(f"bad memory format {c.memory_format!r}", hint="auto, channels_last or contiguous")
    if c.schedule not in SCHEDULES:
        raise UsageError(f"bad --schedule {c.schedule!r}", hint="full (the paper: every candidate trains the "
                                                                "whole epoch) or halving")
    if not (isinstance(c.eta, (int, float)) and c.eta > 1):
        raise UsageError(f"bad --eta {c.eta}", hint="use a number > 1 (2 keeps the better half at each rung)")
    if not (isinstance(c.min_fraction, (int, float)) and 0 < c.min_fraction <= 1):
        raise UsageError(f"bad --min-fraction {c.min_fraction}",
                         hint="the first rung's share of the epoch, in (0, 1], e.g. 0.125")
    rms = getattr(c, "rung_min_samples", 2000)
    if isinstance(rms, bool) or not isinstance(rms, int) or rms < 0:
        raise UsageError(f"bad --rung-min-samples {rms}",
                         hint="samples each candidate trains on before a rung ranks, an integer >= 0 (default 2000)")
    check_stop_when_stable(getattr(c, "stop_when_stable", False), getattr(c, "stable_fraction", 0.25), c.schedule)
    if c.schedule == Schedule.HALVING and c.metric != "train_acc":
        raise UsageError(f"--schedule halving ranks by the train accuracy so far; --metric {c.metric} "
                         "needs the whole epoch", hint="use --schedule full with this metric")
    check_lr(c.lr)
    check_weight_decay(c.weight_decay)
    check_momentum(c.momentum)
    if str(c.optimizer).lower() not in ("adam", "sgd") and c.train_config is None:
        raise UsageError(f"bad --optimizer {c.optimizer!r}", hint="adam or sgd")
    for name in ("train_limit", "val_limit", "bn_recalib_batches"):
        v = getattr(c, name)
        if v is not None and v < (0 if name == "bn_recalib_batches" else 1):
            raise UsageError(f"bad --{name.replace('_', '-')} {v}", hint="use a positive number")
    if c.stream not in STREAM_MODES:
        raise UsageError(f"bad --stream {c.stream!r}", hint=f"use one of {', '.join(STREAM_MODES)}")
    if c.precision not in PRECISIONS:
        raise UsageError(f"unknown --precision {c.precision!r}", hint=f"use one of {', '.join(PRECISIONS)}")
    check_stream_options(c.augment, parse_floats(c.mean, "--mean"), parse_floats(c.std, "--std"), c.workers)


def check_stream_options(augment: str, mean: Sequence[float] | None, std: Sequence[float] | None,
                         workers: int | None) -> None:
    """``--augment`` in AUGMENTS, ``--mean`` / ``--std`` together with std > 0, ``--workers`` >= 0
    (``data.stream.StreamOptions`` checks the same). Raises ``UsageError``."""
    if augment not in AUGMENTS:
        raise UsageError(f"unknown --augment {augment!r}", hint=f"use one of {', '.join(AUGMENTS)}")
    if (mean is None) != (std is None):
        raise UsageError("--mean and --std go together", hint="e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225")
    if std is not None and any(not (v > 0) for v in std):
        raise UsageError(f"bad --std {tuple(std)}: every value must be > 0")
    if workers is not None and workers < 0:
        raise UsageError(f"bad --workers {workers}", hint="0 decodes in the training process")


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
    "input-shape-model": ("`--input-shape 1,16` that the model does not run on (exit 1 instead when the model also "
                          "fails on the shape bnnshift chooses without the option: the model is at fault)", 2),
    "arg-unknown": ("`--arg nosucharg=3`: a name the factory's signature does not take (the line lists the ones it "
                    "takes)", 2),
    "site-unknown": ("`patch --site nosuch=0.5`, a `--site` / `--exclude` pattern or a `--config` name that matches "
                     "no site (the line lists the existing sites)", 2),
    "data-not-clean": ("a data function's images with NaN/inf, or labels that are not class indices (float, one-hot, "
                       "negative): the line names the count / first sample or the labels' shape", 1),
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
    "grid-all-degenerate": ("`--shifts 50,100` on a site whose pre-activation stays far below: every shift makes a site "
                            "constant at the initial weights (found before any training)", 2),
    "out-not-writable": ("`--out` where nothing can be written (a few bytes are written first)", 1),
    "patch-o-not-writable": ("`patch -o` where nothing can be written", 1),
    "onnx-not-writable": ("`--onnx` in a directory that cannot be written", 1),
    "full-disk-search": ("a full disk at `search --out` (found before any training)", 1),
    "full-disk-patch": ("a full disk while `patch` writes (the old OUT stays whole)", 1),
    "out-locked": ("`search --out DIR` while another search owns DIR (the line names its PID)", 1),
    "model-not-copyable": ("a model `copy.deepcopy` cannot copy even when its uncopyable attribute objects are shared "
                           "(the line names the class)", 1),
    "out-not-empty": ("an existing non-empty output directory without `--force`", 1),
    "output-locked": ("`patch -o DIR`, `fold DIR` or `search --patch-out DIR` while another bnnshift writes DIR "
                      "(the line names its PID)", 1),
    "journal-path-outside": ("`search --resume` with a journal whose state path leaves `OUT/states/` (`..`, "
                             "absolute, a symlink out): nothing read or removed", 1),
    "trust-pin-changed": ("a recipe trusted by the record whose model file or a local module it imports changed "
                          "(the line names the file); `--trust-recipe` when the named file's sha256 differs", 1),
    "unsafe-load-gadget": ("`--unsafe-load` of a pickle naming a code-execution global (picklescan's list: "
                           "`timeit`, `cProfile`, `pydoc`, `os`, ...)", 1),
    "search-one-class": ("a search on data with fewer than 2 classes (the line gives the sample count)", 2),
    "image-bomb": ("an image over PIL's decompression-bomb limit (the line names the file)", 1),
    "state-disk-full": ("a full disk while a halving search saves a paused state (resumable with `--resume`)", 1),
    "worker-killed": ("a killed DataLoader worker (its PID), a stopped torchrun rank (seen from another: its rank), "
                      "an allocation torch refuses", 1),
    "interrupted": ("Ctrl-C (SIGINT) at any moment, also during the imports: one line, temp directories removed", 130),
    "terminated": ("SIGTERM (CI, `timeout`, Slurm, Kubernetes): handled like Ctrl-C", 143),
    "fold-already-folded": ("`fold DIR` of a directory folded before, without `--data`: not refused, one line says "
                            "where each threshold went (`bn:...` / `bias:...`), nothing is rewritten", 0),
    "mean-without-std": ("`--mean` without `--std` (or the reverse), any command", 2),
    "mean-std-count": ("`--mean/--std` with a count that fits neither 1 nor the input channels", 2),
    "data-own-statistics": ("`fold` / `export --data` of an image folder or integer tensors (normalised with their "
                            "own statistics) when neither `--mean/--std` nor patch.json gives the model's "
                            "normalisation: nothing written", 2),
}
