"""Phase 4: the context of each site, in the paper's terms, and its advice.

For a site found in the graph: the *producer* of its pre-activation (BatchNorm, residual
add, learnable bias, hardtanh, pooling...), the *pool* between the previous weight layer
and the site (claim 3), the *follower* (PReLU / RPReLU / LeakyReLU after the binary layer
that consumes the site, claim 8), an existing *threshold* (learnable bias values), and
whether a shift can be *folded* into an existing parameter.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._guard import copy_model
from ._state import model_state
from .detect import Discovery, is_weight_layer
from .fold_targets import (_ADD, _TRANSPARENT_FUNCS, _TRANSPARENT_METHODS, _bias_add, _first_arg, _module,
                           _param_owner, _param_source, _preact_node, measure_bias_sign)
from .fold_targets import find_fold_targets as _fold_analysis
from .sites import APPLY_OP, APPLY_PRODUCER, KIND_MODULE, Site

__all__ = ["advice_for", "analyse", "classify_producer", "find_follower", "find_pool", "measure_bias_sign",
           "measure_shift_once"]

_POOL_MODULES = {nn.MaxPool1d: "MaxPool", nn.MaxPool2d: "MaxPool", nn.MaxPool3d: "MaxPool",
                 nn.AdaptiveMaxPool2d: "MaxPool", nn.AvgPool1d: "AvgPool", nn.AvgPool2d: "AvgPool",
                 nn.AvgPool3d: "AvgPool", nn.AdaptiveAvgPool2d: "AvgPool"}
_POOL_FUNCS = {F.max_pool1d: "MaxPool", F.max_pool2d: "MaxPool", F.adaptive_max_pool2d: "MaxPool",
               F.avg_pool1d: "AvgPool", F.avg_pool2d: "AvgPool", F.adaptive_avg_pool2d: "AvgPool"}
_WEIGHT_FUNCS = {F.conv1d, F.conv2d, F.conv3d, F.linear, torch.conv2d, torch.matmul}


def _is_weight_node(gm, node: fx.Node) -> bool:
    if node.op == "call_module":
        return is_weight_layer(_module(gm, node))
    return node.op == "call_function" and node.target in _WEIGHT_FUNCS


def _is_learnable_bias_module(m: nn.Module | None) -> bool:
    if m is None or is_weight_layer(m) or isinstance(m, nn.modules.batchnorm._BatchNorm):
        return False
    params = dict(m.named_parameters(recurse=False))
    return len(params) == 1 and next(iter(params.values())).dim() <= 4 and not list(m.children())


def _skip_transparent(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    cur = node
    for _ in range(16):
        if (cur.op == "call_method" and cur.target in _TRANSPARENT_METHODS) or \
                (cur.op == "call_function" and cur.target in _TRANSPARENT_FUNCS):
            nxt = _first_arg(cur)
            if nxt is None:
                break
            cur = nxt
        elif cur.op == "call_module" and isinstance(_module(gm, cur), (nn.Identity, nn.Dropout, nn.Flatten)):
            nxt = _first_arg(cur)
            if nxt is None:
                break
            cur = nxt
        else:
            break
    return cur


def classify_producer(gm: fx.GraphModule, node: fx.Node | None) -> tuple[str, str | None]:
    """(kind, module path) of what computes the pre-activation."""
    if node is None:
        return "unknown", None
    node = _skip_transparent(gm, node)
    if node.op == "placeholder":
        return "model input", None
    if node.op == "call_module":
        m = _module(gm, node)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return "BatchNorm", node.target
        if isinstance(m, nn.Hardtanh):
            return "hardtanh", node.target
        if isinstance(m, (nn.ReLU, nn.ReLU6)):
            return "ReLU", node.target
        if isinstance(m, nn.PReLU):
            return "PReLU", node.target
        if type(m) in _POOL_MODULES:
            return _POOL_MODULES[type(m)], node.target
        if _is_learnable_bias_module(m):
            return "learnable bias", node.target
        if is_weight_layer(m):
            return f"weight layer ({type(m).__name__})", node.target
        return type(m).__name__, node.target
    ba = _bias_add(node)
    if ba is not None:
        return "learnable bias", _param_owner(ba[1])
    if node.op == "call_function":
        if node.target in _ADD or node.target is torch.Tensor.add:
            a = [x for x in node.args if isinstance(x, fx.Node) and _param_source(x) is None]
            return ("residual add" if len(a) >= 2 else "add"), None
        if node.target is F.hardtanh:
            return "hardtanh", None
        if node.target in _POOL_FUNCS:
            return _POOL_FUNCS[node.target], None
        if node.target in (F.batch_norm,):
            return "BatchNorm", None
        return getattr(node.target, "__name__", str(node.target)), None
    if node.op == "call_method":
        if node.target in ("add", "add_", "__add__"):
            a = [x for x in node.args if isinstance(x, fx.Node) and _param_source(x) is None]
            return ("residual add" if len(a) >= 2 else "add"), None
        if node.target in ("div", "clamp"):
            return f"{node.target}", None
        return str(node.target), None
    return node.op, None


def find_pool(gm: fx.GraphModule, node: fx.Node | None) -> str | None:
    """MaxPool / AvgPool on the path from the previous weight layer to the site, if any."""
    cur = node
    for _ in range(24):
        if cur is None or cur.op in ("placeholder", "get_attr"):
            return None
        if _is_weight_node(gm, cur):
            return None
        if cur.op == "call_module":
            m = _module(gm, cur)
            if type(m) in _POOL_MODULES:
                return _POOL_MODULES[type(m)]
        elif cur.op == "call_function" and cur.target in _POOL_FUNCS:
            return _POOL_FUNCS[cur.target]
        cur = _first_arg(cur)
    return None


def find_follower(gm: fx.GraphModule, node: fx.Node, site_nodes: set[fx.Node]) -> tuple[str | None, float | None]:
    """PReLU / RPReLU / LeakyReLU after the binary layer that consumes the site.

    Breadth-first over the users of the site, each path remembering whether it went through
    a weight layer; a path stops at a second weight layer or at another site.
    """
    frontier: list[tuple[fx.Node, bool]] = [(node, False)]
    seen: set[tuple[fx.Node, bool]] = set()
    steps = 0
    while frontier and steps < 200:
        cur, passed = frontier.pop(0)
        steps += 1
        for u in cur.users:
            if (u, passed) in seen or (u in site_nodes and u is not node):
                continue
            seen.add((u, passed))
            nxt_passed = passed
            if u.op == "call_module":
                m = _module(gm, u)
                if passed and isinstance(m, nn.PReLU):
                    scope_names = [v[1].__name__ for v in (u.meta.get("nn_module_stack") or {}).values()
                                   if isinstance(v, tuple) and isinstance(v[1], type)]
                    kind = "RPReLU" if any("RPReLU" in n for n in scope_names) else "PReLU"
                    return kind, float(m.weight.detach().mean())
                if passed and isinstance(m, nn.LeakyReLU):
                    return "LeakyReLU", float(m.negative_slope)
                if passed and isinstance(m, (nn.ReLU, nn.ReLU6)):
                    return "ReLU", 0.0
                if is_weight_layer(m):
                    if passed:
                        continue
                    nxt_passed = True
            elif u.op == "call_function":
                if passed and u.target is F.leaky_relu:
                    slope = u.args[1] if len(u.args) > 1 else u.kwargs.get("negative_slope", 0.01)
                    return "LeakyReLU", float(slope) if isinstance(slope, (int, float)) else None
                if passed and u.target is F.prelu:
                    return "PReLU", None
                if u.target in _WEIGHT_FUNCS:
                    if passed:
                        continue
                    nxt_passed = True
            frontier.append((u, nxt_passed))
    return None, None


def advice_for(site: Site) -> list[str]:
    out: list[str] = []
    if site.follower in ("PReLU", "RPReLU"):
        out.append(f"{site.follower} follows the binary layer: the distribution is already skewed, shifting likely hurts (claim 8)")
    elif site.follower == "LeakyReLU" and site.follower_slope is not None and site.follower_slope < 0.9:
        out.append(f"LeakyReLU(slope {site.follower_slope:g}) follows: shifting helps less the lower the slope (claim 8)")
    if site.pool == "MaxPool":
        out.append("after MaxPool: already unbalanced towards -1; search t >= 0 (claims 2-3)")
    elif site.pool == "AvgPool":
        out.append("after AvgPool: the accuracy curve is symmetric; search both signs of t (claim 3)")
    if site.foldable and site.foldable.startswith("bias:"):
        out.append(f"t folds into the learnable bias {site.foldable[5:]} at zero inference cost")
    elif site.producer == "residual add" and not site.foldable:
        out.append("input is the residual stream: t needs its own subtraction (cannot fold); a compare-with-t is free on XNOR hardware")
    if site.own_threshold is not None:
        out.append("a learnable threshold exists: a fixed shift only sets its init, which decides the result (claim 7)")
    if site.alphabet == "{0,1}":
        out.append("Heaviside {0,1}: the shift means x > t")
    if site.producer == "BatchNorm" and site.foldable and site.foldable.startswith("bn:"):
        out.append("BatchNorm before: t folds into the BN bias (beta - t) at zero inference cost")
    if not out:
        out.append("search t in [-1, 2] (claim 2: best t = 1.2 for binary vgg-small on CIFAR-10)")
    return out




def _flat_tensors(y: Any) -> list[torch.Tensor]:
    out, stack = [], [y]
    while stack:
        v = stack.pop(0)
        if isinstance(v, torch.Tensor):
            out.append(v.detach())
        elif isinstance(v, (tuple, list)):
            stack[:0] = list(v)
        elif isinstance(v, dict):
            stack[:0] = list(v.values())
    return out


@contextlib.contextmanager
def _same_noise(seed: int = 0):
    """Every forward that is compared with another draws the same random numbers: a stochastic
    binarizer (``sign(x + noise)``, stochastic rounding) then differs between two runs only by
    what the comparison changes (the global RNG state is restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check_producer_hooks(disc: Discovery, model: nn.Module, t: float = 0.5) -> None:
    """A shift on a producer's output must move only its binarizer's input: measured, not assumed.

    The graph can miss a reader (another output of a multi-output ``Function`` re-joining the
    binarizer's output, a call outside the traced graph). So the model is run with ``t`` on each
    producer and with ``t`` on the op itself (which moves only the binarizer's input); a site
    whose forward outputs differ is moved onto its op, with a warning.
    """
    from .shift import insert_shifts

    prod = [s for s in disc.sites if s.apply == APPLY_PRODUCER]
    root = next((r for r in disc.dyn.calls if r.path == ""), None)
    if not prod or root is None or not root.inp.is_tensor or not root.inp.is_float:
        return
    x = torch.randn(root.inp.shape, generator=torch.Generator().manual_seed(4321))

    def on_op(s: Site) -> Site:
        c = copy.copy(s)
        c.apply, c.module, c.call_index = APPLY_OP, None, 0
        return c

    def run(sites: list[Site]) -> list[torch.Tensor]:
        m = copy_model(model).eval()
        insert_shifts(m, sites, {s.name: t for s in sites})
        with torch.no_grad(), _same_noise():
            return _flat_tensors(m(x.to(next(iter(m.parameters())).dtype) if any(True for _ in m.parameters()) else x))

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return len(a) == len(b) and all(
            u.shape == v.shape and (torch.allclose(u.double(), v.double(), atol=1e-5 * max(1.0, float(u.abs().max())),
                                                   rtol=1e-5) if u.is_floating_point() and u.numel() else torch.equal(u, v))
            for u, v in zip(a, b))

    try:
        if same(run(prod), run([on_op(s) for s in prod])):
            return
        bad = [s for s in prod if not same(run([s]), run([on_op(s)]))]
    except Exception:  # noqa: BLE001 - cannot measure: keep the graph's decision
        return
    for s in bad:
        s.apply, s.module, s.call_index, s.producer_module = APPLY_OP, None, 0, None
        disc.warnings.append(f"site {s.name}: the producer's output is also read elsewhere (measured); "
                             "the shift is applied to the binarizer's own input")


def _check_lowering(disc: Discovery, model: nn.Module, t: float = 0.5) -> None:
    """A shift applied by lowering the fold target (``Site.shift_into``) must move the model as
    ``x - t`` where ``apply`` says does: measured on a random batch (float64 where the model
    runs in it, else to float tolerance); a site that differs loses ``shift_into``, with a warning."""
    from .shift import insert_shifts

    low = [s for s in disc.sites if s.shift_into]
    root = next((r for r in disc.dyn.calls if r.path == ""), None)
    if not low or root is None or not root.inp.is_tensor or not root.inp.is_float:
        return
    x = torch.randn(root.inp.shape, generator=torch.Generator().manual_seed(4321))

    def plain(s: Site) -> Site:
        c = copy.copy(s)
        c.shift_into = None
        return c

    def run(sites: list[Site], dtype) -> list[torch.Tensor]:
        m = copy_model(model).eval()
        if dtype is not None:
            m = m.to(dtype)
        insert_shifts(m, sites, {s.name: t for s in sites})
        p = next(iter(m.parameters()), None)
        with torch.no_grad(), _same_noise():
            return _flat_tensors(m(x.to(p.dtype) if p is not None else x))

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return len(a) == len(b) and all(
            u.shape == v.shape and (torch.allclose(u.double(), v.double(), atol=1e-5 * max(1.0, float(u.abs().max())),
                                                   rtol=1e-5) if u.is_floating_point() and u.numel() else torch.equal(u, v))
            for u, v in zip(a, b))

    try:
        try:
            dtype = torch.float64
            ref = run([plain(s) for s in low], dtype)
        except Exception:  # noqa: BLE001 - the model does not run in float64
            dtype = None
            ref = run([plain(s) for s in low], dtype)
        if same(ref, run(low, dtype)):
            return
        bad = [s for s in low if not same(run([plain(s)], dtype), run([s], dtype))]
    except Exception as exc:  # noqa: BLE001 - cannot measure: do not rely on the lowering
        bad = low
        disc.warnings.append(f"lowering fold targets at run time could not be checked ({type(exc).__name__}); "
                             "their shifts stay x - t hooks")
        for s in bad:
            s.shift_into = None
        return
    for s in bad:
        disc.warnings.append(f"site {s.name}: lowering {s.shift_into} by t does not move the model as x - t "
                             "does (measured); the shift stays a hook and is not folded")
        s.shift_into, s.foldable, s.fold_with, s.bias_sign = None, None, None, None
        s.fold_reason = f"lowering the fold target by t does not act as x - t (measured)"


def _first_tensor(v: Any) -> torch.Tensor | None:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, (tuple, list)) and v and isinstance(v[0], torch.Tensor):
        return v[0]
    return None


