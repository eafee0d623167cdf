"""Phase 5 (mechanism): insert ``x - t`` before each binarizer of a user's own model.

The user's module tree and forward are kept; each site gets a threshold tensor registered
on the module that hosts its hook (a buffer, or an ``nn.Parameter`` when trainable), so the
state_dict keeps every original key and gains one key per site, e.g.
``layer1.0.act.bnnshift_threshold_call1``. Subtracting before the binarizer moves its
forward threshold and its straight-through window together (the paper's shift along x),
and keeps the model's own sign(0) convention. ``t = 0`` reproduces the original outputs
and gradients bitwise (x - 0 == x).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from ._compat import alias_kwargs
from ._runtime import POST_CALL, SiteRuntime, hook_slot, own_modules, site_hook_paths
from ._state import model_state, set_state
from .errors import PatchError
from .sites import APPLY_OP, APPLY_PRODUCER, Site, target_param

THRESHOLD_PREFIX = "bnnshift_threshold_"


def threshold_attr(site: Site) -> str:
    """Name of the threshold tensor on its host module (unique per host)."""
    if site.apply == APPLY_OP:
        return f"{THRESHOLD_PREFIX}op{site.op_index}"
    if site.apply == APPLY_PRODUCER:
        return f"{THRESHOLD_PREFIX}out{site.call_index}"
    return f"{THRESHOLD_PREFIX}call{site.call_index}"


def host_path(site: Site) -> str:
    return (site.scope or "") if site.apply == APPLY_OP else (site.module or "")


def threshold_key(site: Site) -> str:
    """The state_dict key of the site's threshold."""
    h = host_path(site)
    return f"{h}.{threshold_attr(site)}" if h else threshold_attr(site)


def _shaped(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    t = t.to(dtype=x.dtype)
    if t.dim() == 1 and x.dim() >= 2:
        return t.view(1, -1, *([1] * (x.dim() - 2)))
    return t


class _SubtractInput:
    """``args[0] - t`` with t read from the hooked (host) module."""

    def __init__(self, attr: str):
        self.attr = attr

    def __call__(self, module, args):
        x = args[0]
        return (x - _shaped(getattr(module, self.attr), x), *args[1:])


class _SubtractOutput:
    def __init__(self, attr: str):
        self.attr = attr

    def __call__(self, module, output):
        return output - _shaped(getattr(module, self.attr), output)


def fold_param(model: nn.Module, spec: str) -> tuple[nn.Module, str] | None:
    """(module, parameter name) that a fold target ``bn:PATH`` / ``bias:PATH.PARAM`` names, or
    None when it is not a registered parameter of that module."""
    found = target_param(spec or "")
    if found is None:
        return None
    path, pname = found
    try:
        owner = model.get_submodule(path) if path else model
    except AttributeError:
        return None
    if not isinstance(owner._parameters.get(pname), torch.Tensor):
        return None
    return owner, pname


@alias_kwargs  # the old keyword ``direction``: bnnshift._compat.RENAMED
def fold_delta(t: torch.Tensor, param: torch.Tensor, bias_sign: int) -> torch.Tensor:
    """What a fold adds to ``param`` for threshold ``t``: ``-bias_sign * t`` (shape () or
    ``param.shape``; the bias sign +1 for ``x + b`` and BN beta, -1 for ``x - b``).

    ``fold.fold_shifts`` stores ``param + fold_delta(...)``; a hook with ``Site.shift_into``
    computes the same expression while the module runs, so both are bitwise equal.
    Raises ValueError when a per-channel ``t`` does not fit ``param``.
    """
    t = t.to(dtype=param.dtype, device=param.device)
    if t.numel() == 1:
        return -bias_sign * t.reshape(())
    if t.numel() == param.numel():
        return -bias_sign * t.reshape(param.shape)
    raise ValueError(f"a threshold of {t.numel()} values does not fit a parameter of {param.numel()}")


class _LowerParam:
    """While its module runs, its parameter ``pname`` reads as ``b + fold_delta(t, b)``: the
    shift applied as the fold applies it (``Site.shift_into``). The parameter itself, the
    state_dict and the optimizer are untouched: the lowered tensor shadows it in the module's
    ``__dict__`` from the pre-hook to the (always called) forward hook."""

    def __init__(self, site: str, host: nn.Module, attr: str, pname: str, bias_sign: int):
        self.site, self.host, self.attr, self.pname, self.bias_sign = site, host, attr, pname, bias_sign

    def lower(self, module: nn.Module) -> None:
        b = module._parameters[self.pname]
        module.__dict__[self.pname] = b + fold_delta(getattr(self.host, self.attr), b, self.bias_sign)

    def restore(self, module: nn.Module) -> None:
        module.__dict__.pop(self.pname, None)


def _first_float(m: nn.Module) -> torch.Tensor | None:
    for t in list(m.parameters()) + list(m.buffers()):
        if t.is_floating_point():
            return t
    return None


@dataclass
class ShiftRuntime:
    """What ``insert_shifts`` attached: the runtime and the sites it shifts."""

    runtime: SiteRuntime
    sites: list[Site]


def insert_shifts(model: nn.Module, sites: Iterable[Site], shifts: dict[str, float], *, trainable: bool = False,
                  per_channel: bool = False) -> nn.Module:
    """Attach a threshold to every site named in ``shifts`` (in place); returns ``model``.

    ``trainable`` makes thresholds ``nn.Parameter`` (ReActNet RSign-style), ``per_channel``
    gives them one value per channel (needs ``site.channels``). Raises ``PatchError`` for an
    unknown site or a site whose host module does not exist.
    """
    if model_state(model).shift is not None:
        raise PatchError("the model already has bnnshift shifts", hint="patch a freshly built model")
    sites = [s for s in sites if s.name in shifts]
    own_modules(model, site_hook_paths(model, sites))  # thresholds live on this instance only
    mods = dict(model.named_modules())
    rt = SiteRuntime(model, watch_scopes={s.scope or "" for s in sites if s.apply == APPLY_OP})
    for s in sites:
        h = host_path(s)
        if h not in mods:
            raise PatchError(f"site {s.name}: module {h!r} not found in the model",
                             hint="the model does not match the one that was scanned")
        host = mods[h]
        value = float(shifts[s.name])
        if per_channel:
            if not s.channels:
                raise PatchError(f"site {s.name}: number of channels unknown, cannot make a per-channel threshold",
                                 hint="run without --per-channel")
            t = torch.full((s.channels,), value)
        else:
            t = torch.tensor(value)
        ref = _first_float(host)
        ref = ref if ref is not None else _first_float(model)
        if ref is not None:
            t = t.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else torch.float32)
        attr = threshold_attr(s)
        if trainable:
            host.register_parameter(attr, nn.Parameter(t))
        else:
            host.register_buffer(attr, t)
        lowered = _lowered(model, s, host, attr, t)
        if lowered is not None:
            rt.param_shifts.setdefault(lowered[0], []).append(lowered[1])
            continue
        try:
            slot = hook_slot(s)
        except ValueError as exc:
            raise PatchError(str(exc)) from None
        rt.attach(s, _SubtractOutput(attr) if slot.table == POST_CALL else _SubtractInput(attr))
    uses_apply = any(s.apply == APPLY_OP and s.op.endswith(".apply") for s in sites)
    rt.install(apply_wrapper=uses_apply)
    set_state(model, shift=ShiftRuntime(rt, sites))
    return model


