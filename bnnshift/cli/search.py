"""``bnnshift search``: train one short epoch per candidate shift t, rank by train accuracy."""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional

import typer

from ..vocab import Schedule
from ._common import (ALLOW_NONFINITE, ARG, CHECKPOINT, DEVICE, INPUT_SHAPE, JSON, MODEL, NON_STRICT, OUTPUT_INDEX, OUTPUT_KEY,
                      QUIET, USE_EMA, MEAN, STD, ArgList, print_load_notes)
from ._output import Output, SearchProgress


# the progress display (overall bar with ETA, current candidate's steps, heartbeat lines off a terminal)
_RichProgress = SearchProgress


_DATA = typer.Option(..., "--data", help="Data spec: fashion-mnist[:ROOT], mnist:ROOT, cifar10[:ROOT], "
                                         "imagefolder:PATH, module:function, synthetic[:N].")
_SHIFTS = typer.Option("-1:2:0.25", "--shifts", help="START:STOP:STEP (STOP included on the grid) "
                                                      "or a comma list, e.g. 0,0.5,1.")
_EPOCHS = typer.Option(1, "--epochs", help="Epochs per candidate (the paper: 1).")
_STEPS = typer.Option(None, "--steps", help="Train this many batches instead of whole epochs.")
_SEEDS = typer.Option(1, "--seeds", help="Seeds per shift (seeds 0..N-1): mean ± std per candidate.")
_SEED_LIST = typer.Option(None, "--seed-list", help="Explicit seeds, e.g. 0,1,2.")
_BATCH_SIZE = typer.Option(256, "--batch-size")
_LR = typer.Option(None, "--lr", help="Learning rate (default: Adam 1e-3, SGD 0.05).")
_OPTIMIZER = typer.Option("adam", "--optimizer", help="adam or sgd.")
_WEIGHT_DECAY = typer.Option(0.0, "--weight-decay")
_MOMENTUM = typer.Option(None, "--momentum", help="SGD momentum (default 0.9).")
_TRAIN_CONFIG = typer.Option(None, "--train-config",
                             help="module:function(model, config) -> optimizer / dict / TrainSetup.")
_VAL = typer.Option(False, "--val", help="Also measure held-out accuracy (after re-estimating BN stats).")
_METRIC = typer.Option("train_acc", "--metric", help="Rank by train_acc (paper), last_acc or val_acc.")
_BN_RECALIB_BATCHES = typer.Option(20, "--bn-recalib-batches")
_HARDTANH = typer.Option(False, "--hardtanh",
                         help="Shift the hardtanh of a full-precision model instead of the signs.")
_TRAIN_LIMIT = typer.Option(None, "--train-limit", help="Use this many training samples.")
_VAL_LIMIT = typer.Option(None, "--val-limit")
_OUT_DIR = typer.Option(None, "--out", help="Directory for journal.jsonl and search.json/md/png."
                                            " Missing parent directories are created (mkdir -p).")
_RESUME = typer.Option(False, "--resume", help="Skip candidates already in --out's journal.")
_FORCE = typer.Option(False, "--force", help="Overwrite a non-empty --out / --patch-out.")
_PATCH_OUT = typer.Option(None, "--patch-out", help="Write the model patched with the winner (a "
                                                    "directory as patch -o). Missing parent "
                                                    "directories are created (mkdir -p).")
_SCHEDULE = typer.Option("full", "--schedule",
                         help="full (the paper: every candidate trains the whole epoch) or halving "
                              "(successive halving: the best 1/eta continue at each rung; docs/search.md).")
_ETA = typer.Option(2.0, "--eta", help="Successive halving: keep the best 1/eta of the shifts at each rung.")
_MIN_FRACTION = typer.Option(0.125, "--min-fraction",
                             help="Successive halving: the first rung's share of the epoch.")
_RUNG_MIN_SAMPLES = typer.Option(2000, "--rung-min-samples",
                                 help="Successive halving: a rung ranks only after each candidate trained on "
                                      "this many samples (earlier rungs are left out; none left: the full "
                                      "schedule). A rung whose scores are at chance ranks nothing; a "
                                      "shift is eliminated only when behind every kept one beyond the "
                                      "paired noise (2 SE). 0: neither rule.",
                                 min=0)
_STOP_WHEN_STABLE = typer.Option(False, "--stop-when-stable",
                                 help="Successive halving: end a rung early once the shifts it keeps "
                                      "have not changed for --stable-fraction of its steps and lead "
                                      "the others beyond their paired noise (docs/search.md).")
_STABLE_FRACTION = typer.Option(0.25, "--stable-fraction",
                                help="--stop-when-stable: the share of a rung's steps the decision must "
                                     "hold (the patience), in (0, 1].")
