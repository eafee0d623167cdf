"""Wall time of K candidates x 1 epoch: eager sequential vs bnnshift's default search path.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_search.py --width 0.25 --train-limit 15360
    python benchmarks/bench_search.py --quick          # a smoke run (a few steps)

* eager sequential: for each candidate a freshly built model, patched, trained eagerly
  (``compile='off'``), i.e. what a user's plain loop does;
* default path: ``bnnshift.search.search(cfg)`` (one patched model reused, the training step
  compiled once; the compile time is INCLUDED in its wall time).

Also prints the share of this machine's fp32 GEMM peak (big ``torch.mm``) that each loop
reaches, counting 3 x forward FLOPs per training sample (forward + 2x backward).
Data: Fashion-MNIST in memory, vgg-small with ``in_chans=1, input_size=28``.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a busy neighbour made spinning threads 5-20x slower

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


def gemm_peak(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def forward_flops(cfg) -> float:
    from bnnshift.load import load_model
    from bnnshift.scan import model_summary

    lm = load_model(cfg.model, args=cfg.model_args)
    s = model_summary(lm.model, cfg.input_shape, set(), set())
    return 2.0 * (s["binary_macs"] + s["float_macs"])  # per sample (binary layers run as fp32 GEMMs here)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:vgg-small")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--k", type=int, default=6, help="number of candidates")
    ap.add_argument("--train-limit", type=int, default=None, help="training samples (default: all 60000)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2048 samples")
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time eager + channels_last and compiled + contiguous (sequential reuse)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from bnnshift.search import SearchConfig, SearchContext, run_candidate, search
    from bnnshift.train import set_threads

    set_threads("cpu")
    limit = 2048 if a.quick else a.train_limit
    shifts = [round(-0.5 + 0.5 * i, 3) for i in range(a.k)]
    common = dict(model=a.model, data="fashion-mnist", model_args={"width": a.width, "in_chans": 1, "input_size": 28},
                  input_shape=(1, 28, 28), shifts=shifts, seeds=[0], batch_size=a.batch_size, train_limit=limit)
    peak = gemm_peak()
    res: dict = {"model": a.model, "width": a.width, "k": a.k, "train_samples": limit or 60000,
                 "batch_size": a.batch_size, "threads": torch.get_num_threads(), "gemm_peak_gflops": peak / 1e9}
    flops = forward_flops(SearchConfig(**common))
    steps = (limit or 60000) // a.batch_size
    work = 3 * flops * steps * a.batch_size * a.k

    if not a.skip_eager:
        cfg_e = SearchConfig(compile="off", memory_format="contiguous", **common)
        ctx = SearchContext.open(cfg_e)  # load data + scan once (every path gets this setup for free)
        t0 = time.perf_counter()
        for s in shifts:  # a plain loop: a fresh model per candidate, eager, NCHW
            run_candidate(cfg_e, s, 0, model_factory=_factory(cfg_e), context=ctx)
        res["eager_seconds"] = time.perf_counter() - t0
        res["eager_peak_share"] = work / res["eager_seconds"] / peak
        del ctx
    if a.breakdown:
        for label, kw in (("eager_channels_last", dict(compile="off", memory_format="channels_last")),
                          ("compiled_contiguous", dict(compile="auto", memory_format="contiguous"))):
            c = SearchConfig(**kw, **common)
            ctx = SearchContext.open(c)
            t0 = time.perf_counter()
            search(c, context=ctx)
            res[f"{label}_seconds"] = time.perf_counter() - t0
            del ctx

    cfg_d = SearchConfig(**common)  # the defaults: compile auto, channels_last for conv models
    ctx = SearchContext.open(cfg_d)  # data + scan, as above
    t0 = time.perf_counter()
    summary = search(cfg_d, context=ctx)
    res["default_seconds"] = time.perf_counter() - t0
    res["default_compiled"] = summary.compiled
    res["compile_seconds"] = summary.compile_seconds
    res["compile_error"] = summary.compile_error
    res["default_peak_share"] = work / res["default_seconds"] / peak
    steady = [c.seconds for c in summary.candidates[1:] if c.seconds]
    if steady:
        res["default_steady_seconds_per_candidate"] = sum(steady) / len(steady)
    if "eager_seconds" in res:
        res["ratio_default_over_eager"] = res["default_seconds"] / res["eager_seconds"]
        if steady:
            res["ratio_steady_per_candidate"] = res["default_steady_seconds_per_candidate"] / (res["eager_seconds"] / a.k)
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k:40s} {v:.4g}" if isinstance(v, float) else f"{k:40s} {v}")
    return 0


def _factory(cfg):
    from bnnshift.load import load_model

    def build(seed: int):
        return load_model(cfg.model, args=cfg.model_args).model

    return build


if __name__ == "__main__":
    sys.exit(main())
