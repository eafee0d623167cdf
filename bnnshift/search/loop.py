"""The search's entry points: :func:`search` (the CLI's: the default trainer, ``--schedule full``
or ``halving``, one process or torchrun ranks, the pre-flight check, ``--compile auto``) and
:func:`search_with` (the library's, around the user's ``train_one_epoch``). Both run the full
schedule through :func:`_loop` and open the journal with :func:`.outputs.open_journal`; ``search``
does not call ``search_with``. The package docstring (:mod:`bnnshift.search`) says how it is built."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..errors import TrainingError, UsageError
from ..journal import JOURNAL_NAME, OutputLock, candidate_key, shift_key
from ..sites import Site
from ..validate import parse_shifts
from .aggregate import summarise
from .candidate import _as_factory, _clone_state, _run_in_context, _set_shift, constant_sites
from .config import SearchConfig
from .context import SearchContext, _find_sites
from .halving import _halving_loop
from .outputs import attach_context, open_journal, write_outputs
from .progress import _Progress
from .results import CandidateResult, SearchSummary
from .schedule import Schedule
from .steppath import _choose_step_path, _record_compile, _set_path


def _loop(ctx: SearchContext, *, shifts: list[float], seeds: list[int], metric: str, config: dict[str, Any],
          out_dir: str | Path | None, resume: bool, force: bool, progress: Any,
          train_one_epoch: Callable | None, step_progress_target: Any) -> SearchSummary:
    t0 = time.perf_counter()
    setup = open_journal(out_dir, resume=resume, force=force, config_hash=ctx.config_hash)
    journal, done = setup.journal, setup.done
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
    attach_context(summary, ctx)
    write_outputs(summary, out_dir)
    return summary


def search(cfg: SearchConfig, *, out_dir: str | Path | None = None, resume: bool = False, force: bool = False,
           progress: Any = None, patch_out: str | Path | None = None,
           context: SearchContext | None = None) -> SearchSummary:
    """Run every (shift, seed) candidate of ``cfg`` with the default trainer.

    ``out_dir``: journal + search.json/.md/.png (atomic). ``resume`` reuses finished candidates
    of the same config_hash from the journal. ``progress``: an object with optional methods
    ``start(shift, seed, i, n)``, ``step(done, total)``, ``end(result, i, n)``, ``skip(result, i, n)``
    and, with ``--schedule halving``, ``rung(rung, n_rungs, steps, epoch_steps)`` at each rung.
    ``patch_out``: write the patched model with the winning shift (``bnnshift.patch``).
    Raises ``TrainingError`` (exit 1) after writing the report if every candidate failed.
    Under ``torchrun`` every rank trains each candidate with DDP (:mod:`bnnshift.parallel`).
    ``context``: a :class:`SearchContext` opened for ``cfg`` to reuse (data, scan, patched
    model); by default one is opened here and dropped when the search returns.
    """
    from ..parallel import launched_by_torchrun

    if launched_by_torchrun():
        return _search_ranks(cfg, out_dir=out_dir, resume=resume, force=force, progress=progress, patch_out=patch_out,
                             context=context)
    with OutputLock(out_dir):  # one owner per --out: a second search is refused before any work
        return _search_owned(cfg, out_dir=out_dir, resume=resume, force=force, progress=progress,
                             patch_out=patch_out, context=context)


PREFLIGHT_RECALIB_BATCHES = 2  # BN statistics re-estimated on this many batches before the pre-flight probe


def preflight_degenerate(ctx: SearchContext, shifts: Sequence[float], seed: int) -> dict[float, list[str]]:
    """Before the first candidate (issue 22): the sites each shift makes constant at ``seed``'s
    initial weights, ``{shift: [site names]}`` (only shifts with a constant site).

    The same check as a finished candidate's ``degenerate`` (+1 share exactly 0 or 1 on the probe
    batch, after BN statistics are re-estimated, here on ``PREFLIGHT_RECALIB_BATCHES`` batches),
    on a throwaway copy of the patched model. {} when the search has no probe batch."""
    from ..probe import probe_sites
    from ..shift import insert_shifts
    from ..train import recalibrate_bn

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


def _preflight(ctx: SearchContext, cfg: SearchConfig) -> list[str]:
    """Stop a search whose every candidate would be degenerate (UsageError, exit 2, before any
    training or output); otherwise the warning lines for the shifts that would be."""
    from ..scan import producer_range

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


def _open_for(cfg: SearchConfig, context: SearchContext | None) -> SearchContext:
    if context is None:
        return SearchContext.open(cfg)
    context.check_config(cfg)
    return context


def _search_owned(cfg: SearchConfig, *, out_dir, resume: bool, force: bool, progress: Any,
                  patch_out, context: SearchContext | None = None) -> SearchSummary:
    ctx = _open_for(cfg, context)
    pre = _preflight(ctx, cfg)
    saved = (getattr(ctx.trainer, "compile_mode", None), getattr(ctx.trainer, "channels_last", False))
    try:
        choice = _choose_step_path(ctx, cfg)
        clock0 = list(ctx.trainer.step_clock) if choice is not None else [0, 0.0]
        if cfg.schedule == Schedule.HALVING:
            summary = _halving_loop(ctx, cfg, out_dir=out_dir, resume=resume, force=force, progress=progress)
        else:
            summary = _loop(ctx, shifts=list(cfg.shifts), seeds=list(cfg.seeds), metric=cfg.metric,
                            config=cfg.to_json(), out_dir=out_dir, resume=resume, force=force, progress=progress,
                            train_one_epoch=None, step_progress_target=ctx.trainer)
            summary.schedule = {"name": Schedule.FULL.value}
    finally:  # run_candidate (distributed workers) keeps cfg.compile's own meaning
        if isinstance(saved[0], (str, type(None))) and hasattr(ctx.trainer, "compile_mode"):
            _set_path(ctx, *saved)
    if choice is not None:
        summary.step_path = choice.to_json()
        _record_compile(ctx, choice, summary, clock0)
        if summary.out_dir:
            from ..report import write_report

            summary.files = write_report(summary, summary.out_dir)
    summary.warnings = search_warnings(ctx.sites, summary.candidates, list(cfg.shifts), ctx.warnings) + pre
    _finish(summary, ctx, patch_out, force=force, cfg=cfg)
    return summary


def _search_ranks(cfg: SearchConfig, *, out_dir, resume: bool, force: bool, progress: Any,
                  patch_out, context: SearchContext | None = None) -> SearchSummary:
    """:func:`search` as one rank of a torchrun job: rank 0 writes the journal and the report; the
    other ranks run the same loop on a private copy of rank 0's journal (same candidates skipped
    on --resume) in a temporary directory; all ranks check they agree."""
    import shutil
    import tempfile

    from ..parallel import agree, barrier, broadcast_object, init_from_env

    if cfg.schedule == Schedule.HALVING and resume:
        raise UsageError("--resume of a --schedule halving search under torchrun is not supported "
                         "(paused states live on rank 0 only)", hint="resume it in one process, or use --schedule full")
    info = init_from_env(cfg.device)
    ctx = _open_for(cfg, context)
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
        if cfg.schedule == Schedule.HALVING:
            summary = _halving_loop(ctx, cfg, out_dir=my_out, resume=resume, force=force or not info.is_main,
                                    progress=progress)
        else:
            summary = _loop(ctx, shifts=list(cfg.shifts), seeds=list(cfg.seeds), metric=cfg.metric,
                            config=cfg.to_json(), out_dir=my_out, resume=resume, force=force or not info.is_main,
                            progress=progress, train_one_epoch=None, step_progress_target=ctx.trainer)
            summary.schedule = {"name": Schedule.FULL.value}
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
    from ..scan import producer_range

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
    ctx = SearchContext(model=None, sites=list(sites), factory=factory, trainer=train_one_epoch,
                   config_hash=h.hexdigest()[:16], input_shape=shape, probe_x=probe,
                   recalib_x=[probe] if probe is not None else [], fresh_model=not reuse_model, name=name)
    full_config = {"library": True, "input_shape": list(shape), "metric": metric, **config}
    with OutputLock(out_dir):
        summary = _loop(ctx, shifts=shifts, seeds=seeds, metric=metric, config=full_config, out_dir=out_dir,
                        resume=resume, force=force, progress=progress, train_one_epoch=train_one_epoch,
                        step_progress_target=None)
        _finish(summary, ctx, patch_out, force=force, cfg=None)
    return summary


def patch_out_warning(summary: SearchSummary) -> str | None:
    """The warning ``--patch-out`` adds when the shift it writes (the best mean score) is not ahead of
    t = 0 beyond the seed noise: a tie, too few seeds, or t = 0 not in the grid. None when the
    written shift is t = 0 or the verdict resolved it ahead of t = 0."""
    t = summary.winner
    if t is None or float(t) == 0.0 or summary.ahead_of_baseline:
        return None
    why = ("t = 0 is not in the grid, so nothing compares it with the model as it is"
           if summary.baseline is None else "it is not ahead of t = 0 beyond the seed noise")
    return (f"--patch-out wrote t = {float(t):g}, the best mean score, but {why}: treat it as a guess "
            "(rerun with more --seeds, or fine-tune t = 0 beside it)")


def _finish(summary: SearchSummary, ctx: SearchContext, patch_out, *, force: bool, cfg: SearchConfig | None) -> None:
    if patch_out is not None and summary.winner is not None:
        from ..report import write_patched

        summary.patch_out = str(write_patched(ctx, summary, patch_out, force=force, cfg=cfg))
        warning = patch_out_warning(summary)
        if warning:
            summary.warnings.append(warning)
        if summary.out_dir:
            from ..report import write_report

            summary.files = write_report(summary, summary.out_dir)
    if summary.all_failed:
        first = next((c for c in summary.candidates if c.error), None)
        raise TrainingError(f"all {len(summary.candidates)} candidates failed"
                            + (f" (first: t={first.shift:g}: {first.error})" if first else ""),
                            hint="lower --lr or check the model; the report lists each failure")
