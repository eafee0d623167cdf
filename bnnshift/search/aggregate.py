"""Candidates into a summary: per-shift statistics, the winner and the noise verdict, cost."""
from __future__ import annotations

import math
from typing import Any

from .. import validate
from ..journal import shift_key
from .results import CandidateResult, SearchSummary, ShiftStats
from .schedule import _mean_or_none


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
        cost=step_cost(candidates, len(shifts) * len(seeds)))


def step_cost(candidates: list[CandidateResult], n_grid: int) -> dict[str, Any]:
    """Training steps of the schedule (each candidate counted from step 0, resumed ones too)
    against the full grid: every candidate trained for as many steps as the longest one."""
    steps = [c.steps for c in candidates if c.steps is not None]
    if not steps:
        return {"candidate_steps": None, "full_grid_candidate_steps": None, "ratio": None}
    full = max(steps) * n_grid
    return {"candidate_steps": sum(steps), "full_grid_candidate_steps": full,
            "ratio": round(sum(steps) / full, 4) if full else None}
