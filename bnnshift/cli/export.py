"""``bnnshift export OUT/ --onnx model.onnx``: ONNX export of a patched directory, verified with
onnxruntime (exit 4 when the verification fails): validate, one call (``pipeline.export_dir``),
print. The export runs in a subprocess so that an exporter crash is reported as one line."""
from __future__ import annotations

from typing import Optional

import typer

from ._common import (ARG, BN_DATA, BN_RECALIB_BATCHES, JSON, MEAN, OUTPUT_INDEX, OUTPUT_KEY, QUIET,
                      RECIPE_MODEL, STD, TRUST_RECIPE, ArgList, parse_mean_std)
from ._output import Output, print_export


def export_command(
    out_dir: str = typer.Argument(..., help="A directory written by `bnnshift patch` (folded or not)."),
    onnx: str = typer.Option(..., "--onnx", help="Path of the ONNX file to write."
                                                 " Missing parent directories are created (mkdir -p)."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset of the file (default: the exporter's);"
                                                          " refused (exit 1, no file) when it cannot be written."),
    batches: int = typer.Option(3, "--batches", min=1, help="Random batches compared with onnxruntime."),
    data: Optional[str] = BN_DATA,
    bn_recalib_batches: int = BN_RECALIB_BATCHES,
    mean: Optional[str] = MEAN,
    std: Optional[str] = STD,
    model_spec: Optional[str] = RECIPE_MODEL,
    arg: ArgList = ARG,
    trust_recipe: bool = TRUST_RECIPE,
    output_index: Optional[int] = OUTPUT_INDEX,
    output_key: Optional[str] = OUTPUT_KEY,
    json_: bool = JSON,
    quiet: bool = QUIET,
):
    """Export to ONNX and verify with onnxruntime (logits, top-1, sign flips per binary activation).

    With --data, the BatchNorm statistics are re-estimated for the ONNX file on data normalised
    with --mean/--std (else patch.json's record), kept only when the probe accuracy is not lower
    (the directory is left as it is: `bnnshift fold OUT/ --data SPEC` updates it). The
    normalisation is written into the ONNX metadata_props (bnnshift_normalisation)."""
    from .. import validate

    out = Output(json_mode=json_, quiet=quiet)
    validate.check_path(out_dir, "OUT_DIR")  # before importing torch
    validate.check_output_file(onnx, "--onnx")
    mean_v, std_v = parse_mean_std(mean, std)

    from ..pipeline import BnOptions, ExportOptions, export_dir

    result = export_dir(ExportOptions(out_dir, onnx, opset, batches, BnOptions(data, bn_recalib_batches, mean_v, std_v),
                                      model=model_spec, args=arg, trust=trust_recipe, output_index=output_index,
                                      output_key=output_key), log=out)
    print_export(out, result.report)
    if result.note:
        out.info(result.note)
    out.result(result.to_json())
