"""Phase 4 (fold targets): where each site's shift can be folded, found from the data flow.

A fold moves t out of the hook into a parameter: the shift then happens where the parameter
enters the data flow, for *every* reader of that value and at *every* use of the parameter.
It equals the hooked model only when both shift the same values. So, per site:

1. the *bias chain*: from the binarizer's input back through ops that commute with
   subtracting a constant (reshapes, identity, ``x + b`` / ``x - b`` with b a parameter) to
   the first op that does not (a BN, a conv, a residual add). Each parameter add on it and
   an affine BN at its root are candidate targets;
2. where the hook shifts (the edge into the binarizer, the conv's input, the producer's
   whole output) and where a fold at each candidate shifts (the candidate's whole output),
   both pushed downstream while the value has exactly one reader: equal end points means
   the same values move;
3. every use of the candidate parameter or BN module in the graph (every get_attr, every
   call of the module, every untraced leaf that owns it) must be such an exact fold point
   of a site; those sites form the fold group (folded together, only with equal t).

The binarizer module's own parameters (RSign written as one module) are tried first, by
measurement: the parameter whose change by -d moves the module's output exactly as
shifting its input by d does is the additive one (centre, not scale; declaration order
does not matter); its values are the site's *own threshold*. ``fold.fold_shifts`` then
proves every fold on a probe batch.

Entry point: :func:`find_fold_targets` (``analyse.analyse`` calls it); :func:`measure_bias_sign`
is also used by ``fold``.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._guard import copy_model
from .detect import Discovery, _closure, node_scope
from .shift import fold_param
from .sites import APPLY_OP, APPLY_PRE_HOOK, APPLY_PRODUCER, KIND_INPUT, KIND_MODULE, Site, target_param

# ops that pass values through unchanged (also used by ``analyse`` to skip to the producer)
_TRANSPARENT_METHODS = {"view", "reshape", "flatten", "contiguous", "clone", "float", "to", "type_as", "squeeze",
                        "unsqueeze", "detach"}
_TRANSPARENT_FUNCS = {torch.flatten, torch.reshape, F.dropout, torch.clone}
_ADD = {operator.add, operator.iadd, torch.add}
_SUB = {operator.sub, operator.isub, torch.sub}
# ops that give a parameter's own values another shape or dtype (never change them)
_RESHAPE_METHODS = {"view", "reshape", "expand", "expand_as", "unsqueeze", "squeeze", "contiguous", "float",
                    "to", "type_as", "view_as", "reshape_as", "clone", "detach", "double", "half"}
_RESHAPE_FUNCS = {torch.reshape, torch.unsqueeze, torch.squeeze, torch.clone}
# methods whose second argument is read for its shape / dtype only
_SHAPE_ARG_METHODS = {"expand_as", "view_as", "reshape_as", "type_as"}
_SHAPE_READS = {"size", "dim", "numel", "shape", "dtype", "device"}


def _param_source(node: Any) -> str | None:
    """The ``get_attr`` target when ``node`` is one parameter/buffer, reshaped or broadcast only."""
    cur = node
    for _ in range(8):
        if not isinstance(cur, fx.Node):
            return None
        if cur.op == "get_attr":
            return str(cur.target)
        if (cur.op == "call_method" and cur.target in _RESHAPE_METHODS) or \
                (cur.op == "call_function" and cur.target in _RESHAPE_FUNCS):
            cur = cur.args[0] if cur.args else None
            continue
        return None
    return None


def _param_owner(target: str) -> str | None:
    return target.rpartition(".")[0] or None


def _bias_add(node: fx.Node) -> tuple[fx.Node, str, int] | None:
    """(activation operand, parameter target, +1 for ``x + b`` / -1 for ``x - b``) when ``node``
    adds one parameter (any spelling: ``x + b``, ``b + x``, ``x + b.expand_as(x)``, ``x - b``,
    ``torch.add``, ``x.add(b)``) to a value that is not itself a parameter; else None."""
    if node.op == "call_function" and (node.target in _ADD or node.target is torch.Tensor.add):
        bias_sign = +1
    elif node.op == "call_method" and node.target in ("add", "add_", "__add__", "__radd__"):
        bias_sign = +1
    elif node.op == "call_function" and (node.target in _SUB or node.target is torch.Tensor.sub):
        bias_sign = -1
    elif node.op == "call_method" and node.target in ("sub", "sub_", "__sub__"):
        bias_sign = -1
    else:
        return None
    if len(node.args) < 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args[0], node.args[1]
    pa, pb = _param_source(a), _param_source(b)
    if isinstance(a, fx.Node) and pa is None and pb is not None:
        return a, pb, bias_sign
    if bias_sign > 0 and isinstance(b, fx.Node) and pb is None and pa is not None:
        return b, pa, bias_sign
    return None


def _value_users(node: fx.Node) -> set[fx.Node]:
    """Users that read ``node``'s values (not only its shape: ``b.expand_as(node)``, ``node.size()``)."""
    out = set()
    for u in node.users:
        if u.op == "call_method" and u.target in _SHAPE_READS:
            continue
        if u.op == "call_function" and u.target is getattr and len(u.args) > 1 and u.args[1] in _SHAPE_READS:
            continue
        if u.op == "call_method" and u.target in _SHAPE_ARG_METHODS and u.args and u.args[0] is not node \
                and node not in u.args[:1]:
            continue
        out.add(u)
    return out


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return gm.get_submodule(node.target)
    except AttributeError:
        return None