class _Recorded:
    """Wraps one shift handler of the patch: records the value its hook shifts (``before``)."""

    def __init__(self, name: str, handler: Any, store: dict[str, torch.Tensor], output: bool = False,
                 calls: dict[str, tuple] | None = None):
        self.name, self.handler, self.store, self.output, self.calls = name, handler, store, output, calls

    def __call__(self, module, arg):
        v = _first_tensor(arg) if self.output else (_first_tensor(arg[0]) if arg else None)
        if v is not None and self.name not in self.store:
            self.store[self.name] = v.detach().clone()
            if self.calls is not None and not self.output and isinstance(arg[0], torch.Tensor):
                self.calls[self.name] = (module, tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a
                                                       for a in arg))
        return self.handler(module, arg)


def _invariant_calls(calls: dict[str, tuple]) -> set[str]:
    """Names of hooked module calls (``calls``: name -> (module, args) of that call) whose output is
    the same for their input ``x`` and ``x - s`` at every shift ``s`` tried."""
    invariant: set[str] = set()
    for name, (mod, args) in calls.items():
        # shifts that move a threshold anywhere in the input's range across many values (its
        # quartiles) and past all of them: a binarizer whose output stays the same for all of
        # them reads a shift-invariant input, not one that a shift of t happens not to flip
        v = args[0].detach().double().reshape(-1)
        if v.numel() < 2 or not v.is_floating_point():
            continue
        span = float(v.max() - v.min()) + 1.0
        shifts = [float(q) for q in torch.quantile(v[:: max(1, v.numel() // 100_000)], torch.tensor(
            [0.25, 0.5, 0.75], dtype=torch.float64))] + [span, -span]
        try:
            with torch.no_grad(), _same_noise():
                y0 = _runtime_binary(mod(*args))
            same = True
            for tv in shifts:
                with torch.no_grad(), _same_noise():
                    y1 = _runtime_binary(mod(args[0] - tv, *args[1:]))
                if not (isinstance(y0, torch.Tensor) and isinstance(y1, torch.Tensor) and y0.shape == y1.shape
                        and torch.equal(y0, y1)):
                    same = False
                    break
        except Exception:  # noqa: BLE001 - the module does not run alone: not measured here
            continue
        if same:
            invariant.add(name)
    return invariant


def _plain_copies(sites: list[Site]) -> list[Site]:
    """Copies of ``sites`` whose shift is a plain ``x - t`` hook (a lowered fold target is
    checked against the plain hook by ``_check_lowering``)."""
    plain = []
    for s in sites:
        c = copy.copy(s)
        c.shift_into = None
        plain.append(c)
    return plain


def _wrap_handlers(rt: Any, plain: list[Site], before: dict[str, torch.Tensor],
                   calls: dict[str, tuple] | None) -> None:
    """Replace each site's shift handler in ``rt`` by a :class:`_Recorded` that stores the value
    its hook shifts in ``before`` (and, with ``calls``, each hooked module call's arguments)."""
    for d, out in ((rt.pre_call, False), (rt.post_call, True), (rt.op_handlers, False)):
        for key, h in list(d.items()):
            name = next((s.name for s in plain if _handler_key(s) == (d is rt.op_handlers, d is rt.post_call, key)),
                        None)
            if name is not None:
                d[key] = _Recorded(name, h, before, out, calls if d is rt.pre_call else None)


def _watch_binarizer_inputs(rt: Any, m: nn.Module, plain: list[Site], after: dict[str, torch.Tensor]) -> list:
    """Record in ``after`` the value that reaches each site's binarizer: an op site's used input
    (``rt.record_ops``), a module call's first argument after every hook ran (one more forward
    pre-hook, registered last). Returns the handles of the extra hooks."""
    op_sites: dict[tuple, list[str]] = {}
    call_sites: dict[tuple, list[str]] = {}
    for s in plain:
        on_op = s.scope is not None and s.kind != KIND_MODULE
        (op_sites if on_op else call_sites).setdefault(
            (s.scope or "", s.op_index) if on_op else (s.module, s.call_index), []).append(s.name)
    rt.watch_scopes = set(rt.watch_scopes or ()) | {sc for sc, _ in op_sites}

    def record(ev):
        v = _first_tensor(ev.used_inputs[0]) if ev.used_inputs else None
        for name in op_sites.get((ev.scope, ev.index), ()):
            if v is not None and name not in after:
                after[name] = v.detach().clone()

    rt.record_ops = record
    for key in call_sites:
        rt.pre_call.setdefault(key, lambda module, args: None)
    rt.install(apply_wrapper=True)
    mods = dict(m.named_modules())
    extra = []
    for (p, k), names in call_sites.items():
        def after_hooks(module, args, _p=p, _k=k, _names=names):
            v = _first_tensor(args[0]) if args else None
            if rt.call_counts.get(_p, 0) - 1 == _k and v is not None:
                for name in _names:
                    after.setdefault(name, v.detach().clone())
        extra.append(mods[p].register_forward_pre_hook(after_hooks))
    return extra


def _shifted_forward(model: nn.Module, plain: list[Site], x: torch.Tensor, tv: float,
                     calls: dict[str, tuple] | None) -> tuple[dict, dict]:
    """One forward of a copy of ``model`` with every site of ``plain`` shifted by ``tv``:
    (value each hook shifted, value that reached each binarizer), by site name."""
    from ._runtime import SiteRuntime
    from .shift import insert_shifts

    m = copy_model(model).eval()
    insert_shifts(m, plain, {s.name: tv for s in plain})
    rt: SiteRuntime = model_state(m).shift.runtime
    rt.remove()
    before: dict[str, torch.Tensor] = {}
    after: dict[str, torch.Tensor] = {}
    _wrap_handlers(rt, plain, before, calls)
    extra = _watch_binarizer_inputs(rt, m, plain, after)
    try:
        p0 = next(iter(m.parameters()), None)
        with torch.no_grad(), _same_noise():
            m(x.to(p0.dtype) if p0 is not None and p0.is_floating_point() else x)
    finally:
        for h in extra:
            h.remove()
        rt.remove()
    return before, after


def _shift_verdict(name: str, b0: dict, a0: dict, b1: dict, a1: dict, t: float) -> str | float:
    """One site's entry of :func:`measure_shift_once` from the unshifted (``b0``, ``a0``) and the
    shifted (``b1``, ``a1``) forwards' hook values and binarizer inputs."""
    if name not in b1:
        return "not fired"
    if name not in a1 or name not in a0 or name not in b0:
        return "not measured"
    if a0[name].shape != b0[name].shape or not torch.equal(a0[name], b0[name]):
        return "indirect"
    if a1[name].shape != b1[name].shape or not a1[name].is_floating_point():
        return "not measured"
    d = (b1[name].double() - a1[name].double()) / t
    k = float(d.median())
    tol = 1e-4 * max(1.0, float(b1[name].abs().max()))
    return 1.0 if torch.allclose(a1[name].double(), b1[name].double() - t, atol=tol, rtol=0) else round(k, 3)


def measure_shift_once(model: nn.Module, sites: list[Site], x: torch.Tensor, t: float = 0.5) -> dict[str, str | float]:
    """How far the patch moves each site's binarizer input: every site shifted by ``t`` at once,
    the patch's own hooks (``shift.insert_shifts`` on a copy), one forward on ``x``.

    Per site name: ``1.0`` when the value reaching the binarizer is exactly the value its hook
    shifted minus ``t`` (once); ``k`` (e.g. ``2.0``) when another hook shifted the same value
    too; ``"not fired"`` when the site's hook did not run; ``"indirect"`` when the hook's value is
    not the binarizer's input (the module transforms it first, e.g. standardises it: a shift of
    ``t`` then moves it by another amount by design); ``"invariant"`` when a hooked module
    call's output is the same for its input ``x`` and ``x - s`` for shifts ``s`` at the
    quartiles of ``x`` and past its whole range (a softmax or a normalisation before its
    threshold: no shift changes anything); ``"not measured"`` when the binarizer's
    input was not seen. Raises whatever the model raises.
    """
    plain = _plain_copies(sites)
    calls: dict[str, tuple] = {}
    b0, a0 = _shifted_forward(model, plain, x, 0.0, calls)
    invariant = _invariant_calls(calls)
    calls.clear()  # the first copy's modules: freed before the second copy is made (memory)
    b1, a1 = _shifted_forward(model, plain, x, t, None)
    return {s.name: "invariant" if s.name in invariant else _shift_verdict(s.name, b0, a0, b1, a1, t)
            for s in plain}


def _runtime_binary(y: Any) -> Any:
    from ._runtime import binary_part

    return binary_part(y)


def _handler_key(s: Site) -> tuple[bool, bool, tuple]:
    """(is op handler, is post-call handler, address key) of the hook ``insert_shifts`` gives ``s``."""
    if s.apply == APPLY_OP:
        return (True, False, (s.scope or "", s.op_index))
    if s.apply == APPLY_PRODUCER:
        return (False, True, (s.module, s.call_index))
    return (False, False, (s.module, s.call_index))


def _check_shift_once(disc: Discovery, model: nn.Module, t: float = 0.5) -> None:
    """Prove that the patch moves every site's binarizer input by exactly ``t``, never ``2t``
    (``measure_shift_once``); a site whose input moves by another multiple of ``t`` shares its
    value with another site's hook and is left out, with a warning. Sites whose hook did not
    run keep ``fired`` for the probe to decide."""
    root = next((r for r in disc.dyn.calls if r.path == ""), None)
    if not disc.sites or root is None or not root.inp.is_tensor or not root.inp.is_float:
        return
    x = torch.randn(root.inp.shape, generator=torch.Generator().manual_seed(4321))
    try:
        res = measure_shift_once(model, disc.sites, x, t)
    except Exception as exc:  # noqa: BLE001 - the model does not run patched on a copy: say so
        disc.warnings.append(f"the shift of each site could not be measured ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120] if str(exc) else ''})")
        return
    bad = {n: k for n, k in res.items() if isinstance(k, float) and k != 1.0}
    for s in list(disc.sites):
        if res.get(s.name) == "invariant":
            reason = ("shift-invariant input: its output is the same for x and x - s at every shift s tried (its "
                      "input's quartiles and past its range; measured): a softmax or a normalisation before its "
                      "threshold, so a shift there changes nothing; left at t = 0")
            disc.warnings.append(f"site {s.name} ({s.op}, {s.alphabet}): {reason}")
        elif s.name in bad:
            reason = (f"a shift of t there moves its binarizer's input by {bad[s.name]:g}t (measured): another site "
                      "already shifts the same value; left at t = 0")
            disc.warnings.append(f"site {s.name}: {reason}")
        else:
            continue
        disc.sites.remove(s)
        disc.excluded.append({"name": s.name, "op": s.op, "alphabet": s.alphabet, "reason": reason})


def analyse(disc: Discovery, model: nn.Module) -> list[Site]:
    """Fill in the context fields of every site of ``disc`` (in place); returns the sites.

    Fold targets come from the data flow (``_fold_analysis``): ``foldable`` is set only where a
    fold moves exactly the values the hook moves and every use of the target is such a site.
    """
    gm = disc.trace.graph_module if disc.trace is not None else None
    site_nodes = set(disc.node_of_site.values())
    _check_producer_hooks(disc, model)
    for s in disc.sites:
        node = disc.node_of_site.get(s.name)
        if node is None or gm is None:
            if s.in_leaf:
                s.producer = f"inside untraced leaf {s.in_leaf}"
                s.fold_reason = s.fold_reason or "found inside an untraced module: context unknown"
            continue
        pre = _preact_node(s, node, gm)
        s.producer, _ = classify_producer(gm, pre)
        s.pool = find_pool(gm, pre)
        s.follower, s.follower_slope = find_follower(gm, node, site_nodes)
    try:
        _fold_analysis(disc, model)
    except Exception as exc:  # noqa: BLE001 - a model the analysis cannot read: no fold, said
        for s in disc.sites:
            s.foldable, s.fold_with, s.bias_sign, s.shift_into = None, None, None, None
            s.fold_reason = f"fold analysis failed ({type(exc).__name__}): hooks kept"
        disc.warnings.append(f"fold analysis failed ({type(exc).__name__}: {str(exc)[:120]}); every shift stays a hook")
    _check_lowering(disc, model)
    _check_shift_once(disc, model)
    for s in disc.sites:
        if not s.foldable and not s.fold_reason:
            if s.producer == "residual add":
                s.fold_reason = "the pre-activation is the residual stream (also feeds the shortcut)"
            elif s.producer == "BatchNorm":
                s.fold_reason = "the BatchNorm output also feeds other layers, or the BN has no affine bias"
            else:
                s.fold_reason = f"producer {s.producer} has no bias to absorb t, or feeds other layers"
        s.advice = advice_for(s)
    return disc.sites
