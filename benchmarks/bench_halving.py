"""Successive halving vs the full first-epoch search: the same pick for a fraction of the cost?

    nice -n 10 python benchmarks/bench_halving.py --models mlp,lenet5 --seeds 5 --out bench-halving.jsonl
    python benchmarks/bench_halving.py --report bench-halving.jsonl       # the table from saved cases

For each model and seed, one full search (``--schedule full``: every shift trains one epoch)
and one successive-halving search (``--schedule halving``, eta 2, first rung 1/8 of the epoch)
over the same K shifts (default ``-1:2.5:0.5``, K = 8), both eager (``compile='off'``) in this
process, so the wall-time ratio compares the schedules and not a compile. Each case is appended
to ``--out`` as one JSON line as soon as it ends (a partial run keeps its cases).
With ``--real-seeds N < --seeds`` the halving pick of the other seeds is computed exactly from the
full search's per-step correct counts (``simulate_halving``); for the real runs the benchmark
asserts that the simulation gives the real pick and step count.

Printed per model:

* agreement: the halving pick is the full search's pick;
* within noise: the halving pick's full-search score is within the full search's seed noise of
  the best (noise = the larger std over seeds of the full scores of the two shifts);
* regret (pp): full-search score of the full pick minus that of the halving pick, mean and worst;
* cost: halving / full candidate steps, and wall time.

``--default-path``: the end-to-end wall time of the DEFAULT search (``--compile auto``: the
calibration and any compile included) with ``--schedule full`` and ``--schedule halving`` against
an eager sequential loop (a fresh model per candidate, eager, NCHW: what a user's plain loop does),
K = 6 shifts, one seed, vgg-small at quarter width (``--models``' first entry):

    nice -n 10 python benchmarks/bench_halving.py --default-path --models vgg-small --k 6

Models: ``mlp``, ``lenet5`` (zoo defaults), ``vgg-small`` and ``vgg-small-avgpool`` at quarter
width (``in_chans=1, input_size=28``). Data: Fashion-MNIST in memory.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

MODELS = {
    "mlp": ("zoo:mlp", {}),
    "lenet5": ("zoo:lenet5", {}),
    "vgg-small": ("zoo:vgg-small", {"in_chans": 1, "input_size": 28, "width": 0.25}),
    "vgg-small-avgpool": ("zoo:vgg-small-avgpool", {"in_chans": 1, "input_size": 28, "width": 0.25}),
}


def simulate_halving(curves: dict[float, list[int]], batch: int, total: int, eta: float, min_fraction: float,
                     stable_fraction: float | None = None):
    """The pick of ``--schedule halving`` from a full search's per-step correct counts.

    Exact, not an approximation: a halving candidate's score at a rung is its train accuracy
    accumulated over the same first steps with the same batches (tests/test_search_halving.py
    checks bitwise equality of the paused-and-continued training). Same ranking rule as
    ``bnnshift.search.halving.HalvingLoop``: best score, then smaller |t|; t = 0 always goes on (the
    verdict's baseline). The rung rules of ``--rung-min-samples`` (chance, paired noise) are not
    applied here (``simulate_search`` applies them). Returns (pick, candidate steps).
    ``stable_fraction``: with ``--stop-when-stable --stable-fraction F``, asking
    ``bnnshift.search.stable_decision`` at the same steps (``stable_marks``) as the search does.
    """
    from bnnshift.search import rung_steps, stable_decision, stable_marks, survivors

    hits = {t: [c[0]] + [c[i] - c[i - 1] for i in range(1, len(c))] for t, c in curves.items()}
    seen = [batch] * total
    alive = sorted(curves)
    steps = {t: 0 for t in alive}
    plan, prev, r = list(rung_steps(total, eta, min_fraction)), 0, 0
    while r < len(plan):
        n = plan[r]
        keep_n = 1 if n == total else survivors(len(alive), eta)
        at = n
        if stable_fraction is not None and len(alive) > keep_n:
            window, marks = stable_marks(prev, n, stable_fraction)
            for c in marks[:-1]:
                if stable_decision({t: [hits[t]] for t in alive}, {t: [seen] for t in alive}, keep=keep_n,
                                   start=prev, at=c, window=window) is not None:
                    at = c
                    break
        for t in alive:
            steps[t] = at
        score = {t: curves[t][at - 1] / (at * batch) for t in alive}
        ranked = sorted(alive, key=lambda t: (score[t], -abs(t)), reverse=True)
        if at == total:
            return ranked[0], sum(steps.values())
        alive = ranked[:keep_n] + [t for t in ranked[keep_n:] if abs(t) < 1e-12]  # t = 0: the verdict's baseline
        if n == total:  # the last rung stopped early: the winner alone finishes the epoch
            plan.append(total)
        prev, r = at, r + 1
    raise AssertionError("no last rung")


def simulate_search(curves: dict[int, dict[float, list[int]]], *, batch: int, total: int, schedule: str,
                    eta: float = 2.0, min_fraction: float = 0.125, rung_min_samples: int = 2000,
                    classes: int | None = 10):
    """The summary and verdict of a multi-seed search (``--schedule full`` or ``halving``) from the
    full search's per-step correct counts ``curves[seed][t]`` (cumulative, one per step of the
    first epoch, full batches of ``batch``): the ranking and rung rules of
    ``bnnshift.search._halving_loop`` (mean over seeds, best then smaller |t|, the rung minimum,
    the chance check and exact ties of ``rung_decision``), the verdict of ``bnnshift.report.verdict``
    from ``bnnshift.search.summarise``. Exact, not an approximation: a paused-and-continued halving
    candidate scores bitwise what the full candidate scored after as many steps
    (tests/test_search_halving.py). Returns (summary, verdict)."""
    from bnnshift.report import verdict
    from bnnshift.search import (CandidateResult, rung_decision, rung_min_steps, rung_steps, summarise,
                                 survivors)
    from bnnshift.search import paired_gap

    seeds = sorted(curves)
    shifts = sorted(curves[seeds[0]])

    def score(t: float, seed: int, n: int) -> float:
        return curves[seed][t][n - 1] / (n * batch)

    def mean(t: float, n: int) -> float:
        return sum(score(t, sd, n) for sd in seeds) / len(seeds)

    if schedule == "full":
        cands = [CandidateResult(shift=t, seed=sd, config_hash="sim", status="ok", score=score(t, sd, total),
                                 steps=total) for sd in seeds for t in shifts]
        rungs: list[dict] = []
    else:
        min_steps = rung_min_steps(type("C", (), {"rung_min_samples": rung_min_samples, "batch_size": batch})())
        plan = rung_steps(total, eta, min_fraction, min_steps)
        chance = 1.0 / classes if classes and rung_min_samples else None
        alive, hist, cands, rungs = list(shifts), {t: [] for t in shifts}, [], []
        hits = {sd: {t: [c[0]] + [c[i] - c[i - 1] for i in range(1, len(c))] for t, c in curves[sd].items()}
                for sd in seeds}  # per-step correct counts (the rung's noise rule)
        seen = [batch] * total
        for r, n in enumerate(plan):
            last = n == total
            keep_n = 1 if last else survivors(len(alive), eta)
            for t in alive:
                hist[t].append(mean(t, n))
            ranked = sorted(alive, key=lambda t: (mean(t, n), -abs(t)), reverse=True)
            keep, decision = (ranked, None) if last else rung_decision(
                ranked, keep_n, lambda t: mean(t, n), samples=n * batch * len(seeds), chance=chance,
                gap=(lambda a, b, n=n: paired_gap([hits[sd][a] for sd in seeds], [seen] * len(seeds),
                                                  [hits[sd][b] for sd in seeds], [seen] * len(seeds), n))
                if rung_min_samples and n >= 2 else None,
                baseline=next((t for t in ranked if abs(t) < 1e-12), None))
            rungs.append({"rung": r, "steps": n, "candidates": list(alive), "kept": sorted(keep) if not last else [],
                          "decision": decision})
            for t in alive:
                if last or t not in keep:
                    for sd in seeds:
                        rs = [score(t, sd, m) for m in plan[:r + 1]]
                        cands.append(CandidateResult(shift=t, seed=sd, config_hash="sim", status="ok", score=rs[-1],
                                                     steps=n, rung=r, rung_scores=rs))
            alive = [t for t in alive if t in keep]
    summary = summarise(cands, shifts=shifts, seeds=seeds, sites=[], config={}, config_hash="sim",
                        metric="train_acc", seconds=0.0)
    summary.rungs = rungs
    return summary, verdict(summary)


def verdict_kind(v: dict) -> str:
    """'shift' (a shift ahead of t = 0 beyond the noise), 't=0' (t = 0 ahead of every shift beyond
    the noise), 'tie' (within noise) or 'unresolved' (too few seeds / no comparison)."""
    if v["resolved"]:
        return "t=0" if abs(v["winner"] or 0.0) < 1e-9 else "shift"
    return "tie" if v["tie"] else "unresolved"


DEFAULT_CANDIDATES = {  # (label, seeds, schedule, eta, min_fraction): today's default first
    "today: 1 seed, full": (1, "full", 2.0, 0.125),
    "3 seeds, full": (3, "full", 2.0, 0.125),
    "3 seeds, halving eta 2": (3, "halving", 2.0, 0.125),
    "3 seeds, halving eta 3": (3, "halving", 3.0, 0.125),
}


def default_case(name: str, args) -> dict:
    """``--default-verdict``: one ``--seeds 5 --schedule full`` search of ``name`` (per-step counts
    kept: the source of every simulated default search) and real ``--seeds 3 --schedule halving``
    searches (eta 2 and 3) on seeds 0..2: their wall time, and a check that the simulation gives
    their verdict, winner and candidate steps."""
    from bnnshift.report import verdict
    from bnnshift.search import SearchConfig, SearchContext, parse_shifts, search

    spec, margs = MODELS[name]
    kw = dict(model=spec, data=args.data, model_args=dict(margs), input_shape=(1, 28, 28),
              shifts=parse_shifts(args.shifts), compile=args.compile, train_limit=args.train_limit,
              batch_size=args.batch_size, bn_recalib_batches=0)
    ctx = SearchContext.open(SearchConfig(**kw, seeds=[0]))  # shared by every run; its trainer records the curves
    ctx.trainer.record_curve = True
    case: dict = {"model": name, "mode": "default-verdict", "shifts": kw["shifts"], "train_limit": args.train_limit,
                  "batch_size": args.batch_size, "compile": args.compile, "seeds": args.seeds,
                  "loadavg_start": os.getloadavg(), "halving": {}}
    seeds_all = list(range(args.first_seed, args.first_seed + args.seeds))
    runs = [("halving", 2.0), ("full", None), ("halving", 3.0)]
    if args.reuse_reference:  # the recorded 5-seed full search is the reference: run today's default and the candidates
        ref = reference_case(args.reuse_reference, name, kw["shifts"], args)
        case.update({"full": ref["full"], "reference_reused": str(args.reuse_reference)})
        runs = [("today", None)] + [("halving", float(e)) for e in args.etas.split(",")]
    for sched, eta in runs:
        seeds = seeds_all if sched == "full" else seeds_all[:1] if sched == "today" else seeds_all[:3]
        if sched == "today":  # today's default (1 seed, full) timed next to the candidates, same machine and load
            t0, c0 = time.perf_counter(), time.process_time()
            s = search(SearchConfig(**kw, seeds=seeds), context=ctx)
            case["today"] = {"wall": time.perf_counter() - t0, "loop_seconds": s.seconds, "seeds": seeds,
                             "cpu": time.process_time() - c0, "cost": s.cost, "verdict": verdict(s),
                             "load": os.getloadavg()[0]}
            for c in s.candidates:
                c.extra.pop("correct_curve", None)
            print(f"{name} today's default seeds {seeds}: {case['today']['wall']:.1f}s ({case['today']['cpu']:.1f}s CPU), load "
                  f"{case['today']['load']:.1f}", flush=True)
            continue
        extra = {"schedule": "halving", "eta": eta, "min_fraction": args.min_fraction} if sched == "halving" else {}
        t0, c0 = time.perf_counter(), time.process_time()
        s = search(SearchConfig(**kw, seeds=seeds, **extra), context=ctx)
        wall = time.perf_counter() - t0
        rec = {"winner": s.winner, "wall": wall, "loop_seconds": s.seconds, "cost": s.cost, "verdict": verdict(s),
               "seeds": seeds, "load": os.getloadavg()[0], "cpu": time.process_time() - c0}
        if sched == "full":
            rec["total_steps"] = s.candidates[0].steps
            rec["curves"] = {str(c.seed): {} for c in s.candidates}
            for c in s.candidates:
                rec["curves"][str(c.seed)][repr(c.shift)] = c.extra.pop("correct_curve")
            rec["scores"] = {f"{c.seed}:{c.shift!r}": c.score for c in s.candidates}
            rec["candidate_seconds"] = {f"{c.seed}:{c.shift!r}": c.seconds for c in s.candidates}
            case["full"] = rec
        else:
            rec["rungs"] = s.rungs
            case["halving"][f"eta{eta:g}"] = rec
        print(f"{name} {sched}{'' if eta is None else f' eta {eta:g}'} seeds {seeds}: {wall:.1f}s ({rec['cpu']:.1f}s CPU), "
              f"{verdict_kind(rec['verdict'])} (t = {s.winner}), load {rec['load']:.1f}", flush=True)
    curves = _curves_of(case)
    for key, rec in case["halving"].items():  # the simulation is the real search
        _, v = simulate_search({sd: curves[sd] for sd in rec["seeds"]}, batch=args.batch_size,
                               total=case["full"]["total_steps"], schedule="halving", eta=float(key[3:]),
                               min_fraction=args.min_fraction)
        rec["simulation_matches"] = (v["winner"], v["text"]) == (rec["verdict"]["winner"], rec["verdict"]["text"])
        if not rec["simulation_matches"]:  # kept in the jsonl and said: the table's simulated rows are then in doubt
            print(f"SIMULATION MISMATCH {name} {key}: {v['text']!r} vs real {rec['verdict']['text']!r}", flush=True)
    case["loadavg_end"] = os.getloadavg()
    return case


def reference_case(path: str | Path, name: str, shifts: list[float], args) -> dict:
    """``--reuse-reference``: the recorded 5-seed full search of model ``name`` (per-seed cases of
    the plain benchmark, or a ``--default-verdict`` case) from the JSON lines at ``path``, checked
    to be the same grid, data size and batch size as this run. Raises SystemExit when missing."""
    cases = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for c in as_default_cases(cases):
        if c["model"] == name and "curves" in c.get("full", {}):
            same = ([round(t, 6) for t in c["shifts"]] == [round(t, 6) for t in shifts]
                    and c.get("train_limit") == args.train_limit and c.get("batch_size", 256) == args.batch_size)
            if not same:
                raise SystemExit(f"{path}: {name}'s reference has shifts {c['shifts']}, train limit "
                                 f"{c.get('train_limit')}, batch {c.get('batch_size')}: run with the same "
                                 "--shifts/--train-limit/--batch-size")
            if len(c["full"]["curves"]) < args.seeds:
                raise SystemExit(f"{path}: {name}'s reference has {len(c['full']['curves'])} seeds, "
                                 f"--seeds {args.seeds} asked")
            return c
    raise SystemExit(f"{path}: no full-search reference with per-step counts for {name}")


def _curves_of(case: dict) -> dict[int, dict[float, list[int]]]:
    return {int(sd): {float(t): v for t, v in cs.items()} for sd, cs in case["full"]["curves"].items()}


def as_default_cases(cases: list[dict]) -> list[dict]:
    """Per-seed full searches of the plain benchmark (one line per model and seed, per-step counts
    kept) grouped per model into ``--default-verdict`` cases: a multi-seed search's candidate
    (t, seed) is the single-seed search's (same init, same batches). Their real halving runs are
    one seed each: no 3-seed wall time (the table says "-")."""
    out, seen = [c for c in cases if c.get("mode") == "default-verdict"], {}
    for c in cases:
        if c.get("mode") or "curves" not in c.get("full", {}):
            continue
        g = seen.setdefault(c["model"], {"model": c["model"], "mode": "default-verdict", "shifts": c["shifts"],
                                          "train_limit": c.get("train_limit"), "batch_size": c.get("batch_size", 256),
                                          "halving": {}, "from_per_seed": True,
                                          "full": {"curves": {}, "loop_seconds": 0.0,
                                                   "total_steps": c["full"]["total_steps"]}})
        g["full"]["curves"][str(c["seed"])] = c["full"]["curves"]
        g["full"]["loop_seconds"] += c["full"]["loop_seconds"]
    for g in seen.values():
        _, g["full"]["verdict"] = simulate_search(_curves_of(g), batch=g["batch_size"], total=g["full"]["total_steps"],
                                                  schedule="full")
    return out + list(seen.values())


def default_table(cases: list[dict]) -> list[dict]:
    """Per model and candidate default: how often its verdict (simulated over every subset of the
    5 seeds of its size) agrees with the 5-seed full search's, and its cost against today's
    default (1 seed, full): candidate steps, and the real runs' wall time."""
    from itertools import combinations

    rows = []
    for c in as_default_cases(cases):
        curves = _curves_of(c)
        total, batch = c["full"]["total_steps"], c["batch_size"]
        ref_sum, ref = simulate_search(curves, batch=batch, total=total, schedule="full")
        ref_stats = {round(st.shift, 6): st for st in ref_sum.stats}

        def confirmed(v: dict) -> bool:
            """A resolved claim the 5-seed full search makes too: t = 0 ahead, or this shift ahead
            of t = 0 beyond the 5-seed search's noise."""
            from bnnshift.search.aggregate import _seed_noise

            if verdict_kind(v) == "t=0":
                return verdict_kind(ref) == "t=0"
            w, b = ref_stats[round(v["winner"], 6)], ref_stats[0.0]
            return w.mean - b.mean > _seed_noise(w, b)

        assert (ref["winner"], ref["text"]) == (c["full"]["verdict"]["winner"], c["full"]["verdict"]["text"])
        full1_steps = total * len(c["shifts"])
        # today's default: one seed of the same grid, timed in this run when there is one (same machine and load)
        full1_wall = c["today"]["loop_seconds"] if c.get("today") else c["full"]["loop_seconds"] / len(curves)
        for label, (n, sched, eta, mf) in DEFAULT_CANDIDATES.items():
            agree = same_winner = cases_n = claims = confirmed_n = 0
            steps = []
            kinds: dict[str, int] = {}
            for sub in combinations(sorted(curves), n):
                s, v = simulate_search({sd: curves[sd] for sd in sub}, batch=batch, total=total, schedule=sched,
                                       eta=eta, min_fraction=mf)
                cases_n += 1
                k = verdict_kind(v)
                kinds[k] = kinds.get(k, 0) + 1
                agree += k == verdict_kind(ref) and (k != "shift" or v["winner"] == ref["winner"])
                same_winner += v["winner"] == ref["winner"]
                if v["resolved"]:
                    claims += 1
                    confirmed_n += confirmed(v)
                steps.append(sum(x.steps for x in s.candidates) / len(sub))
            real = c["halving"].get(f"eta{eta:g}") if sched == "halving" and n == 3 else None
            rows.append({"model": c["model"], "default": label, "cases": cases_n, "agree": agree,
                         "claims": claims, "confirmed": confirmed_n, "grid": len(c["shifts"]),
                         "same_best_mean": same_winner, "kinds": kinds, "reference": verdict_kind(ref),
                         "reference_winner": ref["winner"],
                         "steps_vs_today": n * statistics.mean(steps) / full1_steps,
                         "wall_vs_today": (real["loop_seconds"] / full1_wall) if real else
                         (n if sched == "full" else 1.0 if c.get("today") and n == 1 else float("nan")),
                         "cpu_vs_today": (real["cpu"] / c["today"]["cpu"]) if real and real.get("cpu") and
                         c.get("today", {}).get("cpu") else (1.0 if c.get("today") and n == 1 and sched == "full"
                                                             else float("nan")),
                         "wall_estimate_vs_today": 3 * real["cost"].get("wall_ratio_estimate", float("nan"))
                         if real and real["cost"].get("wall_ratio_estimate") else float("nan")})
    return rows


