"""Runtime machinery shared by the probe (recording) and the patch (shifting).

bnnshift never replaces a user's forward. It attaches small hooks to the user's own module
tree and identifies each binary activation by *where it runs*:

* a call of a module (``path``, k-th call in one root forward): module binarizers,
  conv/linear input quantizers and producers (BN, learnable bias) are addressed this way;
* a candidate op (``sign``, ``heaviside``, ``x > 0``-style comparisons, any
  ``autograd.Function.apply``) executed while a given module is the innermost running one
  (``scope``, j-th candidate op of that scope in one root forward).

The same numbering is produced by the tracer (graph order = execution order), so a site
found in the graph is found again at run time. Counters reset at every root forward.
Ops are seen through a ``TorchFunctionMode`` that is active only while a watched scope runs,
and ``Function.apply`` through a wrapper on ``torch.autograd.Function.apply``; inside an
``apply`` nothing is counted (its inner ``sign`` is part of that one candidate op).

Where a site's hook goes is decided in one place, :func:`hook_slot` (the *hook modes*: a
forward pre-hook on a module call, a forward hook on a producer's call, an intercepted op),
used by the shift, the probe, the taps and the fold. A runtime keeps the
``RemovableHandle`` of every hook it registers and removes exactly those.
"""
from __future__ import annotations

import copy
import operator
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .sites import APPLY_OP, APPLY_PRE_HOOK, APPLY_PRODUCER, target_param

# ---------------------------------------------------------------- candidate ops

_SIGN_FUNCS = {torch.sign, torch.Tensor.sign, torch.sgn, torch.Tensor.sgn}
_HEAVISIDE_FUNCS = {torch.heaviside, torch.Tensor.heaviside}
_COMPARE_FUNCS = {
    torch.gt: "gt", torch.Tensor.gt: "gt", torch.Tensor.__gt__: "gt", torch.greater: "gt",
    torch.ge: "ge", torch.Tensor.ge: "ge", torch.Tensor.__ge__: "ge", torch.greater_equal: "ge",
    torch.lt: "lt", torch.Tensor.lt: "lt", torch.Tensor.__lt__: "lt", torch.less: "lt",
    torch.le: "le", torch.Tensor.le: "le", torch.Tensor.__le__: "le", torch.less_equal: "le",
}
_HARDTANH_FUNCS = {torch.nn.functional.hardtanh}


def candidate_label(func: Any, args: tuple) -> str | None:
    """Label of a torch call that may binarize an activation, or None.

    Comparisons count only against the literal 0 (masks of STEs compare with +-1).
    """
    if func in _SIGN_FUNCS:
        return "sign"
    if func in _HEAVISIDE_FUNCS:
        return "heaviside"
    cmp = _COMPARE_FUNCS.get(func)
    if cmp is not None:
        if len(args) >= 2 and isinstance(args[0], torch.Tensor) and _is_zero_literal(args[1]):
            return "compare"
        return None
    return None


