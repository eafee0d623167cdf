"""Phase 4: the context of each site, in the paper's terms, and its advice.

For a site found in the graph: the *producer* of its pre-activation (BatchNorm, residual
add, learnable bias, hardtanh, pooling...), the *pool* between the previous weight layer
and the site (claim 3), the *follower* (PReLU / RPReLU / LeakyReLU after the binary layer
that consumes the site, claim 8), an existing *threshold* (learnable bias values), and
whether a shift can be *folded* into an existing parameter.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .detect import Discovery, is_weight_layer
from .sites import APPLY_PRE_HOOK, APPLY_PRODUCER, KIND_INPUT, KIND_MODULE, Site

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
    if node.op == "call_function":
        if node.target in _ADD or node.target is torch.Tensor.add:
            a = [x for x in node.args if isinstance(x, fx.Node)]
            if any(x.op == "get_attr" for x in a):
                return "learnable bias", None
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
            a = [x for x in node.args if isinstance(x, fx.Node)]
            if any(x.op == "get_attr" for x in a):
                return "learnable bias", None
            return "residual add", None
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


def _single_use_chain(node: fx.Node, site_node: fx.Node) -> bool:
    """Does ``node`` feed only the site (possibly through transparent single-use ops)?"""
    cur = node
    for _ in range(8):
        users = list(cur.users)
        if len(users) != 1:
            return False
        if users[0] is site_node:
            return True
        cur = users[0]
    return False


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
    if site.producer == "residual add":
        out.append("input is the residual stream: t needs its own subtraction (cannot fold); a compare-with-t is free on XNOR hardware")
    if site.threshold is not None:
        out.append("a learnable threshold exists: a fixed shift only sets its init, which decides the result (claim 7)")
    if site.alphabet == "{0,1}":
        out.append("Heaviside {0,1}: the shift means x > t")
    if site.producer == "BatchNorm" and site.foldable:
        out.append("BatchNorm before: t folds into the BN bias (beta - t) at zero inference cost")
    if not out:
        out.append("search t in [-1, 2] (claim 2: best t = 1.2 for binary vgg-small on CIFAR-10)")
    return out


def analyse(disc: Discovery, model: nn.Module) -> list[Site]:
    """Fill in the context fields of every site of ``disc`` (in place); returns the sites."""
    mods = dict(model.named_modules())
    gm = disc.trace.graph_module if disc.trace is not None else None
    site_nodes = set(disc.node_of_site.values())
    for s in disc.sites:
        node = disc.node_of_site.get(s.name)
        if s.kind == KIND_MODULE:
            m = mods.get(s.module)
            params = dict(m.named_parameters(recurse=True)) if m is not None else {}
            small = {k: v for k, v in params.items() if v.dim() <= 4 and v.numel() <= 4096}
            if small:
                k, v = next(iter(small.items()))
                s.threshold = _threshold_stats(v)
                s.foldable = f"bias:{s.module}.{k}"
                s.fold_reason = "the binarizer module has its own learnable bias"
        if node is None or gm is None:
            if s.in_leaf:
                s.producer = f"inside untraced leaf {s.in_leaf}"
                s.fold_reason = s.fold_reason or "found inside an untraced module: context unknown"
            s.advice = advice_for(s)
            continue
        pre = _preact_node(s, node, gm)
        s.producer, producer_path = classify_producer(gm, pre)
        s.pool = find_pool(gm, pre)
        s.follower, s.follower_slope = find_follower(gm, node, site_nodes)
        if s.producer == "learnable bias" and producer_path:
            pm = mods.get(producer_path)
            p = next(iter(pm.parameters(recurse=False)))
            s.threshold = _threshold_stats(-p)  # x + b > 0  <=>  x > -b
        if s.foldable is None and pre is not None:
            base = _skip_transparent(gm, pre)
            # a hook on the producer's output is attached only when nothing else reads it
            exclusive = (s.apply == APPLY_PRODUCER and s.module == producer_path) or _single_use_chain(base, node)
            if s.producer == "BatchNorm" and producer_path and exclusive:
                bn = mods[producer_path]
                if getattr(bn, "affine", False):
                    s.foldable = f"bn:{producer_path}"
                    s.fold_reason = "BatchNorm output feeds only this binarizer: beta' = beta - t"
                else:
                    s.fold_reason = "BatchNorm without affine bias: would need running_mean (eval only)"
            elif s.producer == "learnable bias" and producer_path and exclusive:
                pname = next(iter(dict(mods[producer_path].named_parameters(recurse=False))))
                s.foldable = f"bias:{producer_path}.{pname}"
                s.fold_reason = "learnable bias feeds only this binarizer: b' = b - t"
            elif s.producer == "residual add":
                s.fold_reason = "the pre-activation is the residual stream (also feeds the shortcut)"
            elif not s.fold_reason:
                s.fold_reason = f"producer {s.producer} has no bias to absorb t, or feeds other layers"
        if s.apply == APPLY_PRE_HOOK and s.kind == KIND_INPUT and s.foldable and pre is not None:
            # the conv's input must go nowhere else for the fold to be exact
            if len(_skip_transparent(gm, pre).users) != 1:
                s.foldable, s.fold_reason = None, "the pre-activation also feeds other layers"
        s.advice = advice_for(s)
    return disc.sites
