"""The prepared GPU evidence script (issue 24, item 4) runs end to end in its CPU mode: every step
it would run on a GPU (bf16 search with channels_last and --compile auto, a 1-process torchrun, fold
and export of the searched patch, the pick-vs-0 promise) exits 0 and lands in one JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_evidence_script_cpu_tiny(tmp_path):
    out = tmp_path / "evidence.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "evidence.py"), "--device", "cpu",
                        "--tiny", "--budget-s", "1200", "--out", str(out)], capture_output=True, text=True,
                       env=env, timeout=1500, cwd=tmp_path)
    assert p.returncode == 0, (p.stderr[-3000:], out.read_text()[-3000:] if out.exists() else "")
    d = json.loads(out.read_text())
    steps = {s["name"]: s for s in d["steps"]}
    for name in ("search-bf16", "torchrun-1proc-gloo", "fold-cuda-trained", "export-cuda-trained",
                 "promise-vgg-small-search", "promise-vgg-small-train",
                 "promise-resnet20-bireal-search", "promise-resnet20-bireal-train"):
        assert steps[name]["rc"] == 0, (name, steps[name].get("stderr_tail"))
    assert "CUDA" in steps["search-fp16"]["skipped"]  # said, not silently left out
    assert steps["export-cuda-trained"]["json"]["passed"] is True
    for model in ("vgg-small", "resnet20-bireal"):
        entry = d["promise"][model]
        assert entry["pick"] in (0.5, 1.0)
        assert entry["paired"]["seeds"] == 2 and len(entry["final_val_acc"]) == 4
        assert all(0.0 <= v <= 1.0 for v in entry["final_val_acc"].values())
    assert d["failed_steps"] == [] and d["device"] == "cpu" and d["torch"]
