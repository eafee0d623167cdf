"""Claim 2, distribution part (PAPER.md): with t = 0 the binary layer after a MaxPool is
already unbalanced (MaxPool skews the pre-activation: mean > median; BN centres on the mean,
so more -1s); with the best positive t every binary layer's output is unbalanced (more -1).

Per site of vgg-small (MaxPool and AvgPool): the +1 share and the pre-activation's
mean - median measured with bnnshift's probe (``bnnshift.probe.probe_sites``, the probe of
``bnnshift scan --data``) on 1000 test images
  * on the trained models of the claims 2/3 grids (recorded at the end of every candidate,
    BN statistics re-estimated) at t = 0 and at the best t (by mean final test accuracy);
  * on the untrained model with ``bnnshift.scan.scan_model(model, shape, batches=...)`` (its BN
    statistics first re-estimated on 20 training batches, as the search does before a probe).
The grids are read from the claims 2/3 journals (run/continued first if missing).

    python benchmarks/reproduce/claim2_distribution.py [--quick]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import claim23_pooling  # noqa: E402
from bnnshift.scan import scan_model  # noqa: E402
from bnnshift.train import recalibrate_bn  # noqa: E402


def untrained_scan(args, pool: str) -> dict:
    cfg = claim23_pooling.settings(args)
    shape = C.data_shape(args.data)
    margs = C.model_args(shape, {"width": cfg["width"], "input_size": shape[1]})
    bundle = C.data_bundle(args.data, shape, cfg["train_limit"], cfg["val_limit"])
    torch.manual_seed(0)
    model = C.factory(claim23_pooling.POOLS[pool], margs)()
    # BN statistics of the untrained model estimated on training batches (as the search does
    # before every probe): otherwise eval-mode BN would not centre anything
    nb = max(1, min(cfg.get("recalib_batches", C.RECALIB_BATCHES), bundle.num_train // 256))
    recalibrate_bn(model, [bundle.train_x[i * 256:(i + 1) * 256] for i in range(nb)])
    report = scan_model(model, shape, batches=[bundle.val_x[:C.PROBE_TEST]], name=claim23_pooling.POOLS[pool])
    return {s.name: {"pool": s.pool, "producer": s.producer, "plus_share": s.plus_fraction,
                     "preact_mean_minus_median": (s.preact["mean"] - s.preact["median"]) if s.preact else None,
                     "preact_skew": s.preact.get("skew") if s.preact else None} for s in report.sites}


def main() -> None:
    ap = C.parser(__doc__)
    args = ap.parse_args()
    out = C.setup(args)
    t0 = time.perf_counter()
    res = claim23_pooling.grids(args, out)
    payload = {"claim": "2 (distribution)", "title": "+1 share per site at t = 0 and at the best t", "models": {}}
    plt = C.plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, (pool, (summary, config)) in zip(axes, res.items()):
        tab = C.table(summary)
        rows = [r for r in tab["final_test_acc"] if r["mean"] is not None]
        best = max(rows, key=lambda r: (r["mean"], -abs(r["shift"])))["shift"]
        rows_f = [r for r in tab["first_epoch_train_acc"] if r["mean"] is not None]
        best_f = max(rows_f, key=lambda r: (r["mean"], -abs(r["shift"])))["shift"]
        wanted = sorted({0.0, best, best_f})
        shares = C.per_site_shares(summary, wanted)
        init = untrained_scan(args, pool)
        payload["models"][pool] = {"best_t_final_test": best, "best_t_first_epoch": best_f,
                                   "trained": shares, "untrained_t0": init}
        names = list(init)
        width = 0.8 / (1 + len(wanted))
        xs = range(len(names))
        ax.bar([x - 0.4 + width / 2 for x in xs], [init[n]["plus_share"] or 0 for n in names], width,
               label="untrained, t=0", color="lightgrey")
        for k, t in enumerate(wanted):
            sh = shares.get(C.shift_key(t), {})
            ax.bar([x - 0.4 + width * (k + 1.5) for x in xs], [(sh.get(n) or {}).get("plus_share_mean") or 0
                                                                for n in names], width,
                   label=f"trained, t={t:+g}" + (" (best test)" if t == best else "")
                   + (" (best 1st ep.)" if t == best_f else ""))
        ax.axhline(0.5, color="k", lw=0.7, ls="--")
        ax.set_xticks(list(xs), [n + ("\n(after pool)" if init[n]["pool"] else "") for n in names], fontsize=8)
        ax.set_title(f"vgg-small {pool}pool")
        ax.set_ylabel("+1 share of the binary activation")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("claim 2: +1 share per site (probe on 1000 test images, mean over seeds)")
    fig.tight_layout()
    C.save_fig(fig, out / "claim2_distribution.png")
    cfg = claim23_pooling.settings(args)
    payload.update(C.meta(args, seeds=cfg["seeds"], settings=cfg, t0=t0))
    C.write_json(out / "claim2_distribution.json", payload)
    for pool, m in payload["models"].items():
        print(f"{pool}pool (best t final {m['best_t_final_test']:+g}, first epoch {m['best_t_first_epoch']:+g}):")
        for n, u in m["untrained_t0"].items():
            line = f"  {n:6s} pool={u['pool']!s:10s} untrained {u['plus_share']:.3f}"
            for t, sh in m["trained"].items():
                v = sh.get(n) or {}
                line += f" | t={t}: {v.get('plus_share_mean', float('nan')):.3f} (mean-median " \
                        f"{v.get('preact_mean_minus_median') or float('nan'):+.3f})"
            print(line)


if __name__ == "__main__":
    main()
