"""``bnnshift scan``: every binary activation per call site, its context and the paper's advice."""
from __future__ import annotations

from typing import Optional

import typer

from ._common import (ALLOW_NONFINITE, ARG, CHECKPOINT, DEVICE, INPUT_SHAPE, JSON, MEAN, MODEL, NON_STRICT, QUIET,
                      STD, UNSAFE, USE_EMA, VERBOSE, ArgList, parse_mean_std, print_load_notes,
                      print_peak_memory)
from ._output import Output


def _fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _empty(v) -> bool:
    return v in (None, "", "-")


def site_rows(report) -> tuple[list[str], list[list[str]], list[str]]:
    """The scan table as (columns, rows, footnotes): short cells (no sentence in a cell),
    columns that are empty for every site dropped, advice moved to numbered footnotes (one per
    distinct text). Full values are in ``--json``."""
    notes: list[str] = []
    cols = ["site", "kind", "alphabet", "producer", "pool", "follower", "threshold", "fold", "+1 share", "advice"]
    rows = []
    for s in report.sites:
        thr = "-" if not s.own_threshold else f"{s.own_threshold['mean']:+.2f}"
        follower = "-" if not s.follower else (f"{s.follower}({s.follower_slope:.2f})" if s.follower_slope is not None
                                                else s.follower)
        refs = []
        for a in s.advice or []:
            if a not in notes:
                notes.append(a)
            refs.append(f"[{notes.index(a) + 1}]")
        fold = (s.foldable or "no").split(":", 1)[0]
        rows.append([s.name, s.kind, s.alphabet, s.producer, s.pool or "-", follower, thr, fold,
                     _fmt(s.plus_fraction), " ".join(refs)])
    keep = [i for i, c in enumerate(cols) if c in ("site", "kind") or not all(_empty(r[i]) for r in rows)]
    return [cols[i] for i in keep], [[r[i] for i in keep] for r in rows], notes


def render_report(report, out: Output) -> None:
    from rich import box
    from rich.table import Table

    cols, rows, notes = site_rows(report)
    t = Table(title=f"{report.model}: {report.num_sites} binary activation sites, "
                    f"{report.weight_binarizers} weight binarizers", box=box.SIMPLE_HEAD, pad_edge=False,
              title_justify="left")
    for c in cols:
        # identifiers never fold mid-word: a name is what --site takes
        t.add_column(c, no_wrap=c in ("site", "fold", "kind", "alphabet"), overflow="ellipsis",
                     justify="right" if c in ("+1 share", "threshold") else "left")
    for r in rows:
        t.add_row(*r)
    out.table(t)
    for i, n in enumerate(notes, 1):
        out.text(f"[{i}] {n}")
    if any(s.foldable for s in report.sites):
        out.text("fold: where t is absorbed at no inference cost (bn: BatchNorm bias, bias: learnable bias)")
    sm = report.summary
    if sm:
        out.text(f"params {sm['params']:,} ({sm['binary_params']:,} binary); MACs binary {sm['binary_macs']:,}, "
                 f"float {sm['float_macs']:,}; OPs {sm['ops']:,.0f}; memory {sm['memory_float32_bytes']/2**20:.2f} "
                 f"MiB fp32, {sm['memory_1bit_bytes']/2**20:.2f} MiB with 1-bit weights (per layer: --summary)")
    if report.leaves:
        out.text("untraced leaves (tracing failed inside; sites there found at run time): " +
                 ", ".join(f"{k} ({report.leaf_errors.get(k, '')})" for k in report.leaves))
    if any(s.preact for s in report.sites):
        t2 = Table(title="pre-activation statistics (paper Fig. 4)", box=box.SIMPLE_HEAD, pad_edge=False,
                   title_justify="left")
        for c in ("site", "+1 share", "mean", "median", "skew"):
            t2.add_column(c, no_wrap=c == "site", justify="left" if c == "site" else "right")
        for s in report.sites:
            p = s.preact or {}
            t2.add_row(s.name, _fmt(s.plus_fraction), _fmt(p.get("mean")), _fmt(p.get("median")), _fmt(p.get("skew")))
        out.table(t2)
    for w in report.warnings:
        out.warn(w)


def _mem(b: int) -> str:
    return f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 1024:.1f} KiB"


