"""``pack``: replace the binary conv2d / linear layers of a (folded) model by packed ones.

How a layer is chosen (all measured on the model's own forward, on a copy, two random
batches of ``input_shape``, ``detect.example_input`` seeds 0 and 7):

1. a ``TorchFunctionMode`` records every ``F.conv2d`` / ``F.linear`` call with the innermost
   module running it: its input, the *effective* weight and bias (the tensors actually passed,
   so every weight-binarizer style counts: ``sign(w) * mean|w|``, an STE, a quantizer module);
2. a module packs when, at every call: it runs exactly one such op and returns its output; the
   op's input is two-valued (+-1 or {0,1}) and is the module's input or ``sign`` /
   ``x > 0`` of it (a conv that binarizes its own input); the effective weight is the same
   tensor for both batches (a function of the parameters) and ``+-alpha_c`` per output channel
   (``alpha_c > 0``, no zeros); padding is zeros (numeric, ``'valid'`` or ``'same'``); the
   module carries no hook (an unfolded shift: run ``bnnshift fold`` first). Anything else stays
   float, with the reason (``PackReport.left_float``);
3. the packed model is **proved** (``verify``): in float64, where every binary sum is exact, the
   float model (packed layers fed the captured effective weights) and the packed model must give
   bitwise the same binary activation at every packed layer's input and logits equal to 1e-9;
   in float32 the sign-flip share must be <= export's 1e-4 and the logits within export's bound
   (1e-3 x max(1, max |logit|)) when nothing flipped. A layer that fails alone is left float.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .._guard import copy_model
from ..detect import example_input
from ..errors import NoSitesError, UsageError
from ..load import pick_logits
from . import ref
from .fuse import Fusion, plan_fusions
from .layers import PackedConv2d, PackedLinear, fused

_CONV = {F.conv2d, torch.conv2d}
_LINEAR = {F.linear, torch._C._nn.linear}
_CONV_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_LINEAR_NAMES = ("input", "weight", "bias")
FLIP_SHARE = 1e-4
# |w| within this relative distance of its channel's max counts as alpha_c: a detach-trick STE
# (``w_b.detach() - w.detach() + w``) leaves float rounding on a two-valued weight
WEIGHT_RTOL = 2.0 ** -18  # export.MAX_SIGN_FLIP_SHARE: the same judgement of float32 ties


def _bound(func, args, kwargs) -> dict[str, Any]:
    names = _CONV_NAMES if func in _CONV else _LINEAR_NAMES
    d = dict(zip(names, args))
    d.update(kwargs)
    d.setdefault("bias", None)
    if func in _CONV:
        for k, v in (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)):
            d.setdefault(k, v)
    d["kind"] = "conv2d" if func in _CONV else "linear"
    return d


@dataclass
class _Call:
    path: str
    op: dict[str, Any]
    out: torch.Tensor
    x: Any = None  # the module's first input
    y: Any = None  # the module's output


class _Recorder(TorchFunctionMode):
    """Records conv2d / linear calls with the innermost running module; ``substitute`` maps a
    module path to (weight, bias) to pass instead (the float64 reference run)."""

    def __init__(self, stack: list[str], calls: list[_Call], substitute: dict[str, tuple] | None = None):
        super().__init__()
        self.stack, self.calls, self.substitute = stack, calls, substitute or {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if (func in _CONV or func in _LINEAR) and self.stack:
            path = self.stack[-1]
            if path in self.substitute:
                w, b = self.substitute[path]
                names = _CONV_NAMES if func in _CONV else _LINEAR_NAMES
                d = dict(zip(names, args))
                d.update(kwargs)
                d["weight"], d["bias"] = w.to(d["input"].dtype), (None if b is None else b.to(d["input"].dtype))
                args, kwargs = (), d
            out = func(*args, **kwargs)
            self.calls.append(_Call(path, _bound(func, args, kwargs), out))
            return out
        return func(*args, **kwargs)


def _run(model: nn.Module, x: torch.Tensor, substitute: dict[str, tuple] | None = None,
         taps: Callable[[str, torch.Tensor], None] | None = None, tap_paths: set[str] | frozenset = frozenset()):
    """Run ``model`` on ``x`` (no grad) recording the conv/linear calls and each module's input/output."""
    stack: list[str] = []
    calls: list[_Call] = []
    per_call: list[tuple[str, Any, Any]] = []
    handles = []

    def pre(path):
        def hook(mod, args):
            stack.append(path)
            if taps is not None and path in tap_paths and args:
                taps(path, args[0])
        return hook

    def post(path):
        def hook(mod, args, out):
            stack.pop()
            per_call.append((path, args[0] if args else None, out))
        return hook

    for path, mod in model.named_modules():
        if path:
            handles.append(mod.register_forward_pre_hook(pre(path)))
            handles.append(mod.register_forward_hook(post(path)))
    try:
        with torch.no_grad(), _Recorder(stack, calls, substitute):
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    # attach each op call to the module call that ran it (the next completed call of its path)
    pending: dict[str, list[_Call]] = {}
    for c in calls:
        pending.setdefault(c.path, []).append(c)
    finished: dict[str, list[tuple[Any, Any]]] = {}
    for path, xi, yo in per_call:
        finished.setdefault(path, []).append((xi, yo))
    return out, pending, finished


