"""The packed runtime against torch fp32 eager and onnxruntime on the folded ONNX, in one run.

    nice -n 10 python benchmarks/bench_runtime.py [--models vgg-small,resnet20-bireal,bireal-resnet18]
        [--large-batches 1] [--out results.json]

Each model (full width, zoo input shape; BatchNorm statistics set as after training, since an
untrained BN puts integer sums exactly on the threshold): scanned, patched with t = 0.5
everywhere, folded, exported with bnnshift.export.export_onnx (verified), packed with
bnnshift.runtime.pack (proved; integer thresholds where a binary activation follows a packed layer
alone). Then, at batch 1 and 32 (``--large-batches`` for inputs of 128 pixels or more: a ResNet-18
at 224x224 runs at batch 1 by default), 1 thread and all threads: per packed
layer (the float module as written, which re-binarizes its weight at every call; the plain float
op with the two-valued weight precomputed; the packed module; all on the same captured input) and
end to end (torch eager, onnxruntime with the same intra-op threads, packed). Times: minimum over
repeats, ms; at 1 thread the calling thread's CPU time, else wall-clock (bnnshift.runtime.bench).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")




def _ort_factory(path: str):
    import numpy as np
    import onnxruntime as ort

    cache: dict[int, object] = {}

    def factory(x, threads):
        if threads not in cache:
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            cache[threads] = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        s = cache[threads]
        feed = {s.get_inputs()[0].name: np.ascontiguousarray(x.numpy())}
        return lambda: s.run(None, feed)
    return factory


def machine() -> dict[str, str]:
    def sh(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in sh(["lscpu"]).splitlines() if ln.startswith("Model name")),
               platform.processor())
    return {"cpu": cpu, "cores": str(os.cpu_count()), "load_before": sh(["uptime"])}


def main(argv=None) -> int:
    import torch

    from bnnshift import registry
    from bnnshift.export import export_onnx
    from bnnshift.fold import fold_shifts
    from bnnshift.patch import patch_model
    from bnnshift.runtime import pack_model
    from bnnshift.runtime.bench import bench, summarise, trained_like
    from bnnshift.scan import scan_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vgg-small,resnet20-bireal,bireal-resnet18")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--large-batches", default="1", help="batches for inputs of 128 pixels or more (ResNet-18)")
    ap.add_argument("--threads", default="")
    ap.add_argument("--min-time", type=float, default=0.5)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    info = machine()
    print(f"# CPU: {info['cpu']} ({info['cores']} cores); load: {info['load_before']}")
    results = {"machine": info, "models": {}}
    threads = [int(t) for t in a.threads.split(",")] if a.threads else sorted({1, torch.get_num_threads()})
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            entry = registry.ZOO.get(name)
            shape = tuple(entry.input_shape)
            torch.manual_seed(0)
            model = trained_like(entry.factory())
            rep = scan_model(model, shape, name=name)
            folded = copy.deepcopy(model)
            patch_model(folded, rep, 0.5)
            fr = fold_shifts(folded, shape)
            onnx_path = os.path.join(tmp, f"{name}.onnx")
            export_onnx(folded, shape, onnx_path, batches=1, sites=rep.sites)
            packed, prep = pack_model(folded, shape)
            print(f"\n## {name} {shape}: {len(fr.folded)} of {len(rep.sites)} shifts folded; {len(prep.packed)} layers "
                  f"packed ({len(prep.thresholds)} with integer thresholds), {len(prep.left_float)} float; "
                  f"proof exact={prep.proof['exact']} "
                  f"({prep.proof['binary_activations']} binary activations); kernel {prep.backend}")
            sizes = a.large_batches if max(shape[1:]) >= 128 else a.batches
            for k, v in prep.thresholds.items():
                print(f"threshold {k}: {v}")
            rows = bench(folded, packed, shape, batches=[int(b) for b in sizes.split(",")], threads=threads,
                         extra={"onnxruntime": _ort_factory(onnx_path)}, min_time=a.min_time)
            print("| what | batch | threads | torch fp32 eager ms | float op ms | onnxruntime ms | packed ms "
                  "| vs eager | vs float op | vs onnxruntime |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for r in summarise(rows) + [r for r in rows if r["what"] != "end to end"]:
                ort_ms = f"{r['onnxruntime_ms']:.3f}" if "onnxruntime_ms" in r else "-"
                ort_x = f"{r['onnxruntime_ms'] / r['packed_ms']:.2f}x" if "onnxruntime_ms" in r else "-"
                fo = f"{r['float_op_ms']:.3f}" if "float_op_ms" in r else "-"
                fox = f"{r['speedup_vs_op']:.2f}x" if "speedup_vs_op" in r else "-"
                print(f"| {r['what']} | {r['batch']} | {r['threads']} | {r['float_ms']:.3f} | {fo} | {ort_ms} | "
                      f"{r['packed_ms']:.3f} | {r['speedup']:.2f}x | {fox} | {ort_x} |")
            sys.stdout.flush()
            results["models"][name] = {"packed": prep.packed, "left_float": prep.left_float, "proof": prep.proof,
                                       "thresholds": prep.thresholds, "no_threshold": prep.no_threshold, "rows": rows}
    results["machine"]["load_after"] = machine()["load_before"]
    print(f"\n# load after: {results['machine']['load_after']}")
    if a.out:
        from bnnshift._io import atomic_write_json

        atomic_write_json(a.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
