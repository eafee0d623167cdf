"""``bnnshift scan``: every binary activation per call site, its context and the paper's advice."""
from __future__ import annotations

from typing import Optional

import typer

from . import app
from ._common import ARG, CHECKPOINT, INPUT_SHAPE, JSON, MODEL, NON_STRICT, QUIET, UNSAFE, ArgList
from ._errors import handle_errors
from ._output import Output


def _fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def render_report(report, out: Output) -> None:
    from rich.table import Table

    t = Table(title=f"binary activations of {report.model}  ({report.num_sites} sites, "
                    f"{report.weight_binarizers} weight binarizers)", show_lines=False)
    cols = ["site", "kind", "alphabet", "producer", "pool", "follower", "threshold", "fold", "+1 share", "advice"]
    for c in cols:
        t.add_column(c, overflow="fold")
    for s in report.sites:
        thr = "-" if not s.threshold else f"{s.threshold['mean']:+.2f} [{s.threshold['min']:+.2f},{s.threshold['max']:+.2f}]"
        follower = "-" if not s.follower else (f"{s.follower}({s.follower_slope:.2f})" if s.follower_slope is not None
                                                else s.follower)
        op = s.op.split(":", 1)[1] if s.op.startswith("module:") else s.op
        t.add_row(s.name, f"{s.kind}: {op}", s.alphabet, s.producer, s.pool or "-", follower, thr,
                  s.foldable or "no", _fmt(s.plus_fraction), s.advice[0] if s.advice else "")
    out.table(t)
    sm = report.summary
    if sm:
        out.table(f"params {sm['params']:,} ({sm['binary_params']:,} binary) | MACs: binary {sm['binary_macs']:,}, "
                  f"float {sm['float_macs']:,} | OPs {sm['ops']:,.0f} | memory {sm['memory_float32_bytes']/2**20:.2f} MiB "
                  f"fp32 -> {sm['memory_1bit_bytes']/2**20:.2f} MiB with 1-bit weights")
    if report.leaves:
        out.table("untraced leaves (tracing failed inside; sites there found at run time): " +
                  ", ".join(f"{k} ({report.leaf_errors.get(k, '')})" for k in report.leaves))
    if any(s.preact for s in report.sites):
        from rich.table import Table as T2
        t2 = T2(title="pre-activation statistics (paper Fig. 4)")
        for c in ("site", "+1 share", "mean", "median", "skew"):
            t2.add_column(c)
        for s in report.sites:
            p = s.preact or {}
            t2.add_row(s.name, _fmt(s.plus_fraction), _fmt(p.get("mean")), _fmt(p.get("median")), _fmt(p.get("skew")))
        out.table(t2)
    for w in report.warnings:
        out.warn(w)


@app.command("scan")
@handle_errors
def scan_command(
    model: str = MODEL,
    arg: ArgList = ARG,
    checkpoint: Optional[str] = CHECKPOINT,
    input_shape: Optional[str] = INPUT_SHAPE,
    data: Optional[str] = typer.Option(None, "--data", help="Data spec for +1 shares: fashion-mnist[:ROOT], "
                                                            "synthetic[:N], cifar10:ROOT, ..."),
    data_batches: int = typer.Option(4, "--data-batches", min=1, help="Batches of data to measure."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    non_strict: bool = NON_STRICT,
    unsafe_load: bool = UNSAFE,
    json_: bool = JSON,
    quiet: bool = QUIET,
):
    """Find every binary activation (per call site), tell it from weight binarization, show its context."""
    from ..scan import scan

    out = Output(json_mode=json_, quiet=quiet)
    report = scan(model, args=arg, checkpoint=checkpoint, input_shape=input_shape, data=data,
                  data_batches=data_batches, batch_size=batch_size, strict=not non_strict, allow_unsafe=unsafe_load)
    if json_:
        out.result(report.to_json())
    else:
        render_report(report, out)