def _first_arg(node: fx.Node) -> fx.Node | None:
    for a in node.args:
        if isinstance(a, fx.Node):
            return a
    return None


def _preact_node(site: Site, node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The node whose value is the site's pre-activation (before the binarizer)."""
    if site.kind == KIND_INPUT:
        # walk back to the first node outside the conv's scope
        from .detect import node_scope

        cur = _first_arg(node)
        while cur is not None:
            s, _ = node_scope(cur)
            if not (s == site.module or s.startswith(site.module + ".")) or cur.op == "placeholder":
                return cur
            cur = _first_arg(cur)
        return None
    return _first_arg(node)


def _own_threshold_stats(t: torch.Tensor) -> dict[str, float]:
    t = t.detach().float()
    return {"mean": float(t.mean()), "min": float(t.min()), "max": float(t.max()), "numel": int(t.numel())}




class _Link:
    __slots__ = ("node", "target")

    def __init__(self, node: fx.Node, target: tuple[str, str, int] | None):
        self.node, self.target = node, target  # target: ("bias", "path.param", bias sign) / ("bn", path, +1)


_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
              nn.AdaptiveMaxPool3d)
_MAX_POOL_FUNCS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                   F.adaptive_max_pool3d}


def _transparent(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops that commute with subtracting a per-channel constant (max(y - t) = max(y) - t: max
    pooling pads with -inf; average pooling counting zero padding does not commute)."""
    if node.op == "call_method" and node.target in _TRANSPARENT_METHODS:
        return True
    if node.op == "call_function" and (node.target in _TRANSPARENT_FUNCS or node.target in _MAX_POOL_FUNCS):
        return True
    return node.op == "call_module" and isinstance(_module(gm, node), (nn.Identity, nn.Dropout, nn.Flatten)
                                                   + _MAX_POOLS)


def _bias_chain(gm: fx.GraphModule, start: fx.Node | None, mods: dict[str, nn.Module]) -> list[_Link]:
    chain: list[_Link] = []
    cur = start
    for _ in range(32):
        if not isinstance(cur, fx.Node):
            break
        ba = _bias_add(cur)
        if ba is not None:
            chain.append(_Link(cur, ("bias", ba[1], ba[2])))
            cur = ba[0]
            continue
        if _transparent(gm, cur):
            chain.append(_Link(cur, None))
            cur = _first_arg(cur)
            continue
        m = mods.get(str(cur.target)) if cur.op == "call_module" else None
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.bias is not None:
            chain.append(_Link(cur, ("bn", str(cur.target), +1)))
        elif isinstance(m, _AFFINE_LEAVES) and isinstance(getattr(m, "bias", None), nn.Parameter):
            chain.append(_Link(cur, ("bias", f"{cur.target}.bias", +1)))  # W x + b, LayerNorm's beta
        else:
            fb = _functional_bias(cur)
            chain.append(_Link(cur, ("bias", fb, +1) if fb is not None else None))
        break
    return chain


# Modules whose output is ``f(x) + bias`` with one bias value per output feature / channel, added
# last: sign(f(x) + b - t) = sign(f(x) + (b - t)), so the bias absorbs t exactly.
_AFFINE_LEAVES = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.LayerNorm, nn.GroupNorm)
# functional spellings: (function, position of the bias argument)
_FUNCTIONAL_BIAS = {F.linear: 2, F.conv1d: 2, F.conv2d: 2, F.conv3d: 2, F.conv_transpose1d: 2,
                    F.conv_transpose2d: 2, F.conv_transpose3d: 2, F.layer_norm: 3, F.group_norm: 3,
                    torch.conv1d: 2, torch.conv2d: 2, torch.conv3d: 2, torch.layer_norm: 3, torch.group_norm: 3}


def _functional_bias(node: fx.Node) -> str | None:
    """The parameter target of the bias of ``F.linear`` / ``F.conv*d`` / ``F.layer_norm`` /
    ``F.group_norm`` (a binary linear layer calling ``F.linear(x, sign(W), self.bias)``) when that
    bias is one parameter; else None."""
    if node.op != "call_function" or node.target not in _FUNCTIONAL_BIAS:
        return None
    i = _FUNCTIONAL_BIAS[node.target]
    b = node.args[i] if len(node.args) > i else node.kwargs.get("bias")
    return _param_source(b) if isinstance(b, fx.Node) else None


def _ste_siblings(x: fx.Node, site_node: fx.Node, mods: dict[str, nn.Module]) -> set[fx.Node]:
    """Readers of the binarizer's input that re-join its output (the other half of an inline
    STE, ``h + (sign(x) - h).detach()``): part of the binarizer, not other consumers."""
    outs = [u for u in site_node.users]
    if outs and all(u.op == "call_function" and u.target is operator.getitem for u in outs):
        # a multi-output Function: only its binary output (index 0) is the binarizer's; a reader
        # re-joining another output (a scale, a clipped copy) is another consumer
        site_closure = {site_node}
        for u in outs:
            if len(u.args) > 1 and u.args[1] == 0:
                site_closure |= _closure(u, mods) | {u}
    else:
        site_closure = _closure(site_node, mods) | {site_node}
    return {u for u in x.users if u is not site_node and (_closure(u, mods) | {u}) & site_closure}


def _readers(chain: list[_Link], j: int, site_node: fx.Node, mods) -> set[fx.Node]:
    node = chain[j].node
    us = _value_users(node)
    if j == 0:
        us -= _ste_siblings(node, site_node, mods)
    return us


def _normalise(chain: list[_Link], state: tuple[str, int], site_node: fx.Node, mods) -> tuple[str, int]:
    """Push a shift downstream while it is the same set of values: ("whole", j) = every reader of
    chain[j] sees it; ("edge", j) = only chain[j-1] (the binarizer for j = 0) sees it."""
    kind, j = state
    for _ in range(2 * len(chain) + 2):
        if kind == "whole":
            nxt = chain[j - 1].node if j > 0 else site_node
            if _readers(chain, j, site_node, mods) == {nxt}:
                kind = "edge"
            else:
                return kind, j
        else:
            if j == 0:
                return kind, j
            kind, j = "whole", j - 1
    return kind, j


def _in_scope(node: fx.Node, scope: str | None) -> bool:
    s, _ = node_scope(node)
    return bool(scope) and (s == scope or s.startswith(scope + "."))


def _hook_state(s: Site, node: fx.Node, chain: list[_Link], gm: fx.GraphModule, mods) -> tuple[str, int] | str:
    """Where the hook of ``s`` shifts, in chain coordinates, or why that is not on the chain."""
    index = {l.node: i for i, l in enumerate(chain)}
    if s.apply == APPLY_OP or (s.apply == APPLY_PRE_HOOK and s.kind == KIND_MODULE):
        return ("edge", 0)
    if s.apply == APPLY_PRODUCER:
        p = _first_arg(node)
        return ("whole", index[p]) if p in index else "the shifted producer is not on the pre-activation's path"
    if s.kind == KIND_INPUT:
        x = _preact_node(s, node, gm)
        if x not in index:
            return "the conv's input reaches its binarizer through ops that do not commute with a shift"
        j = index[x]
        inside = {u for u in _value_users(x) if _in_scope(u, s.module)}
        if j == 0:
            inside -= _ste_siblings(x, node, mods)
        if inside != ({chain[j - 1].node} if j > 0 else {node}):
            return "the conv reads its input elsewhere too (the shift moves more than the binarizer)"
        return ("edge", j)
    return "unknown placement"


def _resolve(model: nn.Module, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    try:
        m = model.get_submodule(owner) if owner else model
    except AttributeError:
        return None
    return getattr(m, name, None)


def measure_bias_sign(module: nn.Module, param: torch.Tensor, x: torch.Tensor) -> int | None:
    """+1 if ``module(x)`` depends on ``param`` as ``x + b``, -1 as ``x - b``, None otherwise.

    Shifting the input by -d must equal moving the parameter by -d (or +d) on >= 99.9% of the
    outputs (a binary output flips only where the two differ by rounding at the threshold), and
    moving the parameter must change the output at all.
    """
    d = 0.37
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            ref = module.forward(x - d)
            base = module.forward(x)
            if not isinstance(ref, torch.Tensor) or not isinstance(base, torch.Tensor):
                return None
            ok = []
            for bias_sign in (+1, -1):
                saved = param.detach().clone()
                param.sub_(bias_sign * d)
                try:
                    out = module.forward(x)
                finally:
                    param.copy_(saved)
                ok.append(isinstance(out, torch.Tensor) and out.shape == ref.shape
                          and bool(torch.isclose(out, ref, atol=1e-5, rtol=1e-5).float().mean() > 0.999))
            changed = not torch.allclose(base, ref)
    except Exception:  # noqa: BLE001 - any failure means "cannot tell"
        return None
    finally:
        module.train(was)
    if not changed:
        return None
    if ok[0] and not ok[1]:
        return +1
    if ok[1] and not ok[0]:
        return -1
    return None


def _own_additive_param(model: nn.Module, path: str, in_shape: tuple[int, ...] | None) -> tuple[str, int] | None:
    """(parameter name, bias sign) of the binarizer module's additive parameter, found by measurement."""
    if not in_shape or len(in_shape) < 2:
        return None
    m = copy_model(model.get_submodule(path))  # measured on a copy: a forward may write its own weights
    g = torch.Generator().manual_seed(1234)
    for name, p in m.named_parameters():
        if not p.is_floating_point() or p.numel() > 65536:
            continue
        if p.numel() != 1 and in_shape[1] not in p.shape:
            continue  # not per-channel on dim 1: not a threshold
        x = (torch.randn(in_shape, generator=g) * 2).to(device=p.device, dtype=p.dtype)
        bias_sign = measure_bias_sign(m, p, x)
        if bias_sign is not None:
            return name, bias_sign
    return None


