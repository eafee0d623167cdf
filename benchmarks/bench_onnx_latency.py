"""onnxruntime latency of patched models relative to the original: patched/original, unfolded
and folded, for a few zoo models, all measured in one run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_onnx_latency.py [--models vgg-small,...] [--runs 50]

Each model: the original, the patched (t = 0.5 everywhere, hooks exported as Sub nodes) and
the folded patched model are exported with bnnshift.export.export_onnx (verified against
torch), then timed with onnxruntime (1 intra-op thread, batch 8, warmup, median of N runs,
the three sessions interleaved so that machine load hits them alike).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv=None) -> int:
    import numpy as np
    import torch

    from bnnshift import registry
    from bnnshift.export import _session, export_onnx
    from bnnshift.fold import fold_shifts
    from bnnshift.patch import patch_model
    from bnnshift.scan import scan_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vgg-small,xnor-resnet18,resnet20-bireal,style-rsign")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--shift", type=float, default=0.5)
    ap.add_argument("--imagenet-width", type=float, default=0.25)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    imagenet = {"xnor-resnet18", "bireal-resnet18", "bireal-resnet34", "reactnet-a"}
    print(f"{'model':<22}{'orig ms':>9}{'unfolded':>10}{'folded':>9}{'#folded':>9}{'nodes o/u/f':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            entry = registry.ZOO.get(name)
            kw, shape = ({"width": a.imagenet_width}, (3, 32, 32)) if name in imagenet else ({}, entry.input_shape)
            torch.manual_seed(0)
            orig = entry.factory(**kw).eval()
            rep = scan_model(orig, shape, name=name)
            pat = copy.deepcopy(orig)
            patch_model(pat, rep, a.shift)
            fol = copy.deepcopy(pat)
            fr = fold_shifts(fol, shape)
            sessions, nodes = [], []
            try:
                for tag, m in (("orig", orig), ("unfolded", pat), ("folded", fol)):
                    r = export_onnx(m, shape, os.path.join(tmp, f"{name}-{tag}.onnx"), batches=1, sites=rep.sites)
                    nodes.append(r.nodes)
                    with open(r.path, "rb") as fh:
                        sessions.append(_session(fh.read(), True))
            except Exception as exc:  # noqa: BLE001 - report and go on with the next model
                print(f"{name:<22}skipped ({tag}): {str(exc).splitlines()[0][:100]}")
                continue
            x = np.random.default_rng(0).standard_normal((a.batch, *shape)).astype(np.float32)
            inp = sessions[0].get_inputs()[0].name
            for s in sessions:
                for _ in range(a.warmup):
                    s.run(None, {inp: x})
            times = [[], [], []]
            for _ in range(a.runs):
                for i, s in enumerate(sessions):
                    t0 = time.perf_counter()
                    s.run(None, {inp: x})
                    times[i].append(time.perf_counter() - t0)
            med = [statistics.median(t) * 1e3 for t in times]
            print(f"{name:<22}{med[0]:>9.3f}{med[1] / med[0]:>10.3f}{med[2] / med[0]:>9.3f}"
                  f"{len(fr.folded):>5}/{len(rep.sites):<3}{'/'.join(map(str, nodes)):>14}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
