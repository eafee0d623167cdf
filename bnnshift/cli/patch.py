"""``bnnshift patch`` and ``bnnshift fold``: insert the shifts, write OUT/ (model.safetensors +
patch.json), optionally fold and export. Each command validates its options, makes one call
(``pipeline.patch_spec`` / ``pipeline.fold_dir``) and prints the result."""
from __future__ import annotations

from typing import List, Optional

import typer

from ..vocab import SiteKind
from ._common import (ALLOW_NONFINITE, ARG, BN_DATA, BN_RECALIB_BATCHES, CHECKPOINT, INPUT_SHAPE, JSON, MEAN, MODEL,
                      NON_STRICT, QUIET, RECIPE_MODEL, STD, TRUST_RECIPE, UNSAFE, USE_EMA, VERBOSE, ArgList, parse_mean_std,
                      print_peak_memory)
from ._output import Output, print_export


def _split_pair(text: str, option: str) -> tuple[str, str]:
    from ..errors import UsageError

    key, sep, value = text.rpartition("=")
    if not sep or not key.strip():
        raise UsageError(f"bad {option} {text!r}: expected NAME=T", hint=f"e.g. {option} 'layer1.*=0.5'")
    return key.strip(), value.strip()


def _cli_config(shift, site, kind, exclude):
    from ..patch import ShiftConfig, parse_shift_value

    cfg = ShiftConfig(shift=parse_shift_value(shift, "--shift") if shift is not None else None)
    for k in kind or []:
        key, value = _split_pair(k, "--kind")
        cfg = cfg.merged(ShiftConfig(kinds={key: parse_shift_value(value, f"--kind {key}")}))
    for s in site or []:
        key, value = _split_pair(s, "--site")
        cfg.add_site(key, value)
    cfg.exclude = list(exclude or [])
    return cfg


def sites_table(rows: list[dict], title: str):
    from rich.table import Table

    t = Table(title=title)
    for c in ("site", "kind", "shift", "applied", "threshold key / fold"):
        t.add_column(c, overflow="fold")
    for r in rows:
        last = r["threshold_key"] or ""
        if r["applied"].startswith("folded"):
            last = ""
        elif r.get("foldable") is None and r.get("fold_reason"):
            last = f"{last}  (not foldable: {r['fold_reason']})"
        t.add_row(r["name"], r["kind"], f"{r['shift']:+g}" if r["shift"] is not None else "-", r["applied"], last)
    return t