def _owners(model: nn.Module, obj: Any) -> set[str]:
    """Paths of modules that hold ``obj`` (a tensor or module) anywhere below them."""
    out = set()
    for path, m in model.named_modules():
        if isinstance(obj, nn.Module):
            if any(sub is obj for sub in m.modules()):
                out.add(path)
        elif any(t is obj for t in list(m.parameters()) + list(m.buffers())):
            out.add(path)
    return out


class _FoldGraph:
    """What the fold-target search reads once per model: modules by path, the traced graph's
    module calls and ``get_attr`` nodes, the input shape of each recorded module call."""

    def __init__(self, disc: Discovery, model: nn.Module):
        self.disc, self.model = disc, model
        self.mods = dict(model.named_modules())
        self.gm = disc.trace.graph_module if disc.trace is not None else None
        nodes = list(self.gm.graph.nodes) if self.gm is not None else []
        self.module_calls = [n for n in nodes if n.op == "call_module"]
        self.get_attrs = [n for n in nodes if n.op == "get_attr"]
        self.in_shapes = {(r.path, r.index): r.inp.shape for r in disc.dyn.calls if r.inp.is_tensor}
        # candidates per site: (target key, spec, bias sign, exact, reason); nearest to the binarizer first
        self.cands: dict[str, list[tuple[Any, str, int, bool, str]]] = {}
        # target key -> exact fold points (graph node or None for a module's own parameter, site name)
        self.points: dict[Any, list[tuple[fx.Node | None, str]]] = {}

    def target(self, kind: str, path: str) -> Any:
        """The parameter (``kind`` "bias" / "own") or BN module ("bn") at ``path``."""
        return _resolve(self.model, path) if kind != "bn" else self.mods.get(path)


