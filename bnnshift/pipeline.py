"""The application layer: one entry per command that composes the phases (torch.ao
``quantize_fx`` style: thin public entries over private composers).

Each entry takes an options dataclass and returns a result dataclass whose ``to_json()`` *is*
the command's documented ``--json`` payload (``docs/*.schema.json``); the CLI validates its
options, makes one call here and prints the result. What the user is told while the work runs
(load notes, BN re-estimation, warnings) goes to ``log``: any object with ``info(line)`` and
``warn(line)`` (the CLI's ``Output``; default: dropped)::

    from bnnshift.pipeline import PatchOptions, patch_spec
    from bnnshift.patch import ShiftConfig
    from bnnshift.source import ModelSource

    result = patch_spec(PatchOptions(ModelSource("zoo:mlp", args=["width=0.25"]), out_dir="OUT",
                                     config=ShiftConfig(shift=0.5)))
    result.to_json()["sites"]

| entry | command | options | result |
|---|---|---|---|
| :func:`scan_spec` | ``scan`` | :class:`ScanOptions` | :class:`ScanResult` |
| :func:`patch_spec` | ``patch`` | :class:`PatchOptions` | :class:`PatchResult` |
| :func:`fold_dir` | ``fold`` | :class:`FoldOptions` | :class:`FoldResult` |
| :func:`export_dir` | ``export`` | :class:`ExportOptions` | :class:`ExportResult` |
"""
from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .source import ModelSource, open_model, say_load_notes
from .vocab import SiteKind


class Log(Protocol):
    """Where an entry says what happens while it runs (``bnnshift.cli._output.Output``)."""

    def info(self, line: str) -> None: ...

    def warn(self, line: str) -> None: ...


class _Discard:
    def info(self, line: str) -> None:
        pass

    def warn(self, line: str) -> None:
        pass


# ---------------------------------------------------------------------------------------- scan


@dataclass
class ScanOptions:
    """``bnnshift scan``: the model, data for +1 shares (``data`` spec, ``data_batches`` batches
    of ``batch_size``), ``device`` for the probes, the input normalisation (``mean`` / ``std``,
    per channel, [0, 1] pixel units) and ``summary`` (add the per-layer table to the JSON)."""

    source: ModelSource
    data: str | None = None
    data_batches: int = 4
    batch_size: int = 256
    device: Any = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    summary: bool = False


@dataclass
class ScanResult:
    """The ``ScanReport`` and the load notes (said on stderr after the scan)."""

    report: Any  # sites.ScanReport
    notes: list[str] = field(default_factory=list)
    summary: bool = False

    def to_json(self) -> dict[str, Any]:
        """``docs/scan.schema.json``."""
        payload = self.report.to_json()
        if self.summary:
            payload["layer_summary"] = self.report.layer_summary
        return payload


def scan_spec(opts: ScanOptions) -> ScanResult:
    """Scan ``opts.source``'s model (``scan.scan``). Raises ``NoSitesError`` (exit 3) when it
    has no binary activation, and what ``source.open_model`` / ``data.load_data`` raise."""
    from .scan import scan

    s, notes = opts.source, []
    report = scan(s.spec, args=s.args, checkpoint=s.checkpoint, input_shape=s.input_shape, data=opts.data,
                  data_batches=opts.data_batches, batch_size=opts.batch_size, strict=s.strict,
                  allow_unsafe=s.allow_unsafe, use_ema=s.use_ema, allow_nonfinite=s.allow_nonfinite, notes=notes,
                  device=opts.device, mean=opts.mean, std=opts.std)
    return ScanResult(report, notes, opts.summary)


# --------------------------------------------------------------------------------------- patch