def print_default_table(rows: list[dict]) -> None:
    print("| model (K shifts) | 5-seed full verdict | candidate default | verdict agrees | resolved claims the "
          "5-seed search confirms | best mean same | verdicts | candidate steps vs today | wall vs today (real run) | "
          "CPU vs today (real run) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["kinds"].items()))
        ref = r["reference"] + (f" t = {r['reference_winner']:g}" if r["reference"] == "shift" else "")
        wall = "-" if math.isnan(r["wall_vs_today"]) else f"{r['wall_vs_today']:.2f}x"
        print(f"| {r['model']} ({r['grid']}) | {ref} | {r['default']} | {r['agree']}/{r['cases']} | "
              f"{r['confirmed']}/{r['claims']} | {r['same_best_mean']}/{r['cases']} | {kinds} | "
              f"{r['steps_vs_today']:.2f}x | {wall} | {_x(r.get('cpu_vs_today'))} |")
    print()
    for label in DEFAULT_CANDIDATES:
        rs = [r for r in rows if r["default"] == label]
        if rs:
            walls = [r["wall_vs_today"] for r in rs if not math.isnan(r["wall_vs_today"])]
            cpus = [r["cpu_vs_today"] for r in rs if not math.isnan(r.get("cpu_vs_today", float("nan")))]
            print(f"{label}: verdict agrees in {sum(r['agree'] for r in rs)}/{sum(r['cases'] for r in rs)} "
                  f"[resolved claims confirmed {sum(r['confirmed'] for r in rs)}/{sum(r['claims'] for r in rs)}] "
                  f"({100 * sum(r['agree'] for r in rs) / sum(r['cases'] for r in rs):.0f}%), candidate steps "
                  f"{statistics.mean(r['steps_vs_today'] for r in rs):.2f}x today's default"
                  + (f", wall {statistics.mean(walls):.2f}x (mean of the models' real runs)" if walls else "")
                  + (f", CPU {statistics.mean(cpus):.2f}x" if cpus else ""))


def _x(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.2f}x"


def run_case(name: str, seed: int, args) -> dict:
    from bnnshift.search import SearchConfig, SearchContext, parse_shifts, search

    spec, margs = MODELS[name]
    kw = dict(model=spec, data=args.data, model_args=dict(margs), input_shape=(1, 28, 28),
              shifts=parse_shifts(args.shifts), seeds=[seed], compile=args.compile, train_limit=args.train_limit,
              batch_size=args.batch_size, bn_recalib_batches=0)
    case = {"model": name, "seed": seed, "shifts": kw["shifts"], "train_limit": args.train_limit,
            "batch_size": args.batch_size,
            "eta": args.eta, "min_fraction": args.min_fraction, "compile": args.compile}
    ctx = SearchContext.open(SearchConfig(**kw))  # shared by both schedules; its trainer records the curves
    ctx.trainer.record_curve = True
    real = seed - args.first_seed < args.real_seeds
    order = ("full", "halving") if seed % 2 == 0 else ("halving", "full")  # alternate: load drifts
    for sched in (order if real else ("full",)):
        extra = {"schedule": sched, "eta": args.eta, "min_fraction": args.min_fraction} if sched == "halving" else {}
        t0 = time.perf_counter()
        s = search(SearchConfig(**kw, **extra), context=ctx)
        wall = time.perf_counter() - t0
        case[sched] = {"winner": s.winner, "wall": wall, "loop_seconds": s.seconds, "cost": s.cost,
                       "scores": {repr(c.shift): c.score for c in s.candidates},
                       "steps": {repr(c.shift): c.steps for c in s.candidates},
                       "rungs": s.rungs}
        if sched == "full":
            curves = {c.shift: c.extra["correct_curve"] for c in s.candidates if c.ok}
            pick, csteps = simulate_halving(curves, args.batch_size, s.candidates[0].steps, args.eta,
                                            args.min_fraction)
            case["simulated"] = {"winner": pick, "cost": {"candidate_steps": csteps}}
            case["full"]["curves"] = {repr(t): v for t, v in curves.items()}  # for --schedules
            case["full"]["total_steps"] = s.candidates[0].steps
            for c in s.candidates:
                c.extra.pop("correct_curve", None)
    if real:
        assert case["simulated"]["winner"] == case["halving"]["winner"], "simulation != real halving"
        assert case["simulated"]["cost"]["candidate_steps"] == case["halving"]["cost"]["candidate_steps"]
    return case


def default_path(args) -> dict:
    from bnnshift.load import load_model
    from bnnshift.search import SearchConfig, SearchContext, run_candidate, search

    name = args.models.split(",")[0]
    spec, margs = MODELS[name]
    shifts = [round(-0.5 + 0.5 * i, 3) for i in range(args.k)]
    common = dict(model=spec, data=args.data, model_args=dict(margs), input_shape=(1, 28, 28), shifts=shifts,
                  seeds=[0], batch_size=args.batch_size, train_limit=args.train_limit)
    res: dict = {"model": name, "k": args.k, "train_limit": args.train_limit, "loadavg_start": os.getloadavg()}
    cfg_e = SearchConfig(compile="off", memory_format="contiguous", **common)
    ctx_e = SearchContext.open(cfg_e)  # data + scan once (every path gets this setup for free)
    t0 = time.perf_counter()
    for t in shifts:  # a plain loop: a fresh model per candidate, eager, NCHW
        run_candidate(cfg_e, t, 0, model_factory=lambda seed: load_model(spec, args=margs).model, context=ctx_e)
    res["eager_sequential_s"] = time.perf_counter() - t0
    print(f"eager sequential {res['eager_sequential_s']:.1f}s (load {os.getloadavg()[0]:.1f})", flush=True)
    for sched in ("halving", "full"):
        cfg = SearchConfig(schedule=sched, **common)
        ctx = SearchContext.open(cfg)
        t0 = time.perf_counter()
        s = search(cfg, context=ctx)
        res[f"default_{sched}_s"] = time.perf_counter() - t0
        res[f"default_{sched}_ratio"] = res[f"default_{sched}_s"] / res["eager_sequential_s"]
        res[f"default_{sched}_step_path"] = s.step_path
        res[f"default_{sched}_winner"] = s.winner
        res[f"default_{sched}_cost"] = s.cost
        print(f"default {sched}: {res[f'default_{sched}_s']:.1f}s = {res[f'default_{sched}_ratio']:.3f}x eager "
              f"sequential; {s.step_path['reason'] if s.step_path else ''} (load {os.getloadavg()[0]:.1f})",
              flush=True)
    res["loadavg_end"] = os.getloadavg()
    return res


def summarize(cases: list[dict]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(c["model"] for c in cases):
        cs = [c for c in cases if c["model"] == name and "full" in c and ("halving" in c or "simulated" in c)]
        if not cs:
            continue
        shifts = [repr(float(t)) for t in cs[0]["shifts"]]
        std = {}
        for t in shifts:  # seed noise of the full search, per shift
            vals = [c["full"]["scores"][t] for c in cs if c["full"]["scores"].get(t) is not None]
            std[t] = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        agree = within = 0
        regrets, steps_ratio, wall_ratio = [], [], []
        for c in cs:
            f, h = c["full"], c.get("halving") or c["simulated"]
            best, pick = repr(float(f["winner"])), repr(float(h["winner"]))
            regret = (f["scores"][best] - f["scores"][pick]) * 100
            regrets.append(regret)
            noise = max(std[best], std[pick]) * 100
            agree += best == pick
            within += best == pick or (not math.isnan(noise) and regret <= noise)
            steps_ratio.append(h["cost"]["candidate_steps"] / f["cost"]["candidate_steps"])
            if "loop_seconds" in h:
                wall_ratio.append(h["loop_seconds"] / f["loop_seconds"])
        rows.append({"model": name, "cases": len(cs), "agree": agree, "within_noise": within,
                     "regret_mean_pp": statistics.mean(regrets), "regret_worst_pp": max(regrets),
                     "steps_ratio": statistics.mean(steps_ratio),
                     "wall_ratio": statistics.mean(wall_ratio) if wall_ratio else float("nan"),
                     "real_halving_runs": len(wall_ratio),
                     "full_wall_s": statistics.mean(c["full"]["loop_seconds"] for c in cs),
                     "halving_wall_s": statistics.mean([c["halving"]["loop_seconds"] for c in cs if c.get("halving")]
                                                       or [float("nan")])})
    return rows


def schedule_table(cases: list[dict], etas=(2.0, 3.0), fractions=(0.0625, 0.125, 0.25)) -> None:
    """Other (eta, first rung) choices, simulated exactly from the saved full searches' curves."""
    print("\n| model | eta | first rung | same pick | within seed noise | regret pp (mean / worst) | candidate steps |")
    print("|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(c["model"] for c in cases):
        cs = [c for c in cases if c["model"] == name and "curves" in c.get("full", {})]
        if not cs:
            continue
        for eta in etas:
            for frac in fractions:
                sim = []
                for c in cs:
                    curves = {float(k): v for k, v in c["full"]["curves"].items()}
                    pick, steps = simulate_halving(curves, c.get("batch_size", 256), c["full"]["total_steps"], eta, frac)
                    sim.append({**c, "halving": None, "simulated": {"winner": pick, "cost": {"candidate_steps": steps}}})
                r = summarize(sim)[0]
                print(f"| {name} | {eta:g} | {frac:g} | {r['agree']}/{r['cases']} | {r['within_noise']}/{r['cases']} | "
                      f"{r['regret_mean_pp']:.2f} / {r['regret_worst_pp']:.2f} | {r['steps_ratio']:.3f}x |")


def stable_table(cases: list[dict], fractions=(0.125, 0.25, 0.5), eta: float = 2.0, first: float = 0.125) -> None:
    """``--stop-when-stable`` on top of the benchmark's halving schedule, simulated exactly from the
    saved full searches' per-step counts (the stop test only reads them)."""
    print("\n| model | --stable-fraction | same pick | within seed noise | regret pp (mean / worst) | candidate steps |")
    print("|---|---|---|---|---|---|")
    for name in dict.fromkeys(c["model"] for c in cases):
        cs = [c for c in cases if c["model"] == name and "curves" in c.get("full", {})]
        if not cs:
            continue
        for frac in (None, *fractions):
            sim = []
            for c in cs:
                curves = {float(k): v for k, v in c["full"]["curves"].items()}
                pick, steps = simulate_halving(curves, c.get("batch_size", 256), c["full"]["total_steps"], eta, first,
                                               stable_fraction=frac)
                sim.append({**c, "halving": None, "simulated": {"winner": pick, "cost": {"candidate_steps": steps}}})
            r = summarize(sim)[0]
            print(f"| {name} | {'off' if frac is None else f'{frac:g}'} | {r['agree']}/{r['cases']} | "
                  f"{r['within_noise']}/{r['cases']} | {r['regret_mean_pp']:.2f} / {r['regret_worst_pp']:.2f} | "
                  f"{r['steps_ratio']:.3f}x |")


def print_table(rows: list[dict]) -> None:
    print("| model | cases | same pick | within seed noise | regret pp (mean / worst) | candidate steps | "
          "wall time (real halving runs) | full / halving s per search |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['cases']} | {r['agree']}/{r['cases']} | {r['within_noise']}/{r['cases']} | "
              f"{r['regret_mean_pp']:.2f} / {r['regret_worst_pp']:.2f} | {r['steps_ratio']:.3f}x | "
              f"{r['wall_ratio']:.3f}x ({r['real_halving_runs']}) | {r['full_wall_s']:.1f} / {r['halving_wall_s']:.1f} |")
    tot = sum(r["cases"] for r in rows)
    if tot:
        print(f"\nall models: within seed noise in {sum(r['within_noise'] for r in rows)}/{tot} cases, "
              f"same pick in {sum(r['agree'] for r in rows)}/{tot}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,lenet5,vgg-small,vgg-small-avgpool")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--shifts", default="-1:2.5:0.5")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--train-limit", type=int, default=None, help="training samples (default: all 60000)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--eta", type=float, default=2.0)
    ap.add_argument("--min-fraction", type=float, default=0.125)
    ap.add_argument("--compile", default="off", help="the trainer's compile mode for both schedules")
    ap.add_argument("--real-seeds", type=int, default=5,
                    help="run the real halving search for the first N seeds (wall time, and a check that the "
                         "simulated pick from the full search's per-step counts is the real one); the other "
                         "seeds' picks are simulated exactly")
    ap.add_argument("--out", default=None, help="append one JSON line per (model, seed) case")
    ap.add_argument("--report", default=None, help="print the table from a saved --out file and exit")
    ap.add_argument("--default-path", action="store_true",
                    help="time the default search (compile auto) full and halving vs an eager sequential loop")
    ap.add_argument("--k", type=int, default=6, help="--default-path: number of shifts")
    ap.add_argument("--default-verdict", action="store_true",
                    help="per model: a 5-seed full search (the reference verdict, and the source of every simulated "
                         "3-seed default) and real 3-seed halving searches (eta 2, 3): the default's verdict and cost")
    ap.add_argument("--reuse-reference", default=None, metavar="JSONL",
                    help="--default-verdict: take the 5-seed full reference (per-step counts) from this file instead of "
                         "running it; run today's default (1 seed, full) and the halving candidates (--etas) only")
    ap.add_argument("--etas", default="2,3", help="--default-verdict: the real 3-seed halving runs' eta values")
    args = ap.parse_args()
    if args.report:
        cases = [json.loads(line) for line in Path(args.report).read_text().splitlines() if line.strip()]
        if args.default_verdict or any(c.get("mode") == "default-verdict" for c in cases):
            print_default_table(default_table(cases))
            return
        print_table(summarize(cases))
        schedule_table(cases)
        stable_table(cases)
        return
    import torch

    print(f"# torch {torch.__version__}, {platform.machine()}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()}", flush=True)
    if args.default_path:
        res = default_path(args)
        print(json.dumps(res, indent=1, default=str))
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(res, default=str) + "\n")
        return
    if args.default_verdict:
        cases = []
        for name in args.models.split(","):
            cases.append(default_case(name, args))
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(cases[-1]) + "\n")
        print_default_table(default_table(cases))
        return
    cases = []
    for name in args.models.split(","):
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            case = run_case(name, seed, args)
            case["loadavg"] = os.getloadavg()
            cases.append(case)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(case) + "\n")
            f, h = case["full"], case.get("halving") or case["simulated"]
            print(f"{name} seed {seed}: full pick {f['winner']:g} ({f['loop_seconds']:.1f}s), halving pick "
                  f"{h['winner']:g} ({h.get('loop_seconds', float('nan')):.1f}s{'' if 'halving' in case else ', simulated'}, "
                  f"{h['cost']['candidate_steps'] / f['cost']['candidate_steps']:.3f}x steps), "
                  f"load {case['loadavg'][0]:.1f}", flush=True)
    print_table(summarize(cases))
    schedule_table(cases)


if __name__ == "__main__":
    main()
