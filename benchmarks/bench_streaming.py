"""The streaming data path (bnnshift.data.stream): peak memory against the data set size, and
images/s of streaming vs the in-memory path, all measured in one run.

    OMP_NUM_THREADS=1 nice python benchmarks/bench_streaming.py [--sizes 5000,50000] [--steps 20]

1. Peak resident memory of ``bnnshift search --stream on --augment cifar`` on image folders of
   5,000 and 50,000 generated 8x8 PNGs (same steps, batch and model, so the same work): the
   search process's own peak (``wait4`` rusage) and the peak of the process tree (the search +
   its DataLoader workers, /proc polled every 0.1 s; RSS counts pages shared with the forked
   workers once per process, so it is an upper bound). The issue's bar: < 150 MB apart.
2. Images/s on Fashion-MNIST (/usr/share/datasets/fashion-mnist): the loader alone (decode,
   augment, collate, no model) and a whole search candidate (zoo:lenet5, eager, the second
   candidate so nothing is warming up), streaming (``--stream on``, workers) vs in memory.
3. With ``--folder PATH`` (an image folder such as CIFAR-10's JPEGs): the loader alone, in
   memory vs streamed from the files vs streamed from the set decoded once into memory
   (bnnshift.data.decoded), and the seconds each takes to open:

       OMP_NUM_THREADS=1 nice python benchmarks/bench_streaming.py --skip memory,loader,search \
           --folder /tmp/cifar/cifar10 --loader-batches 40 --workers 1
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'plugins'}", OMP_NUM_THREADS="1")

MODEL = '''
import torch
from torch import nn

class Sign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(Sign.apply(self.bn(self.conv(x))).flatten(1))

def tiny():
    return Tiny()
'''


def write_folder(root: Path, n: int, classes: int = 10, size: int = 8) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = (rng.random((size, size, 3)) * 60 + (i % classes) * 19).astype(np.uint8)
        Image.fromarray(a).save(root / f"c{i % classes}" / f"{i}.png", compress_level=0)


def _tree_rss(pid: int) -> int:
    """RSS (bytes) of ``pid`` and its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def run_measured(cmd: list[str]) -> tuple[int, int, float, str]:
    """(own peak RSS bytes, process-tree peak RSS bytes, seconds, stdout) of ``cmd``."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss(p.pid))
            time.sleep(0.1)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out_chunks: list[str] = []
    reader = threading.Thread(target=lambda: out_chunks.append(p.stdout.read()), daemon=True)
    reader.start()
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    stop.set()
    th.join()
    reader.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    return ru.ru_maxrss * 1024, peak[0], time.perf_counter() - t0, "".join(out_chunks)


def bench_memory(sizes: list[int], steps: int, tmp: Path) -> list[dict]:
    model = tmp / "tiny.py"
    model.write_text(MODEL)
    rows = []
    for n in sizes:
        folder = tmp / f"imgs{n}"
        t0 = time.perf_counter()
        write_folder(folder, n)
        made = time.perf_counter() - t0
        cmd = [sys.executable, "-m", "bnnshift", "search", f"{model}:tiny", "--input-shape", "3,8,8",
               "--data", f"imagefolder:{folder}", "--stream", "on", "--augment", "cifar", "--workers", "2",
               "--shifts", "0,0.5", "--batch-size", "256", "--steps", str(steps), "--no-compile", "--device", "cpu",
               "--bn-recalib-batches", "2", "--json"]
        own, tree, secs, _ = run_measured(cmd)
        rows.append({"images": n, "own_peak_mb": own / 2**20, "tree_peak_mb": tree / 2**20, "seconds": secs,
                     "write_seconds": made})
        print(f"  {n:>7} images: search process peak {own / 2**20:7.1f} MB, with workers {tree / 2**20:7.1f} MB "
              f"({secs:.1f} s; folder written in {made:.1f} s)", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def bench_loader(batches: int, workers: int) -> dict:
    """Images/s of the data path alone: streaming loader vs in-memory batches."""
    from bnnshift.data import iterate_batches, load_data
    from bnnshift.data.stream import StreamOptions, open_stream

    bs = 256
    mem = load_data("fashion-mnist", input_shape=(1, 28, 28), val_limit=0)
    t0 = time.perf_counter()
    for _ in iterate_batches(mem.train_x, mem.train_y, bs, seed=0, steps=batches):
        pass
    mem_ips = batches * bs / (time.perf_counter() - t0)
    out = {"in_memory": mem_ips}
    for augment in ("none", "cifar"):
        src = open_stream("fashion-mnist", input_shape=(1, 28, 28), options=StreamOptions(augment=augment),
                          val_limit=0)
        out[f"stream_{augment}"] = _loader_images_per_s(src, bs, batches, workers)  # its loader ends with it
    return out


def bench_folder_loader(folder: str, batches: int, workers: int) -> dict:
    """Images/s of the data path alone on an image folder (e.g. CIFAR-10 as JPEGs, ``train/`` +
    ``test/``): the in-memory path (decoded to float32 once, then batches), streaming from the
    files (decoded every epoch) and streaming the folder decoded once into uint8 memory
    (``--stream auto``), each with ``--augment none`` and ``cifar``; plus the one-off seconds to
    open (and decode) the set. Batches of 256, ``workers`` DataLoader workers."""
    import torch

    from bnnshift.data import iterate_batches, load_data
    from bnnshift.data.stream import StreamOptions, open_stream

    bs, spec = 256, f"imagefolder:{folder}"
    t0 = time.perf_counter()
    mem = load_data(spec, input_shape=(3, 32, 32), val_limit=0)
    out = {"in_memory_load_s": time.perf_counter() - t0, "images": int(mem.train_x.shape[0])}
    del mem.train_x  # only the batching is timed below: keep one copy of the tensors
    x = torch.zeros(out["images"], 3, 32, 32)
    y = torch.zeros(out["images"], dtype=torch.int64)
    t0 = time.perf_counter()
    for _ in iterate_batches(x, y, bs, seed=0, steps=batches):
        pass
    out["in_memory"] = batches * bs / (time.perf_counter() - t0)
    del x, y
    for cache in (False, True):
        for augment in ("none", "cifar"):
            t0 = time.perf_counter()
            src = open_stream(spec, input_shape=(3, 32, 32), val_limit=0,
                              options=StreamOptions(augment=augment, cache=cache, mean=(0.5,) * 3, std=(0.25,) * 3))
            label = ("decoded_" if cache else "files_") + augment
            out[f"{label}_open_s"] = time.perf_counter() - t0
            out[label] = _loader_images_per_s(src, bs, batches, workers)  # its loader ends with it
            del src
    return out


def bench_search(steps: int, workers: int) -> dict:
    base = [sys.executable, "-m", "bnnshift", "search", "zoo:lenet5", "--data", "fashion-mnist", "--shifts", "0,0.5",
            "--batch-size", "256", "--steps", str(steps), "--no-compile", "--device", "cpu",
            "--bn-recalib-batches", "0", "--json"]
    out = {}
    for label, extra in (("in_memory", ["--stream", "off"]),
                         ("stream_none", ["--stream", "on", "--workers", str(workers)]),
                         ("stream_cifar", ["--augment", "cifar", "--workers", str(workers)])):
        _, _, _, stdout = run_measured(base + extra)
        cand = json.loads(stdout)["candidates"][-1]
        out[label] = steps * 256 / cand["seconds"]
    return out



def _loader_images_per_s(src, bs: int, batches: int, workers: int) -> float:
    """Images/s of ``batches`` batches of ``bs`` through the streaming DataLoader of ``src``
    (its persistent workers started by two batches first, not timed)."""
    import torch

    from bnnshift.data.stream import SeededBatchSampler, make_loader

    sampler = SeededBatchSampler(src.num_train, bs)
    loader = make_loader(src.train, sampler, workers=workers, pin_memory=False)
    sampler.set_order(0, steps=2)
    for _ in loader:  # start the persistent workers
        pass
    sampler.set_order(1, steps=batches)
    t0 = time.perf_counter()
    for xb, _ in loader:
        assert xb.dtype == torch.float32
    return batches * bs / (time.perf_counter() - t0)

def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="5000,50000")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--loader-batches", type=int, default=40)
    ap.add_argument("--search-steps", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: memory, loader, search, folder")
    ap.add_argument("--folder", default=None, help="an image folder (PATH/train + PATH/test, e.g. CIFAR-10 as JPEGs, "
                                                   "3x32x32): also time its data path (part 'folder')")
    a = ap.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    print(f"bnnshift streaming benchmark: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    result: dict = {}
    if "memory" not in skip:
        print("peak resident memory, streaming search (--augment cifar, 2 workers, same steps):", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            rows = bench_memory([int(v) for v in a.sizes.split(",")], a.steps, Path(tmp))
        result["memory"] = rows
        if len(rows) >= 2:
            d_own = rows[-1]["own_peak_mb"] - rows[0]["own_peak_mb"]
            d_tree = rows[-1]["tree_peak_mb"] - rows[0]["tree_peak_mb"]
            print(f"  difference {rows[0]['images']} -> {rows[-1]['images']}: search process {d_own:+.1f} MB, "
                  f"with workers {d_tree:+.1f} MB (bar: < 150 MB)", flush=True)
    if "loader" not in skip:
        sys.path.insert(0, str(ROOT))
        r = bench_loader(a.loader_batches, a.workers)
        result["loader"] = r
        print(f"Fashion-MNIST data path alone, images/s (batch 256, {a.workers} workers):", flush=True)
        for k, v in r.items():
            print(f"  {k:<14}{v:>12,.0f}   ({v / r['in_memory']:.4f} x in-memory)", flush=True)
    if a.folder and "folder" not in skip:
        sys.path.insert(0, str(ROOT))
        r = bench_folder_loader(a.folder, a.loader_batches, a.workers)
        result["folder"] = r
        print(f"image folder {a.folder} ({r['images']} training images), data path alone, images/s "
              f"(batch 256, {a.workers} workers; one-off open/decode seconds in brackets):", flush=True)
        print(f"  {'in_memory':<16}{r['in_memory']:>12,.0f}   (load {r['in_memory_load_s']:.1f} s)", flush=True)
        for k in ("files_none", "files_cifar", "decoded_none", "decoded_cifar"):
            print(f"  {k:<16}{r[k]:>12,.0f}   (open {r[k + '_open_s']:.1f} s)", flush=True)
    if "search" not in skip:
        r = bench_search(a.search_steps, a.workers)
        result["search"] = r
        print(f"Fashion-MNIST search candidate (zoo:lenet5, eager, {a.search_steps} steps of 256), images/s:",
              flush=True)
        for k, v in r.items():
            print(f"  {k:<14}{v:>12,.0f}   ({v / r['in_memory']:.2f} x in-memory)", flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