def _own_candidate(g: _FoldGraph, s: Site) -> list[tuple[Any, str, int, bool, str]]:
    """The binarizer module's own additive parameter, found by measurement (sets the site's own
    threshold from its values); [] when it has none."""
    if not (s.kind in (KIND_MODULE, KIND_INPUT) and s.apply == APPLY_PRE_HOOK and s.module in g.mods):
        return []
    own = _own_additive_param(g.model, s.module, g.in_shapes.get((s.module, s.call_index)))
    if own is None:
        return []
    pname, bias_sign = own
    p = _resolve(g.model, f"{s.module}.{pname}")
    key = ("own", id(p))
    g.points.setdefault(key, []).append((None, s.name))
    s.own_threshold = _own_threshold_stats(-bias_sign * p)  # x + b > 0  <=>  x > -b
    return [(key, f"bias:{s.module}.{pname}", bias_sign, True, "")]


def _chain_candidates(g: _FoldGraph, s: Site) -> list[tuple[Any, str, int, bool, str]]:
    """The parameter adds and the affine BN on the site's bias chain, each exact or not (why)."""
    node = g.disc.node_of_site.get(s.name)
    if node is None or g.gm is None:
        return []
    chain = _bias_chain(g.gm, _first_arg(node), g.mods)
    hook = _hook_state(s, node, chain, g.gm, g.mods)
    out = []
    for i, link in enumerate(chain):
        if link.target is None:
            continue
        kind, path, bias_sign = link.target
        obj = g.target(kind, path)
        if obj is None:
            continue
        if kind == "bias" and s.own_threshold is None:
            s.own_threshold = _own_threshold_stats(-bias_sign * obj)
        if isinstance(hook, str):
            exact, why = False, hook
        else:
            exact = _normalise(chain, ("whole", i), node, g.mods) == _normalise(chain, hook, node, g.mods)
            why = "" if exact else (f"{path} also feeds other layers (a fold would move them too)")
        key = (kind, id(obj))
        out.append((key, f"bias:{path}" if kind == "bias" else f"bn:{path}", bias_sign, exact, why))
        if exact:
            g.points.setdefault(key, []).append((link.node, s.name))
    return out