@dataclass
class PatchOptions:
    """``bnnshift patch``: the model, the output directory, the shifts (``config``: a
    ``patch.ShiftConfig``; ``hardtanh_shift``: t for ``nn.Hardtanh`` sites), thresholds as
    parameters (``trainable``) or per channel, ``fold`` into BN / bias, ``onnx`` path and
    ``opset`` for a verified export, and the input normalisation recorded in ``patch.json``."""

    source: ModelSource
    out_dir: Path
    config: Any  # patch.ShiftConfig
    hardtanh_shift: float | None = None
    trainable: bool = False
    per_channel: bool = False
    fold: bool = False
    onnx: str | None = None
    opset: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


@dataclass
class PatchResult:
    """What ``patch`` wrote: ``rows`` (``patch.describe``), the fold and export reports (or
    None), the warnings said while patching and the recipe's normalisation record."""

    out_dir: Path
    model: str
    checkpoint: dict[str, Any] | None
    input_shape: tuple[int, ...]
    trainable: bool
    per_channel: bool
    rows: list[dict[str, Any]]
    fold: Any = None  # fold.FoldReport
    export: Any = None  # export.ExportReport
    warnings: list[str] = field(default_factory=list)
    normalisation: dict[str, Any] | None = None
    excluded_sites: list[dict[str, Any]] = field(default_factory=list)  # found, left at t = 0, each with the reason

    def to_json(self) -> dict[str, Any]:
        """``docs/patch.schema.json``."""
        return {
            "out_dir": str(self.out_dir),
            "files": [str(self.out_dir / "model.safetensors"), str(self.out_dir / "patch.json")],
            "model": self.model,
            "checkpoint": self.checkpoint,
            "input_shape": list(self.input_shape),
            "trainable": self.trainable,
            "per_channel": self.per_channel,
            "sites": [r for r in self.rows if r["kind"] != SiteKind.HARDTANH],
            "hardtanh_sites": [r for r in self.rows if r["kind"] == SiteKind.HARDTANH],
            "fold": self.fold.to_json() if self.fold is not None else None,
            "onnx": self.export.to_json() if self.export is not None else None,
            "warnings": self.warnings,
            "normalisation": self.normalisation,
            "excluded_sites": self.excluded_sites,
        }


def patch_spec(opts: PatchOptions, log: Log | None = None) -> PatchResult:
    """Load, scan and patch ``opts.source``'s model, write ``opts.out_dir`` (``model.safetensors``
    + ``patch.json``, swapped in whole; one writer at a time: ``journal.OutputLock``), then fold
    and export when asked. A directory this call created is removed again when it fails.
    Raises ``NoSitesError`` (exit 3), ``LockedError``, ``UsageError`` and the loaders' errors."""
    from .journal import OutputLock

    out_dir = Path(opts.out_dir)
    created = not out_dir.exists()  # nothing is created before the swap at the end
    try:
        with OutputLock(out_dir, beside=True):  # one writer per output (as search --out)
            return _patch(opts, out_dir, log or _Discard())
    except BaseException:
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _patch(opts: PatchOptions, out_dir: Path, log: Log) -> PatchResult:
    from ._io import replace_dir
    from .errors import NoSitesError
    from .patch import build_recipe, describe, patch_model, save_patched
    from .scan import NO_SITES_HINT, scan_model

    cfg, ht = opts.config, opts.hardtanh_shift
    opened = open_model(opts.source)
    loaded, shape = opened.loaded, opened.shape
    say_load_notes(log, opened.notes, loaded.checkpoint_json())
    report = scan_model(loaded.model, shape, name=opened.name, include_hardtanh=ht is not None)
    for w in report.warnings:
        log.warn(w)
    if not report.sites and ht is None:
        raise NoSitesError(f"no binary activation found in {opened.name}", hint=NO_SITES_HINT)
    if not report.sites and cfg.shift is not None and not (cfg.patterns or cfg.names or cfg.kinds):
        cfg.shift = None  # a full-precision model: only --hardtanh-shift applies
    patch_model(loaded.model, report, cfg, trainable=opts.trainable, per_channel=opts.per_channel,
                hardtanh_shift=ht)
    warnings = list(report.warnings) + _constant_sites(loaded.model, report.sites, shape, log)
    recipe = build_recipe(loaded.model, spec=loaded.spec, input_shape=shape, checkpoint=loaded.checkpoint,
                          checkpoint_sha256=loaded.checkpoint_sha256, load_report=loaded.load_report,
                          normalisation=_norm_record(opts, loaded.model, shape))
    fold_report = None
    if opts.fold:
        from .fold import fold_shifts

        fold_report = fold_shifts(loaded.model, shape)
    with replace_dir(out_dir, force=True) as tmp:  # refused early without --force; the old OUT stays whole
        save_patched(loaded.model, recipe, tmp, force=True)
    rows = describe(loaded.model)
    export_report = None
    if opts.onnx:
        from .export import export_patched_dir

        export_report = export_patched_dir(out_dir, opts.onnx, opts.opset)
    return PatchResult(out_dir, opened.name, loaded.checkpoint_json(), shape, opts.trainable, opts.per_channel, rows,
                       fold_report, export_report, warnings, recipe.normalisation, report.excluded_sites)


