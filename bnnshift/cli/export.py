"""``bnnshift export OUT/ --onnx model.onnx``: ONNX export of a patched directory, verified with
onnxruntime (exit 4 when the verification fails). The export runs in a subprocess so that an
exporter crash is reported as one line."""
from __future__ import annotations

from typing import Optional

import typer

from . import app
from ._common import (ARG, BN_DATA, BN_RECALIB_BATCHES, JSON, MEAN, OUTPUT_INDEX, OUTPUT_KEY, QUIET,
                      RECIPE_MODEL, STD, TRUST_RECIPE, ArgList, parse_mean_std)
from ._errors import handle_errors
from ._output import Output


@app.command("export")
@handle_errors
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
    import tempfile

    from .. import validate

    o = Output(json_mode=json_, quiet=quiet)
    validate.check_path(out_dir, "OUT_DIR")  # before importing torch
    validate.check_output_file(onnx, "--onnx")
    mean_v, std_v = parse_mean_std(mean, std)

    from ..export import export_patched_dir
    from ..patch import load_patched, read_recipe, save_patched
    from .patch import _print_export, bn_note, refresh_bn

    recipe = read_recipe(out_dir)
    model = load_patched(out_dir, model=model_spec, args=arg, trust=trust_recipe)
    bn = refresh_bn(o, model, recipe, data, bn_recalib_batches, out_dir, mean_v, std_v)
    norm = bn.pop("_norm", None) if bn is not None else None
    if norm is None and mean_v is not None:
        from ..data.norm import choose_normalisation

        norm = choose_normalisation(mean_v, std_v)
    record = None
    if norm is not None:
        from ..data.norm import as_record

        record = as_record(norm, int(recipe.input_shape[0]) if recipe.input_shape else None)
    if (bn is None or not bn["recalibrated"]) and (record is None or record == recipe.normalisation):
        report = export_patched_dir(out_dir, onnx, opset, batches=batches, model=model_spec, model_args=arg,
                                    trust=trust_recipe, output_index=output_index, output_key=output_key)
    else:
        if record is not None:  # the ONNX metadata names the normalisation used
            recipe.normalisation = record
        with tempfile.TemporaryDirectory(prefix="bnnshift-bn-") as tmp:
            save_patched(model, recipe, tmp, force=True, record_trust=False)  # a copy for the child only
            # the copy is not recorded; this process has just rebuilt the same spec under the trust
            # rules (the pinned files checked), so the child may rebuild it for this run only
            report = export_patched_dir(tmp, onnx, opset, batches=batches, model=model_spec, model_args=arg,
                                        trust=True, output_index=output_index, output_key=output_key)
    _print_export(o, report)
    if bn is None:
        bn_note(o, model, recipe, out_dir, f"bnnshift export {out_dir} --onnx {onnx} --data SPEC "
                                           f"(or bnnshift fold {out_dir} --data SPEC to update the directory)")
    o.result({**report.to_json(), "bn_statistics": bn, "checkpoint": recipe.checkpoint,
              "normalisation": recipe.normalisation})