_COMPILE = typer.Option("auto", "--compile",
                        help="auto (compile only when the expected steps pay back the measured compile "
                             "time, else eager; the reason is in the report), on or off.")
_NO_COMPILE = typer.Option(False, "--no-compile", help="Eager training step (same as --compile off).")
_PRECISION = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16 (torch.autocast; fp16 needs "
                                                       "CUDA and uses a GradScaler).")
_AUGMENT = typer.Option("none", "--augment", help="Train augmentation: imagenet (random resized crop + "
                                                   "flip), cifar (pad-4 crop + flip) or none. Streams.")
_STREAM = typer.Option("auto", "--stream", help="auto (stream with --augment or image folders too big "
                                                 "for memory; a streamed image folder that fits in 512 MB "
                                                 "decoded is decoded once and kept), on (decode every epoch: "
                                                 "bounded memory), off (load into memory).")
_WORKERS = typer.Option(None, "--workers", min=0, help="DataLoader worker processes when "
                                                      "streaming (default min(4, CPUs)).")
_MEMORY_FORMAT = typer.Option("auto", "--memory-format",
                              help="auto (channels_last for conv models), channels_last or contiguous.")
_DTYPE = typer.Option("float32", "--dtype", help="float32 or float64.")
_DOWNLOAD = typer.Option(False, "--download", help="Allow torchvision data sets to download.")
_STORAGE = typer.Option(None, "--storage", help="Distributed search: an Optuna storage URL.")
_STUDY = typer.Option(None, "--study", help="Distributed search: the study name.")
_HEARTBEAT = typer.Option(None, "--heartbeat",
                          help="Distributed search: INTERVAL[,GRACE] seconds before a silent "
                               "worker's trial is retried (default 30,120; env BNNSHIFT_HEARTBEAT).")
_CONNECT_TIMEOUT = typer.Option(None, "--connect-timeout", min=1,
                                help="Distributed search: seconds to wait for the database "
                                     "(default 10; env BNNSHIFT_CONNECT_TIMEOUT).")


def search_command(
    model: str = MODEL,
    data: str = _DATA,
    shifts: str = _SHIFTS,
    epochs: int = _EPOCHS,
    steps: Optional[int] = _STEPS,
    seeds: int = _SEEDS,
    seed_list: Optional[str] = _SEED_LIST,
    batch_size: int = _BATCH_SIZE,
    lr: Optional[float] = _LR,
    optimizer: str = _OPTIMIZER,
    weight_decay: float = _WEIGHT_DECAY,
    momentum: Optional[float] = _MOMENTUM,
    train_config: Optional[str] = _TRAIN_CONFIG,
    val: bool = _VAL,
    metric: str = _METRIC,
    bn_recalib_batches: int = _BN_RECALIB_BATCHES,
    hardtanh: bool = _HARDTANH,
    input_shape: Optional[str] = INPUT_SHAPE,
    train_limit: Optional[int] = _TRAIN_LIMIT,
    val_limit: Optional[int] = _VAL_LIMIT,
    arg: ArgList = ARG,
    checkpoint: Optional[str] = CHECKPOINT,
    non_strict: bool = NON_STRICT,
    use_ema: bool = USE_EMA,
    allow_nonfinite: bool = ALLOW_NONFINITE,
    output_index: Optional[int] = OUTPUT_INDEX,
    output_key: Optional[str] = OUTPUT_KEY,
    out_dir: Optional[str] = _OUT_DIR,
    resume: bool = _RESUME,
    force: bool = _FORCE,
    patch_out: Optional[str] = _PATCH_OUT,
    schedule: str = _SCHEDULE,
    eta: float = _ETA,
    min_fraction: float = _MIN_FRACTION,
    rung_min_samples: int = _RUNG_MIN_SAMPLES,
    stop_when_stable: bool = _STOP_WHEN_STABLE,
    stable_fraction: float = _STABLE_FRACTION,
    compile_: str = _COMPILE,
    no_compile: bool = _NO_COMPILE,
    device: str = DEVICE,
    precision: str = _PRECISION,
    augment: str = _AUGMENT,
    stream: str = _STREAM,
    workers: Optional[int] = _WORKERS,
    mean: Optional[str] = MEAN,
    std: Optional[str] = STD,
    memory_format: str = _MEMORY_FORMAT,
    dtype: str = _DTYPE,
    download: bool = _DOWNLOAD,
    storage: Optional[str] = _STORAGE,
    study: Optional[str] = _STUDY,
    heartbeat: Optional[str] = _HEARTBEAT,
    connect_timeout: Optional[int] = _CONNECT_TIMEOUT,
    json_: bool = JSON,
    quiet: bool = QUIET,
):
    """Train one short epoch per candidate shift t and rank by train accuracy (paper claim 5).

    Exit codes: 0 ok, 1 error or every candidate failed, 2 bad arguments / data spec,
    3 no binary activation found.
    """
    _run(SearchArgs(**locals()))


