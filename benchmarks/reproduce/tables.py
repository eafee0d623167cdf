"""Print the markdown tables of docs/reproduction.md from the JSON files the claim scripts wrote.

    python benchmarks/reproduce/tables.py [--out docs/reproduction]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def pp(m, s=None, sign=True):
    if m is None:
        return "n/a"
    v = f"{m * 100:+.2f}" if sign else f"{m * 100:.2f}"
    return v + (f" ± {s * 100:.2f}" if s is not None else "")


def sps(a) -> str:
    m, s = a["spearman_per_seed_mean"], a["spearman_per_seed_std"]
    return "n/a" if m is None else f"{m:+.2f} ± {s or 0:.2f}"


def load(out: Path, stem: str):
    p = out / f"{stem}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def curve_table(models: dict, names: dict) -> list[str]:
    lines = []
    for key, info in models.items():
        tab = info["table"]
        lines += [f"**{names.get(key, key)}** ({len(tab['seeds'])} seeds; accuracy mean ± std in %, "
                  "Δ = paired difference to t = 0 over seeds, mean ± std in pp, k/n = seeds with Δ > 0)", "",
                  "| t | first-epoch train | Δ vs t=0 | k/n | final test | Δ vs t=0 | k/n |", "|---|---|---|---|---|---|---|"]
        for rf, rt in zip(tab["first_epoch_train_acc"], tab["final_test_acc"]):
            lines.append(f"| {rf['shift']:+g} | {pp(rf['mean'], rf['std'], False)} | {pp(rf['diff_vs_0_mean'], rf['diff_vs_0_std'])} "
                         f"| {rf['diff_vs_0_positive_seeds']}/{rf['n']} | {pp(rt['mean'], rt['std'], False)} | "
                         f"{pp(rt['diff_vs_0_mean'], rt['diff_vs_0_std'])} | {rt['diff_vs_0_positive_seeds']}/{rt['n']} |")
        lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "docs" / "reproduction"))
    out = Path(ap.parse_args().out)
    lines: list[str] = []
    d = load(out, "promise")
    if d:
        lines += ["### the promise (promise.json)", "", d["table_md"], ""]
        for name, m in d["models"].items():
            lines.append(f"- {name}: test accuracy t = 0 {pp(sum(m['test_acc_t0']) / max(1, len(m['test_acc_t0'])), None, False)}"
                         f" %, pick {pp(sum(m['test_acc_pick']) / max(1, len(m['test_acc_pick'])), None, False)} % (seed means);"
                         f" gain per seed {m['gain_pp_per_seed']} pp; same init as the search: {m['same_init_as_search']},"
                         f" first-epoch batches as the search: {m['first_epoch_batches_as_search']}; search "
                         f"{m['search_seconds']:.0f} s + training {m['final_training_seconds']:.0f} s summed")
        lines += [f"- `{d['command']}`: torch {d['torch_version']}, {d['torch_threads']} thread(s), wall "
                  f"{d['wall_seconds']:.0f} s this invocation", ""]
    d = load(out, "claim23_pooling")
    if d:
        lines += ["### claims 2/3", ""] + curve_table(d["models"], {"max": "vgg-small, MaxPool", "avg": "vgg-small, AvgPool"})
        for pool, info in d["models"].items():
            lines.append(f"- {pool}pool asymmetry (Δ(+|t|) − Δ(−|t|), final test / first-epoch train, pp): " + "; ".join(
                f"|t|={a['abs_shift']:g}: {pp(a['mean'], a['std'])} / {pp(b['mean'], b['std'])}"
                for a, b in zip(info["asymmetry_final_test_acc"], info["asymmetry_first_epoch_train_acc"])))
        lines.append("")
    d = load(out, "claim4_small_models")
    if d:
        lines += ["### claim 4", ""] + curve_table(d["models"], {"mlp": "binary MLP", "lenet5": "binary LeNet-5"})
    d = load(out, "claim5_first_epoch")
    if d:
        lines += ["### claim 5", "", "| model | epochs | Spearman (seed means) | Spearman per seed | first-epoch pick | best final t "
                  "| regret (means) | regret per seed | pick − t=0 (means) | pick beats t=0 |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, a in d["models"].items():
            sp = a["spearman_of_means"]
            lines.append(f"| {name} | {a['epochs']} | {'n/a' if sp is None else f'{sp:+.2f}'} | "
                         f"{sps(a)} | "
                         f"{a['first_epoch_pick']:+g} | {a['best_final']:+g} | {pp(a['regret_of_means'])} | "
                         f"{pp(a['regret_per_seed_mean'], a['regret_per_seed_std'])} | {pp(a['pick_minus_t0_final_of_means'])} | "
                         f"{a['pick_beats_t0_seeds']}/{a['n_seeds']} |")
        lines.append("")
    d = load(out, "claim2_distribution")
    if d:
        lines += ["### claim 2 (distribution)", ""]
        for pool, m in d["models"].items():
            ts = list(m["trained"])
            lines += [f"**vgg-small {pool}pool** (+1 share on 1000 test images; trained: mean over seeds; "
                      f"best t by final test = {m['best_t_final_test']:+g}, by first epoch = {m['best_t_first_epoch']:+g})", "",
                      "| site | pool before | untrained t=0 | untrained mean−median | " + " | ".join(f"trained t={t}" for t in ts)
                      + " | trained t=0 mean−median |", "|---" * (5 + len(ts)) + "|"]
            for n, u in m["untrained_t0"].items():
                cells = [f"{(m['trained'][t].get(n) or {}).get('plus_share_mean', float('nan')):.3f}" for t in ts]
                z = (m["trained"].get("0.0", {}).get(n) or {}).get("preact_mean_minus_median")
                lines.append(f"| {n} | {u['pool'] or '-'} | {u['plus_share']:.3f} | {u['preact_mean_minus_median']:+.3f} | "
                             + " | ".join(cells) + f" | {'n/a' if z is None else f'{z:+.3f}'} |")
            lines.append("")
    d = load(out, "claim7_trainable")
    if d:
        lines += ["### claim 7", "", "| init t0 | threshold | runs | final t−β median | q05 … q95 | mean − t0 | share within ±0.5 of t0 "
                  "| mean abs(Δt) | corr(Δt, Δβ) | mean abs(Δt+Δβ)/mean abs(Δt) | test acc % |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in d["summary"]:
            e = r["t_eff"]
            lines.append(f"| {r['init']:+g} | {'trainable' if r['trainable'] else 'fixed'} | {r['n_runs']} | {e['median']:+.3f} | "
                         f"{e['q05']:+.3f} … {e['q95']:+.3f} | {r['t_eff_mean_minus_init']:+.3f} | {r['share_within_0.5_of_init']:.3f} | "
                         + (f"{r['mean_abs_dt']:.4f} | {r['mirror_corr_mean']:+.4f} | {r['mirror_rel_mismatch_mean']:.1e}"
                            if r["trainable"] else "- | - | -")
                         + f" | {pp(r['final_test_acc_mean'], r['final_test_acc_std'], False)} |")
        lines.append("")
    d = load(out, "claim8_resnet20")
    if d:
        lines += ["### claim 8", "", "| follower | best t>0 first-epoch train Δ vs t=0 (pp) | k/n | best t>0 test Δ vs t=0 (pp) | k/n "
                  "| t=−0.5 test Δ | best t overall (test) |", "|---|---|---|---|---|---|---|"]
        for label, v in d["variants"].items():
            b, bt = v["best_positive_first_epoch_train_acc"], v["best_positive_final_test_acc"]
            neg = next((r for r in v["table"]["final_test_acc"] if r["shift"] == -0.5), None)
            lines.append(f"| {label} | {pp(b['gain_vs_0_mean'], b['gain_vs_0_std'])} (t={b['shift']:+g}) | {b['positive_seeds']}/{b['n']} | "
                         f"{pp(bt['gain_vs_0_mean'], bt['gain_vs_0_std'])} (t={bt['shift']:+g}) | {bt['positive_seeds']}/{bt['n']} | "
                         f"{pp(neg['diff_vs_0_mean'], neg['diff_vs_0_std']) if neg else 'n/a'} | {v['best_final_test_acc']['shift']:+g} |")
        lines += ["", "Per variant and t (final test, first-epoch train; paired Δ vs t = 0, pp):", ""]
        for label, v in d["variants"].items():
            lines.append(f"- {label}: " + "; ".join(
                f"t={rt['shift']:+g}: {pp(rt['diff_vs_0_mean'], rt['diff_vs_0_std'])}, {pp(rf['diff_vs_0_mean'], rf['diff_vs_0_std'])}"
                for rt, rf in zip(v["table"]["final_test_acc"], v["table"]["first_epoch_train_acc"])))
        lines.append("")
    for stem in ("claim23_pooling", "claim2_distribution", "claim4_small_models", "claim5_first_epoch", "claim7_trainable",
                 "claim8_resnet20"):
        d = load(out, stem)
        if d:
            lines.append(f"- `{d['command']}`: {d['mode']}, seeds {d['seeds']}, wall {d['wall_seconds']:.0f} s this invocation"
                         + (f", training {sum(m.get('train_seconds_total', 0) for m in (d.get('models') or d.get('variants') or {}).values()):.0f} s summed over candidates"
                            if (d.get("models") or d.get("variants")) and stem not in ("claim5_first_epoch", "claim2_distribution") else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
