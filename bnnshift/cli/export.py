"""``bnnshift export OUT/ --onnx model.onnx``: ONNX export of a patched directory, verified with
onnxruntime (exit 4 when the verification fails). The export runs in a subprocess so that an
exporter crash is reported as one line."""
from __future__ import annotations

from typing import Optional

import typer

from . import app
from ._common import JSON, QUIET
from ._errors import handle_errors
from ._output import Output


@app.command("export")
@handle_errors
def export_command(
    out_dir: str = typer.Argument(..., help="A directory written by `bnnshift patch` (folded or not)."),
    onnx: str = typer.Option(..., "--onnx", help="Path of the ONNX file to write."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default: the exporter's)."),
    batches: int = typer.Option(3, "--batches", min=1, help="Random batches compared with onnxruntime."),
    json_: bool = JSON,
    quiet: bool = QUIET,
):
    """Export to ONNX and verify with onnxruntime (logits, top-1, sign flips per binary activation)."""
    from ..export import export_patched_dir
    from .patch import _print_export

    o = Output(json_mode=json_, quiet=quiet)
    report = export_patched_dir(out_dir, onnx, opset, batches=batches)
    _print_export(o, report)
    o.result(report.to_json())