@dataclass
class SearchArgs:
    """The command line of ``bnnshift search`` as typer parsed it: one field per option, named as
    ``search_command``'s parameters (``compile_``, ``json_``: the builtin ``compile`` and the
    ``json`` module not shadowed)."""

    model: str
    data: str
    shifts: str
    epochs: int
    steps: Optional[int]
    seeds: int
    seed_list: Optional[str]
    batch_size: int
    lr: Optional[float]
    optimizer: str
    weight_decay: float
    momentum: Optional[float]
    train_config: Optional[str]
    val: bool
    metric: str
    bn_recalib_batches: int
    hardtanh: bool
    input_shape: Optional[str]
    train_limit: Optional[int]
    val_limit: Optional[int]
    arg: ArgList
    checkpoint: Optional[str]
    non_strict: bool
    use_ema: bool
    allow_nonfinite: bool
    output_index: Optional[int]
    output_key: Optional[str]
    out_dir: Optional[str]
    resume: bool
    force: bool
    patch_out: Optional[str]
    schedule: str
    eta: float
    min_fraction: float
    rung_min_samples: int
    stop_when_stable: bool
    stable_fraction: float
    compile_: str
    no_compile: bool
    device: str
    precision: str
    augment: str
    stream: str
    workers: Optional[int]
    mean: Optional[str]
    std: Optional[str]
    memory_format: str
    dtype: str
    download: bool
    storage: Optional[str]
    study: Optional[str]
    heartbeat: Optional[str]
    connect_timeout: Optional[int]
    json_: bool
    quiet: bool


def _run(a: SearchArgs) -> None:
    """Everything that can be checked without torch first (docs/reliability.md), then the
    ``SearchConfig`` and one library call: the search, or an Optuna worker with ``--storage``."""
    from .. import validate

    follower = _torchrun_rank() not in (None, 0)
    out = Output(json_mode=a.json_, quiet=a.quiet or follower)  # under torchrun rank 0 alone reports
    validate.check_inputs(model=a.model, checkpoint=a.checkpoint, data=a.data)
    shape = validate.resolve_input_shape(a.input_shape, None) if a.input_shape else None
    options = _config_options(a, shape)
    validate.check_search_config(SimpleNamespace(**options))
    _check_option_combinations(a, shape, follower)

    from ..load import parse_arg_pairs  # imports torch
    from ..search import SearchConfig

    cfg = SearchConfig(model_args=parse_arg_pairs(a.arg), **options)
    if a.storage is not None:
        _run_worker(a, cfg, out)
    else:
        _run_search(a, cfg, out, follower)


def _config_options(a: SearchArgs, shape: tuple[int, ...] | None) -> dict[str, Any]:
    """The ``SearchConfig`` fields from the options (grids and seeds parsed; raises UsageError)."""
    from .. import validate

    return dict(
        model=a.model, data=a.data, checkpoint=a.checkpoint, input_shape=shape,
        shifts=validate.parse_shifts(a.shifts), seeds=validate.parse_seeds(a.seeds, a.seed_list), epochs=a.epochs,
        steps=a.steps, batch_size=a.batch_size, optimizer=a.optimizer, lr=a.lr, weight_decay=a.weight_decay,
        momentum=a.momentum, train_config=a.train_config, hardtanh=a.hardtanh, val=a.val,
        bn_recalib_batches=a.bn_recalib_batches, device=a.device, compile="off" if a.no_compile else a.compile_,
        dtype=a.dtype, memory_format=a.memory_format, train_limit=a.train_limit, val_limit=a.val_limit,
        metric=a.metric, download=a.download, strict=not a.non_strict, use_ema=a.use_ema,
        allow_nonfinite=a.allow_nonfinite, output_index=a.output_index, output_key=a.output_key,
        schedule=a.schedule, eta=a.eta, min_fraction=a.min_fraction, rung_min_samples=a.rung_min_samples,
        stop_when_stable=a.stop_when_stable, stable_fraction=a.stable_fraction, augment=a.augment,
        stream=a.stream, workers=a.workers, mean=a.mean, std=a.std, precision=a.precision)


