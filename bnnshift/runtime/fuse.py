"""Integer thresholds: a packed layer, its BatchNorm (+ a folded t) and the binary activation after
it as one per-channel comparison on the integer dot product (issue 25, item 1).

A packed layer's output is ``y = float(dot) * alpha_c + bias_c`` with ``dot`` an integer in
``[-K, K]`` (``K = KH * KW * C/G``, the layer's fan-in). When that output runs, alone, through
``[MaxPool2d] -> [BatchNorm] -> binarizer -> [MaxPool2d]`` (each module's input *is* the previous
module's output on the probe, each called once per forward), the binary activation is a function
of ``dot`` alone. It is computed, not derived: the chain's own modules (copies, eval mode, their
hooks included, so an unfolded shift counts too) are run on ``y`` for every integer in ``[-K, K]``,
in float32 and in float64, so ties fall exactly where the float model puts them. The result
must be two-valued (``{-1, 1}`` or ``{0, 1}``: a ``sign(0) = 0`` anywhere in the range refuses) and
monotone in ``dot`` per channel: then it is ``(dot >= thr_c) XOR flip_c`` (``flip_c`` where it
decreases: ``gamma * alpha < 0``; a constant channel, ``gamma = 0``, gets a threshold outside the
range). A MaxPool before the binarizer is an OR of ``dot >= thr_c`` over the window (the max of
``y`` is ``y`` of the max dot: the rounding is monotone), one after it an OR of the bits. An
AvgPool, a residual add or any other module in the chain stops it: the layer stays unfused with
the reason (``PackReport.left_float["<path> (threshold)"]``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from .pack import LayerPlan

MAX_FAN_IN = 1 << 16  # the candidate dots are enumerated: (2K + 1) x O values per dtype


@dataclass
class Fusion:
    """One packed layer fused with the modules after it: ``absorbed`` (paths, in order, replaced
    by ``nn.Identity``), ``thr`` int64 (2, O) and ``flip`` bool (2, O) (row 0 float32, row 1
    float64), ``pool`` ``[kh, kw, sh, sw]`` or ``[]``, ``pool_first`` (the pool precedes the
    binarizer), ``lo`` / ``hi`` the binarizer's two values."""
    path: str
    absorbed: list[str]
    thr: torch.Tensor
    flip: torch.Tensor
    pool: list[int] = field(default_factory=list)
    pool_first: bool = True
    lo: float = -1.0
    hi: float = 1.0

    def describe(self) -> str:
        where = "" if not self.pool else (" (MaxPool before the binarizer: OR of the threshold bits, flipped)"
                                          if self.pool_first else " (MaxPool after the binarizer: OR of the bits)")
        flips = int(self.flip[0].sum())
        return (f"integer threshold through {' -> '.join(self.absorbed)}{where}; {flips} channel(s) flipped "
                f"(gamma * alpha < 0); emits {{{self.lo:g}, {self.hi:g}}}")


def _pool_params(m: nn.Module) -> list[int] | str:
    if not isinstance(m, nn.MaxPool2d):
        return f"{type(m).__name__} in the chain (only MaxPool2d commutes with the binarizer)"
    k, s = m.kernel_size, m.stride if m.stride is not None else m.kernel_size
    k = [k, k] if isinstance(k, int) else list(k)
    s = [s, s] if isinstance(s, int) else list(s)
    if m.padding not in (0, (0, 0)) or m.dilation not in (1, (1, 1)) or m.ceil_mode or m.return_indices:
        return "MaxPool2d with padding, dilation, ceil_mode or indices"
    return k + s


def _chain(path: str, leaves: set[str], finished: dict[str, list[tuple[Any, Any]]],
           mods: dict[str, nn.Module]) -> tuple[list[str], list[int], bool] | str:
    """The modules after ``path`` that make its binary activation: (paths, pool, pool_first) or a reason."""
    calls = finished.get(path, [])
    if len(calls) != 1:
        return f"called {len(calls)} times per forward (one call fuses)"
    cur = calls[0][1]
    absorbed: list[str] = []
    pool: list[int] = []
    pool_first, seen_bn, act = True, False, None
    while True:
        users = [p for p in leaves if any(xi is cur for xi, _ in finished.get(p, []))]
        if len(users) != 1:
            break
        p = users[0]
        if len(finished[p]) != 1:
            break
        m, out = mods[p], finished[p][0][1]
        pooling = isinstance(m, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd))
        if not pooling and not (isinstance(out, torch.Tensor) and out.shape == cur.shape):
            break  # besides the pool, only shape-keeping (elementwise, per-channel) modules are absorbed
        if pooling:
            if pool:
                break
            got = _pool_params(m)
            if isinstance(got, str):
                if act is None:
                    return got
                break  # a pool after the binarizer that is not a MaxPool stays torch
            pool, pool_first = got, act is None
            absorbed.append(p)
            if act is not None:
                break
        elif act is not None:
            break
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and not seen_bn and not m.training:
            seen_bn = True
            absorbed.append(p)
        elif isinstance(out, torch.Tensor) and out.is_floating_point() and (
                bool(((out == 1) | (out == -1)).all()) or bool(((out == 1) | (out == 0)).all())):
            act = p
            absorbed.append(p)
        elif isinstance(out, torch.Tensor) and out.is_floating_point() and bool(
                ((out == 1) | (out == -1) | (out == 0)).all()):
            return f"{p} gives sign(0) = 0 on the probe: a sum exactly on the threshold (ternary)"
        else:
            break
        cur = out
    if act is None:
        return ("no binarizer module follows it alone (an inline sign, a residual add or float work in between)")
    return absorbed, pool, pool_first