def _alphabet(t: torch.Tensor) -> str | None:
    if not t.is_floating_point() or t.numel() == 0:
        return None
    if bool(((t == 1) | (t == -1)).all()):
        return "+-1"
    if bool(((t == 1) | (t == 0)).all()) and bool((t == 1).any()):
        return "{0,1}"
    return None


@dataclass
class LayerPlan:
    """One packable module: its effective weight (captured) and conv geometry."""
    path: str
    kind: str  # conv2d | linear
    weight: torch.Tensor
    bias: torch.Tensor | None
    alphabet: str  # +-1 | {0,1}
    input_rule: str  # "binary input" | "binarizes its input"
    stride: list[int] = field(default_factory=lambda: [1, 1])
    padding: list[int] = field(default_factory=lambda: [0, 0])
    dilation: list[int] = field(default_factory=lambda: [1, 1])
    groups: int = 1

    def projected(self) -> torch.Tensor:
        """The two-valued weight the packed layer computes with: sign(w) * max |w| per channel."""
        w = self.weight.detach()
        alpha = w.abs().flatten(1).amax(1).view(-1, *([1] * (w.dim() - 1)))
        return torch.where(w > 0, alpha, -alpha)

    def rounding(self) -> float:
        """Max relative distance of the captured effective weight from its projection."""
        w = self.weight.detach().double()
        return float(((w - self.projected().double()).abs().flatten(1).amax(1)
                      / w.abs().flatten(1).amax(1)).max())

    def build(self) -> PackedConv2d:
        w = self.weight.detach().float()
        alpha = w.abs().flatten(1).amax(1)
        words, popw = ref.pack_weight(w)
        b = None if self.bias is None else self.bias.detach().float().clone()
        cls = PackedLinear if self.kind == "linear" else PackedConv2d
        cin = w.shape[1] * self.groups
        return cls(words, popw, alpha, b, self.stride, self.padding, self.dilation, self.groups,
                   self.alphabet == "{0,1}", cin)


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v]


