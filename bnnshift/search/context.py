"""One configuration's shared state: data, the scanned sites, the trainer, the patched model
and the journal's config hash."""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .. import validate
from .._io import sha256_state_dict
from ..errors import DataError, NoSitesError, UsageError
from ..sites import Site
from .config import SearchConfig

PROBE_SAMPLES = 512  # training samples for the end-of-epoch +1 shares


def _dtype(cfg: SearchConfig) -> torch.dtype:
    return torch.float64 if cfg.dtype == "float64" else torch.float32


def _device(cfg: SearchConfig) -> torch.device:
    from ..parallel import resolve_device
    from ..train import check_precision

    dev = resolve_device(cfg.device)
    check_precision(cfg.precision, dev, cfg.dtype)
    return dev


def init_hash(model: nn.Module) -> str:
    """sha256 of a model's state_dict without bnnshift's threshold buffers."""
    from ..shift import THRESHOLD_PREFIX

    sd = {k: v for k, v in model.state_dict().items() if THRESHOLD_PREFIX not in k}
    return sha256_state_dict(sd)


@dataclass
class SearchContext:
    """One configuration's shared state: the data on the training device, the scanned sites, the
    trainer, one patched model reused by every candidate (weights and thresholds reset between
    them) and the journal's ``config_hash``.

    Owned by its caller: :meth:`open` builds one (loads the data, builds and scans the model);
    pass it to :func:`~bnnshift.search.run_candidate` / :func:`~bnnshift.search.search`
    (``context=``) to reuse it; nothing is cached in the module, so dropping it frees the data and
    the models. ``model``: the patched model (None until the first candidate); ``sites``: the
    scan's sites (``bnnshift.sites.Site``); ``factory(seed) -> nn.Module``: a fresh model under
    ``torch.manual_seed(seed)``; ``trainer``: ``DefaultTrainer`` or the user's
    ``train_one_epoch``; ``input_shape``: ``(C, H, W)``; ``probe_x``: ``(N, C, H, W)`` inputs of
    the end-of-candidate probes (float32 / float64, the training device); ``recalib_x``: batches
    for BN re-estimation; ``val``: held-out ``(inputs, labels)``; ``key``: the configuration it
    was opened for (:func:`config_key`).
    """

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
    key: str | None = None  # config_key() of the SearchConfig it was opened for; None: search_with's
    # what config_hash was made of besides the config: {data_fingerprint, checkpoint_sha256, input_shape}
    hash_parts: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, cfg: SearchConfig) -> "SearchContext":
        """Load ``cfg``'s data, build and scan its model (thresholds at 0 when patched). Raises
        ``DataError`` (data/model mismatch, no --val split), ``UsageError`` (bad input shape, fewer
        than 2 classes), ``NoSitesError`` (nothing to shift)."""
        return _open(cfg)

    @property
    def total_steps(self) -> int:
        """Training steps of one candidate (the default trainer's epoch or ``cfg.steps``)."""
        return int(self.trainer.num_steps())

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    def check_config(self, cfg: SearchConfig) -> None:
        """``UsageError`` (exit 2) when this context was opened for another configuration: a
        candidate must never train on the data or model of another one."""
        if self.key is not None and config_key(cfg) != self.key:
            raise UsageError("this SearchContext was opened for another configuration",
                             hint="open one per configuration: SearchContext.open(cfg)")


def config_key(cfg: SearchConfig) -> str:
    """What a context depends on: every field but the grid and the schedule (JSON, sorted)."""
    d = cfg.to_json()
    for k in ("shifts", "seeds", "schedule", "eta", "min_fraction", "stop_when_stable", "stable_fraction",
              "rung_min_samples"):
        d.pop(k, None)
    return json.dumps(d, sort_keys=True, default=str)


def _hash_parts(data_fingerprint: str, loaded: Any, shape: tuple[int, ...]) -> dict[str, Any]:
    """The inputs of ``SearchConfig.config_hash`` that come from the data and the model."""
    return {"data_fingerprint": data_fingerprint, "checkpoint_sha256": loaded.checkpoint_sha256, "input_shape": shape}


def _load_bundle(cfg: SearchConfig, shape: tuple[int, ...], model: nn.Module | None = None):
    """The in-memory data set, normalised with ``--mean/--std``, else a timm model's
    ``pretrained_cfg``, else the data set's default (``bundle.norm_source`` says which)."""
    from ..data import load_data
    from ..data.norm import choose_normalisation, load_kwargs

    norm = choose_normalisation(cfg.mean, cfg.std, model=model)
    return load_data(cfg.data, input_shape=shape, train_limit=cfg.train_limit,
                     val_limit=(cfg.val_limit if cfg.val else 0), seed=0, download=cfg.download, **load_kwargs(norm))


