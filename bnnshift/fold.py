"""Phase 6: fold fixed shifts into existing parameters (zero inference cost).

* ``bn:PATH``: the site's pre-activation is the output of a BatchNorm that feeds nothing
  else. ``y - t = gamma * xhat + (beta - t)`` in train and in eval mode (xhat is normalised
  with batch or running statistics alike), so ``beta' = beta - t`` is exact, whatever the
  sign of gamma, and works per channel.
* ``bias:PATH.PARAM``: a learnable bias added before the sign (ReActNet ``LearnableBias``,
  an RSign's own bias). Whether it enters as ``x + b`` or ``x - b`` is *measured* on the
  module (``_bias_sign``); a parameter that is not an additive bias at all (a scale)
  is left alone.

A folded site loses its hook and its threshold entry; every other site keeps both, with the
reason (``Site.fold_reason``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._runtime import hook_slot
from ._state import model_state, set_state
from .analyse import measure_bias_sign
from .errors import PatchError

PROBE_BATCH = 8
from .shift import fold_delta, host_path, remove_shifts, shifted_sites, threshold_attr
from .sites import APPLY_OP, Site

__all__ = ["FoldReport", "fold_shifts"]


@dataclass
class FoldReport:
    """``folded``: site name -> 'bn:PATH' / 'bias:PATH.PARAM'; ``kept``: site name -> reason;
    ``rounded``: folded sites whose folded model equals the hooked (unfolded) patch only to float
    rounding, not bitwise, with the reason (every other fold is bitwise the hooked patch)."""

    folded: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    rounded: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"folded": dict(self.folded), "kept": dict(self.kept), "rounded": dict(self.rounded)}


def _module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def _bias_sign(module: nn.Module, pname: str, param: torch.Tensor, channels: int | None) -> int | None:
    """+1 if ``module(x)`` depends on the parameter as ``x + b``, -1 for ``x - b``, else None.

    Measured: shift the input by -d and compare with moving the parameter by -d or +d
    (``module.forward`` is called directly, so no hook of the module itself runs).
    """
    c = channels or (param.shape[1] if param.dim() >= 2 else param.numel())
    if param.dim() >= 3:
        shape = (4, c, *([3] * (param.dim() - 2)))
    else:
        shape = (4, c)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(shape, generator=g).to(device=param.device, dtype=param.dtype) * 2
    return measure_bias_sign(module, param, x)


def _fold_target(model: nn.Module, site: Site, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | str:
    """(parameter, delta to add) for the site's fold, or the reason it cannot be folded."""
    spec = site.foldable
    if not spec:
        return site.fold_reason or "no BatchNorm or learnable bias to absorb t"
    if spec.startswith("bn:"):
        bn = _module(model, spec[3:])
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.affine or bn.bias is None:
            return f"{spec[3:]} is not an affine BatchNorm"
        param = bn.bias
        bias_sign = +1  # beta enters as + beta
    elif spec.startswith("bias:"):
        path, _, pname = spec[5:].rpartition(".")
        owner = _module(model, path)
        param = getattr(owner, pname, None) if owner is not None else None
        if not isinstance(param, torch.Tensor):
            return f"parameter {spec[5:]} not found"
        bias_sign = site.bias_sign if site.bias_sign in (1, -1) else _bias_sign(owner, pname, param,
                                                                                site.channels)
        if bias_sign is None:
            return f"{spec[5:]} does not act as an additive bias on the pre-activation (measured)"
    else:
        return f"unknown fold target {spec!r}"
    try:  # the expression a hook with ``shift_into`` computes at run time (bitwise the same)
        delta = fold_delta(t.detach(), param, bias_sign)
    except ValueError:
        return f"a per-channel threshold of {t.numel()} values does not fit {spec} ({param.numel()} values)"
    return param, delta


def _drop_site(model: nn.Module, site: Site) -> None:
    """Remove the site's hook entry and threshold tensor (other sites keep theirs)."""
    sr = model_state(model).shift
    sr.runtime.detach(site)
    host = _module(model, host_path(site))
    attr = threshold_attr(site)
    if host is not None:
        host._buffers.pop(attr, None)
        host._parameters.pop(attr, None)
    sr.sites = [s for s in sr.sites if s.name != site.name]


def _live_t(model: nn.Module, site: Site) -> torch.Tensor:
    return getattr(_module(model, host_path(site)), threshold_attr(site))


@dataclass
class _Group:
    """Sites folded together into one target (``spec``), all with the same threshold ``t``."""

    spec: str
    sites: list[Site]


