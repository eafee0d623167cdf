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
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._guard import copy_model
from ._state import model_state
from .detect import Discovery, _closure, activation_nodes, is_weight_layer, node_scope
from .shift import fold_param
from .sites import APPLY_OP, APPLY_PRE_HOOK, APPLY_PRODUCER, KIND_INPUT, KIND_MODULE, Site, target_param

_TRANSPARENT_METHODS = {"view", "reshape", "flatten", "contiguous", "clone", "float", "to", "type_as", "squeeze",
                        "unsqueeze", "detach"}
_TRANSPARENT_FUNCS = {torch.flatten, torch.reshape, F.dropout, torch.clone}
_POOL_MODULES = {nn.MaxPool1d: "MaxPool", nn.MaxPool2d: "MaxPool", nn.MaxPool3d: "MaxPool",
                 nn.AdaptiveMaxPool2d: "MaxPool", nn.AvgPool1d: "AvgPool", nn.AvgPool2d: "AvgPool",
                 nn.AvgPool3d: "AvgPool", nn.AdaptiveAvgPool2d: "AvgPool"}
_POOL_FUNCS = {F.max_pool1d: "MaxPool", F.max_pool2d: "MaxPool", F.adaptive_max_pool2d: "MaxPool",
               F.avg_pool1d: "AvgPool", F.avg_pool2d: "AvgPool", F.adaptive_avg_pool2d: "AvgPool"}
_WEIGHT_FUNCS = {F.conv1d, F.conv2d, F.conv3d, F.linear, torch.conv2d, torch.matmul}
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
        sign = +1
    elif node.op == "call_method" and node.target in ("add", "add_", "__add__", "__radd__"):
        sign = +1
    elif node.op == "call_function" and (node.target in _SUB or node.target is torch.Tensor.sub):
        sign = -1
    elif node.op == "call_method" and node.target in ("sub", "sub_", "__sub__"):
        sign = -1
    else:
        return None
    if len(node.args) < 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args[0], node.args[1]
    pa, pb = _param_source(a), _param_source(b)
    if isinstance(a, fx.Node) and pa is None and pb is not None:
        return a, pb, sign
    if sign > 0 and isinstance(b, fx.Node) and pb is None and pa is not None:
        return b, pa, sign
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


def _is_weight_node(gm, node: fx.Node) -> bool:
    if node.op == "call_module":
        return is_weight_layer(_module(gm, node))
    return node.op == "call_function" and node.target in _WEIGHT_FUNCS


def _is_learnable_bias_module(m: nn.Module | None) -> bool:
    if m is None or is_weight_layer(m) or isinstance(m, nn.modules.batchnorm._BatchNorm):
        return False
    params = dict(m.named_parameters(recurse=False))
    return len(params) == 1 and next(iter(params.values())).dim() <= 4 and not list(m.children())


def _first_arg(node: fx.Node) -> fx.Node | None:
    for a in node.args:
        if isinstance(a, fx.Node):
            return a
    return None


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


def _threshold_stats(t: torch.Tensor) -> dict[str, float]:
    t = t.detach().float()
    return {"mean": float(t.mean()), "min": float(t.min()), "max": float(t.max()), "numel": int(t.numel())}


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
    if site.threshold is not None:
        out.append("a learnable threshold exists: a fixed shift only sets its init, which decides the result (claim 7)")
    if site.alphabet == "{0,1}":
        out.append("Heaviside {0,1}: the shift means x > t")
    if site.producer == "BatchNorm" and site.foldable and site.foldable.startswith("bn:"):
        out.append("BatchNorm before: t folds into the BN bias (beta - t) at zero inference cost")
    if not out:
        out.append("search t in [-1, 2] (claim 2: best t = 1.2 for binary vgg-small on CIFAR-10)")
    return out




# ------------------------------------------------------------------ fold targets (data flow)
#
# A fold moves t out of the hook into a parameter: the shift then happens where the parameter
# enters the data flow, for *every* reader of that value and at *every* use of the parameter.
# It equals the hooked model only when both shift the same values. So, per site:
#
# 1. the *bias chain*: from the binarizer's input back through ops that commute with
#    subtracting a constant (reshapes, identity, ``x + b`` / ``x - b`` with b a parameter) to
#    the first op that does not (a BN, a conv, a residual add). Each parameter add on it and
#    an affine BN at its root are candidate targets;
# 2. where the hook shifts (the edge into the binarizer, the conv's input, the producer's
#    whole output) and where a fold at each candidate shifts (the candidate's whole output),
#    both pushed downstream while the value has exactly one reader: equal end points means
#    the same values move;
# 3. every use of the candidate parameter or BN module in the graph (every get_attr, every
#    call of the module, every untraced leaf that owns it) must be such an exact fold point
#    of a site; those sites form the fold group (folded together, only with equal t).
#
# The binarizer module's own parameters (RSign written as one module) are tried first, by
# measurement: the parameter whose change by -d moves the module's output exactly as
# shifting its input by d does is the additive one (centre, not scale; declaration order
# does not matter). ``fold.fold_shifts`` then proves every fold on a probe batch.