def _own_uses_ok(g: _FoldGraph, path: str, group: list[str]) -> tuple[bool, str]:
    """A binarizer module's own parameter: every call of the module is a shifted site of the
    group, and the parameter is read nowhere else."""
    obj = _resolve(g.model, path)
    owner = _param_owner(path)
    calls = {n for n in g.module_calls if str(n.target) == owner}
    sites_of_owner = {s.name for s in g.disc.sites if s.module == owner and s.apply == APPLY_PRE_HOOK}
    if len(calls) > len(sites_of_owner & set(group)) and g.gm is not None:
        return False, f"{owner} is called where it is not a shifted binarizer"
    if any(_resolve(g.model, str(n.target)) is obj and not _in_scope(n, owner) for n in g.get_attrs):
        return False, f"{path} is also read outside {owner}"
    others = _owners(g.model, obj) - {p for p in g.mods if p == owner or p.startswith(owner + ".")
                                      or owner.startswith(p + ".") or p == ""}
    if any(str(n.target) in others for n in g.module_calls):
        return False, f"{path} is also used inside {sorted(others)[0]}"
    return True, ""


def _target_entries(g: _FoldGraph, kind: str, path: str, obj: Any) -> set[fx.Node]:
    """The graph nodes where the target's values enter the data flow: the first non-reshaping
    readers of every ``get_attr`` of the parameter (and every call of its affine module), or
    every call of the BN module."""
    if kind != "bias":
        return {n for n in g.module_calls if g.mods.get(str(n.target)) is obj}
    entries: set[fx.Node] = set()
    frontier = [n for n in g.get_attrs if _resolve(g.model, str(n.target)) is obj]
    seen: set[fx.Node] = set()
    while frontier:
        cur = frontier.pop()
        for u in cur.users:
            if u in seen:
                continue
            seen.add(u)
            if _param_source(u) is not None:
                frontier.append(u)
            else:
                entries.add(u)
    owner = _param_owner(path)
    if owner in g.mods and isinstance(g.mods[owner], _AFFINE_LEAVES):
        entries |= {n for n in g.module_calls if str(n.target) == owner}  # every call adds the bias
    return entries


def _uses_ok(g: _FoldGraph, key: Any, spec: str) -> tuple[bool, str, list[str]]:
    """(ok, why not, fold group): every use of the target must be an exact fold point of some site."""
    kind = key[0]
    pts = g.points.get(key, [])
    group = sorted({name for _, name in pts}, key=[s.name for s in g.disc.sites].index)
    path = spec.split(":", 1)[1]
    if kind == "own":
        return (*_own_uses_ok(g, path, group), group)
    obj = g.target(kind, path)
    stray = _target_entries(g, kind, path, obj) - {n for n, _ in pts if n is not None}
    if stray:
        n = next(iter(stray))
        return False, f"{path} is also read by {n.name} (not only by shifted binarizers)", group
    # untraced leaves that hold the parameter / module
    leaf_calls = {str(n.target) for n in g.module_calls} - ({path} if kind == "bn" else set())
    holders = {p for p in _owners(g.model, obj) if p in leaf_calls}
    holders -= {p for p in holders if kind == "bias" and p == _param_owner(path)}
    if holders:
        return False, f"{path} is also used inside {sorted(holders)[0]}", group
    return True, "", group