def _lowered(model: nn.Module, s: Site, host: nn.Module, attr: str, t: torch.Tensor) -> tuple[str, _LowerParam] | None:
    """(module path, handler) when ``s`` is shifted by lowering its fold target (``shift_into``)."""
    if not s.shift_into or s.bias_sign not in (1, -1):
        return None
    found = fold_param(model, s.shift_into)
    if found is None:
        return None
    owner, pname = found
    if t.numel() not in (1, owner._parameters[pname].numel()):
        return None
    return target_param(s.shift_into)[0], _LowerParam(s.name, host, attr, pname, int(s.bias_sign))


def remove_shifts(model: nn.Module, *, keep_thresholds: bool = False) -> nn.Module:
    """Detach every bnnshift hook (through the runtime's removable handles) and, unless
    ``keep_thresholds``, the threshold tensors; returns ``model``. The model's own hooks stay."""
    sr = model_state(model).shift
    if sr is not None:
        sr.runtime.remove()
        set_state(model, shift=None)
    if not keep_thresholds:
        for m in model.modules():
            for name in [n for n in list(m._buffers) + list(m._parameters) if n.startswith(THRESHOLD_PREFIX)]:
                delattr(m, name)
    return model


def shifted_sites(model: nn.Module) -> list[Site]:
    """The sites whose shift hooks ``insert_shifts`` attached to ``model`` (empty when none)."""
    sr = model_state(model).shift
    return list(sr.sites) if sr is not None else []


def get_thresholds(model: nn.Module) -> dict[str, torch.Tensor]:
    """Site name -> current threshold tensor of a patched model."""
    mods = dict(model.named_modules())
    return {s.name: getattr(mods[host_path(s)], threshold_attr(s)) for s in shifted_sites(model)}
