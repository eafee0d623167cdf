"""Phase 6: the first-epoch calibration search (paper claim 5).

Train ONE short epoch per candidate shift ``t`` and rank the candidates by train accuracy.
Every candidate starts from the same initial weights (seeded init, or the checkpoint) and
sees the same batches in the same order (fixed by the seed); only ``t`` differs. Each
candidate records the sha256 of its initial state_dict and the hash of its batch order, so
the report can show that this held.

Layers, from the bottom:

* :func:`run_candidate` ``(cfg, shift, seed) -> CandidateResult``: a pure function of its
  arguments (a worker on another machine gets the same score). In one process it reuses one
  patched model per configuration (weights and threshold buffers are rewritten in place
  between candidates), so the compiled training step is built once.
* :func:`search_with` ``(model_factory, train_one_epoch, shifts, seeds, ...)``: the library
  entry point for teams with their own training code; patching, same init, journal, resume
  and report are done around their ``train_one_epoch(model, *, seed, shift)``.
* :func:`search` ``(cfg)``: the CLI's search; ``search_with`` with the default trainer
  (:class:`bnnshift.train.DefaultTrainer`).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from . import validate
from ._io import prepare_output_dir, sha256_state_dict
from .errors import DataError, NoSitesError, OutputError, TrainingError, UsageError
from .journal import JOURNAL_NAME, Journal, OutputLock, candidate_key, shift_key
from .sites import Site
from .validate import METRICS, SCHEDULES, parse_seeds, parse_shifts  # noqa: F401 (torch-free: the CLI checks first)

__all__ = [
    "SearchConfig", "CandidateResult", "ShiftStats", "SearchSummary", "parse_shifts", "parse_seeds",
    "run_candidate", "search", "search_with", "init_hash", "rung_steps", "survivors", "stable_decision",
    "stable_marks",
]

PROBE_SAMPLES = 512  # training samples for the end-of-epoch +1 shares
# --stop-when-stable: every survivor must lead every eliminated shift by more than this many
# paired standard errors of the per-step accuracy differences (stable_decision)
STABLE_Z = 2.0
# successive halving keeps candidates' training states in memory while they fit in this many
# bytes in total; beyond it they live only in --out (states/) and are read back per rung
STATE_MEMORY_BUDGET = 1 << 30


# ------------------------------------------------------------------------------ config


@dataclass
class SearchConfig:
    """Everything that decides a candidate's score, except its shift and seed.

    ``lr=None`` means the optimizer's default (Adam 1e-3, SGD 0.05; docs/search.md).
    ``compile``: 'auto' (``search``: compile only when the expected steps pay back the compile,
    measured, see ``bnnshift.train.choose_step_path``; ``run_candidate``: compile), 'on'
    (torch.compile the forward+loss, eager on any error), 'off'.
    ``memory_format``: 'auto' trains models with 2-d convolutions in channels_last (measured
    1.6x faster eager steps on CPU: MaxPool and oneDNN convs avoid layout conversions).
    ``compile``, ``memory_format`` and ``device`` change float rounding only: not hashed.
    ``metric`` ranks the candidates: 'train_acc' (accumulated over the epoch, the paper's
    signal), 'last_acc' (last 25% of the steps) or 'val_acc' (needs ``val``).
    """

    model: str
    data: str
    model_args: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    input_shape: tuple[int, ...] | None = None
    shifts: list[float] = field(default_factory=lambda: [0.0])
    seeds: list[int] = field(default_factory=lambda: [0])
    epochs: int = 1
    steps: int | None = None
    batch_size: int = 256
    optimizer: str = "adam"
    lr: float | None = None
    weight_decay: float = 0.0
    momentum: float | None = None
    train_config: str | None = None
    hardtanh: bool = False
    val: bool = False
    bn_recalib_batches: int = 20
    device: str = "cpu"
    compile: str = "auto"
    memory_format: str = "auto"
    dtype: str = "float32"
    train_limit: int | None = None
    val_limit: int | None = None
    metric: str = "train_acc"
    download: bool = False
    strict: bool = True
    use_ema: bool = False
    allow_nonfinite: bool = False
    output_index: int | None = None
    output_key: str | None = None
    schedule: str = "full"
    eta: float = 2.0
    min_fraction: float = 0.125
    stop_when_stable: bool = False  # stop a rung once its decision held for stable_fraction of its steps
    stable_fraction: float = 0.25
    rung_min_samples: int = 2000  # halving: a rung that ranks trains each candidate on at least this many samples
    # streaming data path and precision (bnnshift.data.stream, docs/search.md)
    augment: str = "none"
    stream: str = "auto"
    workers: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    precision: str = "fp32"

    # fields that do not change a score (or are the candidate itself); the schedule decides
    # which candidates train how far, not what a candidate scores after n steps
    _NOT_HASHED = ("shifts", "seeds", "device", "compile", "memory_format", "schedule", "eta", "min_fraction",
                   "workers", "stop_when_stable", "stable_fraction", "rung_min_samples")

    def __post_init__(self):
        if self.input_shape is not None:
            self.input_shape = tuple(int(v) for v in self.input_shape)
        validate.check_search_config(self)  # torch-free: the CLI runs the same checks before importing torch
        self.mean, self.std = validate.parse_floats(self.mean, "--mean"), validate.parse_floats(self.std, "--std")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape) if self.input_shape else None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SearchConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def hashed_fields(self) -> dict[str, Any]:
        d = self.to_json()
        for k in self._NOT_HASHED:
            d.pop(k, None)
        for k, default in _HASHED_IF_SET.items():  # added later: journals written before keep their hash
            if d.get(k) == default:
                d.pop(k, None)
        return d

    def config_hash(self) -> str:
        """sha256 (16 hex) of every field that changes a score, plus the data fingerprint, the
        checkpoint's sha256 and the resolved input shape; shifts, seeds, device, compile and
        output paths are excluded (so a resume with more shifts reuses finished candidates)."""
        ctx = _context(self)
        return ctx.config_hash


_HASHED_IF_SET = {"use_ema": False, "allow_nonfinite": False, "output_index": None, "output_key": None}


def _dtype(cfg: SearchConfig) -> torch.dtype:
    return torch.float64 if cfg.dtype == "float64" else torch.float32


def _device(cfg: SearchConfig) -> torch.device:
    from .parallel import resolve_device
    from .train import check_precision

    dev = resolve_device(cfg.device)
    check_precision(cfg.precision, dev, cfg.dtype)
    return dev


# ------------------------------------------------------------------------------ results


@dataclass
class CandidateResult:
    """One (shift, seed) training. ``score`` is the config's metric (None when failed)."""

    shift: float
    seed: int
    config_hash: str
    status: str  # 'ok' | 'failed'
    score: float | None = None
    train_acc: float | None = None
    last_acc: float | None = None
    val_acc: float | None = None
    loss: float | None = None
    steps: int | None = None
    failed_step: int | None = None
    error: str | None = None
    init_hash: str | None = None
    batch_order_hash: str | None = None
    first_losses: list[float] = field(default_factory=list)
    plus_fraction: dict[str, float | None] = field(default_factory=dict)
    plus_fraction_mean: float | None = None
    # sites whose +1 share on the probe batch is 0 or 1 after training: constant, they carry no
    # information (e.g. a shift outside a hardtanh's [-1, 1]); the candidate is degenerate
    degenerate: list[str] = field(default_factory=list)
    seconds: float | None = None
    compiled: bool | None = None
    compile_seconds: float | None = None
    compile_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    rung: int | None = None  # successive halving: the last rung reached (0-based); None in a full search
    rung_scores: list[float] = field(default_factory=list)  # train accuracy so far at each rung reached
    resumed: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("resumed", None)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CandidateResult":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class ShiftStats:
    """Aggregate over seeds for one shift."""

    shift: float
    n: int
    failed: int
    mean: float | None
    std: float | None
    stderr: float | None
    loss: float | None
    plus_fraction_mean: float | None
    plus_fraction: dict[str, float | None]
    status: str  # 'ok' | 'failed' | 'partial'
    rung: int | None = None  # successive halving: the rung this shift stopped at (its score is from there)
    steps: int | None = None  # training steps its score covers (halving: fewer than the epoch when eliminated)


@dataclass
class SearchSummary:
    """What a search produced. ``winner`` is the shift with the best mean score."""

    config: dict[str, Any]
    config_hash: str
    metric: str
    sites: list[str]
    seeds: list[int]
    shifts: list[float]
    candidates: list[CandidateResult]
    stats: list[ShiftStats]
    winner: float | None
    baseline: float | None
    noise_note: str
    ahead_of_baseline: bool | None
    seconds: float
    # t = 0 has the best mean: the best other shift (``runner_up``) and whether t = 0 leads it by
    # more than the seed noise (True), within it (False) or with no noise estimate (None)
    runner_up: float | None = None
    baseline_ahead: bool | None = None
    compiled: bool | None = None
    compile_seconds: float | None = None
    compile_error: str | None = None
    resumed: int = 0
    shared_init: bool = True
    shared_batches: bool = True
    out_dir: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    patch_out: str | None = None
    checkpoint: dict[str, Any] | None = None  # load.LoadReport.to_json() of cfg.checkpoint
    notes: list[str] = field(default_factory=list)  # load report line, input shape source, fallbacks
    # the normalisation the inputs were given: {"mean", "std", "source", "pixel_mean", "pixel_std"}
    normalisation: dict[str, Any] | None = None
    schedule: dict[str, Any] = field(default_factory=lambda: {"name": "full"})
    rungs: list[dict[str, Any]] = field(default_factory=list)
    cost: dict[str, Any] = field(default_factory=dict)
    step_path: dict[str, Any] | None = None  # --compile auto: compiled or eager, memory format, and why
    warnings: list[str] = field(default_factory=list)  # no-STE layers, grid outside a site's range, degenerate

    @property
    def all_failed(self) -> bool:
        return bool(self.candidates) and all(not c.ok for c in self.candidates)

    def to_json(self) -> dict[str, Any]:
        from ._version import __version__

        return {
            "bnnshift_version": __version__,
            "command": "search",
            "config": self.config,
            "config_hash": self.config_hash,
            "metric": self.metric,
            "sites": self.sites,
            "seeds": self.seeds,
            "shifts": self.shifts,
            "winner": self.winner,
            "baseline": self.baseline,
            "ahead_of_baseline": self.ahead_of_baseline,
            "runner_up": self.runner_up,
            "baseline_ahead": self.baseline_ahead,
            "noise_note": self.noise_note,
            "shared_init": self.shared_init,
            "shared_batches": self.shared_batches,
            "compiled": self.compiled,
            "compile_seconds": self.compile_seconds,
            "compile_error": self.compile_error,
            "seconds": self.seconds,
            "resumed": self.resumed,
            "schedule": self.schedule,
            "rungs": self.rungs,
            "cost": self.cost,
            "step_path": self.step_path,
            "stats": [asdict(s) for s in self.stats],
            "candidates": [c.to_json() for c in self.candidates],
            "files": self.files,
            "patch_out": self.patch_out,
            "warnings": self.warnings,
            "checkpoint": self.checkpoint,
            "notes": self.notes,
            "normalisation": self.normalisation,
        }


# ------------------------------------------------------------------------------ context


def init_hash(model: nn.Module) -> str:
    """sha256 of a model's state_dict without bnnshift's threshold buffers."""
    from .shift import THRESHOLD_PREFIX

    sd = {k: v for k, v in model.state_dict().items() if THRESHOLD_PREFIX not in k}
    return sha256_state_dict(sd)


@dataclass
class _Context:
    """One configuration's shared state in this process: data, one patched model, sites."""

    model: nn.Module | None
    sites: list[Site]
    factory: Callable[[int], nn.Module]
    trainer: Callable[..., Any]
    config_hash: str
    input_shape: tuple[int, ...] | None
    probe_x: torch.Tensor | None = None
    recalib_x: list[torch.Tensor] = field(default_factory=list)
    val: tuple[torch.Tensor, torch.Tensor] | None = None
    batch_hash: Callable[[int], str | None] = lambda seed: None
    init_states: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    init_hashes: dict[int, str] = field(default_factory=dict)
    fresh_model: bool = False
    name: str = "model"
    loaded: Any = None
    warnings: list[str] = field(default_factory=list)  # the scan's (no STE, in-place writes...)
    notes: list[str] = field(default_factory=list)  # said to the user once: load report, shape source, fallbacks
    normalisation: dict[str, Any] | None = None  # DataBundle.normalisation_json(): what the inputs were normalised with


_CONTEXTS: dict[str, _Context] = {}