def _count(n: int) -> str:
    """MACs, compact: 0, 1,280, 147.5K, 2.14M, 1.82G (--json has the exact numbers)."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}G"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e4:
        return f"{n / 1e3:.1f}K"
    return f"{n:,}"


def render_layer_summary(report, out: Output) -> None:
    """larq-style per-layer table with totals (``--summary``)."""
    from rich import box
    from rich.table import Table

    ls = report.layer_summary or {}
    t = Table(title=f"{report.model}: per-layer summary (input {'x'.join(map(str, report.input_shape))}, "
                    "MACs per sample)", box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left", show_footer=True)
    tot = ls.get("totals") or {}
    layers = ls.get("layers") or []
    cols = [("layer", "total"), ("output", ""), ("1-bit\nparams", f"{tot.get('params_1bit', 0):,}"),
            ("32-bit\nparams", f"{tot.get('params_32bit', 0):,}"), ("memory", _mem(tot.get("memory_bytes", 0))),
            ("binary\nMACs", _count(tot.get("binary_macs", 0))), ("float\nMACs", _count(tot.get("float_macs", 0)))]
    name_w = min(40, max([len(r["layer"]) for r in layers] + [5]))
    for c, foot in cols:
        t.add_column(c, footer=foot, no_wrap=True, min_width=name_w if c == "layer" else None,
                     justify="left" if c in ("layer", "output") else "right")
    for r in layers:
        shape = "x".join(map(str, r["output_shape"])) if r["output_shape"] else "-"
        t.add_row(r["layer"], shape, f"{r['params_1bit']:,}", f"{r['params_32bit']:,}", _mem(r["memory_bytes"]),
                  _count(r["binary_macs"]), _count(r["float_macs"]))
    out.table(t)
    if tot:
        comp = tot.get("compression")
        out.text(f"memory {_mem(tot['memory_fp32_bytes'])} in fp32, {_mem(tot['memory_bytes'])} with 1-bit weights"
                 + (f" (compression x{comp:.2f})" if comp else ""))


def scan_command(
    model: str = MODEL,
    arg: ArgList = ARG,
    checkpoint: Optional[str] = CHECKPOINT,
    input_shape: Optional[str] = INPUT_SHAPE,
    data: Optional[str] = typer.Option(None, "--data", help="Data spec for +1 shares: fashion-mnist[:ROOT], "
                                                            "synthetic[:N], cifar10:ROOT, ..."),
    data_batches: int = typer.Option(4, "--data-batches", min=1, help="Batches of data to measure."),
    summary: bool = typer.Option(False, "--summary", help="Per-layer table instead: output shape, 1-bit / 32-bit "
                                                          "params, memory, binary / float MACs (larq-style)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    device: str = DEVICE,
    non_strict: bool = NON_STRICT,
    unsafe_load: bool = UNSAFE,
    use_ema: bool = USE_EMA,
    allow_nonfinite: bool = ALLOW_NONFINITE,
    mean: Optional[str] = MEAN,
    std: Optional[str] = STD,
    json_: bool = JSON,
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
):
    """Find every binary activation (per call site), tell it from weight binarization, show its context."""
    from .. import validate

    out = Output(json_mode=json_, quiet=quiet)
    # checked before importing torch (docs/reliability.md)
    validate.check_inputs(model=model, checkpoint=checkpoint, data=data)
    shape = validate.resolve_input_shape(input_shape, None) if input_shape else None
    validate.check_device(device)
    mean_v, std_v = parse_mean_std(mean, std)

    from ..detect import PROBE_BATCH  # imports torch
    from ..parallel import resolve_device
    from ..pipeline import ScanOptions, scan_spec
    from ..source import ModelSource

    if shape is not None:
        validate.check_input_memory(shape, max(PROBE_BATCH, batch_size if data else 0), option="--input-shape")
    source = ModelSource(model, args=arg, checkpoint=checkpoint, input_shape=input_shape, strict=not non_strict,
                         allow_unsafe=unsafe_load, use_ema=use_ema, allow_nonfinite=allow_nonfinite)
    result = scan_spec(ScanOptions(source, data=data, data_batches=data_batches, batch_size=batch_size,
                                   device=resolve_device(device), mean=mean_v, std=std_v, summary=summary))
    print_load_notes(out, result.notes, result.report.checkpoint)
    if json_:
        out.result(result.to_json())
    elif summary:
        render_layer_summary(result.report, out)
    else:
        render_report(result.report, out)
    if verbose:
        print_peak_memory(out)