class _Link:
    __slots__ = ("node", "target")

    def __init__(self, node: fx.Node, target: tuple[str, str, int] | None):
        self.node, self.target = node, target  # target: ("bias", "path.param", sign) / ("bn", path, +1)


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
            for sign in (+1, -1):
                saved = param.detach().clone()
                param.sub_(sign * d)
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
    """(parameter name, sign) of the binarizer module's additive parameter, found by measurement."""
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
        sign = measure_bias_sign(m, p, x)
        if sign is not None:
            return name, sign
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


def _fold_analysis(disc: Discovery, model: nn.Module) -> None:
    """Set ``foldable`` / ``fold_with`` / ``fold_sign`` / ``fold_reason`` / ``threshold`` per site."""
    mods = dict(model.named_modules())
    gm = disc.trace.graph_module if disc.trace is not None else None
    graph_nodes = list(gm.graph.nodes) if gm is not None else []
    module_calls = [n for n in graph_nodes if n.op == "call_module"]
    get_attrs = [n for n in graph_nodes if n.op == "get_attr"]
    in_shapes = {(r.path, r.index): r.inp.shape for r in disc.dyn.calls if r.inp.is_tensor}

    # candidates per site: (target key, spec, sign, exact, reason); nearest to the binarizer first
    cands: dict[str, list[tuple[Any, str, int, bool, str]]] = {}
    points: dict[Any, list[tuple[fx.Node | None, str]]] = {}  # target key -> exact fold points (node, site)
    for s in disc.sites:
        lst: list[tuple[Any, str, int, bool, str]] = []
        if s.kind in (KIND_MODULE, KIND_INPUT) and s.apply == APPLY_PRE_HOOK and s.module in mods:
            own = _own_additive_param(model, s.module, in_shapes.get((s.module, s.call_index)))
            if own is not None:
                p = _resolve(model, f"{s.module}.{own[0]}")
                key = ("own", id(p))
                lst.append((key, f"bias:{s.module}.{own[0]}", own[1], True, ""))
                points.setdefault(key, []).append((None, s.name))
                s.threshold = _threshold_stats(-own[1] * p)  # x + b > 0  <=>  x > -b
        node = disc.node_of_site.get(s.name)
        if node is not None and gm is not None:
            chain = _bias_chain(gm, _first_arg(node), mods)
            hook = _hook_state(s, node, chain, gm, mods)
            for i, link in enumerate(chain):
                if link.target is None:
                    continue
                kind, path, sign = link.target
                obj = _resolve(model, path) if kind == "bias" else mods.get(path)
                if obj is None:
                    continue
                if kind == "bias" and s.threshold is None:
                    s.threshold = _threshold_stats(-sign * obj)
                if isinstance(hook, str):
                    exact, why = False, hook
                else:
                    exact = _normalise(chain, ("whole", i), node, mods) == _normalise(chain, hook, node, mods)
                    why = "" if exact else (f"{path} also feeds other layers (a fold would move them too)")
                key = (kind, id(obj))
                spec = f"bias:{path}" if kind == "bias" else f"bn:{path}"
                lst.append((key, spec, sign, exact, why))
                if exact:
                    points.setdefault(key, []).append((link.node, s.name))
        cands[s.name] = lst

    # every use of each target must be an exact fold point of some site
    def uses_ok(key: Any, spec: str) -> tuple[bool, str, list[str]]:
        kind = key[0]
        pts = points.get(key, [])
        group = sorted({name for _, name in pts}, key=[s.name for s in disc.sites].index)
        nodes = {n for n, _ in pts if n is not None}
        path = spec.split(":", 1)[1]
        if kind == "own":
            obj = _resolve(model, path)
            owner = _param_owner(path)
            calls = {n for n in module_calls if str(n.target) == owner}
            sites_of_owner = {s.name for s in disc.sites if s.module == owner and s.apply == APPLY_PRE_HOOK}
            if len(calls) > len(sites_of_owner & set(group)) and gm is not None:
                return False, f"{owner} is called where it is not a shifted binarizer", group
            if any(_resolve(model, str(g.target)) is obj and not _in_scope(g, owner) for g in get_attrs):
                return False, f"{path} is also read outside {owner}", group
            others = _owners(model, obj) - {p for p in mods if p == owner or p.startswith(owner + ".")
                                             or owner.startswith(p + ".") or p == ""}
            if any(str(n.target) in others for n in module_calls):
                return False, f"{path} is also used inside {sorted(others)[0]}", group
            return True, "", group
        obj = _resolve(model, path) if kind == "bias" else mods.get(path)
        entries: set[fx.Node] = set()
        if kind == "bias":
            frontier = [g for g in get_attrs if _resolve(model, str(g.target)) is obj]
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
            if owner in mods and isinstance(mods[owner], _AFFINE_LEAVES):
                entries |= {n for n in module_calls if str(n.target) == owner}  # every call adds the bias
        else:
            entries = {n for n in module_calls if mods.get(str(n.target)) is obj}
        stray = entries - nodes
        if stray:
            n = next(iter(stray))
            return False, f"{path} is also read by {n.name} (not only by shifted binarizers)", group
        # untraced leaves that hold the parameter / module
        leaf_calls = {str(n.target) for n in module_calls} - ({path} if kind == "bn" else set())
        holders = {p for p in _owners(model, obj) if p in leaf_calls}
        holders -= {p for p in holders if kind == "bias" and p == _param_owner(path)}
        if holders:
            return False, f"{path} is also used inside {sorted(holders)[0]}", group
        return True, "", group

    checked: dict[Any, tuple[bool, str, list[str]]] = {}
    choice: dict[str, tuple[Any, str, int]] = {}
    refused: dict[str, str] = {}
    for _ in range(8):  # a target is valid only if every site of its group chose it
        choice.clear()
        refused.clear()
        for s in disc.sites:
            for key, spec, sign, exact, why in cands.get(s.name, []):
                if not exact:
                    refused.setdefault(s.name, why)
                    continue
                if key not in checked:
                    checked[key] = uses_ok(key, spec)
                ok, reason, _ = checked[key]
                if ok:
                    choice[s.name] = (key, spec, sign)
                    break
                refused.setdefault(s.name, reason)
        split = [key for key, (ok, _, group) in checked.items()
                 if ok and any(choice.get(n, (None,))[0] != key for n in group)]
        for key in split:
            ok, _, group = checked[key]
            checked[key] = (False, f"shared with {', '.join(group)}, which do not all fold into it", group)
        if not split:
            break
    for s in disc.sites:
        if s.name in choice:
            key, spec, sign = choice[s.name]
            group = checked[key][2] if key in checked else [s.name]
            s.foldable, s.fold_sign, s.fold_with = spec, sign, group
            s.shift_into = spec if (gm is not None and group == [s.name]
                                    and _read_only_in_owner(model, spec, get_attrs)) else None
            what = "BatchNorm" if spec.startswith("bn:") else "learnable bias"
            formula = "beta' = beta - t" if spec.startswith("bn:") else ("b' = b - t" if sign > 0 else "b' = b + t")
            if len(group) > 1:
                s.fold_reason = (f"{what} {spec.split(':', 1)[1]} feeds only the binarizers {', '.join(group)}: "
                                 f"{formula}, folded when their t are equal")
            else:
                s.fold_reason = f"{what} feeds only this binarizer: {formula}"
        else:
            s.foldable, s.fold_with, s.fold_sign, s.shift_into = None, None, None, None
            if s.name in refused:
                s.fold_reason = refused[s.name]


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
        s.shift_into, s.foldable, s.fold_with, s.fold_sign = None, None, None, None
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
    from ._runtime import SiteRuntime
    from .shift import insert_shifts

    plain = []
    for s in sites:
        c = copy.copy(s)
        c.shift_into = None  # a lowered fold target is checked against the plain hook by _check_lowering
        plain.append(c)
    by_name = {s.name: s for s in plain}

    calls: dict[str, tuple] = {}

    def run(tv: float) -> tuple[dict, dict]:
        m = copy_model(model).eval()
        insert_shifts(m, plain, {s.name: tv for s in plain})
        rt: SiteRuntime = model_state(m).shift.runtime
        rt.remove()
        before: dict[str, torch.Tensor] = {}
        after: dict[str, torch.Tensor] = {}
        for d, out in ((rt.pre_call, False), (rt.post_call, True), (rt.op_handlers, False)):
            for key, h in list(d.items()):
                name = next((s.name for s in plain if _handler_key(s) == (d is rt.op_handlers, d is rt.post_call, key)), None)
                if name is not None:
                    d[key] = _Recorded(name, h, before, out, calls if (tv == 0.0 and d is rt.pre_call) else None)
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
        for p, _ in call_sites:
            rt.pre_call.setdefault((p, _), lambda module, args: None)
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
        try:
            p0 = next(iter(m.parameters()), None)
            with torch.no_grad(), _same_noise():
                m(x.to(p0.dtype) if p0 is not None and p0.is_floating_point() else x)
        finally:
            for h in extra:
                h.remove()
            rt.remove()
        return before, after

    b0, a0 = run(0.0)
    invariant = _invariant_calls(calls)
    calls.clear()  # the first copy's modules: freed before the second copy is made (memory)
    b1, a1 = run(t)
    out: dict[str, str | float] = {}
    for name in by_name:
        if name in invariant:
            out[name] = "invariant"
        elif name not in b1:
            out[name] = "not fired"
        elif name not in a1 or name not in a0 or name not in b0:
            out[name] = "not measured"
        elif a0[name].shape != b0[name].shape or not torch.equal(a0[name], b0[name]):
            out[name] = "indirect"
        elif a1[name].shape != b1[name].shape or not a1[name].is_floating_point():
            out[name] = "not measured"
        else:
            d = (b1[name].double() - a1[name].double()) / t
            k = float(d.median())
            tol = 1e-4 * max(1.0, float(b1[name].abs().max()))
            out[name] = 1.0 if torch.allclose(a1[name].double(), b1[name].double() - t, atol=tol, rtol=0) else round(k, 3)
    return out


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
            s.foldable, s.fold_with, s.fold_sign, s.shift_into = None, None, None, None
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
