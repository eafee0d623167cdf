"""Successive halving over the shifts (``--schedule halving``): :class:`HalvingLoop` trains the
rungs; the decisions (rung steps, survivors, stability, chance, ties) are the pure functions of
:mod:`bnnshift.search.schedule`, the paused states live in :mod:`bnnshift.search.states`."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..journal import candidate_key, shift_key
from .aggregate import step_cost, summarise
from .candidate import _finish_candidate, _measure_on_main, _record_probes, _result_from, _set_shift, _shared_model
from .config import SearchConfig
from .context import SearchContext
from .outputs import attach_context, open_journal, write_outputs
from .progress import _Progress
from .results import CandidateResult, SearchSummary
from .schedule import (STABLE_Z, Schedule, _alive_count, _mean_or_none, _plan_note, paired_gap, rung_decision,
                       rung_min_steps, rung_steps, stable_decision, stable_marks, survivors)
from .states import _StateStore

Key = tuple[str, int]  # (shift_key(t), seed): one candidate


class HalvingLoop:
    """Successive halving over the shifts (Jamieson & Talwalkar 2016; Li et al. 2017, Hyperband's
    inner loop): every shift trains to the first rung, the best ``ceil(n / eta)`` by the train
    accuracy accumulated so far (mean over seeds) continue from where they paused, until the
    survivors finish the epoch. Candidates stay paired: same init, same batches in the same order,
    so a survivor's score equals its full-search score (bitwise on the same machine).

    One object per run: ``HalvingLoop(ctx, cfg, out_dir=..., resume=..., force=..., progress=...).run()``
    returns the :class:`SearchSummary` (and writes the report with ``out_dir``)."""

    def __init__(self, ctx: SearchContext, cfg: SearchConfig, *, out_dir: str | Path | None, resume: bool,
                 force: bool, progress: Any):
        self.t0 = time.perf_counter()
        self.ctx, self.cfg, self.trainer, self.out_dir = ctx, cfg, ctx.trainer, out_dir
        self.shifts, self.seeds = list(cfg.shifts), list(cfg.seeds)
        setup = open_journal(out_dir, resume=resume, force=force, config_hash=ctx.config_hash, rungs=True)
        self.journal, self.done, self.rung_recs = setup.journal, setup.done, setup.rungs
        self.store = _StateStore(setup.out, fresh=not resume)
        self.recs_by_cand: dict[Key, dict[int, dict]] = {}
        for (sk, seed, _h, steps), rec in self.rung_recs.items():
            if not rec.get("eliminated"):
                self.store.known((sk, seed), steps, rec.get("state"))
            self.recs_by_cand.setdefault((sk, seed), {})[steps] = rec
        self.total = self.trainer.num_steps()
        self.plan = rung_steps(self.total, cfg.eta, cfg.min_fraction, rung_min_steps(cfg))
        self.plan_note = _plan_note(cfg, self.total)
        labels = getattr(self.trainer, "train_y", None)
        classes = int(labels.max()) + 1 if isinstance(labels, torch.Tensor) and labels.numel() else 0
        self.chance = 1.0 / classes if classes > 1 else None
        self.clock0 = list(getattr(self.trainer, "step_clock", [0, 0.0]))
        self.runs = list(self.plan)  # the rungs this run trains: an early-stopped last rung adds the winner's finish
        self.pr = _Progress(progress)
        self.alive = list(self.shifts)
        self.final: dict[Key, CandidateResult] = {}
        self.rung_scores: dict[Key, list[float]] = {}
        self.step_hist: dict[Key, tuple[list[int], list[int]]] = {}  # per-step (hits, seen): the rung's noise rule
        self.rungs_out: list[dict[str, Any]] = []
        self.trained_steps = 0
        self.n_total = sum(len(self.seeds) * _alive_count(len(self.shifts), cfg.eta, r) for r in range(len(self.plan)))
        self.i = 0  # the progress counter over every candidate of every rung

    # ------------------------------------------------------------------ the run

    def run(self) -> SearchSummary:
        """Train every rung; the summary (written to ``out_dir`` with the report)."""
        try:
            r, prev = 0, 0
            while r < len(self.runs):
                reached = self._rung(r, prev)
                if reached is None:
                    break
                prev = reached
                r += 1
        finally:
            self.trainer.progress = None
        self.store.close()
        return self._summary()

    def _rung(self, r: int, prev: int) -> int | None:
        """Train rung ``r`` (from step ``prev``), rank it, eliminate; the steps it reached, or None
        when the search ends here (the last rung, or no shift left)."""
        cfg, n_plan = self.cfg, self.runs[r]
        winner_run = r >= len(self.plan)  # the winner's steps to the end after an early-stopped last rung
        keep_n = 1 if n_plan == self.total else survivors(len(self.alive), cfg.eta)
        self.pr.call("rung", r, len(self.runs), n_plan, self.total)
        n_r, stop, pre_failed, pre_secs = n_plan, None, {}, {}
        if cfg.stop_when_stable and not winner_run and len(self.alive) > keep_n:
            n_r, stop, pre_failed, pre_secs = self._stable_span(r, prev, n_plan, keep_n)
        if stop is not None and n_plan == self.total:
            self.runs.append(self.total)  # the winner alone finishes the epoch
            self.n_total += len(self.seeds)
        last = n_r == self.total
        scores: dict[str, list[float | None]] = {}
        current: dict[Key, CandidateResult] = {}
        for seed in self.seeds:
            for s in self.alive:
                res, score = self._candidate(r, s, seed, n_r, last, stop, pre_failed, pre_secs)
                scores.setdefault(shift_key(s), []).append(score)
                current[(shift_key(s), seed)] = res
        keep = self._rank(r, n_r, n_plan, last, stop, keep_n, scores)
        if last:
            return None
        self._eliminate(r, n_r, keep, stop, current)
        self.alive = [t for t in self.alive if t in keep]
        self.n_total = self.i + self._planned_after(r)  # a widened / extended rung or t = 0 kept: more to come
        return n_r if self.alive else None

    def _planned_after(self, r: int) -> int:
        """The candidates (shift x seed) the rungs after ``r`` train as planned from the shifts
        alive now: ``ceil(n / eta)`` per rung, plus t = 0 where it would not be among them."""
        n, total = len(self.alive), 0
        has_zero = any(abs(t) < 1e-12 for t in self.alive)
        for q in range(r + 1, len(self.runs)):
            total += n * len(self.seeds)
            n = min(len(self.alive), survivors(n, self.cfg.eta) + (1 if has_zero else 0))
        return total

    def _stable_span(self, r: int, prev: int, n_plan: int, keep_n: int) -> tuple[int, dict | None, dict, dict]:
        """--stop-when-stable: where rung ``r`` ends (a journaled early stop repeated exactly, or
        trained interleaved with the stability test). Returns (steps, stop record, failed, seconds)."""
        n_r, stop, interleave = self._rung_plan(r, n_plan, prev)
        pre_failed: dict = {}
        pre_secs: dict = {}
        if interleave or (stop is not None and not all(
                n_r in self.recs_by_cand.get((shift_key(t), sd), {}) for sd in self.seeds for t in self.alive)):
            n_r, fresh_stop, pre_failed, pre_secs = self._train_interleaved(
                r, prev, n_plan, keep_n, n_r if stop is not None else None, self.i)
            stop = stop if stop is not None else fresh_stop
        return n_r, stop, pre_failed, pre_secs

    def _rung_plan(self, r: int, n_r: int, prev: int) -> tuple[int, dict | None, bool]:
        """Where rung ``r`` ends on this run: (steps, journaled early stop or None, train it
        interleaved with the stability test). A resumed run repeats a journaled early stop
        exactly; a rung some candidate already finished at its planned steps is not stopped early."""
        keys = [(shift_key(t), seed) for seed in self.seeds for t in self.alive]
        for key in keys:
            for steps, rec in self.recs_by_cand.get(key, {}).items():
                st = rec.get("stop")
                if (isinstance(st, dict) and rec.get("rung") == r and st.get("planned_steps") == n_r
                        and st.get("from_steps") == prev and prev < steps < n_r):
                    return steps, st, False
        if any(n_r in self.recs_by_cand.get(key, {})
               or (n_r == self.total and (key[0], key[1], self.ctx.config_hash) in self.done) for key in keys):
            return n_r, None, False
        return n_r, None, True

    # ------------------------------------------------------------------ --stop-when-stable

    def _train_interleaved(self, r: int, prev: int, n_r: int, keep_n: int, forced: int | None, i0: int
                           ) -> tuple[int, dict | None, dict, dict]:
        """--stop-when-stable: train the rung's candidates in turns of a few steps (each pausing
        with its full state, so the scores are bitwise the uninterrupted ones) and stop the rung
        at the first turn where :func:`stable_decision` holds; ``forced``: train to that step
        (a journaled decision). Returns (steps, stop record, failed candidates, seconds)."""
        window, marks = stable_marks(prev, n_r, self.cfg.stable_fraction)
        if forced is not None:
            marks = [forced]
        failed: dict = {}
        secs: dict = {}
        hist: dict = {}
        for c in marks:
            self._turn(c, i0, failed, secs, hist)
            if forced is not None or c == n_r:
                return c, None, failed, secs
            stop = self._stable_stop(r, prev, n_r, c, window, keep_n, failed, hist)
            if stop is not None:
                return c, stop, failed, secs
        return n_r, None, failed, secs

    def _turn(self, c: int, i0: int, failed: dict, secs: dict, hist: dict) -> None:
        """One turn: every candidate of the rung trained (or found) up to step ``c``; their
        per-step counts into ``hist``, the failed ones into ``failed``."""
        trainer, pr = self.trainer, self.pr
        order = [(seed, t) for seed in self.seeds for t in self.alive]
        for j, (seed, t) in enumerate(order):
            key = (shift_key(t), seed)
            if key in failed:
                continue
            got = self.store.get(key)
            if got is not None and got[0] >= c:
                if key not in hist:
                    cnt = got[1].get("run", {})
                    hist[key] = (list(cnt.get("step_hits") or []), list(cnt.get("step_seen") or []))
                continue
            pr.call("start", t, seed, i0 + j, self.n_total)
            t1 = time.perf_counter()
            model = _shared_model(self.ctx, seed)
            _set_shift(model, t)
            run, bad = self._train_on(model, got, t, seed, c)
            if bad is not None:
                failed[key] = bad
                self.store.drop(key)
            else:
                self.store.hold(key, c, trainer.snapshot(run, model), len(self.shifts) * len(self.seeds))
                hist[key] = (list(run.step_hits), list(run.step_seen))
            secs[key] = secs.get(key, 0.0) + time.perf_counter() - t1

    def _stable_stop(self, r: int, prev: int, n_r: int, c: int, window: int, keep_n: int, failed: dict,
                     hist: dict) -> dict | None:
        """The stop record when the rung's decision is stable at step ``c``, else None."""
        seeds = self.seeds
        ok = [t for t in self.alive if all((shift_key(t), sd) not in failed for sd in seeds)]
        if len(ok) <= keep_n:
            return None  # nothing left to decide: every candidate continues anyway
        h = {t: [hist.get((shift_key(t), sd), ([], []))[0] for sd in seeds] for t in ok}
        n = {t: [hist.get((shift_key(t), sd), ([], []))[1] for sd in seeds] for t in ok}
        stop = stable_decision(h, n, keep=keep_n, start=prev, at=c, window=window)
        if stop is not None:
            dropped = [(shift_key(t), sd) for t in self.alive for sd in seeds
                       if t not in stop["kept"] and (shift_key(t), sd) not in failed]
            stop.update({"rung": r, "planned_steps": n_r, "from_steps": prev, "fraction": self.cfg.stable_fraction,
                         "steps_saved": (n_r - c) * len(dropped)})
        return stop

    # ------------------------------------------------------------------ one candidate at a rung

    def _candidate(self, r: int, s: float, seed: int, n_r: int, last: bool, stop: dict | None,
                   pre_failed: dict, pre_secs: dict) -> tuple[CandidateResult, float | None]:
        """Candidate ``(s, seed)`` at rung ``r`` (``n_r`` steps): read back from the journal, or
        trained on from its paused state; journaled, its state kept for the next rung. Returns
        (result, score the rung ranks by: None when it failed)."""
        key = (shift_key(s), seed)
        hist = self.rung_scores.setdefault(key, [])
        res = self._resumed(r, s, seed, n_r, last, hist)
        if res is not None:
            self.pr.call("skip", res, self.i, self.n_total)
            self.i += 1
            return res, (res.score if res.ok else None)
        self.pr.call("start", s, seed, self.i, self.n_total)
        t1 = time.perf_counter() - pre_secs.get(key, 0.0)
        model = _shared_model(self.ctx, seed)
        _set_shift(model, s)
        failed = pre_failed.get(key)
        run = None
        if failed is None:
            run, failed = self._advance(model, key, s, seed, n_r)
        self.trainer.progress = None
        if failed is not None:
            res = self._failed(r, s, seed, n_r, last, stop, failed, t1, hist)
            score = None
        else:
            res = self._trained(r, s, seed, n_r, last, stop, run, model, t1, hist)
            score = res.score if res.ok else None
        self.pr.call("end", res, self.i, self.n_total)
        self.i += 1
        return res, score

    def _resumed(self, r: int, s: float, seed: int, n_r: int, last: bool, hist: list) -> CandidateResult | None:
        """The candidate's journaled result at this rung (a resumed run), else None."""
        key = (shift_key(s), seed)
        ck = candidate_key(s, seed, self.ctx.config_hash)
        rec = self.rung_recs.get((*ck, n_r))
        if last and ck in self.done:
            res = CandidateResult.from_json(self.done[ck])
            res.resumed = True
            if res.ok:
                hist[:] = hist[:r] + [res.score]
            res.rung, res.rung_scores = r, list(hist)
            self.final[key] = res
            return res
        if rec is not None and not last:
            res = CandidateResult.from_json(rec["result"])
            res.resumed = True
            got = self.store.get(key)
            if got is not None and got[0] == n_r:  # its per-step counts: the rung decides as the first run did
                cnt = got[1].get("run", {})
                self.step_hist[key] = (list(cnt.get("step_hits") or []), list(cnt.get("step_seen") or []))
            hist[:] = hist[:r] + [res.score]
            if not res.ok:
                self.final[key] = res
            return res
        return None

    def _advance(self, model: torch.nn.Module, key: Key, s: float, seed: int, n_r: int) -> tuple[Any, Any]:
        """Train the candidate from its paused state (or step 0) to step ``n_r``: (run, failure or None)."""
        got = self.store.get(key)
        if got is not None and got[0] <= n_r:
            self.pr.call("phase", f"restoring its state paused at step {got[0]}")
        return self._train_on(model, got if got is not None and got[0] <= n_r else None, s, seed, n_r)

    def _train_on(self, model: torch.nn.Module, got: tuple[int, dict] | None, s: float, seed: int,
                  to: int) -> tuple[Any, Any]:
        """Restore the paused state ``got`` (None: start at step 0) and train to step ``to``:
        (run, failure or None); the steps trained are counted."""
        trainer, pr = self.trainer, self.pr
        trainer.progress = (lambda d, t: pr.call("step", d, t))
        run = trainer.restore(model, got[1]) if got is not None else trainer.start(model, seed=seed, shift=s)
        step0 = run.step
        try:
            failed = trainer.advance(run, model, to)
        finally:
            trainer.progress = None
        self.trained_steps += run.step - step0
        return run, failed

    def _failed(self, r: int, s: float, seed: int, n_r: int, last: bool, stop: dict | None, failed: Any,
                t1: float, hist: list) -> CandidateResult:
        key = (shift_key(s), seed)
        cfg, ctx = self.cfg, self.ctx
        res = _result_from(failed, shift=s, seed=seed, ctx=ctx, metric=cfg.metric, seconds=time.perf_counter() - t1)
        res.rung, res.rung_scores = r, list(hist)
        self.final[key] = res
        self.store.drop(key)
        if self.journal is not None:
            if last:
                self.journal.append(s, seed, ctx.config_hash, res.to_json())
            else:
                self.journal.append_rung(s, seed, ctx.config_hash, rung=r, steps=n_r, result=res.to_json(),
                                         eliminated=True, stop=stop)
        return res

    def _trained(self, r: int, s: float, seed: int, n_r: int, last: bool, stop: dict | None, run: Any,
                 model: torch.nn.Module, t1: float, hist: list) -> CandidateResult:
        key = (shift_key(s), seed)
        cfg, ctx, trainer = self.cfg, self.ctx, self.trainer
        if last:
            res = _result_from(trainer.result(run), shift=s, seed=seed, ctx=ctx, metric=cfg.metric,
                               seconds=time.perf_counter() - t1)
            if res.ok:
                self.pr.call("phase", "measuring its +1 shares (BN re-estimation, probe)")
                _finish_candidate(ctx, model, res, cfg.metric)
            hist[:] = hist[:r] + ([res.score] if res.ok else [])
            res.rung, res.rung_scores = r, list(hist)
            self.final[key] = res
            self.store.drop(key)
            if self.journal is not None:
                self.journal.append(s, seed, ctx.config_hash, res.to_json())
            return res
        res = _result_from(trainer.partial(run), shift=s, seed=seed, ctx=ctx, metric=cfg.metric,
                           seconds=time.perf_counter() - t1)
        hist[:] = hist[:r] + ([res.score] if res.ok else [])
        res.rung, res.rung_scores = r, list(hist)
        self.step_hist[key] = (list(run.step_hits), list(run.step_seen))
        self.pr.call("phase", f"pausing at step {n_r}: saving its state for the next rung")
        rel = self.store.put(key, n_r, trainer.snapshot(run, model), len(self.shifts) * len(self.seeds))
        if self.journal is not None:
            self.journal.append_rung(s, seed, ctx.config_hash, rung=r, steps=n_r, result=res.to_json(),
                                     state=rel, stop=stop)
        if not res.ok:
            self.final[key] = res
        return res

    # ------------------------------------------------------------------ ranking and elimination

    def _rank(self, r: int, n_r: int, n_plan: int, last: bool, stop: dict | None, keep_n: int,
              scores: dict[str, list[float | None]]) -> list[float]:
        """The shifts that go on after rung ``r`` (all ranked ones at the last rung); the rung's record."""
        cfg, alive = self.cfg, self.alive

        def mean(t: float) -> float | None:
            return _mean_or_none(scores.get(shift_key(t), []))

        ranked = sorted(alive, key=lambda t: (mean(t) is not None, mean(t) or 0.0, -abs(t)), reverse=True)
        ranked = [t for t in ranked if mean(t) is not None]
        keep = ranked[:keep_n] if not last else ranked
        decision = None
        baseline = next((t for t in ranked if abs(t) < 1e-12), None)  # t = 0 reaches the last rung (issue 22)
        if not last and stop is None:  # a rung ranks only when its scores carry information (issue 22)
            decides = bool(cfg.rung_min_samples)
            keep, decision = rung_decision(ranked, keep_n, lambda t: mean(t) or 0.0,
                                           samples=n_r * cfg.batch_size * len(self.seeds),
                                           chance=self.chance if decides else None,
                                           gap=self._gap(n_r) if decides and n_r >= 2 else None, baseline=baseline)
        if stop is not None and not last:
            # a journaled stop keeps the shifts it named (a resumed run makes the same decision, even
            # if its float rounding would rank them otherwise); a fresh stop's are the ranking's
            named = [t for t in ranked if any(shift_key(t) == shift_key(k) for k in stop.get("kept") or [])]
            if len(named) == keep_n:
                keep = named
            stop["kept"] = sorted(keep)
            if baseline is not None and baseline not in keep:
                keep = keep + [baseline]
                decision = {"action": "baseline", "why": f"t = {baseline:g} kept as the verdict's baseline: "
                                                         "one candidate more"}
        self.rungs_out.append({"rung": r, "steps": n_r, "fraction": round(n_r / self.total, 6),
                               "candidates": list(alive), "kept": sorted(keep) if not last else [],
                               "scores": {shift_key(t): mean(t) for t in alive},
                               "samples": n_r * cfg.batch_size, "decision": decision,
                               **({"planned_steps": n_plan, "stopped_early": stop} if cfg.stop_when_stable else {})})
        return keep

    def _gap(self, at: int):
        """``gap(a, b)`` for :func:`rung_decision`: :func:`paired_gap` of shifts a and b after ``at``
        steps from the candidates' per-step counts; a missing or short history is no separation
        (z 0: nothing is eliminated blind)."""
        seeds = self.seeds

        def gap(a: float, b: float) -> dict:
            try:
                ha, na = zip(*[self.step_hist[(shift_key(a), sd)] for sd in seeds])
                hb, nb = zip(*[self.step_hist[(shift_key(b), sd)] for sd in seeds])
                return paired_gap(list(ha), list(na), list(hb), list(nb), at)
            except (KeyError, ValueError):
                return {"margin": 0.0, "se": 0.0, "z": 0.0}
        return gap

    def _eliminate(self, r: int, n_r: int, keep: list[float], stop: dict | None,
                   current: dict[Key, CandidateResult]) -> None:
        """The shifts left out at rung ``r``: their record is their score there (+1 shares measured
        on their paused state), journaled as eliminated."""
        ctx = self.ctx
        n_out = sum(1 for t in self.alive if t not in keep) * len(self.seeds)
        k_out = 0
        for t in self.alive:
            if t in keep:
                continue
            for seed in self.seeds:  # eliminated here: its record is its score at this rung
                key = (shift_key(t), seed)
                k_out += 1
                self.pr.call("transition", r, k_out, n_out)  # progress between rungs (issue 22)
                if key in self.final:
                    continue
                ck = candidate_key(t, seed, ctx.config_hash)
                rec = self.rung_recs.get((*ck, n_r))
                if rec is not None and rec.get("eliminated"):
                    res = CandidateResult.from_json(rec["result"])
                    res.resumed = True
                else:
                    got = self.store.get(key)
                    res = self._measured(t, seed, current[key], got[1] if got is not None and got[0] == n_r else None)
                    res.rung, res.rung_scores = r, list(self.rung_scores.get(key, []))
                    if self.journal is not None:
                        self.journal.append_rung(t, seed, ctx.config_hash, rung=r, steps=n_r, result=res.to_json(),
                                                 eliminated=True, stop=stop)
                res.rung, res.rung_scores = r, list(self.rung_scores.get(key, []))
                self.final[key] = res
                self.store.drop(key)

    def _measured(self, s: float, seed: int, res: CandidateResult, state: dict | None) -> CandidateResult:
        """An eliminated candidate's +1 shares, measured on its paused ``state`` (None: as it is)."""
        if state is not None:
            ctx = self.ctx
            model = _shared_model(ctx, seed)
            _set_shift(model, s)
            self.trainer.restore(model, state)
            plus, _val, error = _measure_on_main(ctx, model)
            _record_probes(res, plus, error)
        return res

    # ------------------------------------------------------------------ the summary

    def _summary(self) -> SearchSummary:
        """The run's summary: the candidates' final records, the schedule, the rungs and the cost."""
        ctx, cfg, trainer, t0 = self.ctx, self.cfg, self.trainer, self.t0
        shifts, seeds, plan, plan_note, total = self.shifts, self.seeds, self.plan, self.plan_note, self.total
        final, rungs_out, trained_steps, clock0 = self.final, self.rungs_out, self.trained_steps, self.clock0
        out_dir = self.out_dir
        results = [final[(shift_key(s), seed)] for seed in seeds for s in shifts if (shift_key(s), seed) in final]
        summary = summarise(results, shifts=shifts, seeds=seeds, sites=[s.name for s in ctx.sites],
                            config=cfg.to_json(), config_hash=ctx.config_hash, metric=cfg.metric,
                            seconds=time.perf_counter() - t0)
        attach_context(summary, ctx)
        summary.schedule = {"name": Schedule.HALVING.value, "eta": cfg.eta, "min_fraction": cfg.min_fraction, "rung_steps": plan,
                            "rung_min_samples": cfg.rung_min_samples}
        extended = [x for x in rungs_out if (x.get("decision") or {}).get("action") == "extended"]
        nonlast = rungs_out[:-1]
        if len(plan) == 1 or (nonlast and len(extended) == len(nonlast)):
            if len(plan) == 1:
                why = plan_note
            else:
                chance_only = all("at chance" in x["decision"]["why"] for x in extended)
                why = ("every rung's scores were at chance: " if chance_only else
                       "no rung could decide (scores at chance, or the cut within the paired noise): ")
                why += extended[-1]["decision"]["why"]
            summary.schedule["fallback"] = f"full: {why}"
        if plan_note and len(plan) > 1:
            summary.schedule["plan_note"] = plan_note
        if cfg.stop_when_stable:
            summary.schedule.update({"stop_when_stable": True, "stable_fraction": cfg.stable_fraction,
                                     "stable_z": STABLE_Z})
        summary.rungs = rungs_out
        summary.cost = {**step_cost(results, len(shifts) * len(seeds)),
                        "full_grid_candidate_steps": total * len(shifts) * len(seeds),
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
        write_outputs(summary, out_dir)
        return summary


def _halving_loop(ctx: SearchContext, cfg: SearchConfig, *, out_dir: str | Path | None, resume: bool, force: bool,
                  progress: Any) -> SearchSummary:
    """:class:`HalvingLoop` ``(...).run()``."""
    return HalvingLoop(ctx, cfg, out_dir=out_dir, resume=resume, force=force, progress=progress).run()
