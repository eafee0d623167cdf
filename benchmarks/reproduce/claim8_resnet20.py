"""Claim 8 (PAPER.md): ResNet-20 with Bi-Real double skip. An extra PReLU after every block
already skews the distribution, so shifting the threshold hurts; with LeakyReLU(s) the benefit
of shifting returns as s -> 1 (s = 1 is the identity = the plain model).

Variants (zoo): resnet20-bireal (no follower, = slope 1), resnet20-bireal-prelu, and
resnet20-bireal-leakyrelu with slope in {0, 0.25, 0.5, 0.9}. Each is one resumable bnnshift
search (first-epoch train accuracy and test accuracy vs t), seeds run round-robin over the
variants. Reduced to fit this machine (stated in docs/reproduction.md): width 0.25 (4/8/16
channels), images resized to half their side (14x14 for Fashion-MNIST), a training subset.

    python benchmarks/reproduce/claim8_resnet20.py [--quick]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

VARIANTS = [  # (label, zoo name, extra args, follower slope for the plot; PReLU learns its own)
    ("none (s=1)", "resnet20-bireal", {}, 1.0),
    ("PReLU", "resnet20-bireal-prelu", {}, None),
    ("LeakyReLU s=0", "resnet20-bireal-leakyrelu", {"slope": 0.0}, 0.0),
    ("LeakyReLU s=0.25", "resnet20-bireal-leakyrelu", {"slope": 0.25}, 0.25),
    ("LeakyReLU s=0.5", "resnet20-bireal-leakyrelu", {"slope": 0.5}, 0.5),
    ("LeakyReLU s=0.9", "resnet20-bireal-leakyrelu", {"slope": 0.9}, 0.9),
]
FULL = dict(width=0.25, side_div=2, train_limit=7680, val_limit=2000, epochs=1, seeds=[0, 1, 2],
            shifts=[-0.5, 0.0, 0.5, 1.0], compile=False)
QUICK = dict(width=0.25, side_div=2, train_limit=512, val_limit=500, epochs=1, seeds=[0], shifts=[0.0, 0.5],
             compile=False, recalib_batches=2)


def settings(args) -> dict:
    return dict(QUICK if args.quick else FULL)


def grids(args, out: Path, *, progress: bool = True) -> dict:
    cfg = settings(args)
    c, h, w = C.data_shape(args.data)
    shape = (c, h // cfg["side_div"], w // cfg["side_div"])
    res = {}
    for k in range(len(cfg["seeds"])):
        for label, zoo, extra, _ in VARIANTS:
            margs = C.model_args(shape, {"width": cfg["width"], **extra})
            tag = zoo + "".join(f"_{a}{v:g}" for a, v in extra.items())
            res[label] = C.run_grid(f"claim8_{tag}", zoo=zoo, margs=margs, data=args.data, shape=shape,
                                    shifts=cfg["shifts"], seeds=cfg["seeds"][:k + 1], epochs=cfg["epochs"],
                                    train_limit=cfg["train_limit"], val_limit=cfg["val_limit"], out=out,
                                    fresh=args.fresh and k == 0, compile=cfg["compile"] and not args.no_compile,
                                    progress=progress,
                                    recalib_batches=cfg.get("recalib_batches", C.RECALIB_BATCHES))
    return res


def main() -> None:
    ap = C.parser(__doc__)
    args = ap.parse_args()
    out = C.setup(args)
    t0 = time.perf_counter()
    cfg = settings(args)
    res = grids(args, out)
    payload = {"claim": "8", "title": "ResNet-20 double skip: PReLU / LeakyReLU follower vs shift benefit",
               "variants": {}}
    plt = C.plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for label, zoo, extra, slope in VARIANTS:
        summary, config = res[label]
        tab = C.table(summary)
        info = {"zoo": zoo, "args": extra, "slope": slope, "config": config, "config_hash": summary.config_hash,
                "table": tab, "train_seconds_total": round(sum(c.seconds or 0 for c in summary.candidates), 1)}
        for metric in ("first_epoch_train_acc", "final_test_acc"):
            rows = [r for r in tab[metric] if r["mean"] is not None]
            b = max(rows, key=lambda r: (r["mean"], -abs(r["shift"])))
            pos = [r for r in rows if r["shift"] > 0]
            bp = max(pos, key=lambda r: r["mean"]) if pos else None
            info[f"best_{metric}"] = {"shift": b["shift"], "gain_vs_0_mean": b["diff_vs_0_mean"],
                                      "gain_vs_0_std": b["diff_vs_0_std"], "n": b["n"]}
            info[f"best_positive_{metric}"] = ({"shift": bp["shift"], "gain_vs_0_mean": bp["diff_vs_0_mean"],
                                                "gain_vs_0_std": bp["diff_vs_0_std"],
                                                "positive_seeds": bp["diff_vs_0_positive_seeds"], "n": bp["n"]}
                                               if bp else None)
        payload["variants"][label] = info
        for ax, metric in zip(axes, ("first_epoch_train_acc", "final_test_acc")):
            rows = tab[metric]
            ax.errorbar([r["shift"] for r in rows], [(r["diff_vs_0_mean"] or 0) * 100 for r in rows],
                        yerr=[(r["diff_vs_0_std"] or 0) * 100 for r in rows], marker="o", capsize=3, label=label)
    axes[0].set_ylabel("first-epoch train acc. minus t=0 (pp)")
    axes[1].set_ylabel(f"test acc. after {cfg['epochs']} epoch(s) minus t=0 (pp)")
    for ax in axes:
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel("threshold shift t")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"ResNet-20 Bi-Real double skip (width {cfg['width']}, 1/{cfg['side_div']} side) on {args.data}, "
                 f"{len(cfg['seeds'])} seeds, paired difference to t = 0, mean ± std")
    fig.tight_layout()
    C.save_fig(fig, out / "claim8_resnet20.png")
    payload.update(C.meta(args, seeds=cfg["seeds"], settings=cfg, t0=t0))
    C.write_json(out / "claim8_resnet20.json", payload)
    for label, info in payload["variants"].items():
        b = info["best_positive_first_epoch_train_acc"]
        bt = info["best_positive_final_test_acc"]
        print(f"{label:18s} best t>0 first-epoch train gain {C.fmt_pp(b['gain_vs_0_mean'], b['gain_vs_0_std'])} "
              f"(t={b['shift']:+g}); test gain {C.fmt_pp(bt['gain_vs_0_mean'], bt['gain_vs_0_std'])} (t={bt['shift']:+g})")


if __name__ == "__main__":
    main()