def _constant_sites(model, sites, shape, log: Log) -> list[str]:
    """Sites a shift makes constant on a probe batch (said, and kept in the warnings)."""
    if not sites:
        return []
    from .detect import example_input, probe_batch_size
    from .patch import patch_state
    from .scan import constant_site_warnings

    st = patch_state(model)
    const = constant_site_warnings(model, sites, st.shifts if st else {}, [example_input(shape, batch=probe_batch_size(shape, 64), seed=1)])
    for w in const:
        log.warn(w)
    return const


def _norm_record(opts: PatchOptions, model, shape) -> dict[str, Any] | None:
    from .data.norm import as_record, choose_normalisation

    norm = choose_normalisation(opts.mean, opts.std, model=model)
    if norm is not None and len(shape) >= 3:
        from .data.bundle import broadcast_norm

        broadcast_norm(norm["mean"], norm["std"], int(shape[0]))  # a count that fits neither 1 nor C: exit 2
    return as_record(norm, int(shape[0]) if len(shape) >= 3 else None)


# ------------------------------------------------------------------------- BN statistics (fold, export)


BN_PROBE = 1000  # held-out samples that measure the BN statistics before and after re-estimation
BN_BATCH = 256


@dataclass
class BnOptions:
    """BN re-estimation of ``fold`` / ``export``: ``data`` spec (None: none), ``batches`` of
    256 training samples, the normalisation ``mean`` / ``std`` (per channel, [0, 1] pixels)."""

    data: str | None = None
    batches: int = 20
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def refresh_bn(log: Log, model, recipe, bn: BnOptions, out_dir: str) -> tuple[dict | None, dict | None]:
    """With ``bn.data``: measure how stale the BN statistics are, re-estimate them on random
    batches (``recalibrate.reestimate_bn``), keep the new ones only when the probe accuracy is
    not lower. The data are normalised with ``bn.mean/std``, else patch.json's record, else a
    timm model's ``pretrained_cfg``; a data set that would be normalised with its own statistics
    while none of these is known is refused (``UsageError``, nothing written).

    Returns ``(bn_statistics JSON or None without data, the normalisation applied or None)``."""
    if bn.data is None:
        return None, None
    import torch

    from .data import load_data
    from .data.norm import choose_normalisation, load_kwargs
    from .errors import UsageError
    from .recalibrate import reestimate_bn

    norm = choose_normalisation(bn.mean, bn.std, recorded=getattr(recipe, "normalisation", None), model=model)
    bundle = load_data(bn.data, input_shape=tuple(recipe.input_shape) if recipe.input_shape else None,
                       train_limit=bn.batches * BN_BATCH + BN_PROBE, val_limit=BN_PROBE, seed=0, **load_kwargs(norm))
    if norm is None and bundle.norm_source == "own":
        raise UsageError(
            f"--data {bundle.name} would be normalised with its own statistics, and {out_dir}/patch.json does not "
            "record the normalisation the model was trained with: BN statistics estimated on other inputs than "
            "the model's make it worse",
            hint="pass the normalisation used in training, e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225; "
                 "fold records it in patch.json")
    if norm is None and bundle.norm_source == "standard":
        log.info(f"normalisation: {bundle.name}'s published mean {list(bundle.mean)} / std {list(bundle.std)} "
                 f"({out_dir}/patch.json records none; pass --mean/--std if the model was trained with another)")
    for n in bundle.notes:
        log.warn(n)
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
    rep = reestimate_bn(model, train_x, px, py, batches=bn.batches, batch_size=BN_BATCH, seed=0)
    for level, line in rep.lines(bundle.name):
        (log.warn if level == "warn" else log.info)(f"{out_dir}: {line}" if not rep.bn_layers else line)
    norm_json = bundle.normalisation_json()
    norm_json["source"] = norm["source"] if norm is not None else bundle.norm_source
    return ({"data": bundle.name, "recalibrated": rep.bn_layers > 0 and rep.accepted, "batches": rep.batches,
             "probe": probe_from, **rep.to_json(), "normalisation": norm_json, "notes": list(bundle.notes)}, norm)


