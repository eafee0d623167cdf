"""The pure decisions of the schedules (no training, no torch): successive halving's rung
steps and survivors, --stop-when-stable's marks and decision, the chance and tie rules."""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable

from ..vocab import Schedule  # noqa: F401 - the str enum lives in the vocabulary (bnnshift.vocab)
from .config import SearchConfig

# --stop-when-stable: every survivor must lead every eliminated shift by more than this many
# paired standard errors of the per-step accuracy differences (stable_decision)
STABLE_Z = 2.0


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
            gap = paired_gap(hits[a], seen[a], hits[b], seen[b], at)
            if not gap["z"] > z:
                return None
            if tight is None or (gap["z"], gap["margin"]) < (tight["z"], tight["margin"]):
                tight = {"ahead": a, "behind": b, **gap}
    return {"steps": at, "window": window, "stable_from": at - window, "kept": sorted(kept),
            "tightest": _json_gap(tight)}


def paired_gap(hits_a: list[list[int]], seen_a: list[list[int]], hits_b: list[list[int]],
               seen_b: list[list[int]], at: int) -> dict[str, float]:
    """How far shift a leads shift b after ``at`` steps, against the paired noise.

    ``hits_x[k]`` / ``seen_x[k]``: seed k's correct and seen samples of every first-epoch step
    (ints, at least ``at`` long; the same seed order for a and b). ``margin``: the score
    difference (mean over seeds of the accumulated train accuracy, as the rung ranks), an
    accuracy fraction; ``se``: the standard error of the per-step differences ``d_i`` (mean over
    seeds of ``hits_a[i]/seen_a[i] - hits_b[i]/seen_b[i]``; same batches for a and b, so the batch
    difficulty cancels), ``stdev(d) / sqrt(at)``; ``z = margin / se`` (inf for a positive margin
    without spread, 0 for none). Needs ``at >= 2``; raises ``ValueError`` on a short history."""
    if at < 2 or any(len(h) < at or len(n) < at for h, n in zip(hits_a + hits_b, seen_a + seen_b)):
        raise ValueError(f"paired_gap needs at least {max(at, 2)} steps of history per seed")

    def score(hs: list[list[int]], ns: list[list[int]]) -> float:
        vals = [sum(h[:at]) / sum(n[:at]) if sum(n[:at]) else 0.0 for h, n in zip(hs, ns)]
        return sum(vals) / len(vals)

    k = len(hits_a)
    d = [sum(ha[i] / na[i] - hb[i] / nb[i] for ha, na, hb, nb in zip(hits_a, seen_a, hits_b, seen_b)) / k
         for i in range(at)]
    margin = score(hits_a, seen_a) - score(hits_b, seen_b)
    mean = sum(d) / at
    se = math.sqrt(sum((v - mean) ** 2 for v in d) / (at - 1) / at)
    ratio = margin / se if se > 0 else (math.inf if margin > 0 else 0.0)
    return {"margin": margin, "se": se, "z": ratio}


def _json_gap(gap: dict | None) -> dict | None:
    """A :func:`paired_gap` record for JSON: an infinite z (no spread at all) is None."""
    if gap is not None and math.isinf(gap["z"]):
        gap = {**gap, "z": None}
    return gap


CHANCE_Z = 3.0  # a rung's best mean score within this many binomial standard errors of chance: at chance