def _choose_targets(g: _FoldGraph) -> tuple[dict[str, tuple[Any, str, int]], dict[str, str],
                                             dict[Any, tuple[bool, str, list[str]]]]:
    """Each site's nearest valid target; a target is valid only if every site of its group
    chose it (repeated until no group splits). Returns (choice, refused reason, checked)."""
    checked: dict[Any, tuple[bool, str, list[str]]] = {}
    choice: dict[str, tuple[Any, str, int]] = {}
    refused: dict[str, str] = {}
    for _ in range(8):
        choice.clear()
        refused.clear()
        for s in g.disc.sites:
            for key, spec, bias_sign, exact, why in g.cands.get(s.name, []):
                if not exact:
                    refused.setdefault(s.name, why)
                    continue
                if key not in checked:
                    checked[key] = _uses_ok(g, key, spec)
                ok, reason, _ = checked[key]
                if ok:
                    choice[s.name] = (key, spec, bias_sign)
                    break
                refused.setdefault(s.name, reason)
        split = [key for key, (ok, _, group) in checked.items()
                 if ok and any(choice.get(n, (None,))[0] != key for n in group)]
        for key in split:
            ok, _, group = checked[key]
            checked[key] = (False, f"shared with {', '.join(group)}, which do not all fold into it", group)
        if not split:
            break
    return choice, refused, checked


def _set_fold_fields(g: _FoldGraph, choice, refused, checked) -> None:
    """Write ``foldable`` / ``bias_sign`` / ``fold_with`` / ``shift_into`` / ``fold_reason``."""
    for s in g.disc.sites:
        if s.name not in choice:
            s.foldable, s.fold_with, s.bias_sign, s.shift_into = None, None, None, None
            if s.name in refused:
                s.fold_reason = refused[s.name]
            continue
        key, spec, bias_sign = choice[s.name]
        group = checked[key][2] if key in checked else [s.name]
        s.foldable, s.bias_sign, s.fold_with = spec, bias_sign, group
        s.shift_into = spec if (g.gm is not None and group == [s.name]
                                and _read_only_in_owner(g.model, spec, g.get_attrs)) else None
        what = "BatchNorm" if spec.startswith("bn:") else "learnable bias"
        formula = "beta' = beta - t" if spec.startswith("bn:") else ("b' = b - t" if bias_sign > 0 else "b' = b + t")
        if len(group) > 1:
            s.fold_reason = (f"{what} {spec.split(':', 1)[1]} feeds only the binarizers {', '.join(group)}: "
                             f"{formula}, folded when their t are equal")
        else:
            s.fold_reason = f"{what} feeds only this binarizer: {formula}"


def find_fold_targets(disc: Discovery, model: nn.Module) -> None:
    """Set ``foldable`` / ``fold_with`` / ``bias_sign`` / ``shift_into`` /
    ``fold_reason`` / ``own_threshold`` of every site of ``disc``, in place.

    ``foldable`` is set only where a fold moves exactly the values the hook moves and every use
    of the target is such a site (module docstring). Raises whatever reading the model raises
    (``analyse.analyse`` catches it: no fold, hooks kept).
    """
    g = _FoldGraph(disc, model)
    for s in disc.sites:
        g.cands[s.name] = _own_candidate(g, s) + _chain_candidates(g, s)
    _set_fold_fields(g, *_choose_targets(g))


def _read_only_in_owner(model: nn.Module, spec: str, get_attrs: list[fx.Node]) -> bool:
    """Is the fold target's parameter read only inside its own module's forward, under its own
    name? Then lowering it while that module runs is the fold itself (``shift.insert_shifts``)."""
    found = fold_param(model, spec)
    if found is None:
        return False
    owner, pname = found
    obj = owner._parameters[pname]
    path = target_param(spec)[0]
    holders = [p for p, m in model.named_modules(remove_duplicate=False)
               if any(v is obj for v in m._parameters.values())]
    if holders != [path] or any(v is obj for k, v in owner._parameters.items() if k != pname):
        return False  # tied: another module (or name) reads the same tensor
    for g in get_attrs:
        if _resolve(model, str(g.target)) is obj and (str(g.target) != f"{path}.{pname}" if path else
                                                        str(g.target) != pname):
            return False
        if _resolve(model, str(g.target)) is obj and path and not _in_scope(g, path):
            return False  # read by the parent's forward (``x + self.move.bias``)
    return True