def bn_note(recipe, out_dir: str, command: str) -> str:
    """The note said without ``--data`` when the weights changed since the BatchNorm running
    statistics were last known to fit them (``patch.bn_statistics_stale``); ``command``: the
    command line that re-estimates them."""
    how = "" if getattr(recipe, "normalisation", None) else " with --mean/--std as in training"
    return (f"note: the weights in {out_dir} changed since its BatchNorm running statistics were measured "
            f"(fine-tuned?) and they were not checked; re-estimate them: {command}{how} (docs/finetune.md)")


def _record(norm: dict | None, recipe) -> dict | None:
    from .data.norm import as_record

    return as_record(norm, int(recipe.input_shape[0]) if recipe.input_shape else None) if norm is not None else None


def _given_norm(bn: BnOptions) -> dict | None:
    if bn.mean is None:
        return None
    from .data.norm import choose_normalisation

    return choose_normalisation(bn.mean, bn.std)


# ---------------------------------------------------------------------------------------- fold


@dataclass
class FoldOptions:
    """``bnnshift fold``: the patched directory (rewritten in place), BN re-estimation first
    (``bn``), and the model to rebuild (``model`` spec / ``args``; ``trust`` the recipe's code)."""

    out_dir: str
    bn: BnOptions = field(default_factory=BnOptions)
    model: str | None = None
    args: list[str] | None = None
    trust: bool = False


@dataclass
class FoldResult:
    """What ``fold`` did: the ``fold.FoldReport`` (``None`` when the directory was already
    folded and nothing was rewritten: ``already_folded`` then maps site -> target), the site
    rows, the BN statistics JSON, the recipe's normalisation record and a ``note`` to say."""

    out_dir: str
    checkpoint: dict[str, Any] | None
    report: Any  # fold.FoldReport | None
    rows: list[dict[str, Any]]
    bn_statistics: dict[str, Any] | None = None
    normalisation: dict[str, Any] | None = None
    already_folded: dict[str, str] | None = None
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        """``docs/fold.schema.json``."""
        if self.report is None:
            return {"out_dir": self.out_dir, "checkpoint": self.checkpoint, "folded": {}, "kept": {},
                    "already_folded": self.already_folded, "sites": self.rows, "bn_statistics": None}
        return {"out_dir": self.out_dir, "checkpoint": self.checkpoint, **self.report.to_json(), "sites": self.rows,
                "bn_statistics": self.bn_statistics, "normalisation": self.normalisation}


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


