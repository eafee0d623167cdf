"""Phase 4b: the dynamic check. Run real batches through the user's own model and measure,
per site, what the paper's Fig. 4 shows: the share of +1 outputs and the pre-activation's
mean / median / skew; and confirm that each site fires and outputs two values only.

It uses the same addressing as the patch (``_runtime``), so a site that the probe sees is
a site the patch can shift.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from ._runtime import OP, POST_CALL, PRE_CALL, SiteRuntime, binary_part, hook_slot
from ._state import model_state
from .sites import APPLY_OP, Site

_SAMPLE = 50_000  # pre-activation values kept per site for median/skew


@dataclass
class _Acc:
    plus: float = 0.0
    total: float = 0.0
    distinct: set = field(default_factory=set)
    samples: list = field(default_factory=list)
    channels: int | None = None
    fired: int = 0
    max_distinct: int = 0
    zeros: float = 0.0  # outputs exactly 0: sign(0) = 0 makes a "binary" site ternary
    pre_min: float = float("inf")
    pre_max: float = float("-inf")
    pre_zeros: float = 0.0  # pre-activation values exactly 0 (where sign(0) = 0 comes from)
    pre_total: float = 0.0

    def add_pre(self, x: torch.Tensor):
        x = x.detach()
        if x.dim() >= 2:
            self.channels = int(x.shape[1])
        flat = x.float().reshape(-1)
        if flat.numel():
            self.pre_min = min(self.pre_min, float(flat.min()))
            self.pre_zeros += float((flat == 0).sum())
            self.pre_total += flat.numel()
            self.pre_max = max(self.pre_max, float(flat.max()))
        kept = sum(t.numel() for t in self.samples)
        if kept < _SAMPLE:
            step = max(1, flat.numel() // max(1, (_SAMPLE - kept)))
            self.samples.append(flat[::step][: _SAMPLE - kept].cpu())

    def add_out(self, y: torch.Tensor):
        y = y.detach()
        self.fired += 1
        yf = y.float()
        self.plus += float((yf > 0).sum())
        self.zeros += float((yf == 0).sum())
        self.total += yf.numel()
        # distinct values within one sample (a per-sample scale keeps a sign binary)
        u = torch.unique((yf[0] if yf.dim() >= 2 else yf).reshape(-1)[:100_000])
        if u.numel() > 3 and float(u.abs().max()) > 0:  # an STE expression: two values up to rounding
            u = torch.unique(torch.round(u / u.abs().max() * 1000)) * u.abs().max() / 1000
        self.max_distinct = max(self.max_distinct, int(u.numel()))
        if len(self.distinct) <= 4:
            self.distinct.update(float(v) for v in u[:5])


def _preact_stats(samples: list[torch.Tensor]) -> dict[str, float] | None:
    if not samples:
        return None
    x = torch.cat(samples).double()
    if x.numel() == 0:
        return None
    mean, std = float(x.mean()), float(x.std()) if x.numel() > 1 else 0.0
    skew = float(((x - mean) ** 3).mean() / (std ** 3)) if std > 0 else 0.0
    return {"mean": mean, "median": float(x.median()), "std": std, "skew": skew}


def probe_sites(model: nn.Module, sites: Iterable[Site], batches: Iterable[torch.Tensor], *,
                device: torch.device | str = "cpu", update: bool = True) -> dict[str, dict]:
    """Measure every site on ``batches`` (eval mode, no grad).

    Returns ``{site name: {"fired", "binary", "plus_fraction", "zero_fraction", "preact",
    "channels", "preact_zero_fraction"}}`` and, with ``update``, writes those into the ``Site``
    objects. Sites already shifted by a patch are measured *after* the shift (the subtraction
    happens before the measurement hook).
    """
    sites = list(sites)
    acc = {s.name: _Acc() for s in sites}
    probe_scopes = {s.scope or "" for s in sites if s.scope is not None}
    shift = model_state(model).shift
    if shift is not None:
        # a patched model: measure through its own runtime (one runtime per model at a time)
        rt = shift.runtime
        rt.remove()
        saved = (rt.watch_scopes, dict(rt.pre_call), rt.any_pre, rt.any_post, rt.record_ops)
        rt.watch_scopes = set(rt.watch_scopes or ()) | probe_scopes
    else:
        rt = SiteRuntime(model, watch_scopes=probe_scopes)
        saved = None
    by_call, by_out = _recorders(rt, sites, acc)
    was_training = model.training
    model.eval()
    # any_pre/any_post fire only on counted module calls: count the ones we need
    for path, k in list(by_call) + list(by_out):
        rt.pre_call.setdefault((path, k), _noop)
    rt.install(track_all_calls=False, apply_wrapper=True)
    try:
        with torch.no_grad():
            for xb in batches:
                model(xb.to(device))
    finally:
        rt.remove()
        model.train(was_training)
        if saved is not None:
            rt.watch_scopes, pre_call, rt.any_pre, rt.any_post, rt.record_ops = saved
            rt.pre_call.clear()
            rt.pre_call.update(pre_call)
            rt.install(apply_wrapper=True)
    out = {s.name: _result(acc[s.name]) for s in sites}
    if update:
        for s in sites:
            _update_site(s, out[s.name])
    return out


def _recorders(rt: SiteRuntime, sites: list[Site], acc: dict[str, "_Acc"]):
    """Set ``rt``'s recording callbacks (uncounted) to feed ``acc`` per site, each site read
    where ``_runtime.hook_slot`` hooks it; returns the (path, k) calls they must count."""
    by_call: dict[tuple[str, int], Site] = {}
    by_out: dict[tuple[str, int], Site] = {}
    by_op: dict[tuple[str, int], Site] = {}
    binarizers: set[str] = set()  # sites whose call's output is the binary one
    for s in sites:
        slot = hook_slot(s)
        {PRE_CALL: by_call, POST_CALL: by_out, OP: by_op}[slot.table][slot.key] = s
        if slot.op is not None:  # the binarizing op inside a hooked call: its output is the site's
            by_op[slot.op] = s
        if slot.module_binarizer:
            binarizers.add(s.name)

    def any_pre(path, k, args):
        s = by_call.get((path, k))
        if s is not None and args and isinstance(args[0], torch.Tensor):
            acc[s.name].add_pre(args[0])

    def any_post(path, k, output):
        s = by_call.get((path, k))
        out = binary_part(output)  # (sign, scale): the sign output is the site
        if s is not None and s.name in binarizers and isinstance(out, torch.Tensor):
            acc[s.name].add_out(out)
        s = by_out.get((path, k))
        if s is not None and isinstance(output, torch.Tensor):
            acc[s.name].add_pre(output)

    def record(ev):
        s = by_op.get((ev.scope, ev.index))
        if s is None:
            return
        if s.apply == APPLY_OP and ev.inputs and isinstance(ev.inputs[0], torch.Tensor):
            acc[s.name].add_pre(ev.inputs[0])
        out = binary_part(ev.output)  # (sign, scale): the sign output is the site
        if isinstance(out, torch.Tensor):
            acc[s.name].add_out(out)

    rt.any_pre, rt.any_post, rt.record_ops = _uncounted(rt, any_pre), _uncounted(rt, any_post), _uncounted(rt, record)
    return by_call, by_out


def _result(a: "_Acc") -> dict:
    """One site's measurement (``probe_sites``' per-site dict) from its accumulator."""
    binary = a.fired > 0 and a.max_distinct <= 3
    preact = _preact_stats(a.samples)
    if preact is not None and a.pre_min <= a.pre_max:
        preact["min"], preact["max"] = a.pre_min, a.pre_max
    # {0,1} / boolean sites emit 0 by design; for a sign the zeros are sign(0) = 0
    signed = a.fired > 0 and any(v < 0 for v in a.distinct)
    return {"fired": a.fired > 0, "binary": binary,
            "plus_fraction": (a.plus / a.total) if a.total else None,
            "zero_fraction": (a.zeros / a.total) if (a.total and signed) else None,
            "preact": preact, "channels": a.channels,
            "preact_zero_fraction": (a.pre_zeros / a.pre_total) if a.pre_total else None}


def _update_site(s: Site, res: dict) -> None:
    s.fired, s.binary_checked = res["fired"], res["binary"]
    s.plus_fraction, s.preact = res["plus_fraction"], res["preact"]
    s.zero_fraction = res["zero_fraction"]
    if res["channels"] is not None:
        s.channels = res["channels"]


def _noop(module, args):
    return None


def _uncounted(rt: SiteRuntime, fn):
    """``fn`` run with ``rt``'s op numbering off.

    The runtime numbers the candidate ops (``sign``, ``x > 0``, ``Function.apply``) of a
    watched scope in execution order, and a site is addressed by that number. A measurement
    callback runs *inside* the scope (between two calls of a binarizer used twice per
    forward), so its own ``y > 0`` would be counted as the scope's next op and shift the
    numbers of every later call: the second call's statistics would be read from the probe's
    own comparison, and a patched model's threshold for it applied to that comparison
    (issue 19: every call of a shared binarizer reported constant). Here the probe's own
    torch calls are neither counted nor shifted.
    """
    def run(*args):
        prev = rt._in_apply
        rt._in_apply = True
        try:
            return fn(*args)
        finally:
            rt._in_apply = prev
    return run


@dataclass
class GradientCheck:
    """Where the loss's gradient goes (one backward on one batch, train mode; eval mode only
    when the model cannot run a train-mode forward on the batch).

    ``reaches``: site name -> does a non-zero gradient reach the site's input (None: its input
    does not depend on a parameter, e.g. the model input itself). ``frozen``: trainable
    parameters that receive no gradient at all (a binarizer without a straight-through
    estimator upstream of them: ``torch.sign``'s derivative is 0 everywhere).
    """

    reaches: dict[str, bool | None]
    frozen: list[str]


def gradient_check(model: nn.Module, sites: Iterable[Site], x: torch.Tensor) -> GradientCheck | None:
    """Run ``x`` forward and one backward through ``model`` (pass a copy: gradients are left on it).

    The loss is a random projection of the output (a plain sum can cancel, e.g. after a
    softmax). Returns None when the forward or backward fails.
    """
    sites = list(sites)
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def h(module, args_or_out):
            t = args_or_out[0] if isinstance(args_or_out, tuple) else args_or_out
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.retain_grad()
                seen[name] = t
            return None
        return h

    rt = SiteRuntime(model, watch_scopes={s.scope or "" for s in sites if s.apply == APPLY_OP})
    for s in sites:
        rt.attach(s, keep(s.name))
    was_training = model.training
    # train mode, as training runs: with the running statistics of an untrained model a BN
    # can push every value of the probe batch out of a clipped STE's window (|x| <= 1), which
    # would call a working STE absent; the buffers a train-mode forward updates are restored
    saved_buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.train()
    model.zero_grad(set_to_none=True)
    rt.install(apply_wrapper=any(s.apply == APPLY_OP for s in sites))
    try:
        with torch.enable_grad():
            try:
                out = model(x)
            except Exception:  # noqa: BLE001 - e.g. BatchNorm on one sample: measure in eval mode
                model.eval()
                out = model(x)
            if isinstance(out, (tuple, list)):
                out = next((o for o in out if isinstance(o, torch.Tensor)), None)
            if not isinstance(out, torch.Tensor) or not out.is_floating_point() or not out.requires_grad:
                return None
            g = torch.Generator().manual_seed(3)
            proj = torch.randn(out.shape, generator=g).to(device=out.device, dtype=out.dtype)
            (out * proj).sum().backward()
    except Exception:  # noqa: BLE001 - best effort: a model that cannot backprop here is told elsewhere
        return None
    finally:
        rt.remove()
        model.train(was_training)
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in saved_buffers:
                    b.copy_(saved_buffers[n])
    reaches: dict[str, bool | None] = {}
    for s in sites:
        t = seen.get(s.name)
        reaches[s.name] = None if t is None else bool(t.grad is not None and bool((t.grad != 0).any()))
    frozen = [n for n, p in model.named_parameters()
              if p.requires_grad and (p.grad is None or not bool((p.grad != 0).any()))]
    return GradientCheck(reaches, frozen)
