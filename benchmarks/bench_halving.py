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
    ``bnnshift.search.halving.HalvingLoop``: best score, then smaller |t|. Returns (pick, candidate steps).
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
        alive = ranked[:keep_n]
        if n == total:  # the last rung stopped early: the winner alone finishes the epoch
            plan.append(total)
        prev, r = at, r + 1
    raise AssertionError("no last rung")


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
    args = ap.parse_args()
    if args.report:
        cases = [json.loads(line) for line in Path(args.report).read_text().splitlines() if line.strip()]
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
