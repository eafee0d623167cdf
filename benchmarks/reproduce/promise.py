"""The product's promise, measured: does the shift ``bnnshift search`` picks beat ``t = 0`` after
real training?

Per model (zoo ``mlp``, ``lenet5``, quarter-width ``vgg-small`` with MaxPool) and per seed, on the
full Fashion-MNIST training set:

1. **search** -- ``bnnshift.search.search(SearchConfig(...))`` with the CLI's defaults: the
   default shift grid, one epoch per candidate, Adam 1e-3, batch 256, ranked by first-epoch train
   accuracy. The pick of seed k is the winner of that seed's candidates (``bnnshift search
   --seed-list k``; ties go to the smaller abs(t), as the search report does).
2. **train to the end** -- ``t = pick`` and ``t = 0`` each trained ``epochs`` epochs (Adam 1e-3
   with a per-step cosine schedule to 0, batch 256) through ``bnnshift.search.search_with``
   (patched model, same initial weights and same batch order for every ``t`` of a seed, journal,
   resume). The initial weights are those the search used for that seed (checked: the
   ``init_hash`` of both runs is compared) and the first epoch's batch order is the search's.
3. **evaluate** -- test accuracy on the 10k test images after re-estimating the BN statistics on
   20 training batches (``bnnshift.recalibrate_bn``, as ``bnnshift search --val``).

Reported per model: seeds where the pick beats ``t = 0`` (``wins``), the mean paired gain with a
95% t-interval over seeds, and the same for the best fixed shift in hindsight: the shift with
the best mean final accuracy among those trained to the end for EVERY seed ({0, each seed's pick}
once phase 2 has filled it in; an optimistic, selected-after-the-fact baseline, reported only to
show how much the search leaves on the table).

Order: MLP, LeNet-5, vgg; each model's search and pick-vs-0 trainings first (the figure), then
a second phase that trains every seed's pick for every other seed (the hindsight set).
``promise.json`` is rewritten (atomically) after every model and phase, with per-model
``complete`` flags; an interrupted run resumes from the journals in ``runs/promise_*``.

    python benchmarks/reproduce/promise.py --threads 1              # full (~1-2 h on 1 thread)
    python benchmarks/reproduce/promise.py --quick                  # smoke (seconds, CI)
    python benchmarks/reproduce/promise.py --models mlp,lenet5      # a subset

Another data set (e.g. CIFAR-10 as class folders, ``train/`` + ``test/``): ``--data`` takes any
bnnshift data spec, and ``--grid``, ``--epochs``, ``--n-seeds`` and ``--model-arg`` replace the
Fashion-MNIST settings of the models run (docs/reproduction.md, "CIFAR-10"):

    python benchmarks/reproduce/promise.py --data imagefolder:/tmp/cifar/cifar10 --models vgg-small \
        --model-arg width=0.25 --grid=-1:2.5:0.5 --n-seeds 5 --epochs 8 --no-hindsight --threads 1
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bnnshift import recalibrate_bn  # noqa: E402  (public BN re-estimation)
from bnnshift.data import batch_order_hash, iterate_batches  # noqa: E402
from bnnshift.journal import Journal, shift_key  # noqa: E402
from bnnshift.scan import scan_model  # noqa: E402
from bnnshift.search import SearchConfig, parse_shifts, search, search_with, summarise  # noqa: E402
from bnnshift.train import StepRunner, default_optimizer, evaluate, mix_seed  # noqa: E402

MODELS = {
    "mlp": dict(zoo="mlp", args={}, epochs=15, seeds=[0, 1, 2, 3, 4]),
    "lenet5": dict(zoo="lenet5", args={}, epochs=10, seeds=[0, 1, 2, 3, 4]),
    "vgg-small": dict(zoo="vgg-small", args={"width": 0.25}, epochs=8, seeds=[0, 1, 2]),
}
QUICK_MODELS = {
    "mlp": dict(zoo="mlp", args={"hidden": 32}, epochs=2, seeds=[0, 1]),
    "lenet5": dict(zoo="lenet5", args={"width": 0.25}, epochs=2, seeds=[0, 1]),
    "vgg-small": dict(zoo="vgg-small", args={"width": 0.125}, epochs=1, seeds=[0, 1]),
}
QUICK = dict(train_limit=512, val_limit=500, grid="-0.5:0.5:0.5", compile=False)
FULL = dict(train_limit=None, val_limit=None, grid=None, compile=True)  # grid None = the CLI's default
BATCH, LR = 256, 1e-3


def default_grid() -> str:
    """The ``--shifts`` default of ``bnnshift search`` (read from the CLI, so this follows it)."""
    import inspect

    from bnnshift.cli import search as cli_search

    fn = next(f for n, f in vars(cli_search).items() if callable(f) and "shifts" in _params(f))
    opt = inspect.signature(fn).parameters["shifts"].default
    return getattr(opt, "default", opt)


def _params(f) -> tuple:
    import inspect

    try:
        return tuple(inspect.signature(f).parameters)
    except (TypeError, ValueError):
        return ()


class CosineTrainer:
    """``train_one_epoch(model, *, seed, shift)`` for ``search_with`` that trains ``epochs`` epochs:
    Adam (bnnshift's fused default, lr 1e-3) with a per-step cosine schedule to 0, batch 256,
    the batch order of ``seed`` (epoch 1 = the search's epoch). Returns ``val_acc`` (= ``score``,
    10k test images after BN re-estimation), ``train_acc`` (first epoch), per-epoch train
    accuracy and seconds, and the first epoch's batch-order hash."""

    def __init__(self, bundle, *, epochs: int, compile: bool, channels_last: bool,
                 recalib_batches: int = C.RECALIB_BATCHES):
        self.bundle, self.epochs = bundle, int(epochs)
        self.train_x = bundle.train_x  # search_with moves the model to this dtype/device
        self.channels_last = channels_last  # ... and to channels_last when set
        self.compile = "auto" if compile else "off"
        self.runners: dict = {}
        n = int(bundle.train_x.shape[0])
        rg = torch.Generator().manual_seed(12345)  # the recalibration batches of bnnshift search --val
        self.recalib = [bundle.train_x[torch.randperm(n, generator=rg)[:BATCH]] for _ in range(recalib_batches)]

    def __call__(self, model, *, seed: int, shift: float) -> dict[str, Any]:
        b = self.bundle
        n = int(b.train_x.shape[0])
        per_epoch = n // BATCH
        total = per_epoch * self.epochs
        opt = default_optimizer(model, "adam", LR, 0.0, None)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        runner = self.runners.get(id(model))
        if runner is None:
            runner = self.runners[id(model)] = StepRunner(model, F.cross_entropy, compile=self.compile)
        torch.manual_seed(mix_seed(seed, "train"))
        model.train()
        hits = seen = 0
        loss_sum = 0.0
        acc_epochs, loss_epochs, sec_epochs = [], [], []
        t_epoch = time.perf_counter()
        for i, (xb, yb) in enumerate(iterate_batches(b.train_x, b.train_y, BATCH, seed=seed, steps=total)):
            if self.channels_last and xb.dim() == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            if not runner.verified:
                snap = {k: v.clone() for k, v in model.state_dict().items()}
                loss, logits = runner.first_call(xb, yb, lambda: model.load_state_dict(snap))
            else:
                loss, logits = runner(xb, yb)
                loss.backward()
            lv = float(loss.detach())
            if not math.isfinite(lv):
                return {"failed_step": i + 1, "error": f"loss is {lv} at step {i + 1}", "steps": i + 1}
            opt.step()
            sched.step()
            hits += int((logits.detach().argmax(1) == yb).sum())
            seen += int(yb.shape[0])
            loss_sum += lv
            if (i + 1) % per_epoch == 0:
                acc_epochs.append(hits / seen)
                loss_epochs.append(loss_sum / per_epoch)
                sec_epochs.append(round(time.perf_counter() - t_epoch, 2))
                hits = seen = 0
                loss_sum = 0.0
                t_epoch = time.perf_counter()
        m = _eval_copy(model)
        recalibrate_bn(m, self.recalib)
        test = evaluate(m, b.val_x, b.val_y)
        return {"train_acc": acc_epochs[0], "last_acc": acc_epochs[-1], "val_acc": test, "score": test,
                "loss": loss_epochs[-1], "steps": total, "compiled": runner.compiled,
                "compile_seconds": runner.compile_seconds, "compile_error": runner.compile_error,
                "epoch_train_acc": acc_epochs, "epoch_loss": loss_epochs, "epoch_seconds": sec_epochs,
                "first_epoch_batch_order_hash": batch_order_hash(n, BATCH, seed=seed, steps=per_epoch),
                "torch_threads": torch.get_num_threads()}


def _eval_copy(model):
    import copy

    return copy.deepcopy(model)


# ------------------------------------------------------------------------------ phases


def run_search(name: str, spec: dict, args, mode: dict, out: Path):
    """``bnnshift search`` with the CLI defaults over ``spec['seeds']``; returns (summary, picks)."""
    shape = C.data_shape(args.data)
    margs = C.model_args(shape, {"input_size": shape[1], **spec["args"]})
    grid = args.grid or mode["grid"] or default_grid()
    cfg = SearchConfig(model=f"zoo:{spec['zoo']}", data=args.data, model_args=margs, shifts=parse_shifts(grid),
                       seeds=list(spec["seeds"]), train_limit=mode["train_limit"],
                       compile="auto" if mode["compile"] and not args.no_compile else "off")
    t0 = time.perf_counter()

    class _P:
        def start(self, s, seed, i, n):
            print(f"[{name} search] {i + 1}/{n} t={s:+g} seed={seed} ...", end="", flush=True, file=sys.stderr)

        def end(self, r, i, n):
            print(f" first-epoch train {r.train_acc or float('nan'):.4f} ({r.seconds:.0f}s, "
                  f"{time.perf_counter() - t0:.0f}s total)", flush=True, file=sys.stderr)

    summary = search(cfg, out_dir=out / "runs" / f"promise_{name}" / "search", resume=not args.fresh, force=True,
                     progress=_P())
    picks = {}
    for seed in spec["seeds"]:
        mine = [c for c in summary.candidates if c.seed == seed]
        per_seed = summarise(mine, shifts=summary.shifts, seeds=[seed], sites=summary.sites, config=summary.config,
                             config_hash=summary.config_hash, metric=summary.metric, seconds=0.0)
        picks[seed] = per_seed.winner
    return summary, picks, grid, margs, shape


def run_final(name: str, spec: dict, args, mode: dict, out: Path, margs: dict, shape, plan: dict[int, list[float]]):
    """Train each seed's shifts of ``plan`` to the end (resumable); returns the summary of all."""
    bundle = C.data_bundle(args.data, shape, mode["train_limit"], mode["val_limit"])
    conv = spec["zoo"] != "mlp"
    trainer = CosineTrainer(bundle, epochs=spec["epochs"], compile=mode["compile"] and not args.no_compile,
                            channels_last=conv)
    config = {"model": f"zoo:{spec['zoo']}", "model_args": margs, "data": bundle.name,
              "data_fingerprint": bundle.fingerprint(), "epochs": spec["epochs"], "optimizer": "adam", "lr": LR,
              "schedule": "cosine per step to 0", "batch_size": BATCH, "train_limit": mode["train_limit"],
              "val_limit": mode["val_limit"], "bn_recalib_batches": C.RECALIB_BATCHES}
    run_dir = out / "runs" / f"promise_{name}" / "final"
    t0 = time.perf_counter()

    class _P:
        def start(self, s, seed, i, n):
            print(f"[{name} final] t={s:+g} seed={seed} ({spec['epochs']} epochs) ...", end="", flush=True,
                  file=sys.stderr)

        def end(self, r, i, n):
            print(f" test {r.val_acc or float('nan'):.4f} ({r.seconds:.0f}s, {time.perf_counter() - t0:.0f}s total)",
                  flush=True, file=sys.stderr)

    # the sites, found once by bnnshift's scan (search_with would rescan the model per call)
    torch.manual_seed(0)
    sites = scan_model(C.factory(spec["zoo"], margs)(), shape, name=f"zoo:{spec['zoo']}",
                       batches=[bundle.train_x[:512]], require_sites=True).sites
    candidates = []
    for seed, shifts in plan.items():
        if len(shifts) > 1:  # one call per training first: the journal is re-read before each one,
            for t in shifts:  # so parallel workers (--seeds, --only) never train the same run twice
                search_with(C.factory(spec["zoo"], margs), trainer, shifts=[t], seeds=[seed], input_shape=shape,
                            sites=sites, out_dir=run_dir / f"seed{seed}", resume=not args.fresh, force=True,
                            metric="val_acc", config=config, probe_batches=bundle.train_x[:512], progress=_P(),
                            name=f"zoo:{spec['zoo']}")
        summary = search_with(C.factory(spec["zoo"], margs), trainer, shifts=shifts, seeds=[seed], input_shape=shape,
                              sites=sites, out_dir=run_dir / f"seed{seed}", resume=not args.fresh, force=True, metric="val_acc",
                              config=config, probe_batches=bundle.train_x[:512], progress=_P(),
                              name=f"zoo:{spec['zoo']}")
        candidates += summary.candidates
    return candidates, config


def journaled(out: Path, name: str, plan: dict[int, list[float]]) -> dict[int, list[float]]:
    """``plan`` cut to the (seed, shift) trainings already in the journals (``--report-only``)."""
    kept = {}
    for seed, shifts in plan.items():
        path = out / "runs" / f"promise_{name}" / "final" / f"seed{seed}" / "journal.jsonl"
        have = {shift_key(r["shift"]) for r in Journal(path).records()} if path.is_file() else set()
        got = [t for t in shifts if shift_key(t) in have]
        if got:
            kept[seed] = got
    return kept


# ------------------------------------------------------------------------------ statistics


def paired(gains: list[float]) -> dict[str, Any]:
    """Mean of paired gains (accuracy points) with a two-sided 95% t-interval over seeds."""
    from scipy import stats

    n = len(gains)
    if n == 0:
        return {"n": 0, "wins": 0, "ties": 0, "losses": 0, "mean_gain_pp": None, "ci95_pp": None}
    m = sum(gains) / n
    ci = None
    if n > 1:
        sd = math.sqrt(sum((g - m) ** 2 for g in gains) / (n - 1))
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        ci = [round((m - half) * 100, 3), round((m + half) * 100, 3)]
    return {"n": n, "wins": sum(g > 0 for g in gains), "ties": sum(g == 0 for g in gains),
            "losses": sum(g < 0 for g in gains), "mean_gain_pp": round(m * 100, 3), "ci95_pp": ci,
            "gain_pp_per_seed": [round(g * 100, 3) for g in gains]}


def verdict(p: dict) -> str:
    if not p["n"]:
        return "not measured"
    if p["ties"] == p["n"]:
        return "the search picked t = 0 (or an equal model) on every seed: no gain, no loss"
    if p["ci95_pp"] is None:
        return "one seed: no interval"
    lo, hi = p["ci95_pp"]
    if lo > 0:
        return "pick beats t = 0 (95% interval above 0)"
    if hi < 0:
        return "pick is WORSE than t = 0 (95% interval below 0)"
    return "no difference resolved (95% interval contains 0)"


def analyse(name: str, spec: dict, search_summary, picks: dict, final, grid: str) -> dict[str, Any]:
    acc = {}  # (shift_key, seed) -> final test accuracy
    init = {}
    batch = {}
    secs = 0.0
    for c in final:
        if c.ok:
            acc[(shift_key(c.shift), c.seed)] = c.val_acc
            init[(shift_key(c.shift), c.seed)] = c.init_hash
            batch[c.seed] = c.extra.get("first_epoch_batch_order_hash")
            secs += c.seconds or 0.0
    s_init = {c.seed: c.init_hash for c in search_summary.candidates}
    s_batch = {c.seed: c.batch_order_hash for c in search_summary.candidates}
    z = shift_key(0.0)
    seeds_done = [s for s in spec["seeds"] if (z, s) in acc and (shift_key(picks[s]), s) in acc]
    gains = [acc[(shift_key(picks[s]), s)] - acc[(z, s)] for s in seeds_done]
    main = paired(gains)
    # hindsight: shifts trained to the end for every finished seed
    shifts_all = sorted({float(k) for (k, s) in acc})
    full = [t for t in shifts_all if seeds_done and all((shift_key(t), s) in acc for s in seeds_done)]
    means = {t: sum(acc[(shift_key(t), s)] for s in seeds_done) / len(seeds_done) for t in full}
    # with only t = 0 trained for every seed there is no hindsight choice to report
    best = max(full, key=lambda t: (means[t], -abs(t))) if len(full) > 1 else None
    hind = paired([acc[(shift_key(best), s)] - acc[(z, s)] for s in seeds_done]) if best is not None else paired([])
    same_init = all(init.get((k, s)) == s_init.get(s) for (k, s) in acc)
    same_batches = all(batch.get(s) == s_batch.get(s) for s in batch)
    return {
        "zoo": f"zoo:{spec['zoo']}", "model_args": spec["args"], "epochs": spec["epochs"],
        "seeds": seeds_done, "seeds_planned": list(spec["seeds"]),
        "complete": len(seeds_done) == len(spec["seeds"]),
        "search_grid": grid, "pick_per_seed": [picks[s] for s in spec["seeds"]],
        "wins": main["wins"], "ties": main["ties"], "mean_gain_pp": main["mean_gain_pp"], "ci95_pp": main["ci95_pp"],
        "gain_pp_per_seed": main.get("gain_pp_per_seed"), "verdict": verdict(main),
        "test_acc_t0": [acc[(z, s)] for s in seeds_done],
        "test_acc_pick": [acc[(shift_key(picks[s]), s)] for s in seeds_done],
        "hindsight": {"shifts_trained_for_all_seeds": full, "mean_test_acc": {shift_key(t): means[t] for t in full},
                      "best_shift": best, "wins": hind["wins"], "ties": hind["ties"],
                      "mean_gain_pp": hind["mean_gain_pp"], "ci95_pp": hind["ci95_pp"],
                      "gain_pp_per_seed": hind.get("gain_pp_per_seed")},
        "same_init_as_search": same_init, "first_epoch_batches_as_search": same_batches,
        "final_training_seconds": round(secs, 1),
        "search_seconds": round(sum(c.seconds or 0.0 for c in search_summary.candidates), 1),
    }


def table_md(models: dict) -> str:
    rows = ["| model (epochs) | seeds | first-epoch pick per seed | pick beats t = 0 | mean gain, 95% interval "
            "| best fixed t in hindsight: gain, 95% interval | verdict |", "|---|---|---|---|---|---|---|"]

    def ci(v):
        return "n/a" if v is None else f"[{v[0]:+.2f}, {v[1]:+.2f}]"

    for name, a in models.items():
        h = a["hindsight"]
        picks = ", ".join(f"{p:+g}" for p in a["pick_per_seed"])
        done = "" if a["complete"] else f" (partial: {len(a['seeds'])}/{len(a['seeds_planned'])} seeds)"
        mg = "n/a" if a["mean_gain_pp"] is None else f"{a['mean_gain_pp']:+.2f} pp"
        hg = ("not measured (no shift but 0 trained for every seed)" if h["best_shift"] is None
              else f"t = {h['best_shift']:+g}: {h['mean_gain_pp']:+.2f} pp")
        rows.append(f"| {name} ({a['epochs']}) | {len(a['seeds'])}{done} | {picks} | {a['wins']}/{len(a['seeds'])} "
                    f"| {mg} {ci(a['ci95_pp'])} | {hg}{'' if h['best_shift'] is None else ' ' + ci(h['ci95_pp'])} "
                    f"| {a['verdict']} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------ main


def _model_args(pairs: list[str]) -> dict[str, Any]:
    """``["width=0.25", "pool=avg"]`` -> ``{"width": 0.25, "pool": "avg"}`` (ints, floats parsed).

    Raises ValueError naming a pair without ``=``."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, val = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--model-arg {pair!r}: expected KEY=VALUE, e.g. width=0.25")
        for cast in (int, float):
            try:
                out[key.strip()] = cast(val)
                break
            except ValueError:
                continue
        else:
            out[key.strip()] = val
    return out


def main() -> None:
    ap = C.parser(__doc__)
    ap.add_argument("--models", default=None, help="comma list of mlp,lenet5,vgg-small (default all, in that order)")
    ap.add_argument("--no-hindsight", action="store_true", help="skip phase 2 (every pick for every seed)")
    ap.add_argument("--seeds", default=None,
                    help="worker mode: only these seeds (comma list, in this order), trained into the journals; "
                         "no promise.json and no hindsight phase (run again without --seeds to write them). "
                         "Several workers with disjoint seeds can share one --out")
    ap.add_argument("--only", choices=("pick", "zero"), default=None,
                    help="worker mode (with --seeds): train only t = pick, or only t = 0 (no search)")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: write promise.json from the trainings already in the journals "
                         "(unfinished ones are reported as missing seeds)")
    ap.add_argument("--train-shift", type=float, default=None,
                    help="worker mode (with --seeds): train this fixed shift to the end (no search), e.g. a shift "
                         "the search is expected to pick, or one of the hindsight set")
    ap.add_argument("--grid", default=None,
                    help="the search's shifts, as bnnshift search --shifts (default: the CLI's default grid)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of the training to the end, every model")
    ap.add_argument("--n-seeds", type=int, default=None, help="seeds 0..N-1 for every model (default: per model)")
    ap.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="factory argument for every model run, e.g. width=0.25 (repeatable; numbers parsed)")
    args = ap.parse_args()
    if (args.only or args.train_shift is not None) and args.seeds is None:
        ap.error("--only and --train-shift need --seeds (they are worker options)")
    out = C.setup(args)
    t0 = time.perf_counter()
    mode = QUICK if args.quick else FULL
    specs = {k: dict(v) for k, v in (QUICK_MODELS if args.quick else MODELS).items()}
    try:
        overrides = _model_args(args.model_arg)
    except ValueError as exc:
        ap.error(str(exc))
    if args.epochs is not None and args.epochs < 1 or args.n_seeds is not None and args.n_seeds < 1:
        ap.error("--epochs and --n-seeds must be at least 1")
    for v in specs.values():
        v["args"] = {**v["args"], **overrides}
        if args.epochs is not None:
            v["epochs"] = args.epochs
        if args.n_seeds is not None:
            v["seeds"] = list(range(args.n_seeds))
    worker = args.seeds is not None
    if worker:
        only = [int(v) for v in args.seeds.split(",") if v.strip()]
        for v in specs.values():
            v["seeds"] = [s for s in only if s in v["seeds"]]
    names = [m.strip() for m in args.models.split(",")] if args.models else list(specs)
    unknown = [m for m in names if m not in specs]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(specs)}")
    state: dict[str, dict] = {}
    payload: dict[str, Any] = {"claim": "promise", "title": "first-epoch pick of bnnshift search vs t = 0 after "
                               "training to the end", "models": {}}

    def write(phase: str) -> None:
        # several processes may each run some models into the same --out (e.g. --models mlp and
        # --models lenet5 side by side): merge with what the others wrote, under a lock
        from filelock import FileLock

        if worker:
            return
        path = out / "promise.json"
        with FileLock(str(path) + ".lock"):
            old = json.loads(path.read_text()) if path.is_file() else {}
            keep = old.get("models", {}) if old.get("mode") == ("quick" if args.quick else "full") else {}
            mine = {n: analyse(n, *state[n]["args"]) for n in names if n in state}
            mine = {**{k: v for k, v in keep.items() if k not in mine}, **mine}
            payload["models"] = {k: mine[k] for k in sorted(mine, key=lambda k: list(MODELS).index(k)
                                                            if k in MODELS else 99)}
            payload["table_md"] = table_md(payload["models"])
            payload["phase"] = phase
            payload.update(C.meta(args, seeds=sorted({s for n in names for s in specs[n]["seeds"]}),
                                  settings={"mode": mode, "models": {n: specs[n] for n in names}}, t0=t0))
            payload["torch_threads"] = torch.get_num_threads()
            for k, v in payload["models"].items():  # flat keys the issue asks for, per model
                payload[k] = {key: v[key] for key in ("seeds", "wins", "mean_gain_pp", "ci95_pp", "pick_per_seed")}
            C.write_json(path, payload)

    # phase 1: search, then pick vs 0, model after model
    names = [n for n in names if specs[n]["seeds"]]
    for n in names:
        spec = specs[n]
        if args.train_shift is not None:  # a fixed shift needs no search
            shape = C.data_shape(args.data)
            margs = C.model_args(shape, {"input_size": shape[1], **spec["args"]})
            run_final(n, spec, args, mode, out, margs, shape, {seed: [args.train_shift] for seed in spec["seeds"]})
            continue
        if args.only == "zero":  # t = 0 needs no search
            shape = C.data_shape(args.data)
            margs = C.model_args(shape, {"input_size": shape[1], **spec["args"]})
            run_final(n, spec, args, mode, out, margs, shape, {seed: [0.0] for seed in spec["seeds"]})
            continue
        ssum, picks, grid, margs, shape = run_search(n, spec, args, mode, out)
        plan = {seed: list(dict.fromkeys([picks[seed], 0.0])) for seed in spec["seeds"]}
        if args.only == "pick":
            plan = {seed: [picks[seed]] for seed in spec["seeds"]}
        if args.report_only:
            plan = journaled(out, n, plan)
        final, _ = run_final(n, spec, args, mode, out, margs, shape, plan)
        state[n] = {"args": (spec, ssum, picks, final, grid), "margs": margs, "shape": shape, "picks": picks}
        write(f"pick vs 0 done for {', '.join(state)}")
    # phase 2: every seed's pick for every seed (the hindsight set)
    if not args.no_hindsight and not worker:
        for n in names:
            spec, st = specs[n], state[n]
            hs = sorted(set(st["picks"].values()) | {0.0})
            plan = {seed: hs for seed in spec["seeds"]}
            if args.report_only:
                plan = journaled(out, n, plan)
            final, _ = run_final(n, spec, args, mode, out, st["margs"], st["shape"], plan)
            st["args"] = (spec, st["args"][1], st["picks"], final, st["args"][4])
            write(f"hindsight done for {n}")
    write("done")
    if not worker:
        print(payload["table_md"])


if __name__ == "__main__":
    main()