def _open(cfg: SearchConfig) -> SearchContext:
    """:meth:`SearchContext.open`: load data, build and scan the model."""
    from ..data import batch_order_hash
    from ..source import open_model
    from ..train import DefaultTrainer, set_threads

    device, dtype = _device(cfg), _dtype(cfg)
    set_threads(device.type)
    from ..data import parse_data_spec

    parse_data_spec(cfg.data)  # a bad spec fails before the model is built
    torch.manual_seed(0)
    opened = open_model(_source(cfg), cfg.data)  # docs/checkpoints.md: input shape
    loaded, shape, notes = opened.loaded, opened.shape, opened.notes
    if len(shape) != 3:
        raise UsageError(f"input shape {shape} is not C,H,W", hint="search trains on images: pass --input-shape C,H,W")
    validate.check_batch_norm_batch(loaded.model, cfg.batch_size)
    validate.check_input_memory(shape, cfg.batch_size)
    from ..data.stream import should_stream

    if should_stream(cfg.stream, cfg.data, cfg.augment, shape):
        ctx = _stream_context(cfg, loaded, shape, device, dtype)
        ctx.notes = notes
        return ctx
    bundle = _load_bundle(cfg, shape, loaded.model)
    if bundle.inputs:  # several inputs per sample, packed: the model unpacks them (bnnshift.data.multi)
        from ..data.multi import check_dtype, install_unpack

        check_dtype(bundle.inputs, dtype)
        install_unpack(loaded.model, bundle.inputs)
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
        model = _load(cfg).model
        if bundle.inputs:
            install_unpack(model, bundle.inputs)
        return model

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
    n, bs, steps = int(train_x.shape[0]), cfg.batch_size, trainer.num_steps()
    rg = torch.Generator().manual_seed(12345)
    recalib = [train_x[torch.randperm(n, generator=rg)[:bs]] for _ in range(max(0, cfg.bn_recalib_batches))]
    parts = _hash_parts(bundle.fingerprint(), loaded, shape)
    ctx = SearchContext(
        normalisation=bundle.normalisation_json(),
        model=None, sites=[], factory=factory, trainer=trainer, key=config_key(cfg),
        config_hash=cfg.config_hash(**parts), hash_parts=parts,
        input_shape=shape, probe_x=train_x[:PROBE_SAMPLES], recalib_x=recalib,
        val=((bundle.val_x.to(device=device, dtype=dtype), bundle.val_y.to(device)) if cfg.val else None),
        batch_hash=lambda seed: batch_order_hash(n, bs, seed=seed, steps=steps),
        name=loaded.spec.canonical(), loaded=loaded, notes=notes)
    ctx.sites = _find_sites(loaded.model, shape, hardtanh=cfg.hardtanh, name=ctx.name, notes=ctx.warnings,
                            batches=[train_x[:256].to(torch.float32).cpu()])
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
                    dtype: torch.dtype) -> SearchContext:
    """The context of a streamed data set (bnnshift.data.stream): DataLoader workers decode and
    augment; probes, BN re-estimation and --val stream through the eval transform."""
    from ..data.stream import SeededBatchSampler, StreamOptions, eval_batches, make_loader, open_stream
    from ..parallel import dist_info
    from ..train import DefaultTrainer, StreamTrain

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
    parts = _hash_parts(src.fingerprint(), loaded, shape)
    ctx = SearchContext(normalisation=src_norm, model=None, sites=[], factory=lambda seed: _build(cfg, seed), trainer=trainer,
                   config_hash=cfg.config_hash(**parts), hash_parts=parts,
                   key=config_key(cfg), input_shape=shape, probe_x=probe_x, recalib_x=recalib,
                   val=val, name=loaded.spec.canonical(), loaded=loaded)
    ctx.sites = _find_sites(loaded.model, shape, hardtanh=cfg.hardtanh, name=ctx.name,
                            batches=[probe_x[:256].to(torch.float32).cpu()])
    return ctx


def _build(cfg: SearchConfig, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return _load(cfg).model


def _checkpoint_json(ctx: "SearchContext") -> dict[str, Any] | None:
    loaded = getattr(ctx, "loaded", None)
    return loaded.checkpoint_json() if loaded is not None and hasattr(loaded, "checkpoint_json") else None


def _source(cfg: SearchConfig):
    from ..source import ModelSource

    return ModelSource(cfg.model, args=cfg.model_args, checkpoint=cfg.checkpoint, input_shape=cfg.input_shape,
                       strict=cfg.strict, use_ema=cfg.use_ema, allow_nonfinite=cfg.allow_nonfinite)


def _load(cfg: SearchConfig):
    from ..load import load_model

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
    from ..load import pick_logits

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
    from ..scan import NO_SITES_HINT, scan_model

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