def _padding(op: dict, w: torch.Tensor) -> list[int] | str:
    p = op["padding"]
    if isinstance(p, str):
        if p == "valid":
            return [0, 0]
        d, s = _pair(op["dilation"]), _pair(op["stride"])
        span = [d[i] * (w.shape[2 + i] - 1) for i in range(2)]
        if p == "same" and s == [1, 1] and all(e % 2 == 0 for e in span):
            return [e // 2 for e in span]
        return f"padding={p!r} with an uneven kernel span (asymmetric padding)"
    return _pair(p)


def _judge(path: str, module: nn.Module, calls: list[_Call], finished: list[tuple[Any, Any]],
           weight0: torch.Tensor | None) -> LayerPlan | str:
    """A LayerPlan for ``path`` or the reason it stays float."""
    if module._forward_pre_hooks or module._forward_hooks:
        return "carries a hook (an unfolded shift?): run `bnnshift fold` first"
    if len(calls) != len(finished):
        return f"runs {len(calls)} convolution/linear ops in {len(finished)} calls (one per call is packed)"
    plan = None
    for c, (x, y) in zip(calls, finished):
        op = c.op
        a, w, b = op["input"], op["weight"], op["bias"]
        if not (isinstance(y, torch.Tensor) and y.shape == c.out.shape and torch.equal(y, c.out)):
            return "its output is not the convolution's output (work after the op)"
        if a.dtype not in (torch.float32, torch.float64):
            return f"input dtype {a.dtype} (float32/float64 only)"
        alphabet = _alphabet(a)
        if alphabet is None:
            zeros = int((a == 0).sum()) if a.is_floating_point() else 0
            if zeros and _alphabet(torch.where(a == 0, 1.0, a.double())) == "+-1":
                return (f"input is ternary: {zeros} exact zeros among +-1 (sign(0) = 0 at a pre-activation "
                        "exactly on the threshold)")
            return "input is not a binary activation (+-1 or {0,1}): a real-valued layer"
        if isinstance(x, torch.Tensor) and x.shape == a.shape and torch.equal(x, a):
            rule = "binary input"
        elif isinstance(x, torch.Tensor) and x.shape == a.shape and torch.equal(
                a, torch.where(x > 0, 1.0, 0.0 if alphabet == "{0,1}" else -1.0).to(a.dtype)) and not bool((x == 0).any()):
            rule = "binarizes its input"
        else:
            return "the op's input is not the module's input nor its sign (padding, reshaping or scaling in between)"
        if op["kind"] == "conv2d" and (a.dim() != 4 or w.dim() != 4):
            return "not a 2-D convolution on (N, C, H, W)"
        if weight0 is not None and not (w.shape == weight0.shape and torch.equal(w, weight0)):
            return "the effective weight changes with the input (not a function of the parameters)"
        wf = w.detach().flatten(1)
        alpha = wf.abs().amax(1, keepdim=True)
        dev = float(((wf.abs() - alpha).abs() / alpha.clamp_min(1e-30)).max()) if wf.numel() else 0.0
        if not bool((alpha > 0).all()) or bool((wf == 0).any()) or dev > WEIGHT_RTOL:
            zeros = int((wf == 0).sum())
            return ("effective weight has zeros (ternary)" if zeros else
                    f"effective weight is not two-valued per output channel (+-alpha_c; deviation {dev:.2g})")
        if b is not None and not bool(torch.isfinite(b).all()):
            return "bias is not finite"
        if plan is None:
            geo: dict[str, Any] = {}
            if op["kind"] == "conv2d":
                pad = _padding(op, w)
                if isinstance(pad, str):
                    return pad
                geo = {"stride": _pair(op["stride"]), "padding": pad, "dilation": _pair(op["dilation"]),
                       "groups": int(op["groups"])}
            plan = LayerPlan(path, op["kind"], w.detach().clone(), None if b is None else b.detach().clone(), alphabet,
                             rule, **geo)
        elif plan.alphabet != alphabet or plan.input_rule != rule:
            return "its calls differ (input alphabet or binarization)"
        weight0 = w
    return plan if plan is not None else "not called"


@dataclass
class PackReport:
    """What ``pack`` did: ``packed`` {path: description}, ``left_float`` {path: reason}, the
    proof (``verify``), and the kernel in use (``backend``: cpp | reference)."""
    packed: dict[str, str] = field(default_factory=dict)
    left_float: dict[str, str] = field(default_factory=dict)
    proof: dict[str, Any] = field(default_factory=dict)
    backend: str = ""
    thresholds: dict[str, str] = field(default_factory=dict)  # packed layer -> its integer threshold (fuse)
    no_threshold: dict[str, str] = field(default_factory=dict)  # packed layer -> why it returns floats

    def to_json(self) -> dict[str, Any]:
        return {"packed": self.packed, "left_float": self.left_float, "proof": self.proof, "backend": self.backend,
                "thresholds": self.thresholds, "no_threshold": self.no_threshold}


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def plan_layers(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[dict[str, LayerPlan], dict[str, str]]:
    """Probe ``model`` (a copy, eval mode) on two random batches: packable layers and reasons."""
    return _plan(model, input_shape)[:2]


def _plan(model: nn.Module, input_shape: tuple[int, ...]):
    work = copy_model(model).eval()
    mods = dict(work.named_modules())
    runs = [_run(work, example_input(tuple(input_shape), seed=s)) for s in (0, 7)]
    plans: dict[str, LayerPlan] = {}
    reasons: dict[str, str] = {}
    paths = sorted({p for _, pend, _ in runs for p in pend}, key=list(mods).index)
    for path in paths:
        calls = [c for _, pend, _ in runs for c in pend.get(path, [])]
        finished = [f for _, _, fin in runs for f in fin.get(path, [])]
        got = _judge(path, mods[path], calls, finished, None)
        if isinstance(got, str):
            reasons[path] = got
        else:
            plans[path] = got
    return plans, reasons, mods, runs[0][2]


def _replace(model: nn.Module, plans: dict[str, LayerPlan], fusions: dict[str, Fusion] | None = None) -> nn.Module:
    packed = copy_model(model).eval()
    for path, p in plans.items():
        layer = p.build()
        f = (fusions or {}).get(path)
        if f is not None:
            layer = fused(layer, f.thr, f.flip, f.pool, f.pool_first, f.lo, f.hi, f.absorbed)
            for a in f.absorbed:
                _set(packed, a, nn.Identity())
        _set(packed, path, layer)
    return packed


def verify(model: nn.Module, packed: nn.Module, plans: dict[str, LayerPlan], input_shape: tuple[int, ...],
           batch: int = 16) -> dict[str, Any]:
    """Prove ``packed`` against ``model`` on a probe batch (seed 3). Returns a dict: ``exact``
    (float64: every binary activation at a packed layer's input equal and logits within 1e-9),
    ``float64_max_abs_diff``, ``float32_flip_share``, ``float32_max_abs_diff``, ``float32_bound``,
    ``binary_activations`` (count compared), ``failed`` (reasons; empty when proved);
    ``float64_skipped`` says why when the model cannot run in float64 (then float32 alone judges)."""
    x = example_input(tuple(input_shape), batch=batch, seed=3)
    failed: list[str] = []
    res: dict[str, Any] = {}
    for dtype in (torch.float64, torch.float32):
        ref_m = copy_model(model).eval().to(dtype)
        pk = copy_model(packed).eval().to(dtype)
        taps_r: list[torch.Tensor] = []
        taps_p: list[torch.Tensor] = []
        sub = {p: (pl.projected().to(dtype), pl.bias) for p, pl in plans.items()} if dtype == torch.float64 else None
        try:
            out_r, _, _ = _run(ref_m, x.to(dtype), sub, lambda p, t: taps_r.append(t > 0), set(plans))
        except RuntimeError as exc:  # a forward that hard-codes float32 (torch.where(x >= 0, 1.0, -1.0))
            if dtype != torch.float64:
                raise
            res.update(float64_skipped=f"the model does not run in float64 ({str(exc).splitlines()[0][:120]}): "
                                       "judged in float32 only", float64_flips=None, float64_max_abs_diff=None)
            continue
        out_p, _, _ = _run(pk, x.to(dtype), None, lambda p, t: taps_p.append(t > 0), set(plans))

        lr, lp = pick_logits(out_r)[0], pick_logits(out_p)[0]
        n = sum(t.numel() for t in taps_r)
        flips = sum(int((a != b).sum()) for a, b in zip(taps_r, taps_p)) if len(taps_r) == len(taps_p) else n
        diff = float((lr.double() - lp.double()).abs().max()) if lr.shape == lp.shape else float("inf")
        scale = max(1.0, float(lr.abs().max()))
        if dtype == torch.float64:
            res.update(binary_activations=n, float64_flips=flips, float64_max_abs_diff=diff)
            if flips or diff > 1e-9 * scale:
                failed.append(f"float64: {flips} of {n} binary activations differ, logits differ by {diff:.3g}")
        else:
            share = flips / max(1, n)
            res.update(float32_flips=flips, float32_flip_share=share, float32_max_abs_diff=diff,
                       float32_bound=1e-3 * scale)
            res.setdefault("binary_activations", n)
            if share > FLIP_SHARE or (flips == 0 and diff > 1e-3 * scale):
                failed.append(f"float32: flip share {share:.2e}, logits differ by {diff:.3g}")
    res["exact"] = not failed
    res["failed"] = failed
    return res


def _describe(p: LayerPlan) -> str:
    w = p.weight
    shape = "x".join(map(str, w.shape))
    extra = f", stride {p.stride}, padding {p.padding}, dilation {p.dilation}, groups {p.groups}" \
        if p.kind == "conv2d" else ""
    r = p.rounding()
    note = f", weight two-valued up to float rounding ({r:.1e})" if r else ""
    return f"{p.kind} {shape}, {p.alphabet} inputs ({p.input_rule}){extra}{note}"


def pack_model(model: nn.Module, input_shape: tuple[int, ...], *, thresholds: bool = True
               ) -> tuple[nn.Module, PackReport]:
    """The packed copy of ``model`` (eval mode; ``model`` is never run nor changed) and its report.

    ``input_shape``: one sample's shape, e.g. (3, 32, 32). Raises ``NoSitesError`` (exit 3) when no
    layer has a binary input, ``UsageError`` for a bad shape. Every packed layer is proved
    (module docstring); one that fails the proof alone is left float with the reason. With
    ``thresholds`` (default) a packed layer followed, alone, by [MaxPool] [BatchNorm] and a binarizer
    returns that binary activation from one integer threshold per channel (``fuse``; those modules
    become ``nn.Identity``), proved the same way; ``report.thresholds`` / ``report.no_threshold``."""
    from .kernel import backend

    if not input_shape or any(int(s) <= 0 for s in input_shape):
        raise UsageError(f"bad input shape {tuple(input_shape)}", hint="give one sample's shape, e.g. 3,32,32")
    plans, reasons, mods, finished = _plan(model, tuple(input_shape))
    if not plans:
        raise NoSitesError("no conv2d / linear layer with a binary input and a two-valued weight to pack: "
                           + "; ".join(f"{p}: {r}" for p, r in list(reasons.items())[:3]),
                           hint="pack a patched / folded directory of a BNN (docs/runtime.md)")
    fusions, no_thr = plan_fusions(mods, finished, plans) if thresholds else ({}, {})
    packed = _replace(model, plans, fusions)
    proof = verify(model, packed, plans, tuple(input_shape))
    if proof["failed"] and fusions:  # a threshold that fails alone returns floats again
        for path in list(fusions):
            if verify(model, _replace(model, plans, {path: fusions[path]}), plans, tuple(input_shape))["failed"]:
                no_thr[path] = "its integer threshold failed the proof"
                del fusions[path]
        packed = _replace(model, plans, fusions)
        proof = verify(model, packed, plans, tuple(input_shape))
    if proof["failed"]:  # find the culprits one layer at a time
        for path in list(fusions):
            no_thr[path] = "not tried: a packed layer failed the proof"
        fusions = {}
        for path in list(plans):
            alone = {path: plans[path]}
            r = verify(model, _replace(model, alone), alone, tuple(input_shape))
            if r["failed"]:
                reasons[path] = "packed layer failed the proof: " + "; ".join(r["failed"])
                del plans[path]
        if not plans:
            raise NoSitesError("no layer passed the packing proof: " + "; ".join(reasons.values()),
                               hint="report it with the model (docs/runtime.md)")
        packed = _replace(model, plans)
        proof = verify(model, packed, plans, tuple(input_shape))
    report = PackReport({p: _describe(pl) for p, pl in plans.items()}, reasons, proof, backend(),
                        {p: f.describe() for p, f in fusions.items()},
                        {p: r for p, r in no_thr.items() if p in plans})
    packed.bnnshift_pack_report = report  # type: ignore[attr-defined]
    return packed, report


def pack(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """``model`` with every provably binary conv2d / linear replaced by a packed XNOR-popcount
    layer (a copy, eval mode; the report is ``packed.bnnshift_pack_report``). See ``pack_model``."""
    return pack_model(model, input_shape)[0]
