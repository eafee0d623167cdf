"""Shared plumbing for the reproduction scripts (benchmarks/reproduce/claim*.py).

Every grid is a ``bnnshift.search.search_with`` search (same init per seed, same batch order
per seed, journal + resume, search.json/.md/.png) around ONE trainer defined here:
``MultiEpochTrainer`` trains E epochs with bnnshift's own pieces (``bnnshift.train``: the fused
Adam of the default trainer, ``StepRunner`` = the compiled forward+loss, ``recalibrate_bn``,
``evaluate``; ``bnnshift.data``: in-memory data and the seeded batch order) and records, in one
training per (t, seed):

* ``train_acc``  = train accuracy accumulated over the FIRST epoch (the paper's search signal,
  identical to what ``bnnshift search --epochs 1`` measures);
* ``val_acc``    = test accuracy after the last epoch (BN statistics re-estimated on 20 train
  batches, as ``bnnshift search --val`` does) -- this is the search ``score``;
* ``extra``: per-epoch train and test accuracy, and the per-site +1 share and pre-activation
  stats at the end (``bnnshift.probe.probe_sites`` on test images).

Why not ``bnnshift search --epochs E --val``: when these runs were made its ``train_acc`` was
accumulated over all E epochs (since fixed: it is the first epoch's, with ``epoch_train_acc``
per epoch), and it still evaluates held-out accuracy only at the end, while these scripts
record test accuracy per epoch. See docs/reproduction.md ("API needs").
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bnnshift import __version__ as BNNSHIFT_VERSION  # noqa: E402
from bnnshift.data import iterate_batches, load_data  # noqa: E402
from bnnshift.journal import shift_key  # noqa: E402
from bnnshift.load import load_model  # noqa: E402
from bnnshift.probe import probe_sites  # noqa: E402
from bnnshift.search import search_with  # noqa: E402
from bnnshift.shift import shifted_sites  # noqa: E402
from bnnshift.train import StepRunner, default_optimizer, evaluate, mix_seed, recalibrate_bn  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "docs" / "reproduction"
DEFAULT_DATA = "fashion-mnist"
PROBE_TEST = 1000      # test images for the end-of-training +1 shares
RECALIB_BATCHES = 20   # as bnnshift search --val


# ------------------------------------------------------------------------------ CLI / runtime


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke mode (a minute or two, used by CI)")
    p.add_argument("--out", default=None, help="output dir (default docs/reproduction, or "
                                               "docs/reproduction/quick with --quick)")
    p.add_argument("--data", default=DEFAULT_DATA, help="bnnshift data spec (e.g. cifar10:/path/to/root); "
                                                       "the models get in_chans/input_size from it")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs we may use)")
    p.add_argument("--fresh", action="store_true", help="ignore the journals (default: resume)")
    p.add_argument("--no-compile", action="store_true", help="eager training step")
    return p


def setup(args) -> Path:
    n = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(max(1, int(n)))
    out = Path(args.out) if args.out else (DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    return out


def command_line() -> str:
    argv = list(sys.argv)
    try:
        argv[0] = str(Path(argv[0]).resolve().relative_to(REPO))
    except ValueError:
        pass
    return "python " + " ".join(shlex.quote(a) for a in argv)


def meta(args, *, seeds, settings: dict, t0: float) -> dict[str, Any]:
    return {
        "bnnshift_version": BNNSHIFT_VERSION,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "command": command_line(),
        "mode": "quick" if args.quick else "full",
        "data": args.data,
        "seeds": list(seeds),
        "settings": settings,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False, default=float) + "\n")
    os.replace(tmp, path)


def save_fig(fig, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as _plt

    return _plt


# ------------------------------------------------------------------------------ data / models

_BUNDLES: dict = {}


def data_bundle(spec: str, shape, train_limit: int | None, val_limit: int | None):
    key = (spec, tuple(shape) if shape else None, train_limit, val_limit)
    if key not in _BUNDLES:
        _BUNDLES[key] = load_data(spec, input_shape=tuple(shape) if shape else None, train_limit=train_limit, val_limit=val_limit, seed=0)
    return _BUNDLES[key]


def data_shape(spec: str) -> tuple[int, int, int]:
    """(C, H, W) of the data set (1x28x28 for Fashion-MNIST, 3x32x32 for CIFAR-10)."""
    b = data_bundle(spec, None, 512, 0)
    return tuple(int(v) for v in b.train_x.shape[1:])


def model_args(shape, extra: dict | None = None) -> dict:
    d = {"in_chans": shape[0]}
    d.update(extra or {})
    return d


def factory(zoo_name: str, args: dict):
    def build():
        return load_model(f"zoo:{zoo_name}", args=args).model
    build.__qualname__ = f"zoo:{zoo_name}"
    return build


# ------------------------------------------------------------------------------ the trainer


def _test_acc(model, bundle, recalib, limit=None):
    m = copy.deepcopy(model)
    recalibrate_bn(m, recalib)
    x, y = bundle.val_x, bundle.val_y
    if limit:
        x, y = x[:limit], y[:limit]
    return evaluate(m, x, y), m


class MultiEpochTrainer:
    """``train_one_epoch(model, *, seed, shift)`` for ``search_with`` that trains ``epochs``
    epochs (Adam, lr 1e-3, batch 256 = bnnshift search's defaults) and returns the first-epoch
    train accuracy (``train_acc``), the final test accuracy (``val_acc``, the score) and, in
    ``extra``, per-epoch curves and the end-of-training per-site +1 shares."""

    def __init__(self, bundle, *, epochs: int, batch_size: int = 256, lr: float = 1e-3, compile: bool = True,
                 eval_every_epoch: bool = True, recalib_batches: int = RECALIB_BATCHES):
        self.bundle, self.epochs, self.bs, self.lr = bundle, int(epochs), int(batch_size), float(lr)
        self.compile = "auto" if compile else "off"
        self.eval_every_epoch = eval_every_epoch
        self.runners: dict = {}
        n = int(bundle.train_x.shape[0])
        rg = torch.Generator().manual_seed(12345)
        self.recalib = [bundle.train_x[torch.randperm(n, generator=rg)[:self.bs]] for _ in range(recalib_batches)]

    def __call__(self, model, *, seed: int, shift: float) -> dict[str, Any]:
        b = self.bundle
        opt = default_optimizer(model, "adam", self.lr, 0.0, None)
        key = id(model)
        if key not in self.runners:
            self.runners[key] = StepRunner(model, F.cross_entropy, compile=self.compile)
        runner = self.runners[key]
        per_epoch = int(b.train_x.shape[0]) // self.bs
        total = per_epoch * self.epochs
        torch.manual_seed(mix_seed(seed, "train"))
        model.train()
        correct = seen = 0
        train_epochs, test_epochs, losses = [], [], []
        loss_sum = 0.0
        first_losses: list[float] = []
        for i, (xb, yb) in enumerate(iterate_batches(b.train_x, b.train_y, self.bs, seed=seed, steps=total)):
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
            if len(first_losses) < 3:
                first_losses.append(lv)
            opt.step()
            correct += int((logits.detach().argmax(1) == yb).sum())
            seen += int(yb.shape[0])
            loss_sum += lv
            if (i + 1) % per_epoch == 0:
                train_epochs.append(correct / seen)
                losses.append(loss_sum / per_epoch)
                correct = seen = 0
                loss_sum = 0.0
                last = (i + 1) == total
                if self.eval_every_epoch or last or len(train_epochs) == 1:
                    acc, m = _test_acc(model, b, self.recalib)
                    test_epochs.append(acc)
                    model.train()
                else:
                    test_epochs.append(None)
        # end-of-training distribution (claim 2): +1 share per site on test images, BN re-estimated
        sites = shifted_sites(m)
        res = probe_sites(m, sites, [b.val_x[:PROBE_TEST]], update=False)
        plus = {n: r.get("plus_fraction") for n, r in res.items()}
        pre = {n: ({k: round(v, 5) for k, v in r["preact"].items()} if r.get("preact") else None)
               for n, r in res.items()}
        return {"train_acc": train_epochs[0], "last_acc": train_epochs[-1], "val_acc": test_epochs[-1],
                "score": test_epochs[-1], "loss": losses[-1], "first_losses": first_losses, "steps": total,
                "compiled": runner.compiled, "compile_seconds": runner.compile_seconds,
                "compile_error": runner.compile_error,
                "train_acc_epochs": train_epochs, "test_acc_epochs": test_epochs, "loss_epochs": losses,
                "test_plus_fraction": plus, "test_preact": pre}


def run_grid(name: str, *, zoo: str, margs: dict, data: str, shape, shifts, seeds, epochs: int,
             train_limit: int | None, out: Path, fresh: bool = False, compile: bool = True,
             val_limit: int | None = None, progress: bool = True, recalib_batches: int = RECALIB_BATCHES):
    """One model's grid as a resumable ``search_with`` search in ``out/runs/<name>/``."""
    bundle = data_bundle(data, shape, train_limit, val_limit)
    trainer = MultiEpochTrainer(bundle, epochs=epochs, compile=compile, recalib_batches=recalib_batches)
    config = {"model": f"zoo:{zoo}", "model_args": margs, "data": bundle.name, "data_fingerprint": bundle.fingerprint(),
              "epochs": epochs, "train_limit": train_limit, "val_limit": val_limit, "optimizer": "adam", "lr": 1e-3,
              "batch_size": 256, "bn_recalib_batches": recalib_batches, "probe_test": PROBE_TEST}
    run_dir = out / "runs" / name
    t0 = time.perf_counter()

    class _P:
        def start(self, s, seed, i, n):
            if progress:
                print(f"[{name}] {i + 1}/{n} t={s:+g} seed={seed} ...", end="", flush=True, file=sys.stderr)

        def end(self, r, i, n):
            if progress:
                print(f" first-epoch train {r.train_acc if r.train_acc is not None else float('nan'):.4f} "
                      f"final test {r.val_acc if r.val_acc is not None else float('nan'):.4f} "
                      f"({r.seconds:.0f}s, {time.perf_counter() - t0:.0f}s total)", flush=True, file=sys.stderr)

        def skip(self, r, i, n):
            pass

    summary = search_with(factory(zoo, margs), trainer, shifts=list(shifts), seeds=list(seeds), input_shape=shape,
                          out_dir=run_dir, resume=not fresh, force=True, metric="val_acc", config=config,
                          probe_batches=bundle.train_x[:512], progress=_P(), name=f"zoo:{zoo}")
    return summary, config


# ------------------------------------------------------------------------------ statistics


def _mean_std(v: list[float]) -> tuple[float | None, float | None]:
    v = [x for x in v if x is not None]
    if not v:
        return None, None
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, s


def table(summary) -> dict[str, dict]:
    """Per metric -> per shift: values by seed, mean, std, paired difference to t = 0."""
    ok = [c for c in summary.candidates if c.ok]
    shifts = sorted({c.shift for c in ok})
    seeds = sorted({c.seed for c in ok})
    get = {
        "first_epoch_train_acc": lambda c: c.train_acc,
        "final_test_acc": lambda c: c.val_acc,
        "first_epoch_test_acc": lambda c: (c.extra.get("test_acc_epochs") or [None])[0],
    }
    out: dict[str, Any] = {"shifts": shifts, "seeds": seeds}
    for metric, fn in get.items():
        by = {(shift_key(c.shift), c.seed): fn(c) for c in ok}
        rows = []
        for s in shifts:
            vals = [by.get((shift_key(s), sd)) for sd in seeds]
            base = [by.get((shift_key(0.0), sd)) for sd in seeds]
            diffs = [v - b for v, b in zip(vals, base) if v is not None and b is not None]
            m, sd_ = _mean_std(vals)
            dm, dsd = _mean_std(diffs)
            n = len(diffs)
            se = (dsd / math.sqrt(n)) if (dsd is not None and n > 1) else None
            rows.append({"shift": s, "values": vals, "mean": m, "std": sd_, "diff_vs_0_mean": dm, "diff_vs_0_std": dsd,
                         "diff_vs_0_se": se, "diff_vs_0_t": (dm / se) if (se and dm is not None) else None,
                         "diff_vs_0_positive_seeds": sum(1 for d in diffs if d > 0), "n": n})
        out[metric] = rows
    return out


def per_site_shares(summary, shifts_wanted) -> dict:
    """Mean (over seeds) +1 share per site on test images at the end of training."""
    out = {}
    for s in shifts_wanted:
        cs = [c for c in summary.candidates if c.ok and shift_key(c.shift) == shift_key(s)]
        if not cs:
            continue
        names = list(cs[0].extra.get("test_plus_fraction", {}).keys())
        out[shift_key(s)] = {}
        for n in names:
            vals = [c.extra["test_plus_fraction"].get(n) for c in cs]
            skews = [((c.extra.get("test_preact") or {}).get(n) or {}) for c in cs]
            m, sd = _mean_std(vals)
            mean_minus_median = [p["mean"] - p["median"] for p in skews if p and "mean" in p]
            mm, _ = _mean_std(mean_minus_median)
            out[shift_key(s)][n] = {"plus_share_mean": m, "plus_share_std": sd, "n": len(vals),
                                    "preact_mean_minus_median": mm,
                                    "preact_skew": _mean_std([p.get("skew") for p in skews if p])[0]}
    return out


def spearman(a: list[float], b: list[float]) -> float | None:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return r
    if len(a) < 3:
        return None
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va > 0 and vb > 0 else None


def fmt_pp(m, s=None) -> str:
    if m is None:
        return "n/a"
    return f"{m * 100:+.2f}" + (f" ± {s * 100:.2f}" if s is not None else "") + " pp"


def curve_plot(ax, tab: dict, metric: str, label: str, color=None):
    rows = tab[metric]
    xs = [r["shift"] for r in rows if r["mean"] is not None]
    ms = [r["mean"] * 100 for r in rows if r["mean"] is not None]
    ss = [(r["std"] or 0) * 100 for r in rows if r["mean"] is not None]
    ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=label, color=color)
    ax.axvline(0, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("threshold shift t")
    ax.grid(alpha=0.3)
