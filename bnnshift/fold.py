"""Phase 6: fold fixed shifts into existing parameters (zero inference cost).

* ``bn:PATH``: the site's pre-activation is the output of a BatchNorm that feeds nothing
  else. ``y - t = gamma * xhat + (beta - t)`` in train and in eval mode (xhat is normalised
  with batch or running statistics alike), so ``beta' = beta - t`` is exact, whatever the
  sign of gamma, and works per channel.
* ``bias:PATH.PARAM``: a learnable bias added before the sign (ReActNet ``LearnableBias``,
  an RSign's own bias). Whether it enters as ``x + b`` or ``x - b`` is *measured* on the
  module (``_bias_direction``); a parameter that is not an additive bias at all (a scale)
  is left alone.

A folded site loses its hook and its threshold entry; every other site keeps both, with the
reason (``Site.fold_reason``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import PatchError
from .shift import host_path, remove_shifts, shifted_sites, threshold_attr
from .sites import APPLY_OP, APPLY_PRE_HOOK, APPLY_PRODUCER, Site

__all__ = ["FoldReport", "fold_shifts"]


@dataclass
class FoldReport:
    """``folded``: site name -> 'bn:PATH' / 'bias:PATH.PARAM'; ``kept``: site name -> reason."""

    folded: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"folded": dict(self.folded), "kept": dict(self.kept)}


def _module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def _bias_direction(module: nn.Module, pname: str, param: torch.Tensor, channels: int | None) -> int | None:
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
    d = 0.37
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            ref = module.forward(x - d)
            if not isinstance(ref, torch.Tensor):
                return None
            results = []
            for direction in (+1, -1):
                saved = param.detach().clone()
                param.sub_(direction * d)
                try:
                    out = module.forward(x)
                finally:
                    param.copy_(saved)
                results.append(isinstance(out, torch.Tensor) and out.shape == ref.shape
                               and bool(torch.isclose(out, ref, atol=1e-5, rtol=1e-5).float().mean() > 0.999))
            # the change must matter at all (a parameter the output ignores is no bias)
            changed = not torch.allclose(module.forward(x), ref)
    except Exception:  # noqa: BLE001 - any failure means "cannot tell": keep the hook
        return None
    finally:
        module.train(was)
    if not changed:
        return None
    if results[0] and not results[1]:
        return +1
    if results[1] and not results[0]:
        return -1
    return None


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
        direction = +1  # beta enters as + beta
    elif spec.startswith("bias:"):
        path, _, pname = spec[5:].rpartition(".")
        owner = _module(model, path)
        param = getattr(owner, pname, None) if owner is not None else None
        if not isinstance(param, torch.Tensor):
            return f"parameter {spec[5:]} not found"
        direction = _bias_direction(owner, pname, param, site.channels)
        if direction is None:
            return f"{spec[5:]} does not act as an additive bias on the pre-activation (measured)"
    else:
        return f"unknown fold target {spec!r}"
    t = t.detach().to(dtype=param.dtype, device=param.device)
    if t.dim() == 0 or t.numel() == 1:
        delta = -direction * t.reshape(()).expand(param.shape)
    elif param.numel() == t.numel():
        delta = -direction * t.reshape(param.shape)
    else:
        return f"a per-channel threshold of {t.numel()} values does not fit {spec} ({param.numel()} values)"
    return param, delta


def _drop_site(model: nn.Module, site: Site) -> None:
    """Remove the site's hook entry and threshold tensor (other sites keep theirs)."""
    sr = model._bnnshift_shift
    rt = sr.runtime
    if site.apply == APPLY_PRE_HOOK:
        rt.pre_call.pop((site.module, site.call_index), None)
    elif site.apply == APPLY_PRODUCER:
        rt.post_call.pop((site.module, site.call_index), None)
    elif site.apply == APPLY_OP:
        rt.op_handlers.pop((site.scope or "", site.op_index), None)
    host = _module(model, host_path(site))
    attr = threshold_attr(site)
    if host is not None:
        host._buffers.pop(attr, None)
        host._parameters.pop(attr, None)
    sr.sites = [s for s in sr.sites if s.name != site.name]


def fold_shifts(model: nn.Module) -> FoldReport:
    """Absorb every foldable site's threshold into its BN / bias (in place); returns a ``FoldReport``.

    Sites are folded one at a time; two sites folding into the same parameter keep the second
    as a hook. When no site is left, every bnnshift hook is removed (a plain model again).
    """
    sites = shifted_sites(model)
    if not sites:
        raise PatchError("the model has no bnnshift threshold to fold", hint="patch it first")
    from .patch import patch_state

    st = patch_state(model)
    ht_names = {s.name for s in (st.hardtanh_sites if st else [])}
    hosts = {s.name: _module(model, host_path(s)) for s in sites}
    report = FoldReport()
    used: set[int] = set()
    for s in sites:
        if s.name in ht_names:
            report.kept[s.name] = "hardtanh shift (full-precision model): no bias to absorb it"
            continue
        t = getattr(hosts[s.name], threshold_attr(s))
        target = _fold_target(model, s, t)
        if isinstance(target, str):
            report.kept[s.name] = target
            continue
        param, delta = target
        if id(param) in used:
            report.kept[s.name] = f"{s.foldable} already absorbs another site's threshold"
            continue
        with torch.no_grad():
            param.add_(delta)
        used.add(id(param))
        _drop_site(model, s)
        report.folded[s.name] = s.foldable
        if st is not None:
            st.folded[s.name] = s.foldable
    if not shifted_sites(model):
        remove_shifts(model)
    return report
