"""Claims 2 and 3 (PAPER.md): binary vgg-small, test accuracy vs threshold shift t, with MaxPool
(claim 2/3: only positive shifts help) and with AvgPool (claim 3: the curve is symmetric).

Each model's grid is one resumable bnnshift search (``search_with`` around the shared
multi-epoch trainer of _common.py): every t of a seed starts from the same weights and sees the
same batches. Records the first-epoch train accuracy (the search signal) and the final test
accuracy. Seeds are run round-robin over the two models (seed 0 of both, then seed 1...), so an
interrupted run leaves complete seeds; re-running the same command continues from the journals.

    python benchmarks/reproduce/claim23_pooling.py            # full (see FULL below)
    python benchmarks/reproduce/claim23_pooling.py --quick    # smoke
    python benchmarks/reproduce/claim23_pooling.py --data cifar10:/path/to/cifar-10-batches-py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SHIFTS = [-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0]
FULL = dict(width=0.125, train_limit=15360, val_limit=None, epochs=2, seeds=[0, 1, 2, 3, 4], shifts=SHIFTS, compile=True)
QUICK = dict(width=0.125, train_limit=512, val_limit=500, epochs=1, seeds=[0], shifts=[-0.5, 0.0, 0.5], compile=False,
             recalib_batches=2)
POOLS = {"max": "vgg-small", "avg": "vgg-small-avgpool"}


def settings(args) -> dict:
    return dict(QUICK if args.quick else FULL)


def grids(args, out: Path, *, progress: bool = True) -> dict:
    """Run (or resume) both grids; returns {pool: (summary, config)}."""
    cfg = settings(args)
    shape = C.data_shape(args.data)
    margs = C.model_args(shape, {"width": cfg["width"], "input_size": shape[1]})
    res = {}
    seeds = cfg["seeds"]
    for k in range(len(seeds)):  # round robin: complete seeds for both models first
        for pool, zoo in POOLS.items():
            res[pool] = C.run_grid(f"claim23_{zoo}", zoo=zoo, margs=margs, data=args.data, shape=shape,
                                   shifts=cfg["shifts"], seeds=seeds[:k + 1], epochs=cfg["epochs"],
                                   train_limit=cfg["train_limit"], val_limit=cfg["val_limit"], out=out,
                                   fresh=args.fresh and k == 0, compile=cfg["compile"] and not args.no_compile,
                                   progress=progress,
                                   recalib_batches=cfg.get("recalib_batches", C.RECALIB_BATCHES))
    return res


def best_of(tab, metric):
    rows = [r for r in tab[metric] if r["mean"] is not None]
    return max(rows, key=lambda r: (r["mean"], -abs(r["shift"])))


def asymmetry(tab, metric):
    """Paired (per seed) gain(+|t|) - gain(-|t|): > 0 means positive shifts help more."""
    rows = {C.shift_key(r["shift"]): r for r in tab[metric]}
    out = []
    for r in tab[metric]:
        t = r["shift"]
        if t <= 0 or C.shift_key(-t) not in rows:
            continue
        pos, neg = r["values"], rows[C.shift_key(-t)]["values"]
        d = [p - n for p, n in zip(pos, neg) if p is not None and n is not None]
        m, s = C._mean_std(d)
        out.append({"abs_shift": t, "mean": m, "std": s, "n": len(d), "positive_seeds": sum(1 for v in d if v > 0)})
    return out


def main() -> None:
    ap = C.parser(__doc__)
    args = ap.parse_args()
    out = C.setup(args)
    t0 = time.perf_counter()
    res = grids(args, out)
    payload = {"claim": "2 and 3", "title": "vgg-small: accuracy vs shift, MaxPool vs AvgPool", "models": {}}
    plt = C.plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for pool, (summary, config) in res.items():
        tab = C.table(summary)
        info = {"config": config, "config_hash": summary.config_hash, "sites": summary.sites, "table": tab,
                "train_seconds_total": round(sum(c.seconds or 0 for c in summary.candidates), 1),
                "compiled": summary.compiled, "compile_error": summary.compile_error}
        for metric in ("first_epoch_train_acc", "final_test_acc"):
            b = best_of(tab, metric)
            info[f"best_{metric}"] = {"shift": b["shift"], "mean": b["mean"], "std": b["std"],
                                      "gain_vs_0_mean": b["diff_vs_0_mean"], "gain_vs_0_std": b["diff_vs_0_std"],
                                      "gain_vs_0_t": b["diff_vs_0_t"],
                                      "positive_seeds": b["diff_vs_0_positive_seeds"], "n": b["n"]}
            info[f"asymmetry_{metric}"] = asymmetry(tab, metric)
        payload["models"][pool] = info
        C.curve_plot(axes[0], tab, "first_epoch_train_acc", f"{pool}pool")
        C.curve_plot(axes[1], tab, "final_test_acc", f"{pool}pool")
        for metric, ls in (("final_test_acc", "-"), ("first_epoch_train_acc", ":")):
            rows = [r for r in tab[metric] if abs(r["shift"]) <= 1.0 and r["diff_vs_0_mean"] is not None]
            axes[2].errorbar([r["shift"] + (0.02 if pool == "avg" else -0.02) for r in rows],
                             [r["diff_vs_0_mean"] * 100 for r in rows], yerr=[(r["diff_vs_0_std"] or 0) * 100 for r in rows],
                             marker="o", capsize=3, ls=ls, color="tab:blue" if pool == "max" else "tab:orange",
                             label=f"{pool}pool, {'test after training' if metric == 'final_test_acc' else 'first-epoch train'}")
    cfg = settings(args)
    axes[0].set_ylabel("first-epoch train accuracy (%)")
    axes[1].set_ylabel(f"test accuracy after {cfg['epochs']} epochs (%)")
    axes[2].axhline(0, color="grey", lw=0.6)
    axes[2].set_xlabel("threshold shift t")
    axes[2].set_ylabel("paired difference to t = 0 (pp)")
    axes[2].set_title("zoom |t| <= 1: acc(t) - acc(0), same seed")
    axes[2].grid(alpha=0.3)
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(f"vgg-small (width {cfg['width']}) on {args.data}, {len(cfg['seeds'])} seeds, mean ± std")
    C.save_fig(fig, out / "claim23_pooling.png")
    payload.update(C.meta(args, seeds=cfg["seeds"], settings=cfg, t0=t0))
    C.write_json(out / "claim23_pooling.json", payload)
    for pool, info in payload["models"].items():
        for metric in ("first_epoch_train_acc", "final_test_acc"):
            b = info[f"best_{metric}"]
            print(f"{pool}pool {metric}: best t={b['shift']:+g} gain vs t=0 "
                  f"{C.fmt_pp(b['gain_vs_0_mean'], b['gain_vs_0_std'])} ({b['positive_seeds']}/{b['n']} seeds)")


if __name__ == "__main__":
    main()
