"""Site names: the readable, unique label of each site (docs/architecture.md "Site names").

Module sites are the module path (``layer1.act``; per call ``act@1``, or where each call runs:
``act@layer1``, ``act@root``, ``act@layer1/1``: :func:`call_label`), input quantizers
``conv1:input``, an inline op after the module whose output it binarizes (``bn1:output``) or
``scope:op``. Names are labels: a recipe addresses sites by apply / module / call_index / scope /
op_index. Used by :mod:`bnnshift.detect` (which re-exports ``call_label`` and ``node_scope``).
"""
from __future__ import annotations

from typing import Any

from torch import fx

from ._runtime import OpEvent
from .sites import KIND_HARDTANH, KIND_INLINE, KIND_INPUT, KIND_MODULE, Site


def node_scope(node: fx.Node) -> tuple[str, int]:
    """(module path, call index) of the innermost module running when ``node`` executed."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", 0
    key, val = list(stack.items())[-1]
    path = val[0] if isinstance(val, tuple) else str(val)
    k = 0
    if "@" in str(key):
        try:
            k = int(str(key).rsplit("@", 1)[1])
        except ValueError:
            k = 0
    return path, k


def call_label(path: str, k: int, calls: dict[str, int], callers: dict[tuple[str, int], str] | None) -> str:
    """The suffix that tells the calls of a module used more than once apart. Called from several
    modules (a shared instance): where each call runs, ``@block1`` (the module whose forward made
    call ``k``; ``@root`` for the root forward), ``@block1/1`` for the second call from the same
    place; called from one place only, or the caller unknown: the call index ``@k``; ``""`` for
    a module called once."""
    if calls.get(path, 1) <= 1:
        return ""
    if not callers or (path, k) not in callers or len({c for (p, _), c in callers.items() if p == path}) <= 1:
        return f"@{k}"  # every call from the same place: the call index says it
    where = callers[(path, k)]
    same = sorted(j for (p, j), c in callers.items() if p == path and c == where)
    label = f"@{where or 'root'}"
    return label if len(same) <= 1 else f"{label}/{same.index(k)}"


def name_sites(sites: list[Site], module_calls: dict[str, int], bases: dict[int, str] | None = None,
               callers: dict[tuple[str, int], str] | None = None) -> None:
    """Give each site a unique, readable name (per call site) that says where it is.

    Module sites are the module path (``layer1.act``; a module called from several modules gets
    where each call runs, ``act@layer1``, ``act@layer2``, ``act@root/1``: ``call_label``), input
    quantizers ``conv:input``; an inline op is named after the module whose output it
    binarizes (``bn1:output``, from ``bases``) or, when the value is computed in the same
    forward, ``scope:op`` (``layer1.0:sign``, ``root:sign``).
    """
    bases = bases or {}
    counters: dict[str, int] = {}
    for s in sites:
        if s.kind == KIND_INLINE and id(s) in bases:
            base = bases[id(s)]
            n = counters.get(base, 0)
            counters[base] = n + 1
            s.name = base if n == 0 else f"{base}_{n}"
            continue
        if s.kind == KIND_MODULE or s.kind == KIND_HARDTANH:
            s.name = s.module + call_label(s.module, s.call_index, module_calls, callers)
        elif s.kind == KIND_INPUT:
            s.name = f"{s.module}:input" + call_label(s.module, s.call_index, module_calls, callers)
        else:
            base = f"{s.scope or 'root'}:{s.op.split('.')[0] if s.op.endswith('.apply') else s.op}"
            n = counters.get(base, 0)
            counters[base] = n + 1
            s.name = base if n == 0 else f"{base}_{n}"
    seen: dict[str, int] = {}
    for s in sites:
        if s.name in seen:
            seen[s.name] += 1
            s.name = f"{s.name}#{seen[s.name]}"
        else:
            seen[s.name] = 0


_PASS_METHODS = {"view", "reshape", "flatten", "contiguous", "clone", "detach", "float", "to", "type_as"}


def _stack_call(node: fx.Node, path: str) -> int:
    """Which call of module ``path`` was running when ``node`` executed (from nn_module_stack)."""
    for key, val in (node.meta.get("nn_module_stack") or {}).items():
        p = val[0] if isinstance(val, tuple) else str(val)
        if p == path and "@" in str(key):
            try:
                return int(str(key).rsplit("@", 1)[1])
            except ValueError:
                return 0
    return 0


def output_name(path: str, k: int, calls: dict[str, int], callers: dict[tuple[str, int], str]) -> str:
    return f"{path}:output" + call_label(path, k, calls, callers)


def graph_output_name(first: fx.Node, scope: str, call_index_of: dict, calls: dict[str, int],
                      callers: dict[tuple[str, int], str]) -> str | None:
    """``module:output`` when the op binarizes the output of a module call, else None."""
    p = first
    for _ in range(8):
        if p.op == "call_method" and p.target in _PASS_METHODS and p.args and isinstance(p.args[0], fx.Node):
            p = p.args[0]
        else:
            break
    if p.op == "call_module":
        return output_name(str(p.target), call_index_of.get(p, 0), calls, callers)
    ps, _ = node_scope(p)
    inside = ps.startswith(scope + ".") if scope else bool(ps)
    if not inside or p.op in ("placeholder", "get_attr"):
        return None
    # computed inside a child of ``scope``: the value left that child as its output
    rest = ps[len(scope) + 1:] if scope else ps
    child = (f"{scope}." if scope else "") + rest.split(".")[0]
    return output_name(child, _stack_call(p, child), calls, callers)


def op_name(ev: OpEvent | None, label: str, target: Any = None) -> str:
    fn = ev.function if ev is not None else getattr(target, "bnnshift_function", None)
    if label == "apply" and fn is not None:
        return f"{fn.__name__}.apply"
    return label