def _plan(model: nn.Module, kept: dict[str, str]) -> list[_Group]:
    """Fold groups of the live sites; the others go to ``kept`` with the reason."""
    from .patch import patch_state

    st = patch_state(model)
    ht_names = {s.name for s in (st.hardtanh_sites if st else [])}
    live = {s.name: s for s in shifted_sites(model)}
    folded_before = set(st.folded) if st is not None else set()
    by_spec: dict[str, list[Site]] = {}
    for s in live.values():
        if s.name in ht_names:
            kept[s.name] = "hardtanh shift (full-precision model): no bias to absorb it"
        elif not s.foldable:
            kept[s.name] = s.fold_reason or "no BatchNorm or learnable bias to absorb t"
        else:
            by_spec.setdefault(s.foldable, []).append(s)
    groups: list[_Group] = []
    for spec, members in by_spec.items():
        names = {m.name for m in members}
        for m in members:
            names.update(m.fold_with or ())
        missing = sorted(n for n in names if n not in live)
        why = None
        if missing:
            gone = [n for n in missing if n in folded_before]
            why = (f"{spec} also feeds {', '.join(missing)}, " +
                   ("already folded into it" if gone else "which has no threshold here") +
                   ": folding would move that binarizer too")
        else:
            ts = [_live_t(model, m).detach() for m in members]
            if any(t.shape != ts[0].shape or not torch.equal(t, ts[0]) for t in ts[1:]):
                vals = ", ".join(f"{m.name} t={_fmt_t(t)}" for m, t in zip(members, ts))
                why = f"{spec} feeds several binarizers with different t ({vals}): folds only with equal t"
        if why:
            for m in members:
                kept[m.name] = why
        else:
            groups.append(_Group(spec, members))
    return groups


def _fmt_t(t: torch.Tensor) -> str:
    return f"{float(t):g}" if t.numel() == 1 else f"[{float(t.min()):g}..{float(t.max()):g}]"


def _apply_group(model: nn.Module, g: _Group) -> str | None:
    """Fold ``g`` into ``model`` (in place); the reason when it cannot be folded."""
    first = g.sites[0]
    target = _fold_target(model, first, _live_t(model, first))
    if isinstance(target, str):
        return target
    param, delta = target
    with torch.no_grad():
        param.add_(delta)
    for s in g.sites:
        _drop_site(model, s)
    return None


def _probe_batch(input_shape: Any, example: torch.Tensor | None) -> torch.Tensor:
    if example is not None:
        return example
    if input_shape is None:
        raise PatchError("fold proves itself on a probe batch: the model's input shape is needed",
                         hint="pass input_shape=(C, H, W) (the CLI takes it from patch.json)")
    shape = tuple(int(v) for v in input_shape)
    return torch.randn((PROBE_BATCH, *shape), generator=torch.Generator().manual_seed(20210611))