def _cfg_key(cfg: SearchConfig) -> str:
    d = cfg.to_json()
    for k in ("shifts", "seeds", "schedule", "eta", "min_fraction", "stop_when_stable", "stable_fraction",
              "rung_min_samples"):
        d.pop(k, None)
    return json.dumps(d, sort_keys=True, default=str)


def _load_bundle(cfg: SearchConfig, shape: tuple[int, ...], model: nn.Module | None = None):
    """The in-memory data set, normalised with ``--mean/--std``, else a timm model's
    ``pretrained_cfg``, else the data set's default (``bundle.norm_source`` says which)."""
    from .data import load_data
    from .data.norm import choose_normalisation, load_kwargs

    norm = choose_normalisation(cfg.mean, cfg.std, model=model)
    return load_data(cfg.data, input_shape=shape, train_limit=cfg.train_limit,
                     val_limit=(cfg.val_limit if cfg.val else 0), seed=0, download=cfg.download, **load_kwargs(norm))


def _context(cfg: SearchConfig) -> _Context:
    """Load data, build and scan the model, patch it with all thresholds at 0 (cached)."""
    key = _cfg_key(cfg)
    ctx = _CONTEXTS.get(key)
    if ctx is not None:
        return ctx
    from .data import batch_order_hash
    from .load import choose_input_shape
    from .scan import resolve_input_shape
    from .train import DefaultTrainer, set_threads

    device, dtype = _device(cfg), _dtype(cfg)
    set_threads(device.type)
    from .data import parse_data_spec

    parse_data_spec(cfg.data)  # a bad spec fails before the model is built
    torch.manual_seed(0)
    loaded = _load(cfg)
    notes = list(loaded.notes) + ([loaded.load_report.line()] if loaded.load_report is not None else [])
    explicit = resolve_input_shape(cfg.input_shape, None) if cfg.input_shape is not None else None
    shape, source = choose_input_shape(explicit, loaded, cfg.data)  # docs/checkpoints.md: input shape
    if explicit is None and loaded.input_shape is None:
        notes.append(f"input shape {','.join(map(str, shape))} from {source}")
    if len(shape) != 3:
        raise UsageError(f"input shape {shape} is not C,H,W", hint="search trains on images: pass --input-shape C,H,W")
    validate.check_batch_norm_batch(loaded.model, cfg.batch_size)
    validate.check_input_memory(shape, cfg.batch_size)
    from .data.stream import should_stream

    if should_stream(cfg.stream, cfg.data, cfg.augment, shape):
        ctx = _stream_context(cfg, loaded, shape, device, dtype)
        ctx.notes = notes
        _CONTEXTS[key] = ctx
        return ctx
    bundle = _load_bundle(cfg, shape, loaded.model)
    notes.extend(bundle.notes)
    notes.extend(getattr(bundle, "walk_notes", None) or [])  # image files skipped (symlink loops / escapes)
    note = _check_forward(copy.deepcopy(loaded.model), bundle.train_x[:2], bundle, cfg)  # the loaded model never runs
    if note:
        notes.append(note)
    if cfg.val and bundle.val_x is None:
        raise DataError(f"data set {bundle.name} has no held-out split for --val",
                        hint="use a data set with a test/val split, or drop --val")

    def factory(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return _load(cfg).model

    train_x = bundle.train_x.to(device=device, dtype=dtype)
    train_y = bundle.train_y.to(device)
    channels_last = cfg.memory_format == "channels_last" or (
        cfg.memory_format == "auto" and any(isinstance(m, nn.Conv2d) for m in loaded.model.modules()))
    if channels_last and cfg.memory_format == "auto":
        why = _channels_last_fails(loaded.model, bundle.train_x[:2])
        if why:
            channels_last = False
            notes.append(f"channels_last fails on this model ({why}): trained in the contiguous format")
    trainer = DefaultTrainer(cfg, train_x, train_y, channels_last=channels_last, precision=cfg.precision)
    h = hashlib.sha256()
    h.update(json.dumps(cfg.hashed_fields(), sort_keys=True, default=str).encode())
    h.update(f"|data={bundle.fingerprint()}|ckpt={loaded.checkpoint_sha256}|shape={shape}".encode())
    n, bs, steps = int(train_x.shape[0]), cfg.batch_size, trainer.num_steps()
    rg = torch.Generator().manual_seed(12345)
    recalib = [train_x[torch.randperm(n, generator=rg)[:bs]] for _ in range(max(0, cfg.bn_recalib_batches))]
    ctx = _Context(
        normalisation=bundle.normalisation_json(),
        model=None, sites=[], factory=factory, trainer=trainer, config_hash=h.hexdigest()[:16],
        input_shape=shape, probe_x=train_x[:PROBE_SAMPLES], recalib_x=recalib,
        val=((bundle.val_x.to(device=device, dtype=dtype), bundle.val_y.to(device)) if cfg.val else None),
        batch_hash=lambda seed: batch_order_hash(n, bs, seed=seed, steps=steps),
        name=loaded.spec.canonical(), loaded=loaded, notes=notes)
    ctx.sites = _find_sites(loaded.model, shape, hardtanh=cfg.hardtanh, name=ctx.name, notes=ctx.warnings,
                            batches=[train_x[:256].to(torch.float32).cpu()])
    _CONTEXTS[key] = ctx
    return ctx


def _timm_data_defaults(model: nn.Module) -> dict[str, Any]:
    """mean/std/crop_pct/interpolation of a timm model's ``pretrained_cfg`` ({} for other models)."""
    if not isinstance(getattr(model, "pretrained_cfg", None), dict):
        return {}
    try:
        from timm.data import resolve_data_config

        got = resolve_data_config({}, model=model)
    except Exception:  # noqa: BLE001 - no timm or an odd cfg: the documented defaults apply
        return {}
    return {k: got.get(k) for k in ("mean", "std", "crop_pct", "interpolation") if got.get(k) is not None}


def _stream_context(cfg: SearchConfig, loaded: Any, shape: tuple[int, ...], device: torch.device,
                    dtype: torch.dtype) -> _Context:
    """The context of a streamed data set (bnnshift.data.stream): DataLoader workers decode and
    augment; probes, BN re-estimation and --val stream through the eval transform."""
    from .data.stream import SeededBatchSampler, StreamOptions, eval_batches, make_loader, open_stream
    from .parallel import dist_info
    from .train import DefaultTrainer, StreamTrain

    opts = StreamOptions(augment=cfg.augment, mean=cfg.mean, std=cfg.std, workers=cfg.workers,
                         cache=cfg.stream == "auto")  # --stream on: decode every epoch, bounded memory
    src = open_stream(cfg.data, input_shape=shape, options=opts, download=cfg.download,
                      train_limit=cfg.train_limit, val_limit=(cfg.val_limit if cfg.val else 0), seed=0,
                      model_defaults=_timm_data_defaults(loaded.model))
    if cfg.val and src.val is None:
        raise DataError(f"data set {src.name} has no held-out split for --val",
                        hint="use a data set with a held-out split (PATH/val or PATH/test), or drop --val")
    workers, pin = src.options.num_workers(), device.type == "cuda"
    n, bs = src.num_train, cfg.batch_size
    per_sample = 4 * math.prod(src.input_shape)
    probe_n = max(1, min(PROBE_SAMPLES, n, max(16, (64 << 20) // per_sample)))  # <= 64 MB of probes
    probe = [src.train_eval[i] for i in range(probe_n)]
    probe_x = torch.stack([x for x, _ in probe]).to(device=device, dtype=dtype)
    probe_y = torch.tensor([y for _, y in probe], dtype=torch.int64, device=device)
    _check_forward(loaded.model, probe_x[:2].float().cpu(), src, cfg)
    info = dist_info()
    sampler = SeededBatchSampler(n, bs, rank=info.rank, world=info.world)
    loader = make_loader(src.train, sampler, workers=workers, pin_memory=pin)
    channels_last = cfg.memory_format == "channels_last" or (
        cfg.memory_format == "auto" and any(isinstance(m, nn.Conv2d) for m in loaded.model.modules()))
    trainer = DefaultTrainer(cfg, probe_x, probe_y,
                             channels_last=channels_last, stream=StreamTrain(loader, sampler, n),
                             precision=cfg.precision)
    h = hashlib.sha256()
    h.update(json.dumps(cfg.hashed_fields(), sort_keys=True, default=str).encode())
    h.update(f"|data={src.fingerprint()}|ckpt={loaded.checkpoint_sha256}|shape={shape}".encode())
    rg = torch.Generator().manual_seed(12345)  # the in-memory path's BN re-estimation draws
    recalib_idx = [i for _ in range(max(0, cfg.bn_recalib_batches)) for i in torch.randperm(n, generator=rg)[:bs].tolist()]
    recalib = eval_batches(src.train_eval, recalib_idx, bs, device=device, dtype=dtype, workers=workers,
                           pin_memory=pin, labels=False) if recalib_idx else []
    val = None
    if cfg.val and src.val is not None:
        val = (eval_batches(src.val, list(range(src.num_val)), bs, device=device, dtype=dtype, workers=workers,
                            pin_memory=pin), None)
    src_norm = {"mean": [float(v) for v in src.mean], "std": [float(v) for v in src.std],
                "source": "given" if (cfg.mean is not None or _timm_data_defaults(loaded.model).get("mean")) else "own",
                "pixel_mean": None, "pixel_std": None}
    ctx = _Context(normalisation=src_norm, model=None, sites=[], factory=lambda seed: _build(cfg, seed), trainer=trainer,
                   config_hash=h.hexdigest()[:16], input_shape=shape, probe_x=probe_x, recalib_x=recalib,
                   val=val, name=loaded.spec.canonical(), loaded=loaded)
    ctx.sites = _find_sites(loaded.model, shape, hardtanh=cfg.hardtanh, name=ctx.name,
                            batches=[probe_x[:256].to(torch.float32).cpu()])
    return ctx


def _build(cfg: SearchConfig, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return _load(cfg).model


def _checkpoint_json(ctx: "_Context") -> dict[str, Any] | None:
    loaded = getattr(ctx, "loaded", None)
    return loaded.checkpoint_json() if loaded is not None and hasattr(loaded, "checkpoint_json") else None


def _load(cfg: SearchConfig):
    from .load import load_model

    return load_model(cfg.model, args=cfg.model_args, checkpoint=cfg.checkpoint, strict=cfg.strict,
                      use_ema=cfg.use_ema, allow_nonfinite=cfg.allow_nonfinite)


def _channels_last_fails(model: nn.Module, xb: torch.Tensor) -> str | None:
    """Why a forward in channels_last fails (None if it runs): the speed default must never
    make a model fail that runs in plain eager."""
    if xb.dim() != 4:
        return None
    m = copy.deepcopy(model).to(memory_format=torch.channels_last).eval()
    try:
        with torch.no_grad():
            m(xb.contiguous(memory_format=torch.channels_last))
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:120]}"
    return None


def _check_forward(model: nn.Module, xb: torch.Tensor, bundle, cfg: SearchConfig | None = None) -> str | None:
    """A shape mismatch between data and model is a DataError before any training. Returns the
    note on how the logits were taken from a tuple/dict output (``load.pick_logits``), or None.
    Fewer than 2 classes: ``UsageError`` (exit 2), nothing to rank."""
    from .load import pick_logits

    n_cls = int(getattr(bundle, "num_classes", 2) or 0)
    if n_cls < 2:
        n = getattr(bundle, "num_train", None)
        if n is None and getattr(bundle, "train_y", None) is not None:
            n = int(bundle.train_y.shape[0])
        raise UsageError(f"data set {bundle.name} has {n_cls} class{'es' if n_cls != 1 else ''} ({n} training "
                         "samples): a search needs at least 2 classes to rank shifts",
                         hint="point --data at a folder with one sub-folder per class (2 or more)")

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(xb)
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise DataError(f"the model does not accept samples of shape {tuple(xb.shape[1:])} from {bundle.name}: "
                        f"{type(exc).__name__}: {first}",
                        hint="pass the model's --input-shape C,H,W or a model --arg such as input_size") from None
    finally:
        model.train(was)
    out, note = pick_logits(out, getattr(cfg, "output_index", None), getattr(cfg, "output_key", None))
    if out.dim() != 2:
        raise DataError(f"the model's output has shape {tuple(out.shape)}, not (N, classes)",
                        hint="for a tuple/dict output pass --output-index N / --output-key K")
    if out.shape[1] < bundle.num_classes:
        raise DataError(f"the model outputs {out.shape[1]} classes but {bundle.name} has {bundle.num_classes}",
                        hint=f"pass --arg num_classes={bundle.num_classes}")
    return note


def _find_sites(model: nn.Module, shape, *, hardtanh: bool, name: str, batches=None,
                notes: list[str] | None = None) -> list[Site]:
    from .scan import NO_SITES_HINT, scan_model

    report = scan_model(copy.deepcopy(model), shape, name=name, batches=batches)
    if notes is not None:
        notes.extend(w for w in report.warnings if "no gradient" in w or "in place" in w)
    sites = report.hardtanh_sites if hardtanh else report.sites
    if not sites:
        if hardtanh:
            raise NoSitesError(f"no hardtanh found in {name} for --hardtanh",
                               hint="--hardtanh shifts the hardtanh of a full-precision model")
        raise NoSitesError(f"no binary activation found in {name}", hint=NO_SITES_HINT)
    return list(sites)


# ------------------------------------------------------------------------------ one candidate


def _shared_model(ctx: _Context, seed: int) -> nn.Module:
    """The patched model at the initial state of ``seed`` (weights and thresholds reset)."""
    from .shift import insert_shifts

    if ctx.model is None or ctx.fresh_model:
        model = ctx.factory(seed)
        insert_shifts(model, ctx.sites, {s.name: 0.0 for s in ctx.sites})
        dev_dtype = getattr(ctx.trainer, "train_x", None)
        if dev_dtype is not None:
            model.to(device=dev_dtype.device, dtype=dev_dtype.dtype)
        if getattr(ctx.trainer, "channels_last", False):
            model.to(memory_format=torch.channels_last)
        if ctx.fresh_model:
            ctx.init_states.setdefault(seed, _clone_state(model))
            ctx.init_hashes.setdefault(seed, init_hash(model))
            model.load_state_dict(ctx.init_states[seed])
            return model
        ctx.model = model
        ctx.init_states[seed] = _clone_state(model)
        ctx.init_hashes[seed] = init_hash(model)
    if seed not in ctx.init_states:
        m = ctx.factory(seed)
        ref = next(iter(ctx.model.state_dict().values()))
        m.to(device=ref.device, dtype=_float_dtype(ctx.model))
        sd = ctx.model.state_dict()
        own = m.state_dict()
        ctx.init_states[seed] = {k: (own[k].detach().clone() if k in own else torch.zeros_like(v)) for k, v in sd.items()}
        ctx.init_hashes[seed] = init_hash(m)
    ctx.model.load_state_dict(ctx.init_states[seed])
    return ctx.model


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _set_shift(model: nn.Module, shift: float) -> None:
    from .shift import get_thresholds

    with torch.no_grad():
        for t in get_thresholds(model).values():
            t.fill_(float(shift))


def _measure_after(ctx: _Context, model: nn.Module) -> tuple[dict[str, float | None], float | None]:
    """+1 share per site at the end and held-out accuracy, on a copy with re-estimated BN stats
    (the trained model itself is not touched: its hooks stay as compiled)."""
    from .probe import probe_sites
    from .train import evaluate, recalibrate_bn

    probe_model = copy.deepcopy(model)
    if ctx.recalib_x:
        recalibrate_bn(probe_model, ctx.recalib_x)
    plus: dict[str, float | None] = {}
    if ctx.probe_x is not None:
        res = probe_sites(probe_model, ctx.sites, [ctx.probe_x], update=False, device=ctx.probe_x.device)
        plus = {name: r.get("plus_fraction") for name, r in res.items()}
    val_acc = None
    if ctx.val is not None:
        from .load import logits_picker

        val_acc = evaluate(probe_model, ctx.val[0], ctx.val[1],
                           pick=logits_picker(getattr(ctx.trainer.cfg, "output_index", None),
                                              getattr(ctx.trainer.cfg, "output_key", None))
                           if hasattr(ctx.trainer, "cfg") else None)
    return plus, val_acc


def _result_from(out: Any, *, shift: float, seed: int, ctx: _Context, metric: str,
                 seconds: float) -> CandidateResult:
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        out = {"score": float(out)}
    if not isinstance(out, dict):
        raise TrainingError(f"train_one_epoch returned {type(out).__name__}", hint="return a float or a dict")
    out = dict(out)
    known = {"train_acc", "last_acc", "val_acc", "loss", "steps", "failed_step", "error", "first_losses",
             "compiled", "compile_seconds", "compile_error", "score", "batch_order_hash"}
    r = CandidateResult(shift=float(shift), seed=int(seed), config_hash=ctx.config_hash, status="ok",
                        init_hash=ctx.init_hashes.get(seed), seconds=seconds,
                        batch_order_hash=out.get("batch_order_hash") or ctx.batch_hash(seed))
    for k in ("train_acc", "last_acc", "val_acc", "loss", "steps", "failed_step", "error", "compiled",
              "compile_seconds", "compile_error"):
        if out.get(k) is not None:
            setattr(r, k, out[k])
    # strict JSON: a non-finite loss is told by ``error`` / ``failed_step``, not written as NaN
    r.first_losses = [float(v) for v in out.get("first_losses") or [] if math.isfinite(float(v))]
    r.extra = {k: v for k, v in out.items() if k not in known and _plain(v)}
    if r.failed_step is not None or r.error:
        r.status = "failed"
        return r
    score = out.get("score")
    if score is None:
        score = getattr(r, metric, None)
    if score is None:
        score = r.train_acc
    if score is None or not math.isfinite(float(score)):
        r.status, r.error = "failed", r.error or f"no finite score (got {score!r})"
        return r
    r.score = float(score)
    if r.loss is not None and not math.isfinite(r.loss):
        r.status, r.error = "failed", f"loss is {r.loss}"
        r.score = None
    return r


def _plain(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _run_in_context(ctx: _Context, shift: float, seed: int, metric: str,
                    train_one_epoch: Callable | None = None) -> CandidateResult:
    model = _shared_model(ctx, seed)
    _set_shift(model, shift)
    fn = train_one_epoch or ctx.trainer
    t0 = time.perf_counter()
    try:
        out = fn(model, seed=seed, shift=float(shift))
    except TrainingError as exc:
        out = {"error": exc.one_line(), "failed_step": None}
        r = _result_from({}, shift=shift, seed=seed, ctx=ctx, metric=metric, seconds=time.perf_counter() - t0)
        r.status, r.error = "failed", out["error"]
        return r
    seconds = time.perf_counter() - t0
    r = _result_from(out, shift=shift, seed=seed, ctx=ctx, metric=metric, seconds=seconds)
    if r.ok:
        _finish_candidate(ctx, model, r, metric)
    return r


def constant_sites(plus: dict[str, float | None]) -> list[str]:
    """Sites whose measured +1 share is exactly 0 or 1 (constant on the probe batch)."""
    return [name for name, v in plus.items() if v is not None and (v <= 0.0 or v >= 1.0)]


def _measure_on_main(ctx: _Context, model: nn.Module) -> tuple[dict[str, float | None], float | None, str | None]:
    """``_measure_after`` (+1 shares, held-out accuracy) and the probe error, if any, computed on
    rank 0 only: under torchrun the other ranks skip the probes and the ``--val`` pass and get rank
    0's values (``parallel.broadcast_object``). Every rank holds the same model after training
    (DDP gradients, ``sync_buffers``), so the values are those of one process; computing them on
    every rank would only repeat the work. A probe problem must not lose the training."""
    from .parallel import broadcast_object, dist_info

    info = dist_info()
    got: tuple[dict[str, float | None], float | None, str | None] | None = None
    if info.is_main:
        try:
            plus, val_acc = _measure_after(ctx, model)
            got = (plus, val_acc, None)
        except Exception as exc:  # noqa: BLE001
            got = ({}, None, f"{type(exc).__name__}: {exc}"[:200])
    if info.active:
        got = broadcast_object(got)
    assert got is not None
    return got


def _finish_candidate(ctx: _Context, model: nn.Module, r: CandidateResult, metric: str) -> None:
    """The end-of-training measurements of a finished candidate: +1 shares, held-out accuracy."""
    plus, val_acc, error = _measure_on_main(ctx, model)
    if error is not None:
        r.extra["probe_error"] = error
    r.plus_fraction = plus
    r.degenerate = constant_sites(plus)
    vals = [v for v in plus.values() if v is not None]
    r.plus_fraction_mean = sum(vals) / len(vals) if vals else None
    if val_acc is not None:
        r.val_acc = val_acc
        if metric == "val_acc":
            r.score = val_acc


def run_candidate(cfg: SearchConfig, shift: float, seed: int, *, model_factory: Callable | None = None,
                  train_one_epoch: Callable | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  at_rung: Callable[[int, int, float], bool] | None = None) -> CandidateResult:
    """Train one candidate: ``cfg``'s model from the ``seed``'s initial weights (or the checkpoint),
    all sites shifted by ``shift``, one epoch (or ``cfg.steps``) in the batch order of ``seed``.

    A pure function of ``(cfg, shift, seed)``: the same arguments give the same result in any
    process (bitwise on the same machine and torch build). ``model_factory(seed)`` overrides the
    model (must build the same architecture), ``train_one_epoch`` the default trainer.
    Returns a :class:`CandidateResult` (``status='failed'`` with ``failed_step`` on NaN/inf loss).

    ``at_rung(rung, steps, score_so_far) -> stop`` (default trainer only): called at each of
    ``cfg``'s successive-halving rungs (:func:`rung_steps`) before the last; returning True stops
    the candidate there (its result then has ``rung`` and the score so far). The distributed
    search's pruner decides through it.
    """
    ctx = _context(cfg)
    if at_rung is not None and train_one_epoch is None and model_factory is None:
        return _run_with_rungs(ctx, cfg, shift, seed, at_rung)
    if model_factory is not None:
        ctx = copy.copy(ctx)
        ctx.factory, ctx.model, ctx.fresh_model = _as_factory(model_factory), None, True
        ctx.init_states, ctx.init_hashes = {}, {}
    trainer = train_one_epoch
    if trainer is None and progress is not None:
        ctx.trainer.progress = progress
    try:
        return _run_in_context(ctx, shift, seed, cfg.metric, trainer)
    finally:
        if trainer is None:
            ctx.trainer.progress = None


def _run_with_rungs(ctx: _Context, cfg: SearchConfig, shift: float, seed: int,
                    at_rung: Callable[[int, int, float], bool]) -> CandidateResult:
    trainer = ctx.trainer
    model = _shared_model(ctx, seed)
    _set_shift(model, shift)
    t0 = time.perf_counter()
    run = trainer.start(model, seed=seed, shift=shift)
    plan = rung_steps(run.total, cfg.eta, cfg.min_fraction)
    hist: list[float] = []
    for r, n in enumerate(plan):
        failed = trainer.advance(run, model, n)
        if failed is not None:
            res = _result_from(failed, shift=shift, seed=seed, ctx=ctx, metric=cfg.metric,
                               seconds=time.perf_counter() - t0)
        elif n == run.total:
            res = _result_from(trainer.result(run), shift=shift, seed=seed, ctx=ctx, metric=cfg.metric,
                               seconds=time.perf_counter() - t0)
        else:
            part = trainer.partial(run)
            hist.append(part["train_acc"])
            if not at_rung(r, n, part["train_acc"]):
                continue
            res = _result_from(part, shift=shift, seed=seed, ctx=ctx, metric=cfg.metric,
                               seconds=time.perf_counter() - t0)
        if res.ok:
            _finish_candidate(ctx, model, res, cfg.metric)
            if n == run.total:
                hist.append(res.score)
        res.rung, res.rung_scores = r, list(hist)
        return res
    raise AssertionError("unreachable: the last rung is the whole run")


def rungs_from(candidates: list[CandidateResult], plan: list[int]) -> list[dict[str, Any]]:
    """The ``rungs`` of a report rebuilt from candidates' ``rung_scores`` (distributed search)."""
    out = []
    total = plan[-1] if plan else 0
    for r, n in enumerate(plan):
        reached = [c for c in candidates if c.ok and len(c.rung_scores) > r]
        if not reached:
            break
        shifts = list(dict.fromkeys(c.shift for c in reached))
        scores = {shift_key(t): _mean_or_none([c.rung_scores[r] for c in reached if c.shift == t]) for t in shifts}
        kept = sorted({c.shift for c in reached if (c.rung or 0) > r})
        out.append({"rung": r, "steps": n, "fraction": round(n / total, 6) if total else None, "candidates": shifts,
                    "kept": kept, "scores": scores})
    return out


def _as_factory(model_factory: Callable) -> Callable[[int], nn.Module]:
    from .train import signature_accepts

    takes_seed = signature_accepts(model_factory, "seed")

    def factory(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        m = model_factory(seed=seed) if takes_seed else model_factory()
        if not isinstance(m, nn.Module):
            raise UsageError(f"model_factory returned {type(m).__name__}, not an nn.Module")
        return m

    return factory


# ------------------------------------------------------------------------------ aggregate


def _stats(candidates: list[CandidateResult], shifts: list[float], sites: list[str]) -> list[ShiftStats]:
    out = []
    for s in shifts:
        cs = [c for c in candidates if shift_key(c.shift) == shift_key(s)]
        ok = [c for c in cs if c.ok and c.score is not None]
        n = len(ok)
        mean = std = se = loss = pm = None
        per_site: dict[str, float | None] = {}
        if ok:
            scores = [c.score for c in ok]
            mean = sum(scores) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in scores) / (n - 1)) if n > 1 else 0.0
            se = std / math.sqrt(n)
            losses = [c.loss for c in ok if c.loss is not None]
            loss = sum(losses) / len(losses) if losses else None
            pms = [c.plus_fraction_mean for c in ok if c.plus_fraction_mean is not None]
            pm = sum(pms) / len(pms) if pms else None
            for name in sites:
                vs = [c.plus_fraction.get(name) for c in ok if c.plus_fraction.get(name) is not None]
                per_site[name] = sum(vs) / len(vs) if vs else None
        status = "ok" if cs and len(ok) == len(cs) else ("failed" if not ok else "partial")
        rungs = [c.rung for c in cs if c.rung is not None]
        steps = [c.steps for c in ok if c.steps is not None]
        out.append(ShiftStats(shift=s, n=n, failed=len(cs) - len(ok), mean=mean, std=std, stderr=se, loss=loss,
                              plus_fraction_mean=pm, plus_fraction=per_site, status=status if cs else "missing",
                              rung=max(rungs) if rungs else None, steps=max(steps) if steps else None))
    return out


def _rung_view(stats: list[ShiftStats], candidates: list[CandidateResult], rung: int) -> list[ShiftStats]:
    """The shifts' scores at ``rung`` (successive halving): mean/std over seeds of each candidate's
    train accuracy after that rung's steps; shifts that did not reach it are left out."""
    out = []
    for st in stats:
        vals = [c.rung_scores[rung] for c in candidates
                if shift_key(c.shift) == shift_key(st.shift) and c.ok and len(c.rung_scores) > rung]
        if not vals:
            continue
        n = len(vals)
        mean = sum(vals) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
        out.append(ShiftStats(shift=st.shift, n=n, failed=0, mean=mean, std=std, stderr=std / math.sqrt(n),
                              loss=None, plus_fraction_mean=None, plus_fraction={}, status="ok", rung=rung))
    return out


def _noise_note(stats: list[ShiftStats], winner: ShiftStats | None, seeds: int) -> tuple[str, bool | None, float | None]:
    base = next((s for s in stats if shift_key(s.shift) == shift_key(0.0) and s.mean is not None), None)
    if winner is None:
        return "every candidate failed", None, None
    if base is None:
        return "t = 0 is not in the grid (or failed): no baseline to compare with", None, None
    if shift_key(winner.shift) == shift_key(0.0):
        return "the winner is t = 0 (no shift)", False, 0.0
    diff = winner.mean - base.mean
    least = validate.MIN_VERDICT_SEEDS
    if seeds < least or winner.n < least or base.n < least:  # a std of 1 or 2 values is no noise estimate
        n = min(seeds, winner.n, base.n)
        return (f"winner t = {winner.shift:g} is {diff * 100:+.2f} points ahead of t = 0 with {n} seed"
                f"{'s' if n != 1 else ''}: not resolved, too few seeds to estimate the seed noise (use --seeds "
                f"{least} or more)"), None, 0.0
    noise = _seed_noise(winner, base)
    if diff <= noise:
        return (f"winner t = {winner.shift:g} is NOT ahead of t = 0 by more than the seed noise "
                f"({diff * 100:+.2f} points vs noise {noise * 100:.2f})"), False, noise
    return (f"winner t = {winner.shift:g} is ahead of t = 0 by {diff * 100:+.2f} points, more than the seed noise "
            f"({noise * 100:.2f})"), True, noise


def _seed_noise(a: ShiftStats, b: ShiftStats) -> float:
    """The seed noise of a comparison of two shifts' mean scores: the larger per-shift std, or
    twice the standard error of the difference (the same both ways)."""
    return max(a.std or 0.0, b.std or 0.0, 2 * math.sqrt((a.stderr or 0) ** 2 + (b.stderr or 0) ** 2))


def _baseline_lead(stats: list[ShiftStats], seeds: int) -> tuple[str, bool | None, ShiftStats | None]:
    """t = 0 has the best mean in ``stats``: (note, does it lead the best other shift by more than
    the seed noise (None: fewer than 3 seeds, or no other shift), that shift)."""
    base = next((s for s in stats if shift_key(s.shift) == shift_key(0.0) and s.mean is not None), None)
    others = [s for s in stats if shift_key(s.shift) != shift_key(0.0) and s.mean is not None]
    if base is None or not others:
        return "the winner is t = 0 (no shift); no other shift to compare with", None, None
    r = max(others, key=lambda s: (s.mean, -abs(s.shift)))
    lead = base.mean - r.mean
    least = validate.MIN_VERDICT_SEEDS
    if seeds < least or r.n < least or base.n < least:
        n = min(seeds, r.n, base.n)
        return (f"t = 0 leads the best shift t = {r.shift:g} by {lead * 100:+.2f} points with {n} seed"
                f"{'s' if n != 1 else ''}: not resolved, too few seeds to estimate the seed noise (use --seeds "
                f"{least} or more)"), None, r
    noise = _seed_noise(r, base)
    if lead <= noise:
        return (f"t = 0 is NOT ahead of the best shift t = {r.shift:g} by more than the seed noise "
                f"({lead * 100:+.2f} points vs noise {noise * 100:.2f})"), False, r
    return (f"t = 0 is ahead of the best shift t = {r.shift:g} by {lead * 100:+.2f} points, more than the seed "
            f"noise ({noise * 100:.2f})"), True, r


def summarise(candidates: list[CandidateResult], *, shifts: list[float], seeds: list[int], sites: list[str],
              config: dict[str, Any], config_hash: str, metric: str, seconds: float) -> SearchSummary:
    stats = _stats(candidates, shifts, sites)
    ranked = [s for s in stats if s.mean is not None]
    if any(s.rung is not None for s in ranked):  # successive halving: only the last rung's shifts compete
        top = max(s.rung or 0 for s in ranked)
        ranked = [s for s in ranked if (s.rung or 0) == top]
    winner = max(ranked, key=lambda s: (s.mean, -abs(s.shift))) if ranked else None
    base = next((s for s in stats if shift_key(s.shift) == shift_key(0.0) and s.mean is not None), None)
    if winner is not None and base is not None and base.rung is not None and base.rung != winner.rung:
        # t = 0 was eliminated at an earlier rung: compare both at that rung (paired, same steps)
        view = _rung_view(stats, candidates, base.rung)
        w_at = next((s for s in view if shift_key(s.shift) == shift_key(winner.shift)), None)
        note, ahead, _ = _noise_note(view, w_at, len(seeds)) if w_at is not None else _noise_note(stats, winner,
                                                                                                  len(seeds))
        note += f" (at rung {base.rung}, where t = 0 stopped)"
    else:
        note, ahead, _ = _noise_note(stats, winner, len(seeds))
    runner_up = baseline_ahead = None
    if winner is not None and shift_key(winner.shift) == shift_key(0.0):
        # symmetric: t = 0 leads; by more than the noise, or a tie (issue 22). Compared with the
        # best other shift at the last rung it reached (halving: paired, same steps)
        others = [s for s in stats if s.mean is not None and shift_key(s.shift) != shift_key(0.0)]
        top_other = max((s.rung or 0 for s in others), default=0)
        if others and any(s.rung is not None for s in others) and top_other != (winner.rung or 0):
            view = _rung_view(stats, candidates, top_other)
            note, baseline_ahead, r = _baseline_lead(view, len(seeds))
            note += f" (at rung {top_other}, where t = {r.shift:g} stopped)" if r is not None else ""
        else:
            note, baseline_ahead, r = _baseline_lead(ranked, len(seeds))
        runner_up = r.shift if r is not None else None
    inits = {c.init_hash for c in candidates if c.init_hash}
    by_seed_init = {}
    by_seed_batch = {}
    shared_init = shared_batches = True
    for c in candidates:
        if by_seed_init.setdefault(c.seed, c.init_hash) != c.init_hash:
            shared_init = False
        # a streamed candidate's hash covers the batches it trained (halving stops some early):
        # compare candidates of a seed that trained the same number of steps
        if by_seed_batch.setdefault((c.seed, c.steps), c.batch_order_hash) != c.batch_order_hash:
            shared_batches = False
    del inits
    comp = next((c for c in candidates if c.compiled is not None and not c.resumed), None) or \
        next((c for c in candidates if c.compiled is not None), None)
    csec = next((c.compile_seconds for c in candidates if c.compile_seconds), None)
    return SearchSummary(
        config=config, config_hash=config_hash, metric=metric, sites=sites, seeds=list(seeds), shifts=list(shifts),
        candidates=candidates, stats=stats, winner=winner.shift if winner else None,
        baseline=next((s.mean for s in stats if shift_key(s.shift) == shift_key(0.0)), None),
        noise_note=note, ahead_of_baseline=ahead, seconds=seconds, runner_up=runner_up, baseline_ahead=baseline_ahead,
        compiled=comp.compiled if comp else None, compile_seconds=csec,
        compile_error=next((c.compile_error for c in candidates if c.compile_error), None),
        resumed=sum(1 for c in candidates if c.resumed), shared_init=shared_init, shared_batches=shared_batches,
        cost=_cost(candidates, len(shifts) * len(seeds)))


def _cost(candidates: list[CandidateResult], n_grid: int) -> dict[str, Any]:
    """Training steps of the schedule (each candidate counted from step 0, resumed ones too)
    against the full grid: every candidate trained for as many steps as the longest one."""
    steps = [c.steps for c in candidates if c.steps is not None]
    if not steps:
        return {"candidate_steps": None, "full_grid_candidate_steps": None, "ratio": None}
    full = max(steps) * n_grid
    return {"candidate_steps": sum(steps), "full_grid_candidate_steps": full,
            "ratio": round(sum(steps) / full, 4) if full else None}


# ------------------------------------------------------------------------------ the search loop


class _Progress:
    """Hooks the CLI passes in: ``start(shift, seed, i, n, total_steps)``, ``step(done, total)``,
    ``end(result)``; all optional."""

    def __init__(self, obj: Any):
        self.obj = obj

    def call(self, name: str, *a):
        fn = getattr(self.obj, name, None) if self.obj is not None else None
        if fn is not None:
            fn(*a)


def _loop(ctx: _Context, *, shifts: list[float], seeds: list[int], metric: str, config: dict[str, Any],
          out_dir: str | Path | None, resume: bool, force: bool, progress: Any,
          train_one_epoch: Callable | None, step_progress_target: Any) -> SearchSummary:
    t0 = time.perf_counter()
    journal = None
    done: dict = {}
    if out_dir is not None:
        out = Path(out_dir)
        if resume:
            out.mkdir(parents=True, exist_ok=True)
            prepare_output_dir(out, force=True)
        else:
            prepare_output_dir(out, force=force)
        journal = Journal(out / JOURNAL_NAME)
        if resume:
            done = journal.finished(ctx.config_hash)
        else:
            journal.reset()
    elif resume:
        raise UsageError("--resume needs --out DIR (the journal lives there)")
    pr = _Progress(progress)
    todo = [(s, seed) for seed in seeds for s in shifts]
    results: list[CandidateResult] = []
    for i, (s, seed) in enumerate(todo):
        key = candidate_key(s, seed, ctx.config_hash)
        if key in done:
            r = CandidateResult.from_json(done[key])
            r.resumed = True
            results.append(r)
            pr.call("skip", r, i, len(todo))
            continue
        pr.call("start", s, seed, i, len(todo))
        if step_progress_target is not None:
            step_progress_target.progress = (lambda d, t: pr.call("step", d, t))
        try:
            r = _run_in_context(ctx, s, seed, metric, train_one_epoch)
        finally:
            if step_progress_target is not None:
                step_progress_target.progress = None
        if journal is not None:
            journal.append(s, seed, ctx.config_hash, r.to_json())
        results.append(r)
        pr.call("end", r, i, len(todo))
    summary = summarise(results, shifts=shifts, seeds=seeds, sites=[s.name for s in ctx.sites], config=config,
                        config_hash=ctx.config_hash, metric=metric, seconds=time.perf_counter() - t0)
    summary.checkpoint, summary.notes = _checkpoint_json(ctx), list(getattr(ctx, "notes", []))
    summary.normalisation = getattr(ctx, "normalisation", None)
    if out_dir is not None:
        from .report import write_report

        summary.out_dir = str(out_dir)
        summary.files = write_report(summary, out_dir)
    return summary


# ------------------------------------------------------------------------------ successive halving


def rung_steps(total: int, eta: float, min_fraction: float, min_steps: int = 1) -> list[int]:
    """The step counts at which successive halving ranks the candidates: ``min_fraction`` of the
    epoch, times ``eta`` at each rung, the last rung the whole epoch (``total`` steps). A rung
    under ``min_steps`` is left out (its candidates go on to the next: ``--rung-min-samples``
    divided by the batch size, :func:`rung_min_steps`); ``[total]`` alone is the full schedule.

    ``rung_steps(234, 2, 0.125) == [29, 58, 117, 234]``; ``rung_steps(24, 2, 0.125, 8) == [12, 24]``.
    Increasing, at least one step each.
    """
    out: list[int] = []
    f = float(min_fraction)
    while f < 1.0 - 1e-9:
        n = max(1, int(round(f * total)))
        if n < total and n >= min_steps and (not out or n > out[-1]):
            out.append(n)
        f *= eta
    out.append(int(total))
    return out


def rung_min_steps(cfg: SearchConfig) -> int:
    """The fewest steps of a rung that ranks: ``ceil(cfg.rung_min_samples / batch size)`` (>= 1)."""
    n = int(getattr(cfg, "rung_min_samples", 0) or 0)
    return max(1, math.ceil(n / max(1, int(cfg.batch_size))))


def _plan_note(cfg: SearchConfig, total: int) -> str | None:
    """Why the halving plan differs from ``--min-fraction``'s rungs (rungs under the sample minimum
    left out; the whole schedule fell back to full), or None."""
    raw = rung_steps(total, cfg.eta, cfg.min_fraction)
    plan = rung_steps(total, cfg.eta, cfg.min_fraction, rung_min_steps(cfg))
    if plan == raw:
        return None
    dropped = [n for n in raw if n not in plan]
    why = (f"rungs at {', '.join(map(str, dropped))} steps train each candidate on fewer than "
           f"--rung-min-samples {cfg.rung_min_samples} samples ({rung_min_steps(cfg)} steps of {cfg.batch_size})")
    if len(plan) == 1:
        return f"fell back to the full schedule: {why}; every shift trains the whole epoch"
    return f"{why}: left out, the first rung is at {plan[0]} steps"


def stable_marks(prev: int, n_r: int, fraction: float) -> tuple[int, list[int]]:
    """``--stop-when-stable``'s schedule inside a rung from step ``prev`` to ``n_r``: the window
    (``ceil(fraction x the rung's steps)``, at least 1) and the steps after which the rung's
    candidates all stand and :func:`stable_decision` is asked (turns of ``ceil(window / 2)`` steps
    from the first step where the window fits in the rung; the last mark is ``n_r``, where the
    rung ends anyway). ``stable_marks(0, 29, 0.25) == (8, [9, 13, 17, 21, 25, 29])``."""
    window = max(1, int(math.ceil(fraction * (n_r - prev))))
    turn = max(1, int(math.ceil(window / 2)))
    first = max(prev + window, window + 1)  # the earliest step stable_decision can accept
    return window, sorted(set(list(range(min(n_r, first), n_r, turn)) + [n_r]))


def stable_decision(hits: dict[float, list[list[int]]], seen: dict[float, list[list[int]]], *, keep: int,
                    start: int, at: int, window: int, z: float | None = None) -> dict[str, Any] | None:
    """``--stop-when-stable``: may a successive-halving rung stop at step ``at``?

    ``hits[t]`` / ``seen[t]``: for each seed (the same seed order for every shift t), the correct
    and the seen samples of every training step of the first epoch (ints, at least ``at`` long).
    A shift's score after j steps is the halving ranking's: the mean over seeds of
    ``sum(hits[:j]) / sum(seen[:j])``. The rung's *decision* is the set of the best ``keep``
    shifts (ties to the smaller |t|). The rung may stop when

    1. the decision was the same after every step j in ``[at - window, at]``, all inside the
       rung (``at - window >= start``): the ranking that decides has held for ``window`` steps;
    2. every kept shift a is ahead of every dropped shift b beyond the paired noise: with the
       per-step differences ``d_i = mean over seeds of hits_a[i]/seen_a[i] - hits_b[i]/seen_b[i]``
       (i < at; same batches for every shift, so the batch difficulty cancels),
       ``score_a(at) - score_b(at) > z * stdev(d) / sqrt(at)`` (z = ``STABLE_Z`` = 2, steps
       taken as independent samples: a heuristic, not a test at a stated level).

    Returns None, or ``{"steps": at, "window", "stable_from", "kept": [t...], "tightest": {"ahead",
    "behind", "margin", "se", "z"}}`` (margin and se as accuracy fractions; the tightest pair is
    the one with the smallest margin / se, then the smallest margin; z None when the differences
    have no spread).
    """
    z = STABLE_Z if z is None else float(z)
    shifts = list(hits)
    if at - window < max(start, 1) or at < 2 or not (0 < keep < len(shifts)):
        return None
    if any(len(h) < at or len(n) < at for t in shifts for h, n in zip(hits[t], seen[t])):
        return None  # a history is missing (a state from an older bnnshift): never stop blind
    cum: dict[float, list[list[int]]] = {}
    cseen: dict[float, list[list[int]]] = {}
    for t in shifts:
        cum[t] = [list(itertools.accumulate(h[:at])) for h in hits[t]]
        cseen[t] = [list(itertools.accumulate(n[:at])) for n in seen[t]]

    def score(t: float, j: int) -> float | None:  # after j steps, as the rung ranks (bnnshift.search._halving_loop)
        return _mean_or_none([c[j - 1] / n[j - 1] if n[j - 1] else None for c, n in zip(cum[t], cseen[t])])

    def decision(j: int) -> frozenset:
        ranked = sorted(shifts, key=lambda t: (score(t, j) is not None, score(t, j) or 0.0, -abs(t)), reverse=True)
        return frozenset(ranked[:keep])

    kept = decision(at)
    if any(decision(j) != kept for j in range(at - window, at)):
        return None
    tight = None
    for a in kept:
        for b in shifts:
            if b in kept:
                continue
            d = [sum(ha[i] / na[i] - hb[i] / nb[i] for ha, na, hb, nb in zip(hits[a], seen[a], hits[b], seen[b]))
                 / len(hits[a]) for i in range(at)]
            margin = (score(a, at) or 0.0) - (score(b, at) or 0.0)
            mean = sum(d) / at
            se = math.sqrt(sum((v - mean) ** 2 for v in d) / (at - 1) / at)
            ratio = margin / se if se > 0 else (math.inf if margin > 0 else 0.0)
            if not ratio > z:
                return None
            if tight is None or (ratio, margin) < (tight["z"], tight["margin"]):
                tight = {"ahead": a, "behind": b, "margin": margin, "se": se, "z": ratio}
    if tight is not None and math.isinf(tight["z"]):
        tight["z"] = None  # strict JSON: no infinity (the differences had no spread at all)
    return {"steps": at, "window": window, "stable_from": at - window, "kept": sorted(kept), "tightest": tight}


CHANCE_Z = 3.0  # a rung's best mean score within this many binomial standard errors of chance: at chance


def rung_decision(ranked: list[float], keep_n: int, mean: Callable[[float], float], *, samples: int,
                  chance: float | None) -> tuple[list[float], dict[str, Any] | None]:
    """Which of a rung's ``ranked`` shifts (best first) go on, and why when it is not the plain
    best ``keep_n`` (issue 22): ``({"action": "extended", "why": ...})`` keeps them all when the
    best mean score is at chance (``chance`` = 1 / classes, within ``CHANCE_Z`` binomial standard
    errors over ``samples`` samples: the scores carry no information); ``"tie"`` keeps every shift
    whose mean equals the last kept one's exactly. ``chance=None``: no chance check."""
    if not ranked:
        return [], None
    if chance is not None and 0 < chance < 1 and samples > 0:
        best = mean(ranked[0])
        band = CHANCE_Z * math.sqrt(chance * (1 - chance) / samples)
        if best <= chance + band:
            return list(ranked), {"action": "extended",
                                  "why": (f"scores at chance: the best {best * 100:.2f}% is within {CHANCE_Z:g} "
                                          f"standard errors ({band * 100:.2f} points) of chance {chance * 100:.2f}% "
                                          f"after {samples} samples; all {len(ranked)} shifts go on")}
    keep = ranked[:keep_n]
    if len(ranked) > keep_n:
        cut = mean(ranked[keep_n - 1])
        tied = [t for t in ranked[keep_n:] if mean(t) == cut]
        if tied:
            both = ", ".join(f"{t:g}" for t in [t for t in keep if mean(t) == cut] + tied)
            return keep + tied, {"action": "tie", "why": f"t = {both} tie exactly at the cut ({cut * 100:.2f}%): "
                                                          "all kept"}
    return keep, None


def survivors(n: int, eta: float) -> int:
    """How many of ``n`` candidates continue after a rung: the best ``ceil(n / eta)`` (at least 1)."""
    return max(1, int(math.ceil(n / eta - 1e-9)))


class _StateStore:
    """Paused candidates' training states (``DefaultTrainer.snapshot``): in memory while they fit
    in ``STATE_MEMORY_BUDGET``, and in ``OUT/states/`` whenever there is an output directory
    (written atomically, before the rung record that names them, so ``--resume`` finds them)."""

    PATTERN = "t*_seed*_step*.pt"

    def __init__(self, out_dir: Path | None, *, fresh: bool):
        self.dir = out_dir / "states" if out_dir is not None else None
        self.mem: dict[tuple[str, int], tuple[int, dict]] = {}
        self.in_memory = True
        self.files: dict[tuple[str, int], tuple[int, Path]] = {}
        if fresh:  # a new search into a --force'd directory: states of an older one are stale
            self._clear()

    def _clear(self) -> None:
        if self.dir is not None and self.dir.is_dir():
            for p in self.dir.glob(self.PATTERN):
                p.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.dir.rmdir()

    @staticmethod
    def _bytes(state: dict) -> int:
        total = 0
        stack = [state]
        while stack:
            o = stack.pop()
            if isinstance(o, torch.Tensor):
                total += o.numel() * o.element_size()
            elif isinstance(o, dict):
                stack.extend(o.values())
            elif isinstance(o, (list, tuple)):
                stack.extend(o)
        return total

    def put(self, key: tuple[str, int], steps: int, state: dict, n_candidates: int) -> str | None:
        rel = None
        if self.dir is not None:
            from ._io import _atomic_target

            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / f"t{key[0]}_seed{key[1]}_step{steps}.pt"
            try:
                with _atomic_target(path) as tmp:
                    torch.save(state, tmp)
            except (OSError, RuntimeError) as exc:  # a full disk: torch's zip writer raises RuntimeError
                if isinstance(exc, RuntimeError) and "write" not in str(exc).lower():
                    raise
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
                    (str(exc).strip().splitlines() or ["write failed"])[-1][:160]
                raise OutputError(f"cannot save the training state {path}: {reason}",
                                  hint="free some space (or lower the number of shifts); the journal keeps every "
                                       "finished rung: rerun the same command with --resume") from None
            old = self.files.get(key)
            self.files[key] = (steps, path)
            rel = f"states/{path.name}"
            if old is not None and old[1] != path:
                old[1].unlink(missing_ok=True)
        if self.in_memory and self.dir is not None and self._bytes(state) * n_candidates > STATE_MEMORY_BUDGET:
            self.in_memory = False  # large model: read the states back from --out
            self.mem.clear()
        if self.in_memory or self.dir is None:
            self.mem[key] = (steps, state)
        return rel

    def hold(self, key: tuple[str, int], steps: int, state: dict, n_candidates: int) -> None:
        """A state between two turns of ``--stop-when-stable`` (not journaled): in memory while the
        states fit, else written to ``states/`` like :meth:`put`."""
        if self.dir is None or (self.in_memory and self._bytes(state) * n_candidates <= STATE_MEMORY_BUDGET):
            self.mem[key] = (steps, state)
        else:
            self.put(key, steps, state, n_candidates)

    def known(self, key: tuple[str, int], steps: int, rel: str | None) -> None:
        """A state written by an earlier (killed) process, named by its rung record."""
        if rel and self.dir is not None:
            from .journal import resolve_inside

            # a path read from the journal: data, kept inside OUT/states/ (never removed elsewhere)
            path = resolve_inside(self.dir, rel[len("states/"):] if isinstance(rel, str) and rel.startswith("states/")
                                  else rel, f"journal {self.dir.parent / JOURNAL_NAME}")
            if path.is_file() and steps > self.files.get(key, (-1, None))[0]:
                self.files[key] = (steps, path)

    def get(self, key: tuple[str, int]) -> tuple[int, dict] | None:
        if key in self.mem:
            return self.mem[key]
        got = self.files.get(key)
        if got is None:
            return None
        try:
            return got[0], torch.load(got[1], map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a torn or foreign file: retrain from step 0 instead
            return None

    def drop(self, key: tuple[str, int]) -> None:
        self.mem.pop(key, None)
        got = self.files.pop(key, None)
        if got is not None:
            got[1].unlink(missing_ok=True)

    def close(self) -> None:
        self.mem.clear()
        self.files.clear()
        self._clear()


def _halving_loop(ctx: _Context, cfg: SearchConfig, *, out_dir: str | Path | None, resume: bool, force: bool,
                  progress: Any) -> SearchSummary:
    """Successive halving over the shifts (Jamieson & Talwalkar 2016; Li et al. 2017, Hyperband's
    inner loop): every shift trains to the first rung, the best ``ceil(n / eta)`` by the train
    accuracy accumulated so far (mean over seeds) continue from where they paused, until the
    survivors finish the epoch. Candidates stay paired: same init, same batches in the same order,
    so a survivor's score equals its full-search score (bitwise on the same machine)."""
    t0 = time.perf_counter()
    trainer = ctx.trainer
    shifts, seeds = list(cfg.shifts), list(cfg.seeds)
    journal, done, rung_recs, out = None, {}, {}, None
    if out_dir is not None:
        out = Path(out_dir)
        if resume:
            out.mkdir(parents=True, exist_ok=True)
            prepare_output_dir(out, force=True)
        else:
            prepare_output_dir(out, force=force)
        journal = Journal(out / JOURNAL_NAME)
        if resume:
            done = journal.finished(ctx.config_hash)
            rung_recs = journal.rungs(ctx.config_hash)
        else:
            journal.reset()
    elif resume:
        raise UsageError("--resume needs --out DIR (the journal lives there)")
    store = _StateStore(out, fresh=not resume)
    for (sk, seed, _h, steps), rec in rung_recs.items():
        if not rec.get("eliminated"):
            store.known((sk, seed), steps, rec.get("state"))
    total = trainer.num_steps()
    plan = rung_steps(total, cfg.eta, cfg.min_fraction, rung_min_steps(cfg))
    plan_note = _plan_note(cfg, total)
    labels = getattr(trainer, "train_y", None)
    classes = int(labels.max()) + 1 if isinstance(labels, torch.Tensor) and labels.numel() else 0
    chance = 1.0 / classes if classes > 1 else None
    clock0 = list(getattr(trainer, "step_clock", [0, 0.0]))
    runs = list(plan)  # the rungs this run trains: an early-stopped last rung adds the winner's finish
    recs_by_cand: dict[tuple[str, int], dict[int, dict]] = {}
    for (sk, seed, _h, steps), rec in rung_recs.items():
        recs_by_cand.setdefault((sk, seed), {})[steps] = rec
    pr = _Progress(progress)
    alive = list(shifts)
    final: dict[tuple[str, int], CandidateResult] = {}
    rung_scores: dict[tuple[str, int], list[float]] = {}
    rungs_out: list[dict[str, Any]] = []
    trained_steps = 0
    n_total = sum(len(seeds) * _alive_count(len(shifts), cfg.eta, r) for r in range(len(plan)))
    i = 0

    def finish_eliminated(s: float, seed: int, r: int, res: CandidateResult, state: dict | None) -> CandidateResult:
        if state is not None:
            model = _shared_model(ctx, seed)
            _set_shift(model, s)
            trainer.restore(model, state)
            plus, _val, error = _measure_on_main(ctx, model)
            if error is not None:
                res.extra["probe_error"] = error
            res.plus_fraction = plus
            res.degenerate = constant_sites(plus)
            vals = [v for v in plus.values() if v is not None]
            res.plus_fraction_mean = sum(vals) / len(vals) if vals else None
        return res

    def rung_plan(r: int, n_r: int, prev: int) -> tuple[int, dict | None, bool]:
        """Where rung ``r`` ends on this run: (steps, journaled early stop or None, train it
        interleaved with the stability test). A resumed run repeats a journaled early stop
        exactly; a rung some candidate already finished at its planned steps is not stopped early."""
        keys = [(shift_key(t), seed) for seed in seeds for t in alive]
        for key in keys:
            for steps, rec in recs_by_cand.get(key, {}).items():
                st = rec.get("stop")
                if (isinstance(st, dict) and rec.get("rung") == r and st.get("planned_steps") == n_r
                        and st.get("from_steps") == prev and prev < steps < n_r):
                    return steps, st, False
        if any(n_r in recs_by_cand.get(key, {}) or (n_r == total and (key[0], key[1], ctx.config_hash) in done)
               for key in keys):
            return n_r, None, False
        return n_r, None, True

    def train_interleaved(r: int, prev: int, n_r: int, keep_n: int, forced: int | None, i0: int
                          ) -> tuple[int, dict | None, dict, dict]:
        """--stop-when-stable: train the rung's candidates in turns of a few steps (each pausing
        with its full state, so the scores are bitwise the uninterrupted ones) and stop the rung
        at the first turn where :func:`stable_decision` holds; ``forced``: train to that step
        (a journaled decision). Returns (steps, stop record, failed candidates, seconds)."""
        nonlocal trained_steps
        window, marks = stable_marks(prev, n_r, cfg.stable_fraction)
        if forced is not None:
            marks = [forced]
        failed: dict = {}
        secs: dict = {}
        hist: dict = {}
        order = [(seed, t) for seed in seeds for t in alive]
        for c in marks:
            for j, (seed, t) in enumerate(order):
                key = (shift_key(t), seed)
                if key in failed:
                    continue
                got = store.get(key)
                if got is not None and got[0] >= c:
                    if key not in hist:
                        cnt = got[1].get("run", {})
                        hist[key] = (list(cnt.get("step_hits") or []), list(cnt.get("step_seen") or []))
                    continue
                pr.call("start", t, seed, i0 + j, n_total)
                trainer.progress = (lambda d, tt: pr.call("step", d, tt))
                t1 = time.perf_counter()
                model = _shared_model(ctx, seed)
                _set_shift(model, t)
                run = trainer.restore(model, got[1]) if got is not None else trainer.start(model, seed=seed, shift=t)
                step0 = run.step
                try:
                    bad = trainer.advance(run, model, c)
                finally:
                    trainer.progress = None
                trained_steps += run.step - step0
                if bad is not None:
                    failed[key] = bad
                    store.drop(key)
                else:
                    store.hold(key, c, trainer.snapshot(run, model), len(shifts) * len(seeds))
                    hist[key] = (list(run.step_hits), list(run.step_seen))
                secs[key] = secs.get(key, 0.0) + time.perf_counter() - t1
            if forced is not None or c == n_r:
                return c, None, failed, secs
            ok = [t for t in alive if all((shift_key(t), sd) not in failed for sd in seeds)]
            if len(ok) <= keep_n:
                continue  # nothing left to decide: every candidate continues anyway
            h = {t: [hist.get((shift_key(t), sd), ([], []))[0] for sd in seeds] for t in ok}
            n = {t: [hist.get((shift_key(t), sd), ([], []))[1] for sd in seeds] for t in ok}
            stop = stable_decision(h, n, keep=keep_n, start=prev, at=c, window=window)
            if stop is not None:
                dropped = [(shift_key(t), sd) for t in alive for sd in seeds
                           if t not in stop["kept"] and (shift_key(t), sd) not in failed]
                stop.update({"rung": r, "planned_steps": n_r, "from_steps": prev, "fraction": cfg.stable_fraction,
                             "steps_saved": (n_r - c) * len(dropped)})
                return c, stop, failed, secs
        return n_r, None, failed, secs

    try:
        r, prev = 0, 0
        while r < len(runs):
            n_plan = runs[r]
            winner_run = r >= len(plan)  # the winner's steps to the end after an early-stopped last rung
            keep_n = 1 if n_plan == total else survivors(len(alive), cfg.eta)
            pr.call("rung", r, len(runs), n_plan, total)
            n_r, stop, pre_failed, pre_secs = n_plan, None, {}, {}
            if cfg.stop_when_stable and not winner_run and len(alive) > keep_n:
                n_r, stop, interleave = rung_plan(r, n_plan, prev)
                if interleave or (stop is not None and not all(
                        n_r in recs_by_cand.get((shift_key(t), sd), {}) for sd in seeds for t in alive)):
                    n_r, fresh_stop, pre_failed, pre_secs = train_interleaved(
                        r, prev, n_plan, keep_n, n_r if stop is not None else None, i)
                    stop = stop if stop is not None else fresh_stop
            if stop is not None and n_plan == total:
                runs.append(total)  # the winner alone finishes the epoch
                n_total += len(seeds)
            last = n_r == total
            scores: dict[str, list[float | None]] = {}
            current: dict[tuple[str, int], CandidateResult] = {}
            for seed in seeds:
                for s in alive:
                    key = (shift_key(s), seed)
                    hist = rung_scores.setdefault(key, [])
                    ck = candidate_key(s, seed, ctx.config_hash)
                    rec = rung_recs.get((*ck, n_r))
                    if last and ck in done:
                        res = CandidateResult.from_json(done[ck])
                        res.resumed = True
                        if res.ok:
                            hist[:] = hist[:r] + [res.score]
                        res.rung, res.rung_scores = r, list(hist)
                        final[key] = res
                        scores.setdefault(key[0], []).append(res.score if res.ok else None)
                        current[key] = res
                        pr.call("skip", res, i, n_total)
                        i += 1
                        continue
                    if rec is not None and not last:
                        res = CandidateResult.from_json(rec["result"])
                        res.resumed = True
                        hist[:] = hist[:r] + [res.score]
                        if not res.ok:
                            final[key] = res
                        scores.setdefault(key[0], []).append(res.score if res.ok else None)
                        current[key] = res
                        pr.call("skip", res, i, n_total)
                        i += 1
                        continue
                    pr.call("start", s, seed, i, n_total)
                    trainer.progress = (lambda d, t: pr.call("step", d, t))
                    t1 = time.perf_counter() - pre_secs.get(key, 0.0)
                    model = _shared_model(ctx, seed)
                    _set_shift(model, s)
                    failed = pre_failed.get(key)
                    if failed is None:
                        got = store.get(key)
                        if got is not None and got[0] <= n_r:
                            run = trainer.restore(model, got[1])
                        else:
                            run = trainer.start(model, seed=seed, shift=s)
                        step0 = run.step
                        try:
                            failed = trainer.advance(run, model, n_r)
                        finally:
                            trainer.progress = None
                        trained_steps += run.step - step0
                    trainer.progress = None
                    if failed is not None:
                        res = _result_from(failed, shift=s, seed=seed, ctx=ctx, metric=cfg.metric,
                                           seconds=time.perf_counter() - t1)
                        res.rung, res.rung_scores = r, list(hist)
                        final[key] = res
                        store.drop(key)
                        if journal is not None:
                            if last:
                                journal.append(s, seed, ctx.config_hash, res.to_json())
                            else:
                                journal.append_rung(s, seed, ctx.config_hash, rung=r, steps=n_r, result=res.to_json(),
                                                    eliminated=True, stop=stop)
                        scores.setdefault(key[0], []).append(None)
                        pr.call("end", res, i, n_total)
                        i += 1
                        continue
                    if last:
                        res = _result_from(trainer.result(run), shift=s, seed=seed, ctx=ctx, metric=cfg.metric,
                                           seconds=time.perf_counter() - t1)
                        if res.ok:
                            _finish_candidate(ctx, model, res, cfg.metric)
                        hist[:] = hist[:r] + ([res.score] if res.ok else [])
                        res.rung, res.rung_scores = r, list(hist)
                        final[key] = res
                        store.drop(key)
                        if journal is not None:
                            journal.append(s, seed, ctx.config_hash, res.to_json())
                    else:
                        res = _result_from(trainer.partial(run), shift=s, seed=seed, ctx=ctx, metric=cfg.metric,
                                           seconds=time.perf_counter() - t1)
                        hist[:] = hist[:r] + ([res.score] if res.ok else [])
                        res.rung, res.rung_scores = r, list(hist)
                        rel = store.put(key, n_r, trainer.snapshot(run, model), len(shifts) * len(seeds))
                        if journal is not None:
                            journal.append_rung(s, seed, ctx.config_hash, rung=r, steps=n_r, result=res.to_json(),
                                                state=rel, stop=stop)
                        if not res.ok:
                            final[key] = res
                    scores.setdefault(key[0], []).append(res.score if res.ok else None)
                    current[key] = res
                    pr.call("end", res, i, n_total)
                    i += 1
            ranked = sorted(
                alive, key=lambda t: (_mean_or_none(scores.get(shift_key(t), [])) is not None,
                                      _mean_or_none(scores.get(shift_key(t), [])) or 0.0, -abs(t)), reverse=True)
            ranked = [t for t in ranked if _mean_or_none(scores.get(shift_key(t), [])) is not None]
            keep = ranked[:keep_n] if not last else ranked
            decision = None
            if not last and stop is None:  # a rung ranks only when its scores carry information (issue 22)
                keep, decision = rung_decision(
                    ranked, keep_n, lambda t: _mean_or_none(scores.get(shift_key(t), [])) or 0.0,
                    samples=n_r * cfg.batch_size * len(seeds), chance=chance if cfg.rung_min_samples else None)
            if stop is not None and not last:
                # a journaled stop keeps the shifts it named (a resumed run makes the same decision, even
                # if its float rounding would rank them otherwise); a fresh stop's are the ranking's
                named = [t for t in ranked if any(shift_key(t) == shift_key(k) for k in stop.get("kept") or [])]
                if len(named) == keep_n:
                    keep = named
                stop["kept"] = sorted(keep)
            rungs_out.append({"rung": r, "steps": n_r, "fraction": round(n_r / total, 6), "candidates": list(alive),
                              "kept": sorted(keep) if not last else [],
                              "scores": {shift_key(t): _mean_or_none(scores.get(shift_key(t), [])) for t in alive},
                              "samples": n_r * cfg.batch_size, "decision": decision,
                              **({"planned_steps": n_plan, "stopped_early": stop} if cfg.stop_when_stable else {})})
            if last:
                break
            n_out = sum(1 for t in alive if t not in keep) * len(seeds)
            k_out = 0
            for t in alive:
                if t in keep:
                    continue
                for seed in seeds:  # eliminated here: its record is its score at this rung
                    key = (shift_key(t), seed)
                    k_out += 1
                    pr.call("transition", r, k_out, n_out)  # progress between rungs (issue 22)
                    if key in final:
                        continue
                    ck = candidate_key(t, seed, ctx.config_hash)
                    rec = rung_recs.get((*ck, n_r))
                    if rec is not None and rec.get("eliminated"):
                        res = CandidateResult.from_json(rec["result"])
                        res.resumed = True
                    else:
                        res = current[key]
                        got = store.get(key)
                        res = finish_eliminated(t, seed, r, res, got[1] if got is not None and got[0] == n_r else None)
                        res.rung, res.rung_scores = r, list(rung_scores.get(key, []))
                        if journal is not None:
                            journal.append_rung(t, seed, ctx.config_hash, rung=r, steps=n_r, result=res.to_json(),
                                                eliminated=True, stop=stop)
                    res.rung, res.rung_scores = r, list(rung_scores.get(key, []))
                    final[key] = res
                    store.drop(key)
            alive = [t for t in alive if t in keep]
            if not alive:
                break
            prev = n_r
            r += 1
    finally:
        trainer.progress = None
    store.close()
    results = [final[(shift_key(s), seed)] for seed in seeds for s in shifts if (shift_key(s), seed) in final]
    summary = summarise(results, shifts=shifts, seeds=seeds, sites=[s.name for s in ctx.sites], config=cfg.to_json(),
                        config_hash=ctx.config_hash, metric=cfg.metric, seconds=time.perf_counter() - t0)
    summary.checkpoint, summary.notes = _checkpoint_json(ctx), list(getattr(ctx, "notes", []))
    summary.normalisation = getattr(ctx, "normalisation", None)
    summary.schedule = {"name": "halving", "eta": cfg.eta, "min_fraction": cfg.min_fraction, "rung_steps": plan,
                        "rung_min_samples": cfg.rung_min_samples}
    extended = [x for x in rungs_out if (x.get("decision") or {}).get("action") == "extended"]
    nonlast = rungs_out[:-1]
    if len(plan) == 1 or (nonlast and len(extended) == len(nonlast)):
        why = plan_note if len(plan) == 1 else "every rung's scores were at chance: " + extended[-1]["decision"]["why"]
        summary.schedule["fallback"] = f"full: {why}"
    if plan_note and len(plan) > 1:
        summary.schedule["plan_note"] = plan_note
    if cfg.stop_when_stable:
        summary.schedule.update({"stop_when_stable": True, "stable_fraction": cfg.stable_fraction, "stable_z": STABLE_Z})
    summary.rungs = rungs_out
    summary.cost = {**_cost(results, len(shifts) * len(seeds)), "full_grid_candidate_steps": total * len(shifts) * len(seeds),
                    "trained_steps_this_run": trained_steps}
    if cfg.stop_when_stable:
        summary.cost["steps_saved_by_stable_stop"] = sum((x.get("stopped_early") or {}).get("steps_saved", 0)
                                                         for x in rungs_out)
    cs = summary.cost["candidate_steps"]
    summary.cost["ratio"] = round(cs / summary.cost["full_grid_candidate_steps"], 4) if cs is not None else None
    # wall time of this run next to the step ratio: the full grid's is estimated from this run's own
    # seconds per training step (first steps of a compiled runner excluded) times its candidate steps
    wall = time.perf_counter() - t0
    clock = getattr(trainer, "step_clock", None)
    summary.cost["wall_seconds"] = round(wall, 3)
    if clock is not None and clock[0] > clock0[0]:
        per_step = (clock[1] - clock0[1]) / (clock[0] - clock0[0])
        est = per_step * summary.cost["full_grid_candidate_steps"]
        summary.cost["full_grid_seconds_estimate"] = round(est, 3)
        summary.cost["wall_ratio_estimate"] = round(wall / est, 4) if est > 0 else None
    if out_dir is not None:
        from .report import write_report

        summary.out_dir = str(out_dir)
        summary.files = write_report(summary, out_dir)
    return summary


def _alive_count(k: int, eta: float, rung: int) -> int:
    n = k
    for _ in range(rung):
        n = survivors(n, eta)
    return n


def _mean_or_none(vals: list[float | None]) -> float | None:
    """The mean over seeds; None when any seed failed (a failed candidate does not continue)."""
    if not vals or any(v is None for v in vals):
        return None
    return sum(vals) / len(vals)


# ------------------------------------------------------------------------------ --compile auto


def expected_steps(cfg: SearchConfig, total: int) -> int:
    """Training steps the schedule will run (all candidates, all seeds, nothing resumed)."""
    k, s = len(cfg.shifts), len(cfg.seeds)
    if cfg.schedule != "halving":
        return k * s * total
    plan, prev, n = rung_steps(total, cfg.eta, cfg.min_fraction, rung_min_steps(cfg)), 0, 0
    for r, steps in enumerate(plan):
        n += _alive_count(k, cfg.eta, r) * s * (steps - prev)
        prev = steps
    return n


def _choose_step_path(ctx: _Context, cfg: SearchConfig):
    """``--compile auto``: decide compiled vs eager and the memory format before the first
    candidate (``bnnshift.train.choose_step_path``); None for ``--compile on/off``."""
    from .shift import insert_shifts
    from .train import DefaultTrainer, StepPathChoice, choose_step_path

    trainer = ctx.trainer
    if cfg.compile != "auto" or not isinstance(trainer, DefaultTrainer):
        return None
    steps = expected_steps(cfg, trainer.num_steps())
    has_conv = any(isinstance(m, nn.Conv2d) for m in ctx.loaded.model.modules()) if ctx.loaded else False
    if steps < 50:
        choice = StepPathChoice(compile=False, channels_last=trainer.channels_last,
                                reason=f"eager: only {steps} steps, too few to pay back a compile", expected_steps=steps)
    else:
        x, y = _step_batch(trainer, cfg)
        bs = int(x.shape[0])

        def build() -> nn.Module:
            m = ctx.factory(cfg.seeds[0])
            insert_shifts(m, ctx.sites, {s.name: 0.0 for s in ctx.sites})
            return m.to(device=x.device, dtype=x.dtype)

        key = hashlib.sha256(json.dumps([cfg.model, cfg.model_args, cfg.checkpoint, list(ctx.input_shape or ()), bs,
                                         cfg.dtype, str(x.device), cfg.optimizer, torch.__version__],
                                        sort_keys=True, default=str).encode()).hexdigest()[:16]
        choice = choose_step_path(cfg, build, x[:bs], y[:bs], expected_steps=steps, has_conv=has_conv, key=key)
    _set_path(ctx, "on" if choice.compile else "off", choice.channels_last)
    return choice


def _step_batch(trainer: Any, cfg: SearchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch (inputs, labels) on the training device for ``--compile auto``'s
    measurement: the first ``--batch-size`` samples in memory, or, streaming, the first batch the
    training loader yields in the first seed's order (train transform, this rank's shard): the
    trainer's ``train_x`` holds only the probe samples then, fewer than a batch for large images."""
    if getattr(trainer, "stream", None) is None:
        bs = min(cfg.batch_size, int(trainer.train_x.shape[0]))
        return trainer.train_x[:bs], trainer.train_y[:bs]
    dev, dt = trainer.train_x.device, trainer.train_x.dtype
    sampler = trainer.stream.sampler
    sampler.set_order(cfg.seeds[0], steps=1)
    try:
        xb, yb = next(iter(trainer.stream.loader))
    except StopIteration:
        raise DataError("the training stream yields no batch", hint="lower --batch-size or add samples") from None
    return xb.to(device=dev, dtype=dt), yb.to(dev)


def _set_path(ctx: _Context, compile_mode: str | None, channels_last: bool) -> None:
    trainer = ctx.trainer
    trainer.compile_mode = compile_mode
    if trainer.channels_last != channels_last:
        trainer.channels_last = channels_last
        if ctx.model is not None:
            ctx.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _record_compile(ctx: _Context, choice, summary: SearchSummary, clock0: list) -> None:
    """After a compiled search: remember its compile time and compiled step time for next time."""
    from .train import record_compile

    if not (choice.compile and choice.key and summary.compiled and summary.compile_seconds):
        return
    steps = ctx.trainer.step_clock[0] - clock0[0]
    secs = ctx.trainer.step_clock[1] - clock0[1]
    if steps > 0:
        record_compile(choice.key, compile_seconds=summary.compile_seconds, compiled_step_seconds=secs / steps)


def search(cfg: SearchConfig, *, out_dir: str | Path | None = None, resume: bool = False, force: bool = False,
           progress: Any = None, patch_out: str | Path | None = None) -> SearchSummary:
    """Run every (shift, seed) candidate of ``cfg`` with the default trainer.

    ``out_dir``: journal + search.json/.md/.png (atomic). ``resume`` reuses finished candidates
    of the same config_hash from the journal. ``progress``: an object with optional methods
    ``start(shift, seed, i, n)``, ``step(done, total)``, ``end(result, i, n)``, ``skip(result, i, n)``
    and, with ``--schedule halving``, ``rung(rung, n_rungs, steps, epoch_steps)`` at each rung.
    ``patch_out``: write the patched model with the winning shift (``bnnshift.patch``).
    Raises ``TrainingError`` (exit 1) after writing the report if every candidate failed.
    Under ``torchrun`` every rank trains each candidate with DDP (:mod:`bnnshift.parallel`).
    """
    from .parallel import launched_by_torchrun

    if launched_by_torchrun():
        return _search_ranks(cfg, out_dir=out_dir, resume=resume, force=force, progress=progress, patch_out=patch_out)
    with OutputLock(out_dir):  # one owner per --out: a second search is refused before any work
        return _search_owned(cfg, out_dir=out_dir, resume=resume, force=force, progress=progress,
                             patch_out=patch_out)


PREFLIGHT_RECALIB_BATCHES = 2  # BN statistics re-estimated on this many batches before the pre-flight probe


def preflight_degenerate(ctx: _Context, shifts: Sequence[float], seed: int) -> dict[float, list[str]]:
    """Before the first candidate (issue 22): the sites each shift makes constant at ``seed``'s
    initial weights, ``{shift: [site names]}`` (only shifts with a constant site).

    The same check as a finished candidate's ``degenerate`` (+1 share exactly 0 or 1 on the probe
    batch, after BN statistics are re-estimated, here on ``PREFLIGHT_RECALIB_BATCHES`` batches),
    on a throwaway copy of the patched model. {} when the search has no probe batch."""
    from .probe import probe_sites
    from .shift import insert_shifts
    from .train import recalibrate_bn

    if ctx.probe_x is None or not ctx.sites:
        return {}
    model = ctx.factory(seed)
    insert_shifts(model, ctx.sites, {s.name: 0.0 for s in ctx.sites})
    model.to(device=ctx.probe_x.device, dtype=ctx.probe_x.dtype)
    init = _clone_state(model)
    out: dict[float, list[str]] = {}
    for t in dict.fromkeys(float(v) for v in shifts):
        model.load_state_dict(init)
        _set_shift(model, t)
        if ctx.recalib_x is not None and len(ctx.recalib_x):  # a list of batches, or streamed (eval_batches)
            recalibrate_bn(model, ctx.recalib_x, max_batches=PREFLIGHT_RECALIB_BATCHES)
        res = probe_sites(model, ctx.sites, [ctx.probe_x], update=False, device=ctx.probe_x.device)
        dead = constant_sites({name: r.get("plus_fraction") for name, r in res.items()})
        if dead:
            out[t] = dead
    return out


def _preflight(ctx: _Context, cfg: SearchConfig) -> list[str]:
    """Stop a search whose every candidate would be degenerate (UsageError, exit 2, before any
    training or output); otherwise the warning lines for the shifts that would be."""
    from .scan import producer_range

    dead = preflight_degenerate(ctx, cfg.shifts, cfg.seeds[0])
    if not dead:
        return []
    sites = sorted({n for v in dead.values() for n in v})
    if len(dead) == len(dict.fromkeys(float(v) for v in cfg.shifts)):
        by_name = {s.name: s for s in ctx.sites}
        rngs = [r for r in (producer_range(by_name[n]) for n in sites if n in by_name) if r is not None]
        rngs += [(by_name[n].preact["min"], by_name[n].preact["max"]) for n in sites
                 if n in by_name and producer_range(by_name[n]) is None and by_name[n].preact
                 and by_name[n].preact.get("min") is not None]
        where = f"; its pre-activation lies in [{rngs[0][0]:.3g}, {rngs[0][1]:.3g}]" if rngs else ""
        raise UsageError(f"every shift of --shifts makes {', '.join(sites[:4])} constant at the initial weights "
                         f"(+1 share 0 or 1 on the probe batch): no candidate could learn or be ranked{where}",
                         hint="pick shifts inside the pre-activation's range (bnnshift scan shows it)")
    return [f"before training: t = {', '.join(f'{t:g}' for t in dead)} make{'s' if len(dead) == 1 else ''} "
            f"{', '.join(sites[:4])} constant at the initial weights: those candidates would be degenerate"]


def _search_owned(cfg: SearchConfig, *, out_dir, resume: bool, force: bool, progress: Any,
                  patch_out) -> SearchSummary:
    ctx = _context(cfg)
    pre = _preflight(ctx, cfg)
    saved = (getattr(ctx.trainer, "compile_mode", None), getattr(ctx.trainer, "channels_last", False))
    try:
        choice = _choose_step_path(ctx, cfg)
        clock0 = list(ctx.trainer.step_clock) if choice is not None else [0, 0.0]
        if cfg.schedule == "halving":
            summary = _halving_loop(ctx, cfg, out_dir=out_dir, resume=resume, force=force, progress=progress)
        else:
            summary = _loop(ctx, shifts=list(cfg.shifts), seeds=list(cfg.seeds), metric=cfg.metric,
                            config=cfg.to_json(), out_dir=out_dir, resume=resume, force=force, progress=progress,
                            train_one_epoch=None, step_progress_target=ctx.trainer)
            summary.schedule = {"name": "full"}
    finally:  # run_candidate (distributed workers) keeps cfg.compile's own meaning
        if isinstance(saved[0], (str, type(None))) and hasattr(ctx.trainer, "compile_mode"):
            _set_path(ctx, *saved)
    if choice is not None:
        summary.step_path = choice.to_json()
        _record_compile(ctx, choice, summary, clock0)
        if summary.out_dir:
            from .report import write_report

            summary.files = write_report(summary, summary.out_dir)
    summary.warnings = search_warnings(ctx.sites, summary.candidates, list(cfg.shifts), ctx.warnings) + pre
    _finish(summary, ctx, patch_out, force=force, cfg=cfg)
    return summary


def _search_ranks(cfg: SearchConfig, *, out_dir, resume: bool, force: bool, progress: Any,
                  patch_out) -> SearchSummary:
    """:func:`search` as one rank of a torchrun job: rank 0 writes the journal and the report; the
    other ranks run the same loop on a private copy of rank 0's journal (same candidates skipped
    on --resume) in a temporary directory; all ranks check they agree."""
    import shutil
    import tempfile

    from .parallel import agree, barrier, broadcast_object, init_from_env

    if cfg.schedule == "halving" and resume:
        raise UsageError("--resume of a --schedule halving search under torchrun is not supported "
                         "(paused states live on rank 0 only)", hint="resume it in one process, or use --schedule full")
    info = init_from_env(cfg.device)
    ctx = _context(cfg)
    agree([[shift_key(v) for v in cfg.shifts], list(cfg.seeds), ctx.config_hash], "the candidates and the configuration")
    pre = _preflight(ctx, cfg)  # the same data and weights on every rank: all stop or none
    # --compile auto: rank 0 measures and decides, every rank trains the same way
    choice = _choose_step_path(ctx, cfg) if info.is_main else None
    path = broadcast_object((choice.compile, choice.channels_last) if choice is not None else None)
    if path is not None:
        _set_path(ctx, "on" if path[0] else "off", path[1])
    journal_text = None
    if info.is_main and resume and out_dir is not None and (Path(out_dir) / JOURNAL_NAME).is_file():
        journal_text = (Path(out_dir) / JOURNAL_NAME).read_text(encoding="utf-8", errors="replace")
    journal_text = broadcast_object(journal_text)
    tmp = None
    my_out, my_patch = out_dir, patch_out
    if not info.is_main:
        tmp = Path(tempfile.mkdtemp(prefix=f"bnnshift-rank{info.rank}-"))
        if out_dir is not None and journal_text:
            (tmp / JOURNAL_NAME).write_text(journal_text, encoding="utf-8")
        my_out, my_patch, progress = (tmp if out_dir is not None else None), None, None
    try:
        if cfg.schedule == "halving":
            summary = _halving_loop(ctx, cfg, out_dir=my_out, resume=resume, force=force or not info.is_main,
                                    progress=progress)
        else:
            summary = _loop(ctx, shifts=list(cfg.shifts), seeds=list(cfg.seeds), metric=cfg.metric,
                            config=cfg.to_json(), out_dir=my_out, resume=resume, force=force or not info.is_main,
                            progress=progress, train_one_epoch=None, step_progress_target=ctx.trainer)
            summary.schedule = {"name": "full"}
        agree([[shift_key(c.shift), c.seed, c.status, c.score] for c in summary.candidates], "the candidates' scores")
        summary.warnings = search_warnings(ctx.sites, summary.candidates, list(cfg.shifts), ctx.warnings) + pre
        _finish(summary, ctx, my_patch, force=force, cfg=cfg)
        barrier()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if not info.is_main:
        summary.out_dir, summary.files = None, {}
    return summary


def search_warnings(sites: Sequence[Site], candidates: Sequence[CandidateResult], shifts: Sequence[float],
                    scan_warnings: Sequence[str] = ()) -> list[str]:
    """What makes a search's ranking lossy: layers that cannot learn (no STE), grid points outside
    a site's bounded range (hardtanh, clamp, tanh, sigmoid, ReLU) and degenerate candidates."""
    from .scan import producer_range

    out = list(scan_warnings)
    for s in sites:
        rng = producer_range(s)
        if rng is None:
            continue
        outside = [t for t in shifts if not rng[0] < t < rng[1]]
        if outside:
            out.append(f"shifts {', '.join(f'{t:g}' for t in outside)} lie outside ({rng[0]:g}, {rng[1]:g}), the "
                       f"range {s.producer} leaves the pre-activation of {s.name} in: there the site is constant")
    for c in candidates:
        if c.degenerate:
            out.append(f"t = {c.shift:g} (seed {c.seed}) is degenerate: constant sites {', '.join(c.degenerate)}")
    return out


def search_with(model_factory: Callable[..., nn.Module], train_one_epoch: Callable[..., Any],
                shifts: Iterable[float] | str, seeds: Iterable[int] = (0,), *, input_shape: Sequence[int],
                sites: Sequence[Site] | None = None, out_dir: str | Path | None = None, resume: bool = False,
                force: bool = False, metric: str = "score", config: dict[str, Any] | None = None,
                probe_batches: torch.Tensor | None = None, hardtanh: bool = False, reuse_model: bool = True,
                progress: Any = None, patch_out: str | Path | None = None, name: str = "model") -> SearchSummary:
    """The search around YOUR training code.

    ``model_factory()`` (or ``model_factory(seed=...)``) builds the model; it is called under
    ``torch.manual_seed(seed)`` and every candidate of a seed starts from that same state_dict.
    ``train_one_epoch(model, *, seed, shift) -> float | dict`` trains the patched model (all
    sites shifted by ``shift``) and returns its score, or a dict with ``score`` and/or
    ``train_acc``, ``last_acc``, ``val_acc``, ``loss``, ``failed_step``, ``error`` (other plain
    values land in ``extra``). ``sites`` default to a scan of the model (its hardtanh with
    ``hardtanh=True``). ``config`` (JSON-able) is hashed into the journal key: put there what
    changes a score (LR, data...). ``probe_batches``: inputs for the end +1 shares.
    ``reuse_model=False`` builds a fresh model per candidate (for training code that rewraps
    the model, e.g. DDP). Returns a :class:`SearchSummary`.
    """
    shifts = parse_shifts(shifts)
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise UsageError("no seeds")
    shape = tuple(int(v) for v in input_shape)
    if len(shape) == 4:
        shape = shape[1:]
    factory = _as_factory(model_factory)
    config = dict(config or {})
    probe = probe_batches
    if sites is None:
        m0 = factory(seeds[0])
        batch = [probe.to(torch.float32).cpu()] if probe is not None else None
        sites = _find_sites(m0, shape, hardtanh=hardtanh, name=name, batches=batch)
    h = hashlib.sha256()
    h.update(json.dumps({"config": config, "input_shape": list(shape), "sites": [s.name for s in sites],
                         "metric": metric, "factory": getattr(model_factory, "__qualname__", str(model_factory)),
                         "trainer": getattr(train_one_epoch, "__qualname__", type(train_one_epoch).__name__)},
                        sort_keys=True, default=str).encode())
    ctx = _Context(model=None, sites=list(sites), factory=factory, trainer=train_one_epoch,
                   config_hash=h.hexdigest()[:16], input_shape=shape, probe_x=probe,
                   recalib_x=[probe] if probe is not None else [], fresh_model=not reuse_model, name=name)
    full_config = {"library": True, "input_shape": list(shape), "metric": metric, **config}
    with OutputLock(out_dir):
        summary = _loop(ctx, shifts=shifts, seeds=seeds, metric=metric, config=full_config, out_dir=out_dir,
                        resume=resume, force=force, progress=progress, train_one_epoch=train_one_epoch,
                        step_progress_target=None)
        _finish(summary, ctx, patch_out, force=force, cfg=None)
    return summary


def _finish(summary: SearchSummary, ctx: _Context, patch_out, *, force: bool, cfg: SearchConfig | None) -> None:
    if patch_out is not None and summary.winner is not None:
        from .report import write_patched

        summary.patch_out = str(write_patched(ctx, summary, patch_out, force=force, cfg=cfg))
        if summary.out_dir:
            from .report import write_report

            summary.files = write_report(summary, summary.out_dir)
    if summary.all_failed:
        first = next((c for c in summary.candidates if c.error), None)
        raise TrainingError(f"all {len(summary.candidates)} candidates failed"
                            + (f" (first: t={first.shift:g}: {first.error})" if first else ""),
                            hint="lower --lr or check the model; the report lists each failure")
