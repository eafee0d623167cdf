"""Claim 4 (PAPER.md): the shift effect on small models (binary 2-hidden-layer MLP and binary
LeNet-5; the paper: MNIST, gains of about 0.2%). Same curve as claims 2/3: first-epoch train
accuracy and final test accuracy vs t, >= 5 seeds (the effect is small), every t of a seed from
the same init and batch order (one resumable bnnshift search per model).

    python benchmarks/reproduce/claim4_small_models.py            # full (see FULL below)
    python benchmarks/reproduce/claim4_small_models.py --quick    # smoke
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SHIFTS = [-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0]
FULL = {
    "mlp": dict(train_limit=30720, val_limit=None, epochs=2, seeds=[0, 1, 2, 3, 4], shifts=SHIFTS, compile=True),
    "lenet5": dict(train_limit=15360, val_limit=None, epochs=2, seeds=[0, 1, 2, 3, 4], shifts=SHIFTS, compile=True),
}
QUICK = {
    "mlp": dict(train_limit=1024, val_limit=500, epochs=1, seeds=[0, 1], shifts=[-1.0, 0.0, 1.0], compile=False,
                recalib_batches=2),
    "lenet5": dict(train_limit=512, val_limit=500, epochs=1, seeds=[0], shifts=[0.0, 1.0], compile=False,
                   recalib_batches=2),
}
CHUNKS = (3, 5)  # seeds run in chunks (both models get seeds 0-2 first), each chunk one search call


def settings(args) -> dict:
    return {k: dict(v) for k, v in (QUICK if args.quick else FULL).items()}


def grids(args, out: Path, *, progress: bool = True) -> dict:
    cfgs = settings(args)
    shape = C.data_shape(args.data)
    res = {}
    for k in (CHUNKS if not args.quick else (max(len(c["seeds"]) for c in cfgs.values()),)):
        for zoo, cfg in cfgs.items():
            margs = C.model_args(shape, {"input_size": shape[1]})
            res[zoo] = C.run_grid(f"claim4_{zoo}", zoo=zoo, margs=margs, data=args.data, shape=shape,
                                  shifts=cfg["shifts"], seeds=cfg["seeds"][:k], epochs=cfg["epochs"],
                                  train_limit=cfg["train_limit"], val_limit=cfg["val_limit"], out=out,
                                  fresh=args.fresh and k == CHUNKS[0],
                                  compile=cfg["compile"] and not args.no_compile, progress=progress,
                                  recalib_batches=cfg.get("recalib_batches", C.RECALIB_BATCHES))
    return res


def main() -> None:
    ap = C.parser(__doc__)
    args = ap.parse_args()
    out = C.setup(args)
    t0 = time.perf_counter()
    res = grids(args, out)
    cfgs = settings(args)
    payload = {"claim": "4", "title": "small models (MLP, LeNet-5): accuracy vs shift", "models": {}}
    plt = C.plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (zoo, (summary, config)), ax in zip(res.items(), axes):
        tab = C.table(summary)
        info = {"config": config, "config_hash": summary.config_hash, "sites": summary.sites, "table": tab,
                "train_seconds_total": round(sum(c.seconds or 0 for c in summary.candidates), 1)}
        for metric in ("first_epoch_train_acc", "final_test_acc"):
            rows = [r for r in tab[metric] if r["mean"] is not None]
            b = max(rows, key=lambda r: (r["mean"], -abs(r["shift"])))
            worst = min(rows, key=lambda r: r["mean"])
            info[f"best_{metric}"] = {"shift": b["shift"], "mean": b["mean"], "std": b["std"],
                                      "gain_vs_0_mean": b["diff_vs_0_mean"], "gain_vs_0_std": b["diff_vs_0_std"],
                                      "gain_vs_0_t": b["diff_vs_0_t"], "positive_seeds": b["diff_vs_0_positive_seeds"],
                                      "n": b["n"]}
            info[f"worst_{metric}"] = {"shift": worst["shift"], "mean": worst["mean"]}
        payload["models"][zoo] = info
        ax2 = ax.twinx()
        C.curve_plot(ax, tab, "first_epoch_train_acc", "first-epoch train", color="tab:blue")
        C.curve_plot(ax2, tab, "final_test_acc", f"test after {cfgs[zoo]['epochs']} epochs", color="tab:red")
        ax.set_ylabel("first-epoch train accuracy (%)", color="tab:blue")
        ax2.set_ylabel("final test accuracy (%)", color="tab:red")
        ax.set_title(f"{zoo}: {len(cfgs[zoo]['seeds'])} seeds, mean ± std")
    fig.tight_layout()
    C.save_fig(fig, out / "claim4_small_models.png")
    payload.update(C.meta(args, seeds=sorted({s for c in cfgs.values() for s in c["seeds"]}), settings=cfgs, t0=t0))
    C.write_json(out / "claim4_small_models.json", payload)
    for zoo, info in payload["models"].items():
        for metric in ("first_epoch_train_acc", "final_test_acc"):
            b = info[f"best_{metric}"]
            print(f"{zoo} {metric}: best t={b['shift']:+g} gain vs t=0 "
                  f"{C.fmt_pp(b['gain_vs_0_mean'], b['gain_vs_0_std'])} ({b['positive_seeds']}/{b['n']} seeds), "
                  f"worst t={info[f'worst_{metric}']['shift']:+g}")


if __name__ == "__main__":
    main()