def _outputs(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Every tensor the model returns and every binary site output that can be tapped."""
    from ._taps import Taps

    sites = [s for s in shifted_sites(model) + list(model_state(model).fold_taps)
             if s.apply == APPLY_OP or hook_slot(s).module_binarizer]
    taps = Taps(model, sites)
    try:
        with torch.no_grad():
            y = model(x)
        vals = {n: taps.values[n].detach().clone() for n in taps.names if n in taps.values}
    finally:
        taps.remove()
    flat: list[torch.Tensor] = []
    stack = [y]
    while stack:
        v = stack.pop(0)
        if isinstance(v, torch.Tensor):
            flat.append(v.detach())
        elif isinstance(v, (tuple, list)):
            stack[:0] = list(v)
        elif isinstance(v, dict):
            stack[:0] = list(v.values())
    return flat, vals


def _differs(ref, got, exact: bool) -> str | None:
    """Why ``got`` is not the same model as ``ref`` on the probe batch (None: the same)."""
    (ya, va), (yb, vb) = ref, got
    if len(ya) != len(yb):
        return "the folded model returns different outputs"
    flips = sum(int((torch.sign(va[n].double()) != torch.sign(vb[n].double())).sum()) for n in va if n in vb)
    total = sum(va[n].numel() for n in va if n in vb)
    if (flips and exact) or (total and flips / total > 1e-4):
        return f"{flips} of {total} binary activations change on a probe batch"
    for a, b in zip(ya, yb):
        if a.shape != b.shape:
            return "the folded model's outputs have another shape"
        if a.is_floating_point():
            scale = max(1.0, float(a.abs().max())) if a.numel() else 1.0
            d = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
            if d > (1e-9 if exact else 1e-4) * scale:
                return f"the outputs change on a probe batch (max |diff| {d:.3g})"
        elif not torch.equal(a, b):
            return "the outputs change on a probe batch"
    return None


def _verified(model: nn.Module, groups: list[_Group], x: torch.Tensor, kept: dict[str, str]) -> list[_Group]:
    """The groups whose fold leaves every output and binary activation unchanged on ``x``
    (float64 copies where the model runs in float64, else float32 with a tie tolerance)."""
    def copy_as(dtype):
        m = copy.deepcopy(model).eval()
        return m.to(dtype) if dtype is not None else m

    dtype, exact = torch.float64, True
    try:
        ref = _outputs(copy_as(dtype), x.to(dtype))
    except Exception:  # noqa: BLE001 - the model does not run in float64 (hard-coded float32 tensors)
        dtype, exact = None, False
        ref = _outputs(copy_as(None), x)
    xd = x.to(dtype) if dtype is not None else x

    def trial(gs: list[_Group]) -> str | None:
        m = copy_as(dtype)
        for g in gs:
            why = _apply_group(m, g)
            if why:
                return why
        set_state(m, fold_taps=[s for g in gs for s in g.sites])
        try:
            return _differs(ref, _outputs(m, xd), exact)
        except Exception as exc:  # noqa: BLE001
            return f"the folded model does not run: {type(exc).__name__}: {exc}"[:200]

    if not groups or trial(groups) is None:
        return groups
    ok: list[_Group] = []
    for g in groups:
        why = trial([g])
        if why is None:
            ok.append(g)
        else:
            for s in g.sites:
                kept[s.name] = f"fold into {g.spec} refused: {why}"
    if ok and trial(ok) is not None:
        for g in ok:
            for s in g.sites:
                kept[s.name] = f"fold into {g.spec} refused: the folds change the model together"
        return []
    return ok


def _rounding_reason(s: Site) -> str:
    """Why a fold is exact in real numbers but not bitwise the hooked patch (float32 rounding)."""
    if s.fold_with and len(s.fold_with) > 1:
        why = f"{s.foldable} is shared with {', '.join(n for n in s.fold_with if n != s.name)}"
    else:
        why = f"{s.foldable} is not read only inside its own module (or the model could not be traced)"
    return (f"{why}, so its hook subtracts t from the target's output while the fold lowers the "
            "parameter (b - t): equal to float rounding (binary activations may differ at exact ties), "
            "not bitwise")


def fold_shifts(model: nn.Module, input_shape: Any = None, *, example: torch.Tensor | None = None) -> FoldReport:
    """Absorb every foldable site's threshold into its BN / bias (in place); returns a ``FoldReport``.

    Sites that share one target (a BN or bias called before several binarizers) fold together
    and only when their thresholds are equal. Every fold is then *proved*: the folded model is
    compared with the unfolded one on a probe batch (``example``, or random inputs of
    ``input_shape`` = (C, H, W) without the batch dimension), in float64 where the model runs in
    float64; a fold that changes any output or tapped binary activation is refused and its hooks
    kept, with the reason. When no site is left, every bnnshift hook is removed.
    Raises ``PatchError`` when the model has no threshold or no probe input is given.
    """
    sites = shifted_sites(model)
    if not sites:
        raise PatchError("the model has no bnnshift threshold to fold", hint="patch it first")
    from .patch import patch_state

    st = patch_state(model)
    report = FoldReport()
    groups = _plan(model, report.kept)
    if groups:
        x = _probe_batch(input_shape, example)
        groups = _verified(model, groups, x, report.kept)
    rt = model_state(model).shift.runtime
    lowered = {h.site for hs in rt.param_shifts.values() for h in hs}
    for g in groups:
        why = _apply_group(model, g)
        if why:
            for s in g.sites:
                report.kept[s.name] = why
            continue
        for s in g.sites:
            report.folded[s.name] = g.spec
            if s.name not in lowered:
                report.rounded[s.name] = _rounding_reason(s)
            if st is not None:
                st.folded[s.name] = g.spec
    order = [s.name for s in sites]
    report.folded = {n: report.folded[n] for n in order if n in report.folded}
    report.kept = {n: report.kept[n] for n in order if n in report.kept}
    report.rounded = {n: report.rounded[n] for n in order if n in report.rounded}
    if not shifted_sites(model):
        remove_shifts(model)
    return report
