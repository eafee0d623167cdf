"""Claim 7 (PAPER.md): a trainable threshold (ReActNet RSign-style, per channel) is redundant
with the BN bias in front of it: per channel the learned change of t and of the BN bias beta
end at equal magnitude and opposite sign (training t = doubling the BN-bias learning rate),
and the effective threshold t - beta stays near its initial value (-2, -1, 0, 1, 2), so the
init (= the shift) decides the accuracy.

Uses bnnshift's own mechanism: ``bnnshift.scan.scan_model`` finds the sites,
``bnnshift.shift.insert_shifts(..., trainable=True, per_channel=True)`` makes the thresholds
``nn.Parameter``s (one per channel), the shared trainer of _common.py trains them with the
weights (Adam). A control run keeps the same init as a FIXED threshold (buffer). Results per
(init, seed, mode) go to a bnnshift journal (``bnnshift.journal.Journal``), so an interrupted
run continues where it stopped.

    python benchmarks/reproduce/claim7_trainable.py [--quick]
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bnnshift.journal import Journal  # noqa: E402
from bnnshift.scan import scan_model  # noqa: E402
from bnnshift.shift import get_thresholds, insert_shifts  # noqa: E402

INITS = [-2.0, -1.0, 0.0, 1.0, 2.0]
FULL = dict(model="mlp", train_limit=30720, val_limit=None, epochs=1, seeds=[0, 1], inits=INITS, compile=False)
QUICK = dict(model="mlp", train_limit=1024, val_limit=500, epochs=1, seeds=[0], inits=[-1.0, 1.0],
             compile=False, recalib_batches=2)


def settings(args) -> dict:
    return dict(QUICK if args.quick else FULL)


def _stats(v: torch.Tensor) -> dict:
    v = v.double()
    q = torch.quantile(v, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)).tolist()
    return {"mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0, "q05": q[0], "q25": q[1],
            "median": q[2], "q75": q[3], "q95": q[4], "min": float(v.min()), "max": float(v.max())}


def one_run(args, cfg, bundle, shape, init: float, seed: int, trainable: bool) -> dict:
    build = C.factory(cfg["model"], C.model_args(shape, {"input_size": shape[1]}))
    torch.manual_seed(seed)
    model = build()
    report = scan_model(copy.deepcopy(model), shape, batches=[bundle.train_x[:256]])
    sites = list(report.sites)
    mods = dict(model.named_modules())
    beta0 = {s.name: mods[s.producer_module].bias.detach().clone() for s in sites}
    insert_shifts(model, sites, {s.name: init for s in sites}, trainable=trainable, per_channel=True)
    trainer = C.MultiEpochTrainer(bundle, epochs=cfg["epochs"], compile=cfg["compile"] and not args.no_compile,
                                  recalib_batches=cfg.get("recalib_batches", C.RECALIB_BATCHES))
    t0 = time.perf_counter()
    out = trainer(model, seed=seed, shift=init)
    ths = get_thresholds(model)
    per_site = {}
    for s in sites:
        bn = mods[s.producer_module]
        t = ths[s.name].detach().reshape(-1).double()
        beta = bn.bias.detach().double()
        dt, db = t - init, beta - beta0[s.name].double()
        eff = t - beta  # sign(gamma * xhat + beta - t): the threshold on gamma * xhat
        rec = {"producer": s.producer_module, "channels": int(t.numel()), "t": _stats(t), "beta": _stats(beta),
               "t_eff": _stats(eff), "t_eff_values": [round(float(v), 4) for v in eff]}
        if trainable:
            denom = float(dt.abs().mean())
            rec["mirror"] = {
                "corr_dt_dbeta": float(torch.corrcoef(torch.stack([dt, db]))[0, 1]) if dt.std() > 0 else None,
                "mean_abs_dt": denom, "mean_abs_dbeta": float(db.abs().mean()),
                "rel_mismatch": float((dt + db).abs().mean()) / denom if denom > 0 else None,
                "dt_values": [round(float(v), 5) for v in dt[:128]],
                "dbeta_values": [round(float(v), 5) for v in db[:128]],
            }
        per_site[s.name] = rec
    return {"init": init, "seed": seed, "trainable": trainable, "final_test_acc": out.get("val_acc"),
            "first_epoch_train_acc": out.get("train_acc"), "test_acc_epochs": out.get("test_acc_epochs"),
            "sites": per_site, "seconds": round(time.perf_counter() - t0, 1)}


def runs(args, out: Path) -> list[dict]:
    cfg = settings(args)
    shape = C.data_shape(args.data)
    bundle = C.data_bundle(args.data, shape, cfg["train_limit"], cfg["val_limit"])
    run_dir = out / "runs" / "claim7_trainable"
    run_dir.mkdir(parents=True, exist_ok=True)
    journal = Journal(run_dir / "journal.jsonl")
    if args.fresh:
        journal.reset()
    results = []
    for seed in cfg["seeds"]:
        for trainable in (True, False):
            key_cfg = {k: v for k, v in cfg.items() if k not in ("seeds", "inits", "compile")}
            h = hashlib.sha256(json.dumps({**key_cfg, "data": bundle.fingerprint(), "trainable": trainable},
                                          sort_keys=True).encode()).hexdigest()[:16]
            done = journal.finished(h)
            for init in cfg["inits"]:
                hit = next((v for (sk, sd, ch), v in done.items() if sd == seed and float(sk) == init), None)
                if hit is not None:
                    results.append(hit)
                    continue
                print(f"[claim7] init={init:+g} seed={seed} trainable={trainable} ...", end="", flush=True,
                      file=sys.stderr)
                r = one_run(args, cfg, bundle, shape, init, seed, trainable)
                journal.append(init, seed, h, r)
                print(f" test {r['final_test_acc']:.4f} ({r['seconds']:.0f}s)", flush=True, file=sys.stderr)
                results.append(r)
    return results


def main() -> None:
    ap = C.parser(__doc__)
    args = ap.parse_args()
    out = C.setup(args)
    t0 = time.perf_counter()
    cfg = settings(args)
    res = runs(args, out)
    summary = []
    for init in cfg["inits"]:
        for trainable in (True, False):
            rs = [r for r in res if r["init"] == init and r["trainable"] == trainable]
            if not rs:
                continue
            effs = [v for r in rs for s in r["sites"].values() for v in s["t_eff_values"]]
            e = torch.tensor(effs)
            acc_m, acc_s = C._mean_std([r["final_test_acc"] for r in rs])
            row = {"init": init, "trainable": trainable, "n_runs": len(rs), "final_test_acc_mean": acc_m,
                   "final_test_acc_std": acc_s, "t_eff": _stats(e),
                   "t_eff_mean_minus_init": float(e.mean()) - init,
                   "share_within_0.5_of_init": float(((e - init).abs() <= 0.5).double().mean())}
            if trainable:
                mir = [s["mirror"] for r in rs for s in r["sites"].values()]
                row["mirror_corr_mean"] = C._mean_std([m["corr_dt_dbeta"] for m in mir])[0]
                row["mirror_rel_mismatch_mean"] = C._mean_std([m["rel_mismatch"] for m in mir])[0]
                row["mean_abs_dt"] = C._mean_std([m["mean_abs_dt"] for m in mir])[0]
            summary.append(row)
    plt = C.plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    for k, trainable in enumerate((True, False)):
        data, pos = [], []
        for i, init in enumerate(cfg["inits"]):
            effs = [v for r in res if r["init"] == init and r["trainable"] == trainable
                    for s in r["sites"].values() for v in s["t_eff_values"]]
            if effs:
                data.append(effs)
                pos.append(i + (-0.18 if trainable else 0.18))
        if data:
            bp = ax.boxplot(data, positions=pos, widths=0.3, showfliers=False, patch_artist=True)
            for b in bp["boxes"]:
                b.set_facecolor("tab:orange" if trainable else "tab:grey")
    ax.plot(range(len(cfg["inits"])), cfg["inits"], "k_", ms=25, label="init")
    ax.set_xticks(range(len(cfg["inits"])), [f"{v:+g}" for v in cfg["inits"]])
    ax.set_xlabel("initial threshold t0")
    ax.set_ylabel("final effective threshold t - beta (per channel)")
    ax.set_title("orange: trainable t, grey: fixed t")
    ax.grid(alpha=0.3)
    ax = axes[1]
    r0 = next((r for r in res if r["trainable"] and r["init"] == (1.0 if 1.0 in cfg["inits"] else cfg["inits"][-1])),
              None)
    if r0 is not None:
        for name, s in r0["sites"].items():
            ax.scatter(s["mirror"]["dt_values"], s["mirror"]["dbeta_values"], s=6, label=name)
        lim = max(1e-3, max(abs(v) for s in r0["sites"].values() for v in s["mirror"]["dt_values"]))
        ax.plot([-lim, lim], [lim, -lim], "k--", lw=0.8, label="dbeta = -dt")
        ax.set_xlabel("change of trainable threshold dt")
        ax.set_ylabel("change of BN bias dbeta")
        ax.set_title(f"per channel, init {r0['init']:+g}, seed {r0['seed']}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ax = axes[2]
    for trainable, color in ((True, "tab:orange"), (False, "tab:grey")):
        rows = [r for r in summary if r["trainable"] == trainable]
        ax.errorbar([r["init"] for r in rows], [r["final_test_acc_mean"] * 100 for r in rows],
                    yerr=[(r["final_test_acc_std"] or 0) * 100 for r in rows], marker="o", capsize=3,
                    color=color, label="trainable t" if trainable else "fixed t")
    ax.set_xlabel("initial threshold t0")
    ax.set_ylabel(f"test accuracy after {cfg['epochs']} epochs (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.suptitle(f"claim 7: trainable per-channel threshold, {cfg['model']} on {args.data}")
    fig.tight_layout()
    C.save_fig(fig, out / "claim7_trainable.png")
    payload = {"claim": "7", "title": "trainable threshold vs BN bias", "summary": summary,
               "runs": [{k: v for k, v in r.items() if k != "sites"} |
                        {"sites": {n: {kk: vv for kk, vv in s.items() if kk != "t_eff_values"}
                                   for n, s in r["sites"].items()}} for r in res]}
    payload.update(C.meta(args, seeds=cfg["seeds"], settings=cfg, t0=t0))
    C.write_json(out / "claim7_trainable.json", payload)
    for row in summary:
        print(f"init {row['init']:+g} {'trainable' if row['trainable'] else 'fixed    '}: t_eff median "
              f"{row['t_eff']['median']:+.3f} (q05 {row['t_eff']['q05']:+.3f}, q95 {row['t_eff']['q95']:+.3f}), "
              f"test {row['final_test_acc_mean'] * 100:.2f}%"
              + (f", mirror corr {row['mirror_corr_mean']:+.3f}, rel mismatch {row['mirror_rel_mismatch_mean']:.3g}"
                 if row["trainable"] and row.get("mirror_corr_mean") is not None else ""))


if __name__ == "__main__":
    main()