def _check_option_combinations(a: SearchArgs, shape: tuple[int, ...] | None, follower: bool) -> None:
    """Options that go together or not, the device, the input's memory, the output directories
    (under torchrun rank 0 owns the outputs). Raises UsageError / OutputError."""
    from .. import validate
    from ..errors import UsageError

    if (a.storage is None) != (a.study is None):
        raise UsageError("--storage and --study go together")
    if a.storage is not None and _torchrun_rank() is not None:
        raise UsageError("--storage (Optuna workers) under torchrun is not supported: every rank would take "
                         "its own trials", hint="run the Optuna workers as plain processes, or torchrun without --storage")
    if a.storage is not None and a.stop_when_stable:
        raise UsageError("--stop-when-stable needs the local rung-synchronous schedule; with --storage the rungs are "
                         "Optuna's asynchronous SuccessiveHalvingPruner", hint="drop --stop-when-stable or --storage")
    validate.check_device(a.device)
    if a.input_shape:
        validate.check_input_memory(shape, a.batch_size, option="--input-shape")
    if a.out_dir is not None and not follower:  # under torchrun rank 0 owns the outputs
        validate.check_output_dir(a.out_dir, "--out", force=a.force, reuse=a.resume,
                                  hint="continue an earlier search there with --resume, or pass --force to start over")
    if a.patch_out is not None and not follower:
        validate.check_output_dir(a.patch_out, "--patch-out", force=a.force)


def _run_worker(a: SearchArgs, cfg: Any, out: Output) -> None:
    """``--storage``: this process is an Optuna worker of the study; prints what it ran."""
    from ..errors import BnnshiftError

    try:
        from .. import distributed
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith("bnnshift"):
            raise BnnshiftError(f"distributed search needs {exc.name}",
                                hint="pip install bnnshift[distributed]") from None
        raise BnnshiftError("distributed search is not installed",
                            hint="pip install bnnshift[distributed]") from None
    from pathlib import Path

    if a.heartbeat is not None:
        distributed.parse_heartbeat(a.heartbeat)  # a bad value fails before any training
    results = distributed.run_worker(cfg, a.storage, a.study, Path(a.out_dir) if a.out_dir else None, out,
                                     heartbeat=a.heartbeat, connect_timeout=a.connect_timeout)
    payload = {"command": "search", "distributed": True, "study": a.study,
               "candidates": [r.to_json() for r in results]}
    out.result(payload, human=f"worker finished {len(results)} candidates of study {a.study}")


def _run_search(a: SearchArgs, cfg: Any, out: Output, follower: bool) -> None:
    """The local search (full or halving, torchrun ranks), its progress display and summary."""
    import contextlib

    from ..errors import BnnshiftError
    from ..journal import OutputLock
    from ..search import search

    # --patch-out has one writer, as --out: a second search or patch -o on it is refused before any work
    with OutputLock(a.patch_out, beside=True) if a.patch_out is not None and not follower else contextlib.nullcontext(), \
            _RichProgress(out) as prog:
        try:
            summary = search(cfg, out_dir=a.out_dir, resume=a.resume, force=a.force, progress=prog,
                             patch_out=a.patch_out)
        except BnnshiftError as exc:
            if a.out_dir and "not empty" in exc.message and str(a.out_dir) in exc.message and not a.resume:
                exc.hint = "continue an earlier search there with --resume, or pass --force to start over"
            raise
    if not follower:
        _print_summary(summary, out)


def _torchrun_rank() -> int | None:
    """This process's rank under torchrun (``WORLD_SIZE`` > 1), else None; read from the
    environment like ``parallel.launched_by_torchrun``, without importing torch."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return int(os.environ.get("RANK", "0"))


def _print_summary(summary, out: Output) -> None:
    from ..report import render_table, search_json, verdict

    from ..validate import MIN_VERDICT_SEEDS, few_seeds_warning

    print_load_notes(out, list(getattr(summary, "notes", None) or []), getattr(summary, "checkpoint", None))
    v = verdict(summary)
    few = v.get("resolved") is False and len(summary.seeds) < MIN_VERDICT_SEEDS  # a tie is unresolved too
    if few:  # once, with the verdict it concerns (also with --json, on stderr)
        out.warn(few_seeds_warning(len(summary.seeds)))
    if out.json_mode:
        out.result(search_json(summary))
        return
    out.table(render_table(summary))
    if (getattr(summary, "schedule", None) or {}).get("name") == Schedule.HALVING and getattr(summary, "rungs", None):
        from ..report import _schedule_lines

        for line in _schedule_lines(summary):  # every rung's scores and decision, the wall time
            out.table(line.strip().removeprefix("- "))
    out.table(f"verdict: {v['text']}")
    for n in v["notes"]:
        if not (few and "no noise estimate" in n):  # the warning above said it
            out.table(f"note: {n}")
    if summary.compile_error:
        out.warn(f"torch.compile failed, trained eagerly: {summary.compile_error}")
    for w in getattr(summary, "warnings", []):
        out.warn(w)
    if summary.files:
        out.info(f"report: {summary.files.get('md')}, {summary.files.get('png')}, {summary.files.get('json')}")
    if summary.patch_out:
        out.info(f"patched model with t = {summary.winner:g}: {summary.patch_out}")
