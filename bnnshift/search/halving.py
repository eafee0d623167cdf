"""Successive halving over the shifts (``--schedule halving``)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .._io import prepare_output_dir
from ..errors import UsageError
from ..journal import JOURNAL_NAME, Journal, candidate_key, shift_key
from .aggregate import _cost, summarise
from .candidate import _finish_candidate, _measure_on_main, _result_from, _set_shift, _shared_model, constant_sites
from .config import SearchConfig
from .context import _checkpoint_json, _Context
from .progress import _Progress
from .results import CandidateResult, SearchSummary
from .schedule import STABLE_Z, _alive_count, _mean_or_none, _plan_note, rung_decision, rung_min_steps, rung_steps, stable_decision, stable_marks, survivors
from .states import _StateStore


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
        from ..report import write_report

        summary.out_dir = str(out_dir)
        summary.files = write_report(summary, out_dir)
    return summary