def fold_dir(opts: FoldOptions, log: Log | None = None) -> FoldResult:
    """Fold the thresholds of ``opts.out_dir`` into BN / bias where exact (``fold.fold_shifts``),
    re-estimating the BN statistics first with ``opts.bn.data``; the directory is rebuilt beside
    and swapped in. One writer at a time: a second fold / ``patch -o`` of it, or a search that
    owns it, is refused (``LockedError``); where its parent is read-only only an already folded
    directory can be reported. Raises ``UsageError``, ``UntrustedRecipeError``, ``CheckpointError``."""
    from .journal import OutputLock, check_unlocked

    out_dir = opts.out_dir
    parent = os.path.dirname(os.path.abspath(out_dir))
    writable = os.path.isdir(out_dir) and os.access(parent, os.W_OK)
    if os.path.isdir(out_dir):
        check_unlocked(out_dir)  # a search that owns OUT (its lock inside) is named too
    with OutputLock(out_dir, beside=True) if writable else contextlib.nullcontext():
        return _fold(opts, log or _Discard())


def _fold(opts: FoldOptions, log: Log) -> FoldResult:
    from ._io import replace_dir
    from ._trust import is_trusted
    from .fold import FoldReport, fold_shifts
    from .load import parse_model_spec
    from .patch import BN_STATS_KEY, bn_statistics_stale, describe, load_patched, read_recipe, save_patched, weights_digest
    from .shift import shifted_sites

    out_dir, bn_opts = opts.out_dir, opts.bn
    recipe = read_recipe(out_dir)
    done = folded_targets(recipe)
    if done is not None and bn_opts.data is None and bn_opts.mean is None:  # nothing to do: rewrite nothing
        log.info(already_folded_line(out_dir, done))
        rows = [{k: d.get(k) for k in ("name", "kind", "op", "shift", "applied", "threshold_key", "foldable",
                                       "fold_reason")} for d in recipe.sites]
        return FoldResult(str(out_dir), recipe.checkpoint, None, rows,
                          already_folded={n: t for t, names in done.items() for n in names})
    model = load_patched(out_dir, model=opts.model, args=opts.args, trust=opts.trust)
    if opts.model is not None:  # the recipe now names the model the user gave
        spec = parse_model_spec(opts.model, opts.args if opts.args is not None else recipe.factory_args)
        recipe.model, recipe.factory_args = spec.to_json(), dict(spec.args)
    bn, norm = refresh_bn(log, model, recipe, bn_opts, out_dir)
    norm = norm or _given_norm(bn_opts)
    if norm is not None:  # fold records the normalisation the statistics were estimated with
        recipe.normalisation = _record(norm, recipe)
    if bn is not None and not shifted_sites(model):  # folded before: only the statistics change
        rep = FoldReport()
        log.info(already_folded_line(out_dir, done or {}, data=bn_opts.data))
    else:
        rep = fold_shifts(model, recipe.input_shape)
    if bn is not None and bn["recalibrated"]:  # the statistics now fit these weights
        recipe.hashes = {**(recipe.hashes or {}), BN_STATS_KEY: weights_digest(model)}
    # the record's line is carried forward only for a recipe it already trusted (--model and
    # --trust-recipe trust this run only and record nothing)
    carry = opts.model is None and not opts.trust and is_trusted(recipe.sha256)
    with replace_dir(out_dir, force=True) as tmp:  # never half-rewritten: built beside, swapped in
        save_patched(model, recipe, tmp, force=True, record_trust=carry)
    note = None
    if bn is None and bn_statistics_stale(model, recipe):
        note = bn_note(recipe, out_dir, f"bnnshift fold {out_dir} --data SPEC")
    return FoldResult(str(out_dir), recipe.checkpoint, rep, describe(model), bn, recipe.normalisation, note=note)


# -------------------------------------------------------------------------------------- export


@dataclass
class ExportOptions:
    """``bnnshift export``: the patched directory, the ONNX path and ``opset``, ``batches`` of
    random inputs compared with onnxruntime, BN re-estimation for the file (``bn``; the directory
    is left as it is), the model to rebuild (``model`` / ``args`` / ``trust``) and which output
    holds the logits (``output_index`` / ``output_key``)."""

    out_dir: str
    onnx: str
    opset: int | None = None
    batches: int = 3
    bn: BnOptions = field(default_factory=BnOptions)
    model: str | None = None
    args: list[str] | None = None
    trust: bool = False
    output_index: int | None = None
    output_key: str | None = None


