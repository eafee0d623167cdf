"""One candidate: the patched model at a seed's initial state, shifted, trained, measured."""
from __future__ import annotations

import copy
import json
import math
import time
from typing import Any, Callable

import torch
from torch import nn

from ..errors import TrainingError, UsageError
from .config import SearchConfig
from .context import SearchContext, init_hash
from .results import CandidateResult
from .schedule import rung_steps


def _shared_model(ctx: SearchContext, seed: int) -> nn.Module:
    """The patched model at the initial state of ``seed`` (weights and thresholds reset)."""
    from ..shift import insert_shifts

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
    from ..shift import get_thresholds

    with torch.no_grad():
        for t in get_thresholds(model).values():
            t.fill_(float(shift))


def _measure_after(ctx: SearchContext, model: nn.Module) -> tuple[dict[str, float | None], float | None]:
    """+1 share per site at the end and held-out accuracy, on a copy with re-estimated BN stats
    (the trained model itself is not touched: its hooks stay as compiled)."""
    from ..probe import probe_sites
    from ..train import evaluate, recalibrate_bn

    probe_model = copy.deepcopy(model)
    if ctx.recalib_x:
        recalibrate_bn(probe_model, ctx.recalib_x)
    plus: dict[str, float | None] = {}
    if ctx.probe_x is not None:
        res = probe_sites(probe_model, ctx.sites, [ctx.probe_x], update=False, device=ctx.probe_x.device)
        plus = {name: r.get("plus_fraction") for name, r in res.items()}
    val_acc = None
    if ctx.val is not None:
        from ..load import logits_picker

        val_acc = evaluate(probe_model, ctx.val[0], ctx.val[1],
                           pick=logits_picker(getattr(ctx.trainer.cfg, "output_index", None),
                                              getattr(ctx.trainer.cfg, "output_key", None))
                           if hasattr(ctx.trainer, "cfg") else None)
    return plus, val_acc


def _result_from(out: Any, *, shift: float, seed: int, ctx: SearchContext, metric: str,
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


def _run_in_context(ctx: SearchContext, shift: float, seed: int, metric: str,
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


def _measure_on_main(ctx: SearchContext, model: nn.Module) -> tuple[dict[str, float | None], float | None, str | None]:
    """``_measure_after`` (+1 shares, held-out accuracy) and the probe error, if any, computed on
    rank 0 only: under torchrun the other ranks skip the probes and the ``--val`` pass and get rank
    0's values (``parallel.broadcast_object``). Every rank holds the same model after training
    (DDP gradients, ``sync_buffers``), so the values are those of one process; computing them on
    every rank would only repeat the work. A probe problem must not lose the training."""
    from ..parallel import broadcast_object, dist_info

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


def _record_probes(r: CandidateResult, plus: dict[str, float | None], error: str | None) -> None:
    """The +1 shares per site into ``r``: their mean, the constant (degenerate) sites, a probe error."""
    if error is not None:
        r.extra["probe_error"] = error
    r.plus_fraction = plus
    r.degenerate = constant_sites(plus)
    vals = [v for v in plus.values() if v is not None]
    r.plus_fraction_mean = sum(vals) / len(vals) if vals else None


def _finish_candidate(ctx: SearchContext, model: nn.Module, r: CandidateResult, metric: str) -> None:
    """The end-of-training measurements of a finished candidate: +1 shares, held-out accuracy."""
    plus, val_acc, error = _measure_on_main(ctx, model)
    _record_probes(r, plus, error)
    if val_acc is not None:
        r.val_acc = val_acc
        if metric == "val_acc":
            r.score = val_acc


def run_candidate(cfg: SearchConfig, shift: float, seed: int, *, model_factory: Callable | None = None,
                  train_one_epoch: Callable | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  at_rung: Callable[[int, int, float], bool] | None = None,
                  context: SearchContext | None = None) -> CandidateResult:
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

    ``context``: a :class:`SearchContext` opened for ``cfg`` (``SearchContext.open(cfg)``) and
    kept by the caller, so the data, the scan and the patched model (and its compiled step) are
    built once for many candidates; without it each call opens its own. ``UsageError`` when it was
    opened for another configuration.
    """
    if context is None:
        ctx = SearchContext.open(cfg)
    else:
        context.check_config(cfg)
        ctx = context
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


def _run_with_rungs(ctx: SearchContext, cfg: SearchConfig, shift: float, seed: int,
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


def _as_factory(model_factory: Callable) -> Callable[[int], nn.Module]:
    from ..train import signature_accepts

    takes_seed = signature_accepts(model_factory, "seed")

    def factory(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        m = model_factory(seed=seed) if takes_seed else model_factory()
        if not isinstance(m, nn.Module):
            raise UsageError(f"model_factory returned {type(m).__name__}, not an nn.Module")
        return m

    return factory