def _decision(plan: "LayerPlan", absorbed: list[str], mods: dict[str, nn.Module], dtype: torch.dtype
              ) -> torch.Tensor | str:
    """The binarizer's output (2K + 1, O) for every integer dot in [-K, K], computed by the chain's modules."""
    w = plan.weight
    o = w.shape[0]
    k = int(w[0].numel())
    if k > MAX_FAN_IN:
        return f"fan-in {k} over {MAX_FAN_IN}"
    alpha = w.detach().float().abs().flatten(1).amax(1).to(dtype)  # as the packed layer: float32 alpha, cast
    d = torch.arange(-k, k + 1, dtype=torch.int64)
    y = d.to(dtype)[:, None] * alpha[None, :]
    if plan.bias is not None:
        y = y + plan.bias.detach().float().to(dtype)[None, :]
    if plan.kind == "conv2d":
        y = y[:, :, None, None]
    with torch.no_grad():
        for p in absorbed:
            m = mods[p]
            if isinstance(m, nn.modules.pooling._MaxPoolNd):
                continue  # elementwise here: the pool is done on the bits
            y = copy.deepcopy(m).eval().to(dtype)(y)
    return y.reshape(2 * k + 1, o)


def _threshold(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float] | str:
    """(thr, flip, lo, hi) of a two-valued decision table (2K + 1, O), or a reason."""
    vals = sorted({float(e) for e in v.unique()})
    if not set(vals) <= {-1.0, 1.0} and not set(vals) <= {0.0, 1.0}:
        return (f"the binarizer gives {vals[:4]} on the integer sums: a sum lands exactly on the threshold "
                "(sign(0) = 0)")
    lo = -1.0 if -1.0 in vals else 0.0
    bits = v > 0
    k = (v.shape[0] - 1) // 2
    inc = bool((bits[1:] >= bits[:-1]).all(0).logical_or((bits[1:] <= bits[:-1]).all(0)).all())
    if not inc:
        return "the binary activation is not monotone in the integer sum"
    up = (bits[1:] >= bits[:-1]).all(0)
    d = torch.arange(-k, k + 1, dtype=torch.int64)[:, None]
    big = torch.full_like(d, k + 1)
    first_one = torch.where(bits, d, big).amin(0)
    first_zero = torch.where(~bits, d, big).amin(0)
    flip = ~up
    thr = torch.where(up, first_one, first_zero)
    return thr, flip, lo, 1.0


def plan_fusions(mods: dict[str, nn.Module], finished: dict[str, list[tuple[Any, Any]]],
                 plans: dict[str, "LayerPlan"]) -> tuple[dict[str, Fusion], dict[str, str]]:
    """For each packed layer of ``plans``: its ``Fusion`` or the reason it returns floats.

    ``mods``: the named modules of the (copied, eval) model that ran; ``finished``: per module path
    its calls ``(input, output)`` on one probe batch (``pack._run``)."""
    leaves = {p for p, m in mods.items() if p and not any(True for _ in m.children())}
    fusions: dict[str, Fusion] = {}
    reasons: dict[str, str] = {}
    taken: set[str] = set()
    for path, plan in plans.items():
        got = _chain(path, leaves, finished, mods)
        if isinstance(got, str):
            reasons[path] = got
            continue
        absorbed, pool, pool_first = got
        if taken & set(absorbed) or set(absorbed) & set(plans):
            reasons[path] = "its chain overlaps another layer's"
            continue
        if pool and plan.kind != "conv2d":
            reasons[path] = "a pool after a linear layer"
            continue
        res: list[Any] = []
        for dt in (torch.float32, torch.float64):
            table = _decision(plan, absorbed, mods, dt)
            res.append(table if isinstance(table, str) else _threshold(table))
        bad = next((r for r in res if isinstance(r, str)), None)
        if bad:
            reasons[path] = bad
            continue
        (t32, f32, lo, hi), (t64, f64, lo64, _) = res
        if lo != lo64:
            reasons[path] = "float32 and float64 binarizers differ"
            continue
        fusions[path] = Fusion(path, absorbed, torch.stack([t32, t64]), torch.stack([f32, f64]), pool, pool_first,
                               lo, hi)
        taken |= set(absorbed)
    return fusions, reasons
