"""Export every zoo model (patched, t = 0.5 and t = 1) to ONNX and verify it with onnxruntime.

CI's test_export_verifies_every_zoo_model covers one model per architecture family; the
deeper repeats of the Bi-Real/ResNet-20 block (same ops, more of them) cost minutes of dynamo
tracing each, so they are verified here and the results recorded in docs/export_zoo.json:

    OMP_WAIT_POLICY=PASSIVE python benchmarks/verify_export_zoo.py --out docs/export_zoo.json

Ties (a flip where |pre-activation - t| is within float tolerance) are counted apart and do
not fail verification (docs/patch.md, Export).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bnnshift import registry  # noqa: E402
from bnnshift._version import __version__  # noqa: E402
from bnnshift.export import export_onnx  # noqa: E402
from test_fold_export import patched  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/export_zoo.json")
    ap.add_argument("--models", default="", help="comma list (default: the whole zoo)")
    ap.add_argument("--shifts", default="0.5,1", help="comma list of t")
    args = ap.parse_args()
    torch.set_num_threads(2)
    names = [n for n in args.models.split(",") if n] or registry.ZOO.names()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for t in [float(v) for v in args.shifts.split(",") if v]:
                t0 = time.perf_counter()
                model, shape = patched(name, t)
                try:
                    rep = export_onnx(model, shape, Path(tmp) / f"{name}.onnx", batches=2)
                    row = {"model": name, "shift": t, "passed": rep.passed, "exporter": rep.exporter,
                           "max_abs_diff": rep.max_abs_diff, "top1_agreement": rep.top1_agreement,
                           "sign_flip_share": rep.sign_flip_share, "tie_flips": rep.tie_flips,
                           "flips_after_tie": rep.flips_after_tie, "tied_samples": rep.tied_samples,
                           "sites_checked": rep.sites_checked, "nodes": rep.nodes, "tries": len(rep.attempts)}
                except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                    row = {"model": name, "shift": t, "passed": False, "error": str(exc)[:300]}
                row["seconds"] = round(time.perf_counter() - t0, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"bnnshift_version": __version__, "torch": torch.__version__,
                                          "command": " ".join(sys.argv), "models": rows}, indent=2) + "\n")
    failed = [f"{r['model']}@{r['shift']}" for r in rows if not r["passed"]]
    print(f"{len(rows) - len(failed)}/{len(rows)} verified" + (f"; failed: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
