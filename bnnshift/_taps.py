"""Taps: each site's binary activation (and its pre-activation) recorded during a forward.

Used by ``export`` (the values become extra graph outputs, compared with onnxruntime) and by
``fold`` (a fold must leave every binary activation unchanged). Where a site's value is read
follows where it is hooked (``_runtime.hook_slot``): a binarizer module's output (and its
input, the pre-activation), the (shifted) input of a conv that binarizes its own input, the
(shifted) output of the producer of an inline binarizer, or the output of an intercepted op
(through the patched model's runtime). Taps are plain forward hooks registered after
bnnshift's own, so they see the shifted values; after ``fold`` the same positions hold the
folded values. Every hook is removed through its ``RemovableHandle`` (``Taps.remove``).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ._runtime import OP, PRE_CALL, hook_slot
from ._state import model_state
from .load import logits_picker
from .shift import _shaped, get_thresholds
from .sites import KIND_HARDTANH, Site, target_param

__all__ = ["Taps", "Tapped"]


class Taps:
    """Forward hooks that record each site's binary activation (in site order) during a forward."""

    def __init__(self, model: nn.Module, sites: Iterable[Site]):
        self.model = model
        self.sites = [s for s in sites if s.kind != KIND_HARDTANH]
        self.values: dict[str, torch.Tensor] = {}
        # torch side only (never exported): each site's pre-activation, x - t, to judge ties
        self.pre_values: dict[str, torch.Tensor] = {}
        self.calls: dict[tuple[str, str], int] = {}
        self.handles: list[Any] = []
        self.names: list[str] = []
        self._op_sites: dict[tuple[str, int], str] = {}
        self._rt = None
        self._saved_record = None
        mods = dict(model.named_modules())
        post: dict[str, dict[int, str]] = {}
        pre: dict[str, dict[int, str]] = {}
        self._module_pre: dict[str, dict[int, str]] = {}
        for s in self.sites:  # where each site is hooked says where its binary activation is
            slot = hook_slot(s)
            path, k = slot.key
            if slot.table == OP:
                self._op_sites[slot.key] = s.name
            elif path not in mods:
                continue
            elif slot.module_binarizer:
                post.setdefault(path, {})[k] = s.name  # binarizer module output
                self._module_pre.setdefault(path, {})[k] = s.name  # binarizer module input
            elif slot.table == PRE_CALL:
                pre.setdefault(path, {})[k] = s.name  # shifted input of the conv
            else:
                post.setdefault(path, {})[k] = s.name  # shifted producer output
        # binarizer modules with their own additive parameter (RSign: sign(x + b)): name -> (param, sign)
        self._own_bias: dict[str, tuple[str, int]] = {}
        for s in self.sites:
            tgt = target_param(s.foldable or "")
            if tgt is not None and s.foldable.startswith("bias:") and tgt[0] == s.module and s.bias_sign in (1, -1):
                self._own_bias[s.name] = (tgt[1], int(s.bias_sign))
        # sites shifted by lowering their fold target: their op's input is already x - t
        sr = model_state(model).shift
        self._lowered = {h.site for hs in sr.runtime.param_shifts.values() for h in hs} if sr is not None else set()
        for path, idx in self._module_pre.items():
            self.handles.append(mods[path].register_forward_pre_hook(self._input_hook(path, idx)))
        for path, idx in pre.items():
            self.handles.append(mods[path].register_forward_pre_hook(self._pre_hook(path, idx)))
        for path, idx in post.items():
            self.handles.append(mods[path].register_forward_hook(self._post_hook(path, idx)))
        if self._op_sites and sr is not None:
            self._rt = sr.runtime
            self._saved_record = self._rt.record_ops
            self._rt.record_ops = self._record
        tapped = {n for d in list(pre.values()) + list(post.values()) for n in d.values()}
        if self._rt is not None:
            tapped |= set(self._op_sites.values())
        self.names = [s.name for s in self.sites if s.name in tapped]

    def _input_hook(self, path, idx):
        def hook(module, args):
            k = self.calls.get(("in", path), 0)
            self.calls[("in", path)] = k + 1
            if k in idx and args and isinstance(args[0], torch.Tensor):
                x = args[0].detach()
                own = self._own_bias.get(idx[k])
                if own is not None:  # sign(x + b): the pre-activation includes the module's own bias
                    pname, sign = own
                    b = getattr(module, pname).detach()  # lowered by t while a shift_into hook runs
                    x = x + sign * (b.view(1, -1, *([1] * (x.dim() - 2))) if b.dim() == 1 and x.dim() > 2 else b)
                self.pre_values[idx[k]] = x
        return hook

    def _pre_hook(self, path, idx):
        def hook(module, args):
            k = self.calls.get(("pre", path), 0)
            self.calls[("pre", path)] = k + 1
            if k in idx and args and isinstance(args[0], torch.Tensor):
                self.values[idx[k]] = args[0]
                self.pre_values[idx[k]] = args[0].detach()  # the shifted input is the pre-activation
        return hook

    def _post_hook(self, path, idx):
        def hook(module, args, output):
            k = self.calls.get(("post", path), 0)
            self.calls[("post", path)] = k + 1
            if k in idx and isinstance(output, torch.Tensor):
                self.values[idx[k]] = output
                if path not in self._module_pre or k not in self._module_pre[path]:
                    self.pre_values[idx[k]] = output.detach()  # a producer's shifted output
        return hook

    def _record(self, ev):
        if self._saved_record is not None:
            self._saved_record(ev)
        name = self._op_sites.get((ev.scope, ev.index))
        if name is not None and isinstance(ev.output, torch.Tensor):
            self.values[name] = ev.output
            if ev.inputs and isinstance(ev.inputs[0], torch.Tensor):
                x = ev.inputs[0].detach()  # the op's input before the shift: subtract the live t
                t = self._thresholds().get(name) if name not in self._lowered else None
                self.pre_values[name] = x - _shaped(t, x) if t is not None else x

    def _thresholds(self) -> dict[str, torch.Tensor]:
        try:
            return get_thresholds(self.model)
        except Exception:  # noqa: BLE001 - not a bnnshift-patched model
            return {}

    def reset(self):
        self.values = {}
        self.pre_values = {}
        self.calls = {}

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        if self._rt is not None:
            self._rt.record_ops = self._saved_record
            self._rt = None


class Tapped(nn.Module):
    """``forward(x) -> (logits, *site values)`` (the order of ``taps.names``)."""

    def __init__(self, model: nn.Module, taps: Taps, pick: Any = None):
        super().__init__()
        self.model = model
        self._taps = taps
        self._pick = pick or logits_picker()

    def forward(self, x):
        self._taps.reset()
        out = self._pick(self.model(x))
        vals = [self._taps.values[n].float() if self._taps.values[n].dtype == torch.bool else self._taps.values[n]
                for n in self._taps.names if n in self._taps.values]
        return (out, *vals)
