"""``bnnshift patch`` and ``bnnshift fold``: insert the shifts, write OUT/ (model.safetensors +
patch.json), optionally fold and export. The work is done by ``bnnshift.patch`` / ``fold`` /
``export``; this module parses options and prints."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import typer

from . import app
from ._common import (ALLOW_NONFINITE, ARG, BN_DATA, BN_RECALIB_BATCHES, CHECKPOINT, INPUT_SHAPE, JSON, MEAN, MODEL,
                      NON_STRICT, QUIET, RECIPE_MODEL, STD, TRUST_RECIPE, UNSAFE, USE_EMA, VERBOSE, ArgList,
                      parse_mean_std, print_load_notes, print_peak_memory)
from ._errors import handle_errors
from ._output import Output


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


def _check_out_early(out: str, force: bool) -> tuple[Path, bool]:
    """Fail before the (slow) scan if OUT cannot be used; returns (path, created by us)."""
    from .. import validate

    p = validate.check_output_dir(out, "-o/--out", force=force)
    return p, not p.exists()  # nothing is created here: the directory is swapped in whole at the end


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


@app.command("patch")
@handle_errors
def patch_command(
    model: str = MODEL,
    arg: ArgList = ARG,
    checkpoint: Optional[str] = CHECKPOINT,
    input_shape: Optional[str] = INPUT_SHAPE,
    out: str = typer.Option(..., "-o", "--out", help="Output directory (model.safetensors + patch.json)."
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

    o = Output(json_mode=json_, quiet=quiet)
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
    out_dir, created = _check_out_early(out, force)
    opts = PatchOptions(model=model, args=arg, checkpoint=checkpoint, input_shape=input_shape, out_dir=out_dir,
                        config=cfg, hardtanh_shift=ht, trainable=trainable, per_channel=per_channel, fold=fold,
                        onnx=onnx, opset=opset, strict=not non_strict, allow_unsafe=unsafe_load, use_ema=use_ema,
                        allow_nonfinite=allow_nonfinite, mean=mean_v, std=std_v)
    from ..journal import OutputLock

    try:
        with OutputLock(out_dir, beside=True):  # one writer per output (as search --out): a second patch -o is refused
            payload = _do_patch(o, opts)
    except BaseException:
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    o.result(payload)
    if verbose:
        print_peak_memory(o)


@dataclass
class PatchOptions:
    """What ``bnnshift patch`` was asked to do (the parsed command line)."""

    model: str
    out_dir: Path
    config: Any  # patch.ShiftConfig
    args: list[str] | None = None
    checkpoint: str | None = None
    input_shape: str | None = None
    hardtanh_shift: float | None = None
    trainable: bool = False
    per_channel: bool = False
    fold: bool = False
    onnx: str | None = None
    opset: int | None = None
    strict: bool = True
    allow_unsafe: bool = False
    use_ema: bool = False
    allow_nonfinite: bool = False
    mean: tuple[float, ...] | None = None  # the model's input normalisation, recorded in patch.json
    std: tuple[float, ...] | None = None


def _do_patch(o, opts: PatchOptions) -> dict:
    from ..errors import NoSitesError
    from ..load import choose_input_shape, load_model
    from ..patch import build_recipe, describe, patch_model, save_patched
    from ..scan import NO_SITES_HINT, resolve_input_shape, scan_model

    cfg, ht, out_dir = opts.config, opts.hardtanh_shift, opts.out_dir
    trainable, per_channel = opts.trainable, opts.per_channel
    loaded = load_model(opts.model, args=opts.args, checkpoint=opts.checkpoint, strict=opts.strict,
                        allow_unsafe=opts.allow_unsafe, use_ema=opts.use_ema, allow_nonfinite=opts.allow_nonfinite)
    explicit = resolve_input_shape(opts.input_shape, None) if opts.input_shape else None
    shape, source = choose_input_shape(explicit, loaded)
    notes = list(loaded.notes) + ([loaded.load_report.line()] if loaded.load_report is not None else [])
    if explicit is None and loaded.input_shape is None:  # not declared by the model: say where from
        notes.append(f"input shape {','.join(map(str, shape))} from {source}")
    print_load_notes(o, notes, loaded.checkpoint_json())
    report = scan_model(loaded.model, shape, name=loaded.spec.canonical(), include_hardtanh=ht is not None)
    for w in report.warnings:
        o.warn(w)
    if not report.sites and ht is None:
        raise NoSitesError(f"no binary activation found in {loaded.spec.canonical()}", hint=NO_SITES_HINT)
    if not report.sites and cfg.shift is not None and not (cfg.patterns or cfg.names or cfg.kinds):
        cfg.shift = None  # a full-precision model: only --hardtanh-shift applies
    patch_model(loaded.model, report, cfg, trainable=trainable, per_channel=per_channel, hardtanh_shift=ht)
    warnings = list(report.warnings)
    if report.sites:
        from ..detect import example_input, probe_batch_size
        from ..patch import patch_state
        from ..scan import constant_site_warnings

        st = patch_state(loaded.model)
        const = constant_site_warnings(loaded.model, report.sites, st.shifts if st else {},
                                       [example_input(shape, batch=probe_batch_size(shape, 64), seed=1)])
        for w in const:
            o.warn(w)
        warnings += const
    from ..data.norm import as_record, choose_normalisation

    norm = choose_normalisation(opts.mean, opts.std, model=loaded.model)
    if norm is not None and len(shape) >= 3:
        from ..data.bundle import broadcast_norm

        broadcast_norm(norm["mean"], norm["std"], int(shape[0]))  # a count that fits neither 1 nor C: exit 2
    recipe = build_recipe(loaded.model, spec=loaded.spec, input_shape=shape, checkpoint=loaded.checkpoint,
                          checkpoint_sha256=loaded.checkpoint_sha256, load_report=loaded.load_report,
                          normalisation=as_record(norm, int(shape[0]) if len(shape) >= 3 else None))
    fold_report = None
    if opts.fold:
        from ..fold import fold_shifts

        fold_report = fold_shifts(loaded.model, shape)
    from .._io import replace_dir

    with replace_dir(out_dir, force=True) as tmp:  # refused early without --force; the old OUT stays whole
        save_patched(loaded.model, recipe, tmp, force=True)
    rows = describe(loaded.model)
    export_report = None
    if opts.onnx:
        from ..export import export_patched_dir

        export_report = export_patched_dir(out_dir, opts.onnx, opts.opset)
    o.table(sites_table(rows, f"{loaded.spec.canonical()}: {sum(1 for r in rows if r['kind'] != 'hardtanh')} "
                              f"sites shifted -> {out_dir}"))
    if fold_report is not None:
        for name, why in fold_report.kept.items():
            o.info(f"kept {name}: {why}")
        for name, why in fold_report.rounded.items():
            o.info(f"folded {name} (not bitwise): {why}")
    if export_report is not None:
        _print_export(o, export_report)
    return {
        "out_dir": str(out_dir),
        "files": [str(out_dir / "model.safetensors"), str(out_dir / "patch.json")],
        "model": loaded.spec.canonical(),
        "checkpoint": loaded.checkpoint_json(),
        "input_shape": list(shape),
        "trainable": trainable,
        "per_channel": per_channel,
        "sites": [r for r in rows if r["kind"] != "hardtanh"],
        "hardtanh_sites": [r for r in rows if r["kind"] == "hardtanh"],
        "fold": fold_report.to_json() if fold_report is not None else None,
        "onnx": export_report.to_json() if export_report is not None else None,
        "warnings": warnings,
        "normalisation": recipe.normalisation,
        "excluded_sites": report.excluded_sites,  # found, left at t = 0, each with the reason
    }


def _print_export(o: Output, r) -> None:
    flips = "not checked" if r.sign_flip_share is None else f"{r.sign_flip_share:.2e} over {r.sites_checked} sites"
    ties = getattr(r, "tie_flips", 0) or 0
    if ties:  # flips at |x - t| within float tolerance: counted apart, not failures
        flips += f" ({ties} ties at the threshold and {getattr(r, 'flips_after_tie', 0)} flips after them not counted)"
    o.text(f"ONNX {r.path}: opset {r.opset}, {r.nodes} nodes ({r.exporter}, optimizer {'on' if r.optimize else 'off'}); "
           f"onnxruntime vs torch: max |dlogit| {r.max_abs_diff:.2e}, top-1 agreement {r.top1_agreement:.3f}, "
           f"sign flips {flips}")
    for w in r.warnings:
        o.warn(w)


BN_PROBE = 1000  # held-out samples that measure the BN statistics before and after re-estimation
BN_BATCH = 256


def refresh_bn(o: Output, model, recipe, data: str | None, n_batches: int, out_dir: str,
               mean=None, std=None) -> dict | None:
    """With ``--data``: measure how stale the BN statistics are, re-estimate them on random batches
    (``recalibrate.reestimate_bn``), keep the new ones only when the probe accuracy is not lower.

    The data are normalised with ``--mean/--std``, else patch.json's record, else a timm model's
    ``pretrained_cfg``; a data set that would be normalised with its own statistics (an image
    folder, integer tensors) while none of these is known is refused (UsageError, nothing
    written). Returns the ``bn_statistics`` JSON (``None`` without --data; call ``bn_note`` after
    the command's work then: it says so only when the weights changed since the statistics were
    measured)."""
    if data is None:
        return None
    import torch

    from ..data import load_data
    from ..data.norm import choose_normalisation, load_kwargs
    from ..errors import UsageError
    from ..recalibrate import reestimate_bn

    norm = choose_normalisation(mean, std, recorded=getattr(recipe, "normalisation", None), model=model)
    bundle = load_data(data, input_shape=tuple(recipe.input_shape) if recipe.input_shape else None,
                       train_limit=n_batches * BN_BATCH + BN_PROBE, val_limit=BN_PROBE, seed=0, **load_kwargs(norm))
    if norm is None and bundle.norm_source == "own":
        raise UsageError(
            f"--data {bundle.name} would be normalised with its own statistics, and {out_dir}/patch.json does not "
            "record the normalisation the model was trained with: BN statistics estimated on other inputs than "
            "the model's make it worse",
            hint="pass the normalisation used in training, e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225; "
                 "fold records it in patch.json")
    if norm is None and bundle.norm_source == "standard":
        o.info(f"normalisation: {bundle.name}'s published mean {list(bundle.mean)} / std {list(bundle.std)} "
               f"({out_dir}/patch.json records none; pass --mean/--std if the model was trained with another)")
    for n in bundle.notes:
        o.warn(n)
    if bundle.val_x is not None and len(bundle.val_x):
        px, py, probe_from = bundle.val_x, bundle.val_y, "held-out"
        train_x = bundle.train_x
    else:  # a random part of the training set, kept out of the re-estimation batches
        n = len(bundle.train_x)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
        k = min(BN_PROBE, n // 4) if n >= 8 else 0
        if k:
            px, py, train_x = bundle.train_x[perm[:k]], bundle.train_y[perm[:k]], bundle.train_x[perm[k:]]
        else:
            px, py, train_x = bundle.train_x, bundle.train_y, bundle.train_x
        probe_from = "training"
    rep = reestimate_bn(model, train_x, px, py, batches=n_batches, batch_size=BN_BATCH, seed=0)
    for level, line in rep.lines(bundle.name):
        (o.warn if level == "warn" else o.info)(f"{out_dir}: {line}" if not rep.bn_layers else line)
    norm_json = bundle.normalisation_json()
    norm_json["source"] = norm["source"] if norm is not None else bundle.norm_source
    return {"data": bundle.name, "recalibrated": rep.bn_layers > 0 and rep.accepted, "batches": rep.batches,
            "probe": probe_from, **rep.to_json(), "normalisation": norm_json, "notes": list(bundle.notes),
            "_norm": norm}


def bn_note(o: Output, model, recipe, out_dir: str, command: str) -> None:
    """Without --data: one line when it is actionable: the model has BatchNorm with running
    statistics AND its weights changed since those statistics were last known to fit them
    (fine-tuned after ``patch``; ``patch.bn_statistics_current``). ``command``: the command
    line that re-estimates them (``fold`` / ``export`` with ``--data SPEC``)."""
    import torch

    from ..patch import bn_statistics_current

    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
               for m in model.modules()):
        return
    if bn_statistics_current(model, recipe):  # straight from patch (or fold --data): nothing to do yet
        return
    how = "" if getattr(recipe, "normalisation", None) else " with --mean/--std as in training"
    o.info(f"note: the weights in {out_dir} changed since its BatchNorm running statistics were measured "
           f"(fine-tuned?) and they were not checked; re-estimate them: {command}{how} (docs/finetune.md)")


def folded_targets(recipe) -> dict[str, list[str]] | None:
    """``{target: [site, ...]}`` (``bn:PATH`` / ``bias:PATH.PARAM``) when every site of the recipe
    is folded (nothing left to fold), else None."""
    sites = list(recipe.sites) + list(recipe.hardtanh_sites)
    if not sites or any(not d.get("folded_into") for d in sites):
        return None
    out: dict[str, list[str]] = {}
    for d in sites:
        out.setdefault(d["folded_into"], []).append(d["name"])
    return out


def already_folded_line(out_dir: str, targets: dict[str, list[str]], data: str | None = None) -> str:
    """The one line of ``fold`` on a directory folded before: where each threshold went."""
    where = "; ".join(f"{', '.join(names)} -> {t}" for t, names in targets.items())
    if data is not None:
        return f"{out_dir} is already folded ({where}): only its BatchNorm statistics were re-estimated"
    return (f"{out_dir} is already folded: the thresholds are in the weights ({where}); nothing to do "
            f"(to re-estimate its BatchNorm statistics: bnnshift fold {out_dir} --data SPEC)")


@app.command("fold")
@handle_errors
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

    o = Output(json_mode=json_, quiet=quiet)
    validate.check_path(out_dir, "OUT_DIR")  # before importing torch
    mean_v, std_v = parse_mean_std(mean, std)

    from ..journal import OutputLock

    import contextlib
    import os

    # one writer per output: a second fold / patch -o of OUT is refused (exit 1); where the parent
    # is read-only OUT cannot be rewritten anyway (an already folded one is only reported)
    parent = os.path.dirname(os.path.abspath(out_dir))
    writable = os.path.isdir(out_dir) and os.access(parent, os.W_OK)
    if os.path.isdir(out_dir):
        from ..journal import check_unlocked

        check_unlocked(out_dir)  # a search that owns OUT (its lock inside) is named too
    with OutputLock(out_dir, beside=True) if writable else contextlib.nullcontext():
        _do_fold(o, out_dir, data, bn_recalib_batches, model_spec, arg, trust_recipe, mean_v, std_v)


def _do_fold(o, out_dir, data, bn_recalib_batches, model_spec, arg, trust_recipe, mean_v=None, std_v=None) -> None:
    from ..fold import FoldReport, fold_shifts
    from ..load import parse_model_spec
    from ..patch import describe, load_patched, read_recipe, save_patched
    from ..shift import shifted_sites

    recipe = read_recipe(out_dir)
    done = folded_targets(recipe)
    if done is not None and data is None and mean_v is None:  # nothing to fold, re-estimate or record: say so, rewrite nothing
        o.info(already_folded_line(out_dir, done))
        o.result({"out_dir": str(out_dir), "checkpoint": recipe.checkpoint, "folded": {}, "kept": {},
                  "already_folded": {n: t for t, names in done.items() for n in names},
                  "sites": [{k: d.get(k) for k in ("name", "kind", "op", "shift", "applied", "threshold_key",
                                                   "foldable", "fold_reason")} for d in recipe.sites],
                  "bn_statistics": None})
        return
    model = load_patched(out_dir, model=model_spec, args=arg, trust=trust_recipe)
    if model_spec is not None:  # the recipe now names the model the user gave
        spec = parse_model_spec(model_spec, arg if arg is not None else recipe.factory_args)
        recipe.model, recipe.factory_args = spec.to_json(), dict(spec.args)
    bn = refresh_bn(o, model, recipe, data, bn_recalib_batches, out_dir, mean_v, std_v)
    norm = bn.pop("_norm", None) if bn is not None else None
    if norm is None and mean_v is not None:
        from ..data.norm import choose_normalisation

        norm = choose_normalisation(mean_v, std_v)
    if norm is not None:  # fold records the normalisation the statistics were estimated with
        from ..data.norm import as_record

        recipe.normalisation = as_record(norm, int(recipe.input_shape[0]) if recipe.input_shape else None)
    if bn is not None and not shifted_sites(model):  # folded before: only the statistics change
        rep = FoldReport()
        o.info(already_folded_line(out_dir, done or {}, data=data))
    else:
        rep = fold_shifts(model, recipe.input_shape)
    if bn is not None and bn["recalibrated"]:  # the statistics now fit these weights
        from ..patch import BN_STATS_KEY, weights_digest

        recipe.hashes = {**(recipe.hashes or {}), BN_STATS_KEY: weights_digest(model)}
    from .._io import replace_dir

    from .._trust import is_trusted

    # the record's line is carried forward only for a recipe it already trusted (--model and
    # --trust-recipe trust this run only and record nothing)
    carry = model_spec is None and not trust_recipe and is_trusted(recipe.sha256)
    with replace_dir(out_dir, force=True) as tmp:  # never half-rewritten: built beside, swapped in
        save_patched(model, recipe, tmp, force=True, record_trust=carry)
    rows = describe(model)
    o.table(sites_table(rows, f"{out_dir}: {len(rep.folded)} folded, {len(rep.kept)} kept"))
    for name, why in rep.kept.items():
        o.info(f"kept {name}: {why}")
    for name, why in rep.rounded.items():
        o.info(f"folded {name} (not bitwise): {why}")
    if bn is None:
        bn_note(o, model, recipe, out_dir, f"bnnshift fold {out_dir} --data SPEC")
    o.result({"out_dir": str(out_dir), "checkpoint": recipe.checkpoint, **rep.to_json(), "sites": rows,
              "bn_statistics": bn, "normalisation": recipe.normalisation})
