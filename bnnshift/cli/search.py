"""``bnnshift search``: train one short epoch per candidate shift t, rank by train accuracy."""
from __future__ import annotations

from typing import Optional

import typer

from ._common import (ALLOW_NONFINITE, ARG, CHECKPOINT, DEVICE, INPUT_SHAPE, JSON, MODEL, NON_STRICT, OUTPUT_INDEX, OUTPUT_KEY,
                      QUIET, USE_EMA, MEAN, STD, ArgList, print_load_notes)
from ._output import Output, SearchProgress


# the progress display (overall bar with ETA, current candidate's steps, heartbeat lines off a terminal)
_RichProgress = SearchProgress


def search_command(
    model: str = MODEL,
    data: str = typer.Option(..., "--data", help="Data spec: fashion-mnist[:ROOT], mnist:ROOT, cifar10[:ROOT], "
                                                 "imagefolder:PATH, module:function, synthetic[:N]."),
    shifts: str = typer.Option("-1:2:0.25", "--shifts", help="START:STOP:STEP (STOP included on the grid) "
                                                              "or a comma list, e.g. 0,0.5,1."),
    epochs: int = typer.Option(1, "--epochs", help="Epochs per candidate (the paper: 1)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Train this many batches instead of whole epochs."),
    seeds: int = typer.Option(1, "--seeds", help="Seeds per shift (seeds 0..N-1): mean ± std per candidate."),
    seed_list: Optional[str] = typer.Option(None, "--seed-list", help="Explicit seeds, e.g. 0,1,2."),
    batch_size: int = typer.Option(256, "--batch-size"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default: Adam 1e-3, SGD 0.05)."),
    optimizer: str = typer.Option("adam", "--optimizer", help="adam or sgd."),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="SGD momentum (default 0.9)."),
    train_config: Optional[str] = typer.Option(None, "--train-config",
                                               help="module:function(model, config) -> optimizer / dict / TrainSetup."),
    val: bool = typer.Option(False, "--val", help="Also measure held-out accuracy (after re-estimating BN stats)."),
    metric: str = typer.Option("train_acc", "--metric", help="Rank by train_acc (paper), last_acc or val_acc."),
    bn_recalib_batches: int = typer.Option(20, "--bn-recalib-batches"),
    hardtanh: bool = typer.Option(False, "--hardtanh",
                                  help="Shift the hardtanh of a full-precision model instead of the signs."),
    input_shape: Optional[str] = INPUT_SHAPE,
    train_limit: Optional[int] = typer.Option(None, "--train-limit", help="Use this many training samples."),
    val_limit: Optional[int] = typer.Option(None, "--val-limit"),
    arg: ArgList = ARG,
    checkpoint: Optional[str] = CHECKPOINT,
    non_strict: bool = NON_STRICT,
    use_ema: bool = USE_EMA,
    allow_nonfinite: bool = ALLOW_NONFINITE,
    output_index: Optional[int] = OUTPUT_INDEX,
    output_key: Optional[str] = OUTPUT_KEY,
    out_dir: Optional[str] = typer.Option(None, "--out", help="Directory for journal.jsonl and search.json/md/png."
                                                              " Missing parent directories are created (mkdir -p)."),
    resume: bool = typer.Option(False, "--resume", help="Skip candidates already in --out's journal."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty --out / --patch-out."),
    patch_out: Optional[str] = typer.Option(None, "--patch-out", help="Write the model patched with the winner (a "
                                                                      "directory as patch -o). Missing parent "
                                                                      "directories are created (mkdir -p)."),
    schedule: str = typer.Option("full", "--schedule",
                                 help="full (the paper: every candidate trains the whole epoch) or halving "
                                      "(successive halving: the best 1/eta continue at each rung; docs/search.md)."),
    eta: float = typer.Option(2.0, "--eta", help="Successive halving: keep the best 1/eta of the shifts at each rung."),
    min_fraction: float = typer.Option(0.125, "--min-fraction",
                                       help="Successive halving: the first rung's share of the epoch."),
    rung_min_samples: int = typer.Option(2000, "--rung-min-samples",
                                         help="Successive halving: a rung ranks only after each candidate trained on "
                                              "this many samples (earlier rungs are left out; none left: the full "
                                              "schedule). A rung whose scores are at chance ranks nothing; a "
                                              "shift is eliminated only when behind every kept one beyond the "
                                              "paired noise (2 SE). 0: neither rule.",
                                         min=0),
    stop_when_stable: bool = typer.Option(False, "--stop-when-stable",
                                          help="Successive halving: end a rung early once the shifts it keeps "
                                               "have not changed for --stable-fraction of its steps and lead "
                                               "the others beyond their paired noise (docs/search.md)."),
    stable_fraction: float = typer.Option(0.25, "--stable-fraction",
                                          help="--stop-when-stable: the share of a rung's steps the decision must "
                                               "hold (the patience), in (0, 1]."),
    compile_: str = typer.Option("auto", "--compile",
                                 help="auto (compile only when the expected steps pay back the measured compile "
                                      "time, else eager; the reason is in the report), on or off."),
    no_compile: bool = typer.Option(False, "--no-compile", help="Eager training step (same as --compile off)."),
    device: str = DEVICE,
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16 (torch.autocast; fp16 needs "
                                                               "CUDA and uses a GradScaler)."),
    augment: str = typer.Option("none", "--augment", help="Train augmentation: imagenet (random resized crop + "
                                                           "flip), cifar (pad-4 crop + flip) or none. Streams."),
    stream: str = typer.Option("auto", "--stream", help="auto (stream with --augment or image folders too big "
                                                         "for memory; a streamed image folder that fits in 512 MB "
                                                         "decoded is decoded once and kept), on (decode every epoch: "
                                                         "bounded memory), off (load into memory)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="DataLoader worker processes when "
                                                                        "streaming (default min(4, CPUs))."),
    mean: Optional[str] = MEAN,
    std: Optional[str] = STD,
    memory_format: str = typer.Option("auto", "--memory-format",
                                      help="auto (channels_last for conv models), channels_last or contiguous."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float64."),
    download: bool = typer.Option(False, "--download", help="Allow torchvision data sets to download."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Distributed search: an Optuna storage URL."),
    study: Optional[str] = typer.Option(None, "--study", help="Distributed search: the study name."),
    heartbeat: Optional[str] = typer.Option(None, "--heartbeat",
                                            help="Distributed search: INTERVAL[,GRACE] seconds before a silent "
                                                 "worker's trial is retried (default 30,120; env BNNSHIFT_HEARTBEAT)."),
    connect_timeout: Optional[int] = typer.Option(None, "--connect-timeout", min=1,
                                                  help="Distributed search: seconds to wait for the database "
                                                       "(default 10; env BNNSHIFT_CONNECT_TIMEOUT)."),
    json_: bool = JSON,
    quiet: bool = QUIET,
):
    """Train one short epoch per candidate shift t and rank by train accuracy (paper claim 5).

    Exit codes: 0 ok, 1 error or every candidate failed, 2 bad arguments / data spec,
    3 no binary activation found.
    """
    from types import SimpleNamespace

    from .. import validate
    from ..errors import BnnshiftError, UsageError

    # everything that can be checked without torch is checked before importing it (docs/reliability.md)
    follower = _torchrun_rank() not in (None, 0)
    out = Output(json_mode=json_, quiet=quiet or follower)  # under torchrun rank 0 alone reports
    validate.check_inputs(model=model, checkpoint=checkpoint, data=data)
    shape = validate.resolve_input_shape(input_shape, None) if input_shape else None
    options = dict(
        model=model, data=data, checkpoint=checkpoint, input_shape=shape,
        shifts=validate.parse_shifts(shifts), seeds=validate.parse_seeds(seeds, seed_list), epochs=epochs,
        steps=steps, batch_size=batch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
        momentum=momentum, train_config=train_config, hardtanh=hardtanh, val=val,
        bn_recalib_batches=bn_recalib_batches, device=device, compile="off" if no_compile else compile_,
        dtype=dtype, memory_format=memory_format, train_limit=train_limit, val_limit=val_limit, metric=metric,
        download=download, strict=not non_strict, use_ema=use_ema, allow_nonfinite=allow_nonfinite,
        output_index=output_index, output_key=output_key, schedule=schedule, eta=eta, min_fraction=min_fraction,
        rung_min_samples=rung_min_samples,
        stop_when_stable=stop_when_stable, stable_fraction=stable_fraction, augment=augment, stream=stream,
        workers=workers, mean=mean, std=std, precision=precision)
    validate.check_search_config(SimpleNamespace(**options))
    if (storage is None) != (study is None):
        raise UsageError("--storage and --study go together")
    if storage is not None and _torchrun_rank() is not None:
        raise UsageError("--storage (Optuna workers) under torchrun is not supported: every rank would take "
                         "its own trials", hint="run the Optuna workers as plain processes, or torchrun without --storage")
    if storage is not None and stop_when_stable:
        raise UsageError("--stop-when-stable needs the local rung-synchronous schedule; with --storage the rungs are "
                         "Optuna's asynchronous SuccessiveHalvingPruner", hint="drop --stop-when-stable or --storage")
    validate.check_device(device)
    if input_shape:
        validate.check_input_memory(shape, batch_size, option="--input-shape")
    if out_dir is not None and not follower:  # under torchrun rank 0 owns the outputs
        validate.check_output_dir(out_dir, "--out", force=force, reuse=resume,
                                  hint="continue an earlier search there with --resume, or pass --force to start over")
    if patch_out is not None and not follower:
        validate.check_output_dir(patch_out, "--patch-out", force=force)

    from ..load import parse_arg_pairs  # imports torch
    from ..search import SearchConfig, search

    cfg = SearchConfig(model_args=parse_arg_pairs(arg), **options)
    if storage is not None:
        try:
            from .. import distributed
        except ModuleNotFoundError as exc:
            if exc.name and not exc.name.startswith("bnnshift"):
                raise BnnshiftError(f"distributed search needs {exc.name}",
                                    hint="pip install bnnshift[distributed]") from None
            raise BnnshiftError("distributed search is not installed",
                                hint="pip install bnnshift[distributed]") from None
        from pathlib import Path

        if heartbeat is not None:
            distributed.parse_heartbeat(heartbeat)  # a bad value fails before any training
        results = distributed.run_worker(cfg, storage, study, Path(out_dir) if out_dir else None, out,
                                         heartbeat=heartbeat, connect_timeout=connect_timeout)
        payload = {"command": "search", "distributed": True, "study": study,
                   "candidates": [r.to_json() for r in results]}
        out.result(payload, human=f"worker finished {len(results)} candidates of study {study}")
        return
    import contextlib

    from ..journal import OutputLock

    # --patch-out has one writer, as --out: a second search or patch -o on it is refused before any work
    with OutputLock(patch_out, beside=True) if patch_out is not None and not follower else contextlib.nullcontext(), \
            _RichProgress(out) as prog:
        try:
            summary = search(cfg, out_dir=out_dir, resume=resume, force=force, progress=prog, patch_out=patch_out)
        except BnnshiftError as exc:
            if out_dir and "not empty" in exc.message and str(out_dir) in exc.message and not resume:
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
    if (getattr(summary, "schedule", None) or {}).get("name") == "halving" and getattr(summary, "rungs", None):
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
