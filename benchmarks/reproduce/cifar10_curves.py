"""Claims 2 and 3 on CIFAR-10: the first-epoch curves of vgg-small (MaxPool) and
vgg-small-avgpool from two ``bnnshift search`` runs (their ``search.json``), as one table,
plot and JSON (docs/reproduction.md, "CIFAR-10").

Per shift: first-epoch train accuracy (the search's score) and, where the search ran with
``--val``, held-out accuracy after BN re-estimation, mean ± std over seeds; the paired
difference to ``t = 0`` per seed (mean ± std, k/n seeds above 0); the asymmetry
Δ(+|t|) − Δ(−|t|) per seed (claim 3: positive with MaxPool, about 0 with AvgPool).
Nothing is trained here.

    python benchmarks/reproduce/cifar10_curves.py --maxpool RUN/search.json --avgpool RUN2/search.json \\
        --out docs/reproduction/cifar10
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

LABEL = {"maxpool": "MaxPool", "avgpool": "AvgPool"}
METRICS = (("train_acc", "first-epoch train"), ("val_acc", "first-epoch held-out"))


def _ms(v: list[float]) -> tuple[float | None, float | None]:
    if not v:
        return None, None
    m = sum(v) / len(v)
    return m, (math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0)


def curve(search: dict) -> dict:
    """Per metric and shift: values by seed, mean, std, paired Δ to t = 0; and the asymmetry."""
    ok = [c for c in search["candidates"] if c.get("status") == "ok"]
    shifts = sorted({float(c["shift"]) for c in ok})
    seeds = sorted({int(c["seed"]) for c in ok})
    out: dict = {"shifts": shifts, "seeds": seeds, "config": search.get("config"), "command": search.get("command"),
                 "seconds": search.get("seconds"), "bnnshift_version": search.get("bnnshift_version")}
    for metric, _ in METRICS:
        by = {(float(c["shift"]), int(c["seed"])): c.get(metric) for c in ok}
        if all(v is None for v in by.values()):
            continue
        rows = []
        for t in shifts:
            vals = [by.get((t, s)) for s in seeds]
            diffs = [v - b for v, b in zip(vals, (by.get((0.0, s)) for s in seeds)) if v is not None and b is not None]
            m, sd = _ms([v for v in vals if v is not None])
            dm, dsd = _ms(diffs)
            rows.append({"shift": t, "values": vals, "mean": m, "std": sd, "diff_vs_0_mean": dm, "diff_vs_0_std": dsd,
                         "diff_vs_0_positive_seeds": sum(d > 0 for d in diffs), "n": len(diffs)})
        asym = []
        for a in sorted({abs(t) for t in shifts if t > 0 and -t in shifts}):
            d = [by[(a, s)] - by[(-a, s)] for s in seeds if by.get((a, s)) is not None and by.get((-a, s)) is not None]
            m, sd = _ms(d)
            asym.append({"abs_t": a, "mean": m, "std": sd, "positive_seeds": sum(x > 0 for x in d), "n": len(d)})
        out[metric] = {"rows": rows, "asymmetry": asym,
                       "best_shift": max(rows, key=lambda r: (r["mean"], -abs(r["shift"])))["shift"]}
    return out


def table_md(name: str, cur: dict) -> str:
    metrics = [(m, label) for m, label in METRICS if m in cur]
    head = "| t | " + " | ".join(f"{label} | Δ vs t=0 | k/n" for _, label in metrics) + " |"
    lines = [f"**{name}** ({len(cur['seeds'])} seeds; accuracy mean ± std in %, Δ = paired difference to t = 0, "
             "mean ± std in pp, k/n = seeds with Δ > 0)", "", head, "|---|" + "---|---|---|" * len(metrics)]
    for i, t in enumerate(cur["shifts"]):
        cells = []
        for m, _ in metrics:
            r = cur[m]["rows"][i]
            cells.append(f"{r['mean'] * 100:.2f} ± {r['std'] * 100:.2f} | {r['diff_vs_0_mean'] * 100:+.2f} ± "
                         f"{r['diff_vs_0_std'] * 100:.2f} | {r['diff_vs_0_positive_seeds']}/{r['n']}")
        lines.append(f"| {t:+g} | " + " | ".join(cells) + " |")
    for m, label in metrics:
        a = "; ".join(f"|t|={x['abs_t']:g}: {x['mean'] * 100:+.2f} ± {x['std'] * 100:.2f} pp ({x['positive_seeds']}/"
                      f"{x['n']})" for x in cur[m]["asymmetry"])
        lines.append(f"\n- asymmetry Δ(+|t|) − Δ(−|t|), {label}: {a}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--maxpool", required=True, help="search.json of zoo:vgg-small")
    ap.add_argument("--avgpool", required=True, help="search.json of zoo:vgg-small-avgpool")
    ap.add_argument("--out", required=True, help="directory for cifar10_curves.json / .png")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    curves = {name: curve(json.loads(Path(p).read_text())) for name, p in (("maxpool", a.maxpool), ("avgpool", a.avgpool))}
    md = "\n\n".join(table_md(f"vgg-small, {LABEL[n]}", c) for n, c in curves.items())
    C.write_json(out / "cifar10_curves.json", {"claim": "2, 3 on CIFAR-10", "curves": curves, "table_md": md})
    plt = C.plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (metric, label) in zip(axes, METRICS):
        for name, color in (("maxpool", "C0"), ("avgpool", "C1")):
            if metric in curves[name]:
                rows = curves[name][metric]["rows"]
                ax.errorbar([r["shift"] for r in rows], [r["mean"] * 100 for r in rows],
                            yerr=[r["std"] * 100 for r in rows], marker="o", capsize=3, color=color,
                            label=f"vgg-small {name} ({len(curves[name]['seeds'])} seeds)")
        ax.axvline(0, color="grey", lw=0.6, ls=":")
        ax.set_xlabel("threshold shift t")
        ax.set_ylabel(f"{label} accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("CIFAR-10 (JPEG re-encoded), first epoch per shift, bnnshift search")
    C.save_fig(fig, out / "cifar10_curves.png")
    print(md)


if __name__ == "__main__":
    main()
