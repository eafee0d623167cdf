"""A larq-style per-layer summary of a BNN: output shape, 1-bit and 32-bit parameters, memory,
binary and float MACs, compression (larq's ``lq.models.summary``, in PyTorch terms).

A parameter counts as 1-bit when the scan found a weight binarizer on it (``Discovery.binary_params``)
or when a conv / linear's *effective* weight (the tensor actually passed to ``F.conv2d`` /
``F.linear`` at run time) is two-valued per output channel and computed from it (``weight_ops``),
whatever code produced it (sign in forward, a Function, a parametrization, a buffer, XNOR /
ReActNet / Bi-Real scaling, brevitas).
MACs are counted per conv / linear *op* where it runs (an ``nn.Conv2d`` / ``nn.Linear``, or
``F.conv2d`` / ``F.linear`` written inside any module's forward): binary when its weight is
binary (a 1-bit parameter, or a value ``alpha * sign(w)`` computed in the forward), else float. Memory
assumes 1 bit per binary weight and 32 bits per other parameter; compression is the fp32 size
over that size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["WeightOp", "binary_weight_layers", "count_macs", "is_binary_weight", "layer_summary",
           "layer_summary_and_ops", "macs_per_module", "op_macs",
           "weight_ops"]


def _shape(out: Any) -> list[int] | None:
    if isinstance(out, torch.Tensor):
        return list(out.shape[1:])
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return list(out[0].shape[1:])
    return None


_CONV = {torch.conv1d, torch.conv2d, torch.conv3d}
_CONV_T = {torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d}
_LINEAR = {torch._C._nn.linear}


def _op_weight(func: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    return w if isinstance(w, torch.Tensor) else None


def op_macs(func: Any, args: tuple, kwargs: dict, out: Any, batch: int) -> int:
    """Multiply-accumulates per sample of one conv / transposed conv / linear call, else 0.

    ``batch``: the number of samples in the forward (a linear on ``(B * T, D)`` counts for
    ``B`` samples). conv: output elements x (in_channels / groups) x kernel size; transposed
    conv: input elements x (out_channels / groups) x kernel size; linear: output elements x
    in_features.
    """
    w = _op_weight(func, args, kwargs)
    if w is None or not isinstance(out, torch.Tensor) or w.dim() == 0:
        return 0
    kernel = int(torch.tensor(w.shape[2:]).prod()) if w.dim() > 2 else 1
    if func in _CONV:
        total = out.numel() * w.shape[1] * kernel
    elif func in _CONV_T:
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            return 0
        total = x.numel() * w.shape[1] * kernel
    elif func in _LINEAR:
        total = out.numel() * w.shape[-1]
    else:
        return 0
    return int(total // max(1, batch))


def is_binary_weight(w: torch.Tensor, *, both_signs: bool = True) -> bool:
    """A weight whose values are ``alpha * sign``: along dim 0 (or, for a transposed conv's
    ``(in, out, k...)`` layout, dim 1) every slice holds only ``-a`` and ``+a`` (one ``a`` per
    output channel, XNOR's scale; ReActNet / Bi-Real's magnitude-aware ``mean|W| * sign(W)``)
    or one value, and some slice holds both signs. Equal up to the rounding of an STE
    expression (``b.detach() - c.detach() + c`` is ``b`` only to a few ulps of ``|c| <= 1``):
    ``||w| - a| <= 8 eps (a + 1)``. A freshly initialised float weight never passes; an all-zero
    one does not either; a ternary ``{-a, 0, +a}`` does not. ``both_signs=False``: a slice
    of one sign passes too (the sign of a latent weight initialised positive, as ReActNet's
    ``rand * 1e-3``: the caller knows the values were computed from a float weight)."""
    if not w.is_floating_point() or w.dim() == 0 or w.numel() == 0:
        return False
    w = w.detach()
    tol = 8 * torch.finfo(w.dtype).eps
    for dim in ((0, 1) if w.dim() > 1 else (0,)):
        rows = w.transpose(0, dim).reshape(w.shape[dim], -1) if w.dim() > 1 else w.reshape(1, -1)
        if rows.shape[1] < 2 and dim == 0 and w.dim() > 1:
            continue  # one value per slice says nothing
        mag = rows.abs().float()
        a = mag.amax(1, keepdim=True)
        two = bool(((mag - a).abs() <= tol * (a + 1)).all())
        if two and bool((a > 0).any()) and (not both_signs or bool(((rows.amin(1) < 0) & (rows.amax(1) > 0)).any())):
            return True
    return False


@dataclass
class WeightOp:
    """One conv / transposed conv / linear call of a forward and its *effective* weight (the
    tensor actually passed to ``F.conv2d`` / ``F.linear``, whatever code produced it).

    ``module``: the innermost module running it (``""``: the root); ``func``: the op's name;
    ``macs``: multiply-accumulates per sample; ``binary``: the weight is ``alpha_c * sign``
    (``is_binary_weight``) or a parameter named binary by the scan; ``source``: the parameter
    it is (or is computed from: same shape, else same number of elements, in that module),
    None when none fits (a weight pre-binarized in a buffer with no latent parameter)."""

    module: str
    func: str
    macs: int
    binary: bool
    source: str | None


def _weight_source(w: torch.Tensor, module: str, ids: dict[int, str],
                   named: list[tuple[str, torch.Tensor]]) -> str | None:
    if id(w) in ids:
        return ids[id(w)]
    pre = f"{module}." if module else ""
    own = [(n, p) for n, p in named if n.startswith(pre)]
    for same in (lambda p: tuple(p.shape) == tuple(w.shape), lambda p: p.numel() == w.numel()):
        hits = [n for n, p in own if same(p)]
        if hits:
            return next((n for n in hits if n.rsplit(".", 1)[-1] == "weight"), hits[0])
    return None


def _quantized_from(w: torch.Tensor, latent: torch.Tensor | None) -> bool:
    """``w`` holds one magnitude per output channel and was computed from ``latent``, a float
    weight of many values: a sign (of one sign everywhere when the latent is initialised
    positive) happened between them."""
    if latent is None or latent is w or not latent.is_floating_point() or latent.numel() != w.numel():
        return False
    if latent.detach().reshape(-1)[:4096].unique().numel() <= 2:
        return False
    return is_binary_weight(w, both_signs=False)


class _MacCounter(TorchFunctionMode):
    """Records every conv / linear op of a forward, wherever it is written (a module, an
    ``F.conv2d`` / ``F.linear`` call in a forward), for the innermost running module."""

    def __init__(self, stack: list[str], binary_ids: set[int], batch: int, ops: list[WeightOp],
                 named: list[tuple[str, torch.Tensor]]):
        super().__init__()
        self.stack, self.binary_ids, self.batch, self.ops = stack, binary_ids, batch, ops
        self.named, self.ids = named, {id(p): n for n, p in named}
        self.tensors = dict(named)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _CONV or func in _CONV_T or func in _LINEAR:
            try:
                n = op_macs(func, args, kwargs, out, self.batch)
                w = _op_weight(func, args, kwargs)
                if n and w is not None:
                    where = self.stack[-1] if self.stack else ""
                    src = _weight_source(w, where, self.ids, self.named)
                    binary = id(w) in self.binary_ids or is_binary_weight(w) or _quantized_from(w, self.tensors.get(src))
                    self.ops.append(WeightOp(where, getattr(func, "__name__", str(func)), n, binary, src))
            except Exception:  # noqa: BLE001 - the summary is best effort, the forward goes on
                pass
        return out


class _Push:
    def __init__(self, stack: list[str], path: str):
        self.stack, self.path = stack, path

    def __call__(self, module, args):
        self.stack.append(self.path)


class _Pop:
    def __init__(self, stack: list[str], path: str):
        self.stack, self.path = stack, path

    def __call__(self, module, args, out):
        if self.stack and self.stack[-1] == self.path:
            self.stack.pop()


def weight_ops(model: nn.Module, example: torch.Tensor, binary_params: set[str], *,
               on_output: Any = None) -> tuple[list[WeightOp], bool]:
    """Every conv / linear op of one forward of ``example`` (no grad, eval mode; the model's mode
    is restored) with its effective weight (``WeightOp``), in execution order.

    Every ``conv{1,2,3}d``, ``conv_transpose{1,2,3}d`` and ``linear`` op is seen where it runs
    (nn.Conv2d / nn.Linear, or ``F.conv2d`` / ``F.linear`` written in any module's forward), for
    the innermost module running it. ``on_output(path, module, output)``, if given, is called
    after every module call. Returns the ops and whether the forward ran (a failing forward
    gives what was seen before the failure).
    """
    stack: list[str] = []
    named = list(model.named_parameters())  # a weight's source is a parameter (the latent one)
    binary_ids = {id(p) for n, p in named if n in binary_params}
    batch = int(example.shape[0]) if isinstance(example, torch.Tensor) and example.dim() > 0 else 1
    ops: list[WeightOp] = []
    hooks = []
    for path, m in model.named_modules():
        hooks.append(m.register_forward_pre_hook(_Push(stack, path)))
        hooks.append(m.register_forward_hook(_Pop(stack, path), always_call=True))
        if on_output is not None:
            hooks.append(m.register_forward_hook(lambda mod, a, out, path=path: on_output(path, mod, out)))
    was = model.training
    model.eval()
    ok = True
    try:
        with torch.no_grad(), _MacCounter(stack, binary_ids, batch, ops, named):
            model(example)
    except Exception:  # noqa: BLE001 - best effort: counts without shapes
        ok = False
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return ops, ok


def macs_per_module(ops: list[WeightOp]) -> dict[str, dict[str, int]]:
    """MACs per sample per module path, ``{path: {"binary": n, "float": n}}``, from ``weight_ops``."""
    macs: dict[str, dict[str, int]] = {}
    for op in ops:
        row = macs.setdefault(op.module, {"binary": 0, "float": 0})
        row["binary" if op.binary else "float"] += op.macs
    return macs


def binary_weight_layers(ops: list[WeightOp]) -> tuple[int, set[str]]:
    """How many layers have a binary effective weight, and the parameters those weights are
    (computed from): one layer per distinct source parameter (a shared conv called twice is one
    layer), or per module and op when no parameter fits."""
    keys = {op.source or f"{op.module}:{op.func}" for op in ops if op.binary}
    return len(keys), {op.source for op in ops if op.binary and op.source}


def count_macs(model: nn.Module, example: torch.Tensor, binary_params: set[str], *,
               on_output: Any = None) -> tuple[dict[str, dict[str, int]], bool]:
    """Binary and float MACs per sample of one forward of ``example`` (``weight_ops``), per
    module path: ``{path: {"binary": n, "float": n}}``; an op is binary when its weight is a
    parameter named in ``binary_params`` or its value is binary (``is_binary_weight``: a
    ``sign(w)`` / ``alpha * sign(w)`` computed in the forward). Returns the counts and whether
    the forward ran.
    """
    ops, ok = weight_ops(model, example, binary_params, on_output=on_output)
    return macs_per_module(ops), ok


@torch.no_grad()
def layer_summary(model: nn.Module, example: torch.Tensor, binary_params: set[str]) -> dict[str, Any]:
    """``layer_summary_and_ops`` without the ops."""
    return layer_summary_and_ops(model, example, binary_params)[0]


@torch.no_grad()
def layer_summary_and_ops(model: nn.Module, example: torch.Tensor,
                          binary_params: set[str]) -> tuple[dict[str, Any], list[WeightOp]]:
    """One row per module that owns parameters (plus totals), from one forward of ``example``.

    ``example``: an input batch ``(N, C, H, W)`` (N = 1 is enough). Returns ``{"layers": [{"layer",
    "type", "output_shape", "params_1bit", "params_32bit", "memory_bytes", "binary_macs",
    "float_macs"}], "totals": {... same sums ..., "memory_fp32_bytes", "compression"}}``. MACs are
    per sample. A parameter is 1-bit when it is in ``binary_params`` or a conv / linear's
    effective weight is binary and computed from it (``weight_ops``). The model runs in eval
    mode and is left in its mode; a forward that fails leaves shapes and MACs empty (the
    parameter counts stay). Also returns the ops of that forward (``weight_ops``).
    """
    shapes: dict[str, list[int] | None] = {}

    def shape(path, mod, out):
        if path not in shapes:
            shapes[path] = _shape(out)

    ops, _ = weight_ops(model, example, binary_params, on_output=shape)
    binary = set(binary_params) | binary_weight_layers(ops)[1]
    rows: dict[str, dict[str, Any]] = {}
    for path, m in model.named_modules():
        own = list(m.named_parameters(recurse=False))
        if not own:
            continue
        one = sum(p.numel() for n, p in own if (f"{path}.{n}" if path else n) in binary)
        total = sum(p.numel() for _, p in own)
        rows[path] = {"layer": path or "(root)", "type": type(m).__name__, "output_shape": shapes.get(path),
                      "params_1bit": int(one), "params_32bit": int(total - one),
                      "memory_bytes": int((total - one) * 4 + (one + 7) // 8), "binary_macs": 0, "float_macs": 0}
    macs = macs_per_module(ops)
    mods = dict(model.named_modules())
    for path, n in macs.items():
        # an op in a module without parameters counts for the nearest one that has a row
        # (else a row of its own)
        host = path
        while host not in rows and host:
            host = host.rpartition(".")[0]
        if host not in rows:
            host = path
            rows[host] = {"layer": host or "(root)", "type": type(mods[host]).__name__, "output_shape": None,
                          "params_1bit": 0, "params_32bit": 0, "memory_bytes": 0, "binary_macs": 0, "float_macs": 0}
        rows[host]["binary_macs"] += n["binary"]
        rows[host]["float_macs"] += n["float"]
    layers = list(rows.values())
    one = sum(r["params_1bit"] for r in layers)
    f32 = sum(r["params_32bit"] for r in layers)
    mem = sum(r["memory_bytes"] for r in layers)
    fp32 = (one + f32) * 4
    totals = {"params_1bit": one, "params_32bit": f32, "memory_bytes": mem, "memory_fp32_bytes": fp32,
              "binary_macs": sum(r["binary_macs"] for r in layers), "float_macs": sum(r["float_macs"] for r in layers),
              "compression": round(fp32 / mem, 2) if mem else None}
    return {"layers": layers, "totals": totals}, ops
