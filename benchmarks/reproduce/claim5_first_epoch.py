"""Claim 5 (PAPER.md): the train accuracy at the end of the FIRST epoch, as a function of t,
has the same shape as the final accuracy, so t can be searched with one epoch per candidate.

No new training: this reads (resumes) the grids of claims 2/3 (vgg-small MaxPool / AvgPool)
and claim 4 (MLP, LeNet-5), whose every candidate recorded its first-epoch train accuracy and
its test accuracy after the last epoch (the number of epochs is in each model's settings).
If those grids are missing or incomplete they are run/continued first (same settings, same
journals). Reports per model: Spearman rank correlation between the two curves (seed means
and per seed), and the regret of the first-epoch pick = final accuracy of the t picked by the
first epoch minus the best final accuracy in the grid (0 = the pick was the best).

    python benchmarks/reproduce/claim5_first_epoch.py [--quick]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import claim23_pooling  # noqa: E402
import claim4_small_models  # noqa: E402


def analyse(summary) -> dict:
    tab = C.table(summary)
    shifts = tab["shifts"]
    f_rows, g_rows = tab["first_epoch_train_acc"], tab["final_test_acc"]
    f = [r["mean"] for r in f_rows]
    g = [r["mean"] for r in g_rows]
    pick = max(range(len(shifts)), key=lambda i: (f[i], -abs(shifts[i])))
    best = max(range(len(shifts)), key=lambda i: (g[i], -abs(shifts[i])))
    i0 = next(i for i, s in enumerate(shifts) if s == 0.0)
    per_seed = []
    for k, seed in enumerate(tab["seeds"]):
        fs = [r["values"][k] for r in f_rows]
        gs = [r["values"][k] for r in g_rows]
        if any(v is None for v in fs + gs):
            continue
        p = max(range(len(shifts)), key=lambda i: (fs[i], -abs(shifts[i])))
        per_seed.append({"seed": seed, "spearman": C.spearman(fs, gs), "pick": shifts[p],
                         "best_final": shifts[max(range(len(shifts)), key=lambda i: gs[i])],
                         "regret": gs[p] - max(gs), "pick_minus_t0_final": gs[p] - gs[i0]})
    sp = [d["spearman"] for d in per_seed if d["spearman"] is not None]
    rg = [d["regret"] for d in per_seed]
    vs0 = [d["pick_minus_t0_final"] for d in per_seed]
    return {
        "shifts": shifts, "first_epoch_train_mean": f, "final_test_mean": g,
        "spearman_of_means": C.spearman(f, g),
        "first_epoch_pick": shifts[pick], "best_final": shifts[best],
        "regret_of_means": g[pick] - g[best],
        "pick_minus_t0_final_of_means": g[pick] - g[i0],
        "per_seed": per_seed,
        "spearman_per_seed_mean": C._mean_std(sp)[0], "spearman_per_seed_std": C._mean_std(sp)[1],
        "regret_per_seed_mean": C._mean_std(rg)[0], "regret_per_seed_std": C._mean_std(rg)[1],
        "pick_beats_t0_seeds": sum(1 for v in vs0 if v > 0), "pick_ties_t0_seeds": sum(1 for v in vs0 if v == 0),
        "n_seeds": len(per_seed),
    }


def main() -> None:
    ap = C.parser(__doc__)
    args = ap.parse_args()
    out = C.setup(args)
    t0 = time.perf_counter()
    models = {}
    for pool, (summary, config) in claim23_pooling.grids(args, out, progress=True).items():
        models[f"vgg-small-{pool}pool"] = (summary, config)
    for zoo, (summary, config) in claim4_small_models.grids(args, out, progress=True).items():
        models[zoo] = (summary, config)
    payload = {"claim": "5", "title": "first-epoch train accuracy vs final test accuracy over the shift grid",
               "models": {}}
    plt = C.plt()
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8))
    for ax, (name, (summary, config)) in zip(axes, models.items()):
        a = analyse(summary)
        a["epochs"] = config["epochs"]
        a["train_limit"] = config["train_limit"]
        payload["models"][name] = a
        ax.scatter([v * 100 for v in a["first_epoch_train_mean"]], [v * 100 for v in a["final_test_mean"]])
        for s, x, y in zip(a["shifts"], a["first_epoch_train_mean"], a["final_test_mean"]):
            ax.annotate(f"{s:+g}", (x * 100, y * 100), fontsize=7, xytext=(3, 2), textcoords="offset points")
        ax.set_xlabel("first-epoch train accuracy (%)")
        ax.set_ylabel(f"test accuracy after {config['epochs']} epochs (%)")
        sp = a["spearman_of_means"]
        ax.set_title(f"{name}\nSpearman {'n/a' if sp is None else f'{sp:+.2f}'}, "
                     f"regret {a['regret_of_means'] * 100:+.2f} pp", fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("claim 5: first-epoch signal vs final accuracy (seed means; labels = t)")
    fig.tight_layout()
    C.save_fig(fig, out / "claim5_first_epoch.png")
    seeds = sorted({s for (sm, _) in models.values() for s in sm.seeds})
    payload.update(C.meta(args, seeds=seeds, settings={"claim23": claim23_pooling.settings(args),
                                                        "claim4": claim4_small_models.settings(args)}, t0=t0))
    C.write_json(out / "claim5_first_epoch.json", payload)
    for name, a in payload["models"].items():
        def f2(v):
            return "n/a" if v is None else f"{v:+.2f}"
        print(f"{name}: Spearman {f2(a['spearman_of_means'])} (per seed {f2(a['spearman_per_seed_mean'])} ± "
              f"{f2(a['spearman_per_seed_std'])}), pick t={a['first_epoch_pick']:+g} best final "
              f"t={a['best_final']:+g}, regret {a['regret_of_means'] * 100:+.2f} pp (per seed "
              f"{C.fmt_pp(a['regret_per_seed_mean'], a['regret_per_seed_std'])}), pick beats t=0 in "
              f"{a['pick_beats_t0_seeds']}/{a['n_seeds']} seeds")


if __name__ == "__main__":
    main()