def patch_command(
    model: str = MODEL,
    arg: ArgList = ARG,
    checkpoint: Optional[str] = CHECKPOINT,
    input_shape: Optional[str] = INPUT_SHAPE,
    out_dir: str = typer.Option(..., "-o", "--out", help="Output directory (model.safetensors + patch.json)."
                                                         " Missing parent directories are created (mkdir -p)."),
    shift: Optional[str] = typer.Option(None, "--shift", help="Shift t for every activation site."),
    site: Optional[List[str]] = typer.Option(None, "--site", help="PATTERN=T: exact site name, glob or re:REGEX "
                                                               "(repeatable; later wins)."),
    config: Optional[str] = typer.Option(None, "--config", help="Shifts file (TOML, see docs/patch.md)."),
    kind: Optional[List[str]] = typer.Option(None, "--kind", help="KIND=T for sites of a kind: module, input, inline."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="Site name or pattern to leave unshifted."),
    hardtanh_shift: Optional[str] = typer.Option(None, "--hardtanh-shift", help="Shift nn.Hardtanh activations "
                                                                              "along x (full-precision stage)."),
    trainable: bool = typer.Option(False, "--trainable", help="Thresholds become nn.Parameter (init t)."),
    per_channel: bool = typer.Option(False, "--per-channel", help="One threshold per channel."),
    fold: bool = typer.Option(False, "--fold", help="Absorb t into BN / bias where exact."),
    onnx: Optional[str] = typer.Option(None, "--onnx", help="Also export (and verify) ONNX to this path."
                                                            " Missing parent directories are created (mkdir -p)."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default: the exporter's)."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output directory."),
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
    """Shift the threshold of binary activations: sign(x) -> sign(x - t). Writes OUT/ for fine-tuning.

    --mean/--std (or a timm model's pretrained_cfg) are recorded in patch.json: fold / export --data
    normalise their data with them."""
    from .. import validate
    from ..errors import UsageError

    out = Output(json_mode=json_, quiet=quiet)
    # checked before importing torch (docs/reliability.md)
    validate.check_inputs(model=model, checkpoint=checkpoint, config=config)
    mean_v, std_v = parse_mean_std(mean, std)
    shape = validate.resolve_input_shape(input_shape, None) if input_shape else None
    if onnx:
        validate.check_output_file(onnx, "--onnx")
    if shift is not None:
        validate.parse_shift_value(shift, "--shift")
    ht = validate.parse_shift_value(hardtanh_shift, "--hardtanh-shift") if hardtanh_shift is not None else None
    if shift is None and not site and not kind and not config and ht is None:
        raise UsageError("no shift given", hint="pass --shift T, --site PATTERN=T, --config FILE or --hardtanh-shift T")
    if fold and trainable:
        raise UsageError("--fold and --trainable exclude each other",
                         hint="fold after fine-tuning: bnnshift fold OUT/")

    from ..detect import PROBE_BATCH  # imports torch
    from ..patch import ShiftConfig

    if shape is not None:
        validate.check_input_memory(shape, PROBE_BATCH, option="--input-shape")
    cfg = _cli_config(shift, site, kind, exclude)
    if config:
        cfg = ShiftConfig.from_toml(config).merged(cfg)
    if cfg.empty and ht is None:
        raise UsageError("no shift given", hint="pass --shift T, --site PATTERN=T, --config FILE or --hardtanh-shift T")
    out_dir = validate.check_output_dir(out_dir, "-o/--out", force=force)  # before the (slow) scan
    from ..pipeline import PatchOptions, patch_spec
    from ..source import ModelSource

    source = ModelSource(model, args=arg, checkpoint=checkpoint, input_shape=input_shape, strict=not non_strict,
                         allow_unsafe=unsafe_load, use_ema=use_ema, allow_nonfinite=allow_nonfinite)
    result = patch_spec(PatchOptions(source, out_dir, cfg, hardtanh_shift=ht, trainable=trainable,
                                     per_channel=per_channel, fold=fold, onnx=onnx, opset=opset, mean=mean_v,
                                     std=std_v), log=out)
    rows = result.rows
    out.table(sites_table(rows, f"{result.model}: {sum(1 for r in rows if r['kind'] != SiteKind.HARDTANH)} "
                              f"sites shifted -> {out_dir}"))
    if result.fold is not None:
        _print_fold_lines(out, result.fold)
    if result.export is not None:
        print_export(out, result.export)
    out.result(result.to_json())
    if verbose:
        print_peak_memory(out)


def _print_fold_lines(out: Output, rep) -> None:
    for name, why in rep.kept.items():
        out.info(f"kept {name}: {why}")
    for name, why in rep.rounded.items():
        out.info(f"folded {name} (not bitwise): {why}")


def fold_command(
    out_dir: str = typer.Argument(..., help="A directory written by `bnnshift patch`."),
    data: Optional[str] = BN_DATA,
    bn_recalib_batches: int = BN_RECALIB_BATCHES,
    mean: Optional[str] = MEAN,
    std: Optional[str] = STD,
    model_spec: Optional[str] = RECIPE_MODEL,
    arg: ArgList = ARG,
    trust_recipe: bool = TRUST_RECIPE,
    json_: bool = JSON,
    quiet: bool = QUIET,
):
    """Absorb the thresholds into BatchNorm / bias where exact (in place); keep the others and say why.

    With --data, the BatchNorm statistics are re-estimated first (needed after fine-tuning), on
    data normalised with --mean/--std (else patch.json's record, recorded by patch or an earlier
    fold); the new statistics are kept only when the probe accuracy is not lower."""
    from .. import validate

    out = Output(json_mode=json_, quiet=quiet)
    validate.check_path(out_dir, "OUT_DIR")  # before importing torch
    mean_v, std_v = parse_mean_std(mean, std)

    from ..pipeline import BnOptions, FoldOptions, fold_dir

    result = fold_dir(FoldOptions(out_dir, BnOptions(data, bn_recalib_batches, mean_v, std_v), model=model_spec,
                                  args=arg, trust=trust_recipe), log=out)
    if result.report is not None:
        out.table(sites_table(result.rows, f"{out_dir}: {len(result.report.folded)} folded, "
                                         f"{len(result.report.kept)} kept"))
        _print_fold_lines(out, result.report)
    if result.note:
        out.info(result.note)
    out.result(result.to_json())