@dataclass
class ExportResult:
    """The verified export (``export.ExportReport``), the BN statistics JSON, the recipe's
    checkpoint and normalisation records and a ``note`` to say."""

    report: Any  # export.ExportReport
    bn_statistics: dict[str, Any] | None
    checkpoint: dict[str, Any] | None
    normalisation: dict[str, Any] | None
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        """``docs/export.schema.json``."""
        return {**self.report.to_json(), "bn_statistics": self.bn_statistics, "checkpoint": self.checkpoint,
                "normalisation": self.normalisation}


def export_dir(opts: ExportOptions, log: Log | None = None) -> ExportResult:
    """Export ``opts.out_dir``'s model to ONNX and verify it (``export.export_patched_dir``: in
    a child process). The model is built once, in the child, unless this process must change it
    first (BN re-estimation with ``opts.bn.data``, or a normalisation other than the recorded
    one): then a temporary copy is written for the child. The recipe, the weights' sha256 and the
    trust rules are checked here first (``patch.check_patched``). Raises ``ExportError``,
    ``VerificationError`` (exit 4), ``UntrustedRecipeError``, ``CheckpointError``, ``UsageError``."""
    from .patch import check_patched

    log = log or _Discard()
    recipe, _ = check_patched(opts.out_dir, model=opts.model, args=opts.args, trust=opts.trust)
    record = _record(_given_norm(opts.bn), recipe)
    if opts.bn.data is None and (record is None or record == recipe.normalisation):
        report = _export(opts, opts.out_dir, opts.trust)
        note = _export_note(opts, recipe) if report.bn_statistics_stale else None
        return ExportResult(report, None, recipe.checkpoint, recipe.normalisation, note)
    return _export_changed(opts, recipe, record, log)


def _export(opts: ExportOptions, directory: str, trust: bool):
    from .export import export_patched_dir

    return export_patched_dir(directory, opts.onnx, opts.opset, batches=opts.batches, model=opts.model,
                              model_args=opts.args, trust=trust, output_index=opts.output_index,
                              output_key=opts.output_key)


def _export_note(opts: ExportOptions, recipe) -> str:
    return bn_note(recipe, opts.out_dir, f"bnnshift export {opts.out_dir} --onnx {opts.onnx} --data SPEC "
                                         f"(or bnnshift fold {opts.out_dir} --data SPEC to update the directory)")


def _export_changed(opts: ExportOptions, recipe, record: dict | None, log: Log) -> ExportResult:
    """The export of a model this process changes first (BN statistics, normalisation record)."""
    import tempfile

    from .patch import bn_statistics_stale, load_patched, save_patched

    model = load_patched(opts.out_dir, model=opts.model, args=opts.args, trust=opts.trust)
    bn, norm = refresh_bn(log, model, recipe, opts.bn, opts.out_dir)
    if norm is not None:
        record = _record(norm, recipe)
    if (bn is None or not bn["recalibrated"]) and (record is None or record == recipe.normalisation):
        report = _export(opts, opts.out_dir, opts.trust)
    else:
        if record is not None:  # the ONNX metadata names the normalisation used
            recipe.normalisation = record
        with tempfile.TemporaryDirectory(prefix="bnnshift-bn-") as tmp:
            save_patched(model, recipe, tmp, force=True, record_trust=False)  # a copy for the child only
            # the copy is not recorded; this process has just rebuilt the same spec under the trust
            # rules (the pinned files checked), so the child may rebuild it for this run only
            report = _export(opts, tmp, True)
    note = _export_note(opts, recipe) if bn is None and bn_statistics_stale(model, recipe) else None
    return ExportResult(report, bn, recipe.checkpoint, recipe.normalisation, note)