def _is_zero_literal(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and float(v) == 0.0


# graph-side twin of candidate_label (fx targets); kept next to it so both stay in step
_GRAPH_SIGN = {torch.sign, torch.sgn}
_GRAPH_COMPARE = {operator.gt: "gt", operator.ge: "ge", operator.lt: "lt", operator.le: "le",
                  torch.gt: "gt", torch.ge: "ge", torch.lt: "lt", torch.le: "le",
                  torch.greater: "gt", torch.greater_equal: "ge", torch.less: "lt", torch.less_equal: "le"}
_METHOD_SIGN = {"sign", "sgn"}
_METHOD_COMPARE = {"gt", "ge", "lt", "le", "__gt__", "__ge__", "__lt__", "__le__", "greater", "less"}


def graph_candidate_label(node) -> str | None:
    """The label ``candidate_label`` gives at run time to the op an fx node records."""
    if node.op == "call_function":
        t = node.target
        if getattr(t, "bnnshift_function", None) is not None:
            return "apply"
        if t in _GRAPH_SIGN:
            return "sign"
        if t is torch.heaviside:
            return "heaviside"
        if t in _GRAPH_COMPARE:
            return "compare" if len(node.args) >= 2 and _is_zero_literal(node.args[1]) else None
    elif node.op == "call_method":
        if node.target in _METHOD_SIGN:
            return "sign"
        if node.target == "heaviside":
            return "heaviside"
        if node.target in _METHOD_COMPARE:
            return "compare" if len(node.args) >= 2 and _is_zero_literal(node.args[1]) else None
    return None


# ---------------------------------------------------------------- Function.apply wrapper

_state = threading.local()


def _active() -> "SiteRuntime | None":
    return getattr(_state, "runtime", None)


_ORIG_APPLY = torch.autograd.Function.__dict__["apply"]
_apply_wrapped = False


def _wrapped_apply(cls, *args, **kwargs):
    rt = _active()
    orig = _ORIG_APPLY.__get__(None, cls)
    if rt is None or rt._in_apply or not rt._scopes:
        return orig(*args, **kwargs)
    return rt._on_apply(cls, orig, args, kwargs)


def ensure_apply_wrapper() -> None:
    """Route ``Function.apply`` through bnnshift (a no-op pass-through unless a runtime is active).

    Installed once per process, only when a probe runs or a patched model has a site on an
    inline ``Function.apply`` with no module to hook.
    """
    global _apply_wrapped
    if not _apply_wrapped:
        torch.autograd.Function.apply = classmethod(_wrapped_apply)
        _apply_wrapped = True


def binary_part(output: Any) -> Any:
    """The output of a binarizer that is the binarization: the output itself, or for a
    multi-output binarizer (``(sign, scale)``, ``(scale, sign)``, ``(sign, mean)``) its first
    tensor output with two or three distinct values in one sample (a per-sample scale has
    one), else its first tensor output. Anything else is returned unchanged."""
    if not isinstance(output, (tuple, list)):
        return output
    tensors = [v for v in output if isinstance(v, torch.Tensor)]
    for v in tensors:
        head = (v[0] if v.dim() >= 2 else v).detach().reshape(-1)[:4096]
        if 2 <= torch.unique(head).numel() <= 3:
            return v
    return tensors[0] if tensors else output


# ---------------------------------------------------------------- references bound at construction


class LateApply:
    """Stands for a reference to ``function.apply`` that user code took once
    (``self.q = SignSTE.apply`` in ``__init__``, ``binarize = SignSTE.apply`` at module level).

    Such a reference is bound to whatever ``Function.apply`` was when it was taken: torch's
    own C method (a model built before bnnshift's first probe: the run-time wrapper and the
    tracer's opaque node never see the call, only the ``sign`` inside it) or bnnshift's
    wrapper (a model built after it). ``LateApply`` looks ``apply`` up at every call, so a
    Function is seen the same way however and whenever it was bound (issue 20). Calling it is
    calling ``function.apply``: same outputs, same autograd graph.
    """

    __slots__ = ("function",)

    def __init__(self, function: type):
        self.function = function

    def __call__(self, *args, **kwargs):
        return self.function.apply(*args, **kwargs)

    def __reduce__(self):
        return (LateApply, (self.function,))

    def __repr__(self) -> str:
        return f"{self.function.__qualname__}.apply"


def bound_apply_function(v: Any) -> type | None:
    """The ``autograd.Function`` subclass when ``v`` is a bound ``apply`` of it, else None."""
    if not callable(type(v)) or isinstance(v, (torch.Tensor, nn.Module, str, int, float, type)):
        return None
    try:
        owner = getattr(v, "__self__", None)
    except Exception:  # noqa: BLE001 - a __getattr__ that raises something else than AttributeError
        return None
    if not isinstance(owner, type) or not issubclass(owner, torch.autograd.Function):
        return None
    name = getattr(v, "__name__", "")
    if name == "apply" or getattr(v, "__func__", None) is _wrapped_apply or name == "traced_apply":
        return owner
    return None


def rebind_applies(model: nn.Module) -> int:
    """Replace every bound ``Function.apply`` reference the model's forward can reach by a
    ``LateApply`` (in place; behaviour unchanged). Looks at each module's attributes (and the
    items of list / tuple / dict attributes) and at the module-level names each module class's
    ``forward`` reads. Returns how many references were replaced."""
    n = 0
    seen_fn: set[int] = set()
    for m in model.modules():
        d = m.__dict__
        for k, v in list(d.items()):
            if k in ("_parameters", "_buffers", "_modules"):
                continue
            fn = bound_apply_function(v)
            if fn is not None:
                d[k] = LateApply(fn)
                n += 1
            elif isinstance(v, list):
                for i, e in enumerate(v):
                    fn = bound_apply_function(e)
                    if fn is not None:
                        v[i] = LateApply(fn)
                        n += 1
            elif isinstance(v, tuple) and any(bound_apply_function(e) for e in v):
                d[k] = type(v)(*(LateApply(bound_apply_function(e)) if bound_apply_function(e) else e for e in v)) \
                    if hasattr(v, "_fields") else tuple(LateApply(bound_apply_function(e)) if bound_apply_function(e)
                                                        else e for e in v)
                n += 1
            elif isinstance(v, dict) and not isinstance(v, nn.Module):
                for kk, e in list(v.items()):
                    fn = bound_apply_function(e)
                    if fn is not None:
                        v[kk] = LateApply(fn)
                        n += 1
        fwd = getattr(type(m), "forward", None)
        code, glb = getattr(fwd, "__code__", None), getattr(fwd, "__globals__", None)
        if code is None or glb is None or id(fwd) in seen_fn:
            continue
        seen_fn.add(id(fwd))
        for name in code.co_names:
            fn = bound_apply_function(glb.get(name))
            if fn is not None:
                glb[name] = LateApply(fn)
                n += 1
    return n


# ---------------------------------------------------------------- where a site is hooked

PRE_CALL = "pre_call"  # a forward pre-hook on module call (path, k): the first input is the site's
POST_CALL = "post_call"  # a forward hook on producer call (path, k): the output is the site's input
OP = "op_handlers"  # the candidate op (scope, j) intercepted: its first input is the site's


@dataclass(frozen=True)
class HookSlot:
    """Where one site is hooked in a ``SiteRuntime``: ``table`` (``PRE_CALL``, ``POST_CALL`` or
    ``OP``: the runtime's handler table of that name), ``key`` (``(module path, call index)`` or
    ``(scope, op index)``) and ``op``: the site's binarizing op ``(scope, j)`` when it has one
    inside the hooked call (a conv's input quantizer, an inline op behind its producer), else None.
    A ``PRE_CALL`` slot without ``op`` is a binarizer module: its call's output is the binary one."""

    table: str
    key: tuple[str, int]
    op: tuple[str, int] | None = None

    @property
    def module_binarizer(self) -> bool:
        return self.table == PRE_CALL and self.op is None


def hook_slot(site: Any) -> HookSlot:
    """The one decision of how a site (``sites.Site``) is hooked, from its ``apply`` mode:
    ``pre_hook`` -> ``PRE_CALL`` on (module, call_index), ``producer_hook`` -> ``POST_CALL`` on
    (module, call_index), ``op`` -> ``OP`` on (scope, op_index). Raises ValueError for another mode."""
    if site.apply == APPLY_PRE_HOOK:
        op = (site.scope, site.op_index) if site.scope is not None else None
        return HookSlot(PRE_CALL, (site.module, site.call_index), op)
    if site.apply == APPLY_PRODUCER:
        return HookSlot(POST_CALL, (site.module, site.call_index), (site.scope or "", site.op_index))
    if site.apply == APPLY_OP:
        key = (site.scope or "", site.op_index)
        return HookSlot(OP, key, key)
    raise ValueError(f"site {site.name}: unknown apply mode {site.apply!r}")


# ---------------------------------------------------------------- the runtime


@dataclass
class OpEvent:
    """One candidate op seen at run time."""

    scope: str
    index: int
    label: str  # 'sign' | 'heaviside' | 'compare' | 'apply'
    function: type | None
    inputs: tuple
    output: Any
    # the inputs the op ran on, after any shift handler at this op (``inputs`` are before it)
    used_inputs: tuple = ()


class _ScopeMode(TorchFunctionMode):
    def __init__(self, runtime: "SiteRuntime"):
        super().__init__()
        self.runtime = runtime

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rt = self.runtime
        if rt._in_apply or not rt._scopes:
            return func(*args, **kwargs)
        label = candidate_label(func, args)
        if label is None:
            return func(*args, **kwargs)
        return rt._on_op(label, None, lambda *a: func(*a, **kwargs), args)


OpHandler = Callable[[OpEvent, Callable[..., Any]], Any]


class SiteRuntime:
    """Hooks that number module calls and candidate ops per root forward.

    ``watch_scopes``: module paths whose ops are counted (None: all modules).
    ``on_op(event_inputs) -> new_inputs | None`` handlers keyed by (scope, index) may replace
    an op's inputs (the shift) and see its output; ``on_call`` handlers keyed by (path, k)
    are forward pre-hooks (may return new args) and ``on_return`` handlers forward hooks.
    """

    def __init__(self, model: nn.Module, watch_scopes: set[str] | None = None):
        self.model = model
        self.paths: dict[int, str] = {id(m): p for p, m in model.named_modules()}
        self.watch_scopes = watch_scopes
        self.call_counts: dict[str, int] = {}
        self.op_counts: dict[str, int] = {}
        self._scopes: list[str] = []
        self._scope_modules_stack: list[nn.Module] = []
        self._in_apply = False
        self._mode: _ScopeMode | None = None
        self._handles: list[Any] = []
        self.pre_call: dict[tuple[str, int], Callable] = {}
        self.post_call: dict[tuple[str, int], Callable] = {}
        self.op_handlers: dict[tuple[str, int], Callable] = {}
        # module path -> handlers with lower(module) / restore(module), run around every call
        # of that module (a shift applied as its fold: shift._LowerParam)
        self.param_shifts: dict[str, list[Any]] = {}
        self.record_ops: Callable[[OpEvent], None] | None = None
        # recording hooks on every counted call: (path, k, args) and (path, k, output)
        self.any_pre: Callable[[str, int, tuple], None] | None = None
        self.any_post: Callable[[str, int, Any], None] | None = None
        self._uses_apply = False

    # -- handlers per site (the one dispatcher: ``hook_slot``)
    def attach(self, site: Any, handler: Callable) -> HookSlot:
        """Put ``handler`` where ``site`` is hooked (``hook_slot``); returns the slot."""
        slot = hook_slot(site)
        getattr(self, slot.table)[slot.key] = handler
        return slot

    def detach(self, site: Any) -> None:
        """Take ``site``'s handler out (its slot and any parameter it lowers); others stay."""
        slot = hook_slot(site)
        getattr(self, slot.table).pop(slot.key, None)
        for path, handlers in list(self.param_shifts.items()):
            handlers[:] = [h for h in handlers if getattr(h, "site", None) != site.name]
            if not handlers:
                del self.param_shifts[path]

    # -- installation
    def install(self, *, track_all_calls: bool = False, apply_wrapper: bool = True) -> "SiteRuntime":
        needs_scope = self.watch_scopes is None or bool(self.watch_scopes)
        rebind_applies(self.model)  # ``self.q = F.apply``: seen whenever and however it was bound
        scope_modules = self._scope_modules() if needs_scope else set()
        hooked_call_paths = {p for p, _ in self.pre_call} | {p for p, _ in self.post_call} | set(self.param_shifts)
        root = self.model
        self._handles.append(root.register_forward_pre_hook(_RootPre(self)))
        for path, mod in self.model.named_modules():
            in_scope = path in scope_modules
            counted = track_all_calls or path in hooked_call_paths
            if not (in_scope or counted):
                continue
            self._handles.append(mod.register_forward_pre_hook(_PreHook(self, path, in_scope), with_kwargs=True))
            self._handles.append(mod.register_forward_hook(_PostHook(self, path, in_scope), with_kwargs=True,
                                                           always_call=True))
        if apply_wrapper and needs_scope:
            ensure_apply_wrapper()
            self._uses_apply = True
        return self

    def remove(self) -> None:
        """Detach this runtime's hooks through the ``RemovableHandle``s ``install`` kept (a deep
        copy of the model copies them with it: each refers to its own copy's hook dicts)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._exit_mode()

    def _scope_modules(self) -> set[str]:
        """Watched scopes and all their descendants (to know the innermost running module)."""
        if self.watch_scopes is None:
            return set(self.paths.values())
        out: set[str] = set()
        for path, _ in self.model.named_modules():
            for s in self.watch_scopes:
                if s == "" or path == s or path.startswith(s + "."):
                    out.add(path)
                    break
        return out

    # -- hooks (called by the hook objects below)
    def _root_pre(self, module, args):
        self.call_counts.clear()
        self.op_counts.clear()
        self._scopes.clear()
        self._scope_modules_stack.clear()
        self._in_apply = False
        self._exit_mode()

    def _pre(self, path: str, in_scope: bool, module, args, kwargs):
        k = self.call_counts.get(path, 0)
        self.call_counts[path] = k + 1
        result = None
        if self.any_pre is not None:
            self.any_pre(path, k, args)
        h = self.pre_call.get((path, k))
        if h is not None and not self._in_apply:
            new_args = h(module, args)
            if new_args is not None:
                result = (new_args, kwargs)
        for ps in self.param_shifts.get(path, ()):
            ps.lower(module)
        if in_scope:
            if not self._scopes:
                self._enter_mode()
            self._scopes.append(path)
            self._scope_modules_stack.append(module)
        return result

    def _post(self, path: str, in_scope: bool, module, args, kwargs, output):
        if in_scope and self._scopes and self._scopes[-1] == path:
            self._scopes.pop()
            self._scope_modules_stack.pop()
            if not self._scopes:
                self._exit_mode()
        for ps in self.param_shifts.get(path, ()):
            ps.restore(module)
        k = self.call_counts.get(path, 1) - 1
        if self.any_post is not None:
            self.any_post(path, k, output)
        h = self.post_call.get((path, k))
        if h is not None and not self._in_apply:
            return h(module, output)
        return None

    def _enter_mode(self):
        _state.runtime = self
        self._mode = _ScopeMode(self)
        self._mode.__enter__()

    def _exit_mode(self):
        if self._mode is not None:
            mode, self._mode = self._mode, None
            try:
                mode.__exit__(None, None, None)
            except Exception:
                pass
        if _active() is self:
            _state.runtime = None

    # -- ops
    def _current_scope(self) -> str | None:
        if not self._scopes:
            return None
        s = self._scopes[-1]
        if self.watch_scopes is not None and s not in self.watch_scopes:
            return None
        return s

    def _on_op(self, label: str, function: type | None, call: Callable, args: tuple):
        scope = self._current_scope()
        if scope is None:
            return call(*args)
        j = self.op_counts.get(scope, 0)
        self.op_counts[scope] = j + 1
        orig_args = args
        h = self.op_handlers.get((scope, j))
        if h is not None:
            new_args = h(self._scope_modules_stack[-1], args)
            if new_args is not None:
                args = new_args
        self._in_apply = True
        try:
            out = call(*args)
        finally:
            self._in_apply = False
        if self.record_ops is not None:
            self.record_ops(OpEvent(scope, j, label, function, orig_args, out, tuple(args)))
        return out

    def _on_apply(self, cls, orig, args, kwargs):
        return self._on_op("apply", cls, lambda *a: orig(*a, **kwargs), args)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


# Hooks are small objects, not closures, so that ``copy.deepcopy`` of a patched model gives
# hooks bound to the copy's own runtime and modules (EMA copies, search candidates...).


class _RootPre:
    def __init__(self, runtime: SiteRuntime):
        self.runtime = runtime

    def __call__(self, module, args):
        self.runtime._root_pre(module, args)


class _PreHook:
    def __init__(self, runtime: SiteRuntime, path: str, in_scope: bool):
        self.runtime, self.path, self.in_scope = runtime, path, in_scope

    def __call__(self, module, args, kwargs):
        return self.runtime._pre(self.path, self.in_scope, module, args, kwargs)


class _PostHook:
    def __init__(self, runtime: SiteRuntime, path: str, in_scope: bool):
        self.runtime, self.path, self.in_scope = runtime, path, in_scope

    def __call__(self, module, args, kwargs, output):
        return self.runtime._post(self.path, self.in_scope, module, args, kwargs, output)


# ---------------------------------------------------------------- per-instance modules


def _shallow_clone(m: nn.Module) -> nn.Module:
    """A new module object with the same parameters, buffers and children, and its own dicts
    (hooks, registries), so hooks and thresholds added to it stay off the original."""
    new = m.__class__.__new__(m.__class__)
    new.__dict__.update({k: (copy.copy(v) if isinstance(v, (dict, set, list)) else v) for k, v in m.__dict__.items()})
    return new


def own_modules(model: nn.Module, hooked_paths: set[str]) -> list[str]:
    """Give ``model`` its own module objects where hooks / thresholds go, if they are shared.

    A binarizer object can be shared beyond one model instance (a default argument
    ``act=BinAct()``, a module-level instance): hooks and threshold buffers put on it would
    shift every model that uses it. Each module on the path from the root to a hooked module
    that is also referenced from outside ``model`` (or lies under such a module) is replaced,
    inside ``model`` only, by a shallow clone (same parameters and buffers, own hook dicts).
    Returns the paths that were cloned.
    """
    import gc

    by_path = dict(model.named_modules(remove_duplicate=False))
    need: set[str] = set()
    for p in hooked_paths:
        parts = p.split(".") if p else []
        for i in range(1, len(parts) + 1):
            need.add(".".join(parts[:i]))
    need &= set(by_path)
    if not need:
        return []
    objs = {id(by_path[p]): by_path[p] for p in need}
    inside: set[int] = {id(model)}
    for m in by_path.values():
        inside.add(id(m.__dict__))
        inside.add(id(m._modules))
        for v in m.__dict__.values():
            if isinstance(v, (list, tuple, dict, set)):
                inside.add(id(v))
    gc.collect()
    foreign: set[int] = set()
    import types

    for r in gc.get_referrers(*objs.values()):
        if id(r) in inside or isinstance(r, (types.FrameType, types.MethodType)):
            continue
        if isinstance(r, dict):
            vals = r.values()
        elif isinstance(r, (list, tuple, set, frozenset)):
            vals = r
        else:
            vals = [getattr(r, "cell_contents", None)] if isinstance(r, types.CellType) else []
        foreign.update(id(v) for v in vals if id(v) in objs)
    if not foreign:
        return []
    # clone a shared module and everything under it on the way to a hooked module
    clone_paths = sorted((p for p in need if any(id(by_path[q]) in foreign for q in _self_and_ancestors(p))),
                         key=lambda p: p.count("."))
    clone_ids = {id(by_path[p]) for p in clone_paths}
    memo: dict[int, nn.Module] = {}
    for p in sorted(by_path, key=lambda q: q.count(".")):
        if not p or id(by_path[p]) not in clone_ids:
            continue
        parent_path, _, name = p.rpartition(".")
        parent = _resolve(model, parent_path)
        orig = parent._modules.get(name)
        if orig is None or id(orig) not in clone_ids:
            continue
        if id(orig) not in memo:
            memo[id(orig)] = _shallow_clone(orig)
        parent._modules[name] = memo[id(orig)]
    # plain containers of the clones that listed the originals (self._acts = [self.act])
    for new in memo.values():
        for k, v in new.__dict__.items():
            if k == "_modules":
                continue
            if isinstance(v, list):
                new.__dict__[k] = [memo.get(id(e), e) for e in v]
            elif isinstance(v, dict):
                for kk, e in list(v.items()):
                    if id(e) in memo:
                        v[kk] = memo[id(e)]
    return clone_paths


def site_hook_paths(model: nn.Module, sites) -> set[str]:
    """Module paths that hooks or thresholds of ``sites`` go on (hosts, hooked calls, watched scopes)."""
    out: set[str] = set()
    scopes: set[str] = set()
    for s in sites:
        if s.apply == APPLY_OP:
            scopes.add(s.scope or "")
        target = target_param(getattr(s, "shift_into", None) or "")
        if target is not None:
            out.add(target[0])  # the module whose parameter the shift lowers
        out.add((s.scope or "") if s.apply == APPLY_OP else (s.module or ""))
    for p, _ in model.named_modules():
        if any(sc == "" or p == sc or p.startswith(sc + ".") for sc in scopes):
            out.add(p)
    return out


def _self_and_ancestors(p: str) -> list[str]:
    parts = p.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _resolve(model: nn.Module, path: str) -> nn.Module:
    m = model
    for part in path.split(".") if path else []:
        m = m._modules[part]
    return m