def rung_decision(ranked: list[float], keep_n: int, mean: Callable[[float], float], *, samples: int,
                  chance: float | None, gap: Callable[[float, float], dict] | None = None,
                  baseline: float | None = None, z: float | None = None
                  ) -> tuple[list[float], dict[str, Any] | None]:
    """Which of a rung's ``ranked`` shifts (best first) go on, and why when it is not the plain
    best ``keep_n`` (issue 22). Returns (kept shifts, decision or None); a decision is
    ``{"action", "why"}`` (+ ``"tightest"`` for the noise rule):

    * ``"extended"``: every shift goes on (the rung's decision moves to the next rung) when the
      best mean score is at chance (``chance`` = 1 / classes, within ``CHANCE_Z`` binomial
      standard errors over ``samples`` samples), or when no cut separates the kept from the
      eliminated beyond their paired noise (below);
    * ``"tie"``: every shift whose mean equals the last kept one's exactly is kept too;
    * ``"widened"``: ``gap(a, b)`` (a :func:`paired_gap` record: a's lead over b, accuracy
      fractions) given, a shift is eliminated only when every kept shift leads it by more than
      ``z`` (default ``STABLE_Z``) paired standard errors; shifts within the noise of a kept one
      are kept too, in rank order, until the cut is separated (``"separated"``: the plain cut
      already was, the tightest pair said);
    * ``baseline`` (t = 0, the verdict's reference): kept whatever its rank, one candidate more
      when it is not among the kept (said in ``decision["baseline"]``); it does not widen the cut.

    ``chance=None``: no chance check; ``gap=None``: no noise check. ``keep_n`` >= 1."""
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
    decision: dict[str, Any] | None = None
    if len(ranked) > keep_n:
        cut = mean(ranked[keep_n - 1])
        tied = [t for t in ranked[keep_n:] if mean(t) == cut]
        if tied:
            both = ", ".join(f"{t:g}" for t in [t for t in keep if mean(t) == cut] + tied)
            keep = keep + tied
            decision = {"action": "tie", "why": f"t = {both} tie exactly at the cut ({cut * 100:.2f}%): all kept"}
    if gap is not None and len(ranked) > len(keep):
        keep, noise = _noise_cut(ranked, keep, gap, STABLE_Z if z is None else float(z))
        if noise is not None and (decision is None or noise["action"] != "separated"):
            decision = noise
    if baseline is not None and baseline in ranked and baseline not in keep:
        keep = keep + [baseline]
        decision = dict(decision or {"action": "baseline", "why": ""})
        decision["baseline"] = (f"t = {baseline:g} kept as the verdict's baseline (ranked {ranked.index(baseline) + 1} "
                                f"of {len(ranked)}): one candidate more")
        if not decision["why"]:
            decision["why"] = decision["baseline"]
    return keep, decision


def _noise_cut(ranked: list[float], keep: list[float], gap: Callable[[float, float], dict], z: float
               ) -> tuple[list[float], dict[str, Any] | None]:
    """:func:`rung_decision`'s noise rule: the kept set grown in rank order until every kept shift
    leads every eliminated one by more than ``z`` paired standard errors."""
    keep = list(keep)
    first_n = len(keep)
    tight: dict | None = None
    close: dict | None = None  # the pair that first kept a shift within the noise
    for b in ranked[first_n:]:
        worst = None
        for a in keep:
            g = gap(a, b)
            if worst is None or (g["z"], g["margin"]) < (worst["z"], worst["margin"]):
                worst = {"ahead": a, "behind": b, **g}
        if worst is not None and not worst["z"] > z:
            keep.append(b)
            close = close or worst
        elif worst is not None and (tight is None or (worst["z"], worst["margin"]) < (tight["z"], tight["margin"])):
            tight = worst

    def said(g: dict) -> str:
        zs = "no spread" if math.isinf(g["z"]) else f"{g['z']:.1f} paired SE"
        return (f"t = {g['ahead']:g} leads t = {g['behind']:g} by {g['margin'] * 100:.2f} points, {zs}")

    if close is None:
        return keep, ({"action": "separated", "why": f"every kept shift leads every eliminated one by more than "
                                                     f"{z:g} paired SE (tightest: {said(tight)})",
                       "tightest": _json_gap(tight)} if tight is not None else None)
    if len(keep) == len(ranked):
        return keep, {"action": "extended",
                      "why": (f"the cut is within the paired noise ({said(close)}, not more than {z:g}): no shift is "
                              f"eliminated, all {len(ranked)} go on to the next rung"),
                      "tightest": _json_gap(close)}
    return keep, {"action": "widened",
                  "why": (f"{len(keep) - first_n} more kept within the paired noise of the cut ({said(close)}, not more "
                          f"than {z:g}): {len(keep)} of {len(ranked)} go on"),
                  "tightest": _json_gap(close)}


def survivors(n: int, eta: float) -> int:
    """How many of ``n`` candidates continue after a rung: the best ``ceil(n / eta)`` (at least 1)."""
    return max(1, int(math.ceil(n / eta - 1e-9)))


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


def expected_steps(cfg: SearchConfig, total: int) -> int:
    """Training steps the schedule will run (all candidates, all seeds, nothing resumed)."""
    k, s = len(cfg.shifts), len(cfg.seeds)
    if cfg.schedule != Schedule.HALVING:
        return k * s * total
    plan, prev, n = rung_steps(total, cfg.eta, cfg.min_fraction, rung_min_steps(cfg)), 0, 0
    for r, steps in enumerate(plan):
        n += _alive_count(k, cfg.eta, r) * s * (steps - prev)
        prev = steps
    return n
