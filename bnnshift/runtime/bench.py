"""Timing of a float model against its packed model: per packed layer (the float module and the
packed one on the same captured input) and end to end, at given batch sizes and thread counts.
Times are the minimum over repeated runs, in milliseconds: at 1 thread the CPU time of the calling
thread (``time.thread_time``: torch and onnxruntime with one intra-op thread compute in the caller,
and other processes on a shared machine do not count), with more threads wall-clock."""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from .layers import PackedConv2d


def time_ms(fn: Callable[[], Any], min_time: float = 0.3, min_reps: int = 3,
            clock: Callable[[], float] = time.perf_counter) -> float:
    """Minimum milliseconds of ``fn()`` over repeats on ``clock`` (one warm-up call first)."""
    fn()
    best, reps, start = float("inf"), 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - start < min_time:
        t = clock()
        fn()
        best = min(best, clock() - t)
        reps += 1
    return best * 1e3


def _layer_inputs(model: nn.Module, paths: Iterable[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())
    hs = [mods[p].register_forward_pre_hook(lambda m, a, p=p: got.setdefault(p, a[0])) for p in paths]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hs:
            h.remove()
    return got


def _then(first: Callable[[torch.Tensor], torch.Tensor], rest: list[nn.Module]) -> Callable[[torch.Tensor], Any]:
    def run(x: torch.Tensor) -> Any:
        y = first(x)
        for m in rest:
            y = m(y)
        return y
    return run


def bench(float_model: nn.Module, packed: nn.Module, input_shape: tuple[int, ...], *, batches: Iterable[int] = (1, 32),
          threads: Iterable[int] | None = None, extra: dict[str, Callable[[torch.Tensor, int], Callable[[], Any]]] | None
          = None, min_time: float = 0.3) -> list[dict[str, Any]]:
    """Rows ``{"what", "batch", "threads", "float_ms", "packed_ms", "speedup", **extra_ms}``: one per
    packed layer (``what`` = its path; also ``float_op_ms``: the plain float op with the weight
    precomputed, and ``speedup_vs_op``; a layer with an integer threshold is timed against the float
    layer followed by the modules it absorbs: pool, BN, binarizer) and one ``"end to end"`` per
    (batch, threads).

    ``threads`` default (1, all cores); ``extra``: name -> factory(x, threads) of another end-to-end
    runner (onnxruntime), timed in the end-to-end rows as ``<name>_ms``. Restores torch's thread count."""
    float_model, packed = float_model.eval(), packed.eval()
    paths = [p for p, m in packed.named_modules() if isinstance(m, PackedConv2d)]
    fmods, pmods = dict(float_model.named_modules()), dict(packed.named_modules())
    all_threads = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    try:
        for nt in threads or sorted({1, all_threads}):
            torch.set_num_threads(nt)
            clock = time.thread_time if nt == 1 else time.perf_counter
            for b in batches:
                x = torch.randn(b, *input_shape, generator=torch.Generator().manual_seed(0))
                ins = _layer_inputs(float_model, paths, x)
                with torch.no_grad():
                    for p in paths:
                        if p not in ins:
                            continue
                        # a layer with an integer threshold against the float layer and the modules it absorbs
                        rest = [fmods[a] for a in getattr(pmods[p], "absorbed", [])]
                        fl, op = _then(fmods[p], rest), _then(pmods[p].float_op(), rest)
                        f = time_ms(lambda: fl(ins[p]), min_time, clock=clock)
                        q = time_ms(lambda: pmods[p](ins[p]), min_time, clock=clock)
                        fo = time_ms(lambda: op(ins[p]), min_time, clock=clock)
                        rows.append({"what": p, "batch": b, "threads": nt, "float_ms": f, "float_op_ms": fo,
                                     "packed_ms": q, "speedup": f / q, "speedup_vs_op": fo / q})
                    f = time_ms(lambda: float_model(x), min_time, clock=clock)
                    q = time_ms(lambda: packed(x), min_time, clock=clock)
                    row = {"what": "end to end", "batch": b, "threads": nt, "float_ms": f, "packed_ms": q,
                           "speedup": f / q}
                    for name, factory in (extra or {}).items():
                        row[f"{name}_ms"] = time_ms(factory(x, nt), min_time, clock=clock)
                    rows.append(row)
    finally:
        torch.set_num_threads(all_threads)
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (batch, threads): the packed layers together (sum of their float / packed times) and end to end."""
    out = []
    keys = sorted({(r["batch"], r["threads"]) for r in rows}, key=lambda k: (k[1], k[0]))
    for b, nt in keys:
        layers = [r for r in rows if r["batch"] == b and r["threads"] == nt and r["what"] != "end to end"]
        e2e = [r for r in rows if r["batch"] == b and r["threads"] == nt and r["what"] == "end to end"]
        f, q = sum(r["float_ms"] for r in layers), sum(r["packed_ms"] for r in layers)
        fo = sum(r["float_op_ms"] for r in layers)
        out.append({"what": "binary layers", "batch": b, "threads": nt, "float_ms": f, "float_op_ms": fo,
                    "packed_ms": q, "speedup": f / q if q else float("nan"),
                    "speedup_vs_op": fo / q if q else float("nan")})
        out.extend(e2e)
    return out


def trained_like(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BatchNorm of ``model`` (in place) random running statistics and affine
    parameters as after training; returns it in eval mode. For benchmarks and tests on untrained
    zoo models: an untrained BN has beta = 0, so an integer conv sum of 0 lands exactly on the
    threshold (``sign(0) = 0``, a ternary value) and ``pack`` rightly leaves such layers float."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                c = mod.num_features
                mod.running_mean.copy_(torch.randn(c, generator=g))
                mod.running_var.copy_(torch.rand(c, generator=g) * 4 + 0.5)
                if mod.affine:
                    mod.weight.copy_(torch.randn(c, generator=g))
                    mod.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return model.eval()
