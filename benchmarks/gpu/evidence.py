"""CIFAR-10 evidence on one GPU in one short call (issue 24, item 4); the same script on CPU in a
minute as a smoke test (``--device cpu --tiny``, tests/test_gpu_script.py).

What it runs, each step a ``bnnshift`` command in a child process with its own time limit, each
recorded (command, exit code, wall seconds, the numbers its ``--json`` printed) into ONE JSON file:

1. ``paths``: the CUDA paths the CPU-only test suite cannot run:
   a bf16 search and an fp16 search (``--precision``; fp16 needs CUDA and is skipped on CPU with the
   reason), both ``--memory-format channels_last --compile auto``; a one-process ``torchrun`` search
   (NCCL on CUDA, gloo on CPU); ``fold --data`` and ``export --onnx`` of the patch the bf16 search
   wrote (``--patch-out``: a model trained on the GPU, folded and verified on the CPU exporter).
2. ``promise``: per model (full-width ``vgg-small`` and ``resnet20-bireal`` on CIFAR-10, or tiny
   ones with ``--tiny``), the first-epoch search's pick (``--shifts`` grid, one epoch, ``--seeds``)
   and then the pick and ``t = 0`` trained ``E`` epochs from the same init and batches
   (``bnnshift search --shifts 0,PICK --seed-list ... --epochs E --val --metric val_acc``: Adam
   1e-3, constant rate, BN re-estimated before the held-out accuracy). ``E`` is as many epochs as
   fit in what is left of ``--budget-s`` after the search, measured from the search's own epoch
   time. Reported: per seed the held-out accuracy of both, the paired gain, its mean and 95%
   t-interval, wins.

Data: ``--archive`` (``cifar10-jpeg.tar.gz``, unpacked into a temporary folder) or ``--data-dir``
(``DIR/train/<class>``, ``DIR/test/<class>``). With ``--tiny`` and neither, a small synthetic
PNG folder in the same layout is written, so the smoke test needs no archive.

    python benchmarks/gpu/evidence.py --archive cifar10-jpeg.tar.gz --out gpu-evidence.json
    python benchmarks/gpu/evidence.py --device cpu --tiny --out /tmp/evidence.json   # ~1 min

Exit status: 0 when every step that ran exited 0 (skipped steps say why), 1 otherwise. A step that
runs past its limit is ended and recorded as ``timed_out``; the JSON is written after every step.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

CIFAR_MEAN = "0.4914,0.4822,0.4465"
CIFAR_STD = "0.2470,0.2435,0.2616"
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}

FULL = {
    "paths_model": ("vgg-small", {"width": "0.5"}),
    "paths_steps": 60,
    "promise_models": [("vgg-small", {}), ("resnet20-bireal", {})],
    "grid": "-0.5:1.5:0.5",
    "seeds": [0, 1, 2],
    "batch": 256,
    "train_limit": None,
    "workers": 8,
    "max_epochs": None,
}
TINY = {
    "paths_model": ("vgg-small", {"width": "0.125"}),
    "paths_steps": 4,
    "promise_models": [("vgg-small", {"width": "0.125"}), ("resnet20-bireal", {"width": "0.25"})],
    "grid": "0.5,1",  # no 0 in the tiny grid: the pick is a shift, so the smoke test runs the training step
    "seeds": [0, 1],
    "batch": 32,
    "train_limit": 128,
    "workers": 0,
    "max_epochs": 1,
}


def bnnshift_cmd() -> list[str]:
    """``python -m bnnshift`` of the interpreter running this script (the installed package)."""
    return [sys.executable, "-m", "bnnshift"]


def write_tiny_folder(root: Path, n_train: int = 16, n_test: int = 8, classes: int = 3) -> Path:
    """PNG class folders ``root/{train,test}/cK/*.png``, 32x32 RGB, class-dependent brightness."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = (rng.random((32, 32, 3)) * 60 + c * 60).astype(np.uint8)
                Image.fromarray(a).save(d / f"{i:04d}.png")
    return root


def unpack(archive: Path, into: Path) -> Path:
    """Unpack ``cifar10-jpeg.tar.gz`` into ``into``; return the folder holding ``train/`` and ``test/``."""
    with tarfile.open(archive) as tf:
        tf.extractall(into, filter="data")
    for cand in [into, *sorted(p for p in into.iterdir() if p.is_dir())]:
        if (cand / "train").is_dir():
            return cand
    raise SystemExit(f"evidence: no train/ folder inside {archive}")


class Steps:
    """Runs commands with a time limit each, keeps a record, rewrites the JSON after each."""

    def __init__(self, out: Path, payload: dict[str, Any], deadline: float):
        self.out, self.payload, self.deadline = out, payload, deadline
        self.payload.setdefault("steps", [])

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.payload, indent=1, default=str))
        os.replace(tmp, self.out)

    def skip(self, name: str, why: str) -> None:
        self.payload["steps"].append({"name": name, "skipped": why})
        self.save()

    def run(self, name: str, argv: list[str], limit_s: float, env: dict | None = None) -> dict[str, Any]:
        limit = max(5.0, min(limit_s, self.left()))
        rec: dict[str, Any] = {"name": name, "argv": argv, "limit_s": round(limit, 1)}
        t0 = time.perf_counter()
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=limit,
                               env={**os.environ, **(env or {})})
            rec.update(rc=p.returncode, stderr_tail=p.stderr[-1500:])
            try:
                rec["json"] = json.loads(p.stdout) if p.stdout.strip() else None
            except json.JSONDecodeError:
                rec["stdout_tail"] = p.stdout[-1500:]
        except subprocess.TimeoutExpired as exc:
            rec.update(rc=None, timed_out=True,
                       stderr_tail=(exc.stderr or b"")[-1500:].decode(errors="replace")
                       if isinstance(exc.stderr, bytes) else (exc.stderr or "")[-1500:])
        rec["wall_s"] = round(time.perf_counter() - t0, 2)
        self.payload["steps"].append(rec)
        self.save()
        print(f"evidence: {name}: rc={rec.get('rc')} in {rec['wall_s']} s", file=sys.stderr, flush=True)
        return rec


def _margs(args: dict[str, str]) -> list[str]:
    return [a for k, v in args.items() for a in ("--arg", f"{k}={v}")]


def paths(steps: Steps, data: str, device: str, mode: dict, work: Path, cuda: bool) -> None:
    """bf16 / fp16 searches (channels_last, --compile auto), 1-process torchrun, fold + export."""
    name, margs = mode["paths_model"]
    base = [*bnnshift_cmd(), "search", f"zoo:{name}", *_margs(margs), "--data", data, "--mean", CIFAR_MEAN,
            "--std", CIFAR_STD, "--shifts", "0,0.5", "--steps", str(mode["paths_steps"]), "--batch-size",
            str(mode["batch"]), "--memory-format", "channels_last", "--compile", "auto", "--json", "-q"]
    if mode["train_limit"]:
        base += ["--train-limit", str(mode["train_limit"])]
    patch_dir = work / "patch-bf16"
    steps.run("search-bf16", [*base, "--device", device, "--precision", "bf16", "--out", str(work / "bf16"),
                              "--patch-out", str(patch_dir)], 240)
    if cuda:
        steps.run("search-fp16", [*base, "--device", device, "--precision", "fp16", "--out", str(work / "fp16")], 240)
    else:
        steps.skip("search-fp16", "fp16 needs CUDA (torch.autocast fp16 with a GradScaler)")
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "bnnshift", *base[3:], "--device", device, "--out", str(work / "ddp1")]
    steps.run("torchrun-1proc-" + ("nccl" if cuda else "gloo"), ddp, 240)
    if patch_dir.is_dir():
        steps.run("fold-cuda-trained", [*bnnshift_cmd(), "fold", str(patch_dir), "--data", data, "--json", "-q"], 180)
        steps.run("export-cuda-trained", [*bnnshift_cmd(), "export", str(patch_dir), "--onnx",
                                          str(work / "bf16.onnx"), "--json", "-q"], 240)
    else:
        steps.skip("fold-cuda-trained", "the bf16 search wrote no --patch-out")
        steps.skip("export-cuda-trained", "the bf16 search wrote no --patch-out")


def _candidates(rec: dict[str, Any]) -> list[dict[str, Any]]:
    j = rec.get("json") or {}
    return list(j.get("candidates") or [])


def _paired(gains: list[float]) -> dict[str, Any]:
    n = len(gains)
    if n == 0:
        return {"seeds": 0}
    mean = sum(gains) / n
    if n < 2:
        return {"seeds": n, "mean_gain_pp": round(mean, 3), "ci95_pp": None, "wins": int(gains[0] > 0)}
    sd = math.sqrt(sum((g - mean) ** 2 for g in gains) / (n - 1))
    half = T95.get(n - 1, 1.96) * sd / math.sqrt(n)
    return {"seeds": n, "mean_gain_pp": round(mean, 3), "ci95_pp": [round(mean - half, 3), round(mean + half, 3)],
            "wins": sum(g > 0 for g in gains)}


def promise(steps: Steps, data: str, device: str, mode: dict, work: Path, share: float) -> dict[str, Any]:
    """First-epoch pick vs t = 0 trained to the end, per model; ``share``: this model's part of the time."""
    results: dict[str, Any] = {}
    n_models = len(mode["promise_models"])
    for i, (name, margs) in enumerate(mode["promise_models"]):
        common = [*bnnshift_cmd(), "search", f"zoo:{name}", *_margs(margs), "--data", data, "--mean", CIFAR_MEAN,
                  "--std", CIFAR_STD, "--device", device, "--batch-size", str(mode["batch"]), "--compile", "auto",
                  "--workers", str(mode["workers"]), "--json", "-q"]
        if mode["train_limit"]:
            common += ["--train-limit", str(mode["train_limit"]), "--val-limit", str(mode["train_limit"])]
        seeds = ",".join(str(s) for s in mode["seeds"])
        budget = steps.left() / (n_models - i) * share
        t0 = time.monotonic()
        rec = steps.run(f"promise-{name}-search", [*common, "--shifts", mode["grid"], "--seed-list", seeds,
                                                    "--out", str(work / f"{name}-search")], budget * 0.5)
        cands = [c for c in _candidates(rec) if c.get("score") is not None]
        if rec.get("rc") != 0 or not cands:
            results[name] = {"error": "the first-epoch search did not finish", "rc": rec.get("rc")}
            continue
        by_shift: dict[float, list[float]] = {}
        for c in cands:
            by_shift.setdefault(float(c["shift"]), []).append(float(c["score"]))
        pick = max(by_shift, key=lambda s: (sum(by_shift[s]) / len(by_shift[s]), -abs(s)))
        per_epoch = (time.monotonic() - t0) / max(1, len(cands))  # one candidate = one epoch
        left = budget - (time.monotonic() - t0)
        epochs = max(1, int(left / (per_epoch * 2 * len(mode["seeds"]) * 1.3)))
        if mode["max_epochs"]:
            epochs = min(epochs, mode["max_epochs"])
        entry: dict[str, Any] = {"grid": mode["grid"], "first_epoch_scores": by_shift, "pick": pick,
                                 "epoch_s": round(per_epoch, 2), "epochs": epochs}
        if pick == 0.0:
            entry["note"] = "the search picked t = 0: nothing to compare"
            results[name] = entry
            continue
        rec = steps.run(f"promise-{name}-train", [*common, "--shifts", f"0,{pick}", "--seed-list", seeds, "--epochs",
                                                   str(epochs), "--val", "--metric", "val_acc",
                                                   "--out", str(work / f"{name}-train")], max(30.0, left))
        final: dict[tuple[float, int], float] = {}
        for c in _candidates(rec):
            v = c.get("val_acc", (c.get("extra") or {}).get("val_acc"))
            if v is not None:
                final[(float(c["shift"]), int(c["seed"]))] = float(v)
        gains = [100.0 * (final[(pick, s)] - final[(0.0, s)]) for s in mode["seeds"]
                 if (pick, s) in final and (0.0, s) in final]
        entry.update(final_val_acc={f"t={k[0]} seed={k[1]}": v for k, v in sorted(final.items())},
                     paired=_paired(gains), rc=rec.get("rc"))
        results[name] = entry
        steps.save()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    ap.add_argument("--tiny", action="store_true", help="tiny models and data: the CPU smoke test (~1 min)")
    ap.add_argument("--archive", type=Path, default=None, help="cifar10-jpeg.tar.gz to unpack")
    ap.add_argument("--data-dir", type=Path, default=None, help="an unpacked DIR with train/ and test/")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for everything (default 480)")
    ap.add_argument("--skip-paths", action="store_true", help="only the promise")
    ap.add_argument("--out", type=Path, default=Path("gpu-evidence.json"))
    a = ap.parse_args(argv)
    t_start = time.monotonic()
    import torch

    cuda = torch.cuda.is_available()
    device = a.device if a.device != "auto" else ("cuda" if cuda else "cpu")
    if device.startswith("cuda") and not cuda:
        print("evidence: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    mode = TINY if a.tiny else FULL
    work = Path(tempfile.mkdtemp(prefix="bnnshift-evidence-"))
    payload: dict[str, Any] = {
        "script": "benchmarks/gpu/evidence.py", "argv": sys.argv[1:] if argv is None else argv,
        "mode": "tiny" if a.tiny else "full", "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "budget_s": a.budget_s,
        "data_note": "CIFAR-10 re-encoded as JPEG (shared/data/README.md): close to, not equal to, published numbers",
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    steps = Steps(a.out, payload, t_start + a.budget_s)
    try:
        if a.data_dir is not None:
            root = a.data_dir
        elif a.archive is not None:
            t0 = time.perf_counter()
            root = unpack(a.archive, work / "data")
            payload["unpack_s"] = round(time.perf_counter() - t0, 1)
        elif a.tiny:
            root = write_tiny_folder(work / "tiny")
            payload["data_note"] = "synthetic 32x32 PNG folders (tiny mode)"
        else:
            print("evidence: give --archive or --data-dir (or --tiny)", file=sys.stderr)
            return 2
        data = f"imagefolder:{root}"
        payload["data"] = str(root)
        if not a.skip_paths:
            paths(steps, data, device, mode, work, device.startswith("cuda"))
        payload["promise"] = promise(steps, data, device, mode, work, share=1.0)
        payload["wall_s"] = round(time.monotonic() - t_start, 1)
        steps.save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = [s["name"] for s in payload["steps"] if "skipped" not in s and s.get("rc") != 0]
    payload["failed_steps"] = failed
    steps.save()
    print(f"evidence: {len(payload['steps'])} steps, failed: {failed or 'none'}; wrote {a.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
