"""Phase 2: trace a model into an FX graph for *analysis only*.

Plain ``torch.fx.symbolic_trace`` is wrong for BNNs (FINDINGS.md): it traces through
``autograd.Function.apply`` (the STE's backward is lost), chokes on Python control flow,
numpy scalars and legacy code. The tracer here

* keeps every ``Function.apply`` opaque: one ``call_function`` node whose target carries
  the Function class (``target.bnnshift_function``);
* turns numpy scalars into Python numbers;
* when tracing fails inside a submodule, makes that submodule a leaf and retries, so one
  untraceable block does not sink the whole model (the leaves are reported).

The graph is never used to run the user's training: patched models keep their own forward.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn

from .errors import TraceError

_APPLY_TARGETS: dict[type, object] = {}


def apply_target(cls: type):
    """A stable callable standing for ``cls.apply`` in a graph (keeps the Function opaque)."""
    t = _APPLY_TARGETS.get(cls)
    if t is None:

        def t(*args, **kwargs):
            return cls.apply(*args, **kwargs)

        t.__name__ = f"{cls.__name__}_apply"
        t.__qualname__ = t.__name__
        t.__module__ = __name__
        t.bnnshift_function = cls
        _APPLY_TARGETS[cls] = t
    return t


@contextlib.contextmanager
def _opaque_apply():
    """While tracing, ``Function.apply`` on proxies records one node instead of inlining."""
    base = torch.autograd.Function
    saved = base.__dict__["apply"]

    def traced_apply(cls, *args, **kwargs):
        proxies = [a for a in (*args, *kwargs.values()) if isinstance(a, fx.Proxy)]
        if proxies:
            return proxies[0].tracer.create_proxy("call_function", apply_target(cls), args, kwargs)
        return saved.__get__(None, cls)(*args, **kwargs)

    base.apply = classmethod(traced_apply)
    try:
        yield
    finally:
        base.apply = saved


class BnnTracer(fx.Tracer):
    """FX tracer with opaque ``Function.apply``, numpy-scalar support and extra leaves."""

    def __init__(self, leaf_paths: set[str] = frozenset(), leaf_types: tuple[type, ...] = ()):
        super().__init__()
        self.leaf_paths = set(leaf_paths)
        self.leaf_types = tuple(leaf_types)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            # remember the innermost module whose forward failed
            if not hasattr(exc, "_bnnshift_failed_in"):
                try:
                    exc._bnnshift_failed_in = self.path_of_module(m)
                except Exception:
                    pass
            raise

    def create_arg(self, a):
        if isinstance(a, np.generic):
            a = a.item()
        return super().create_arg(a)


@dataclass
class TraceResult:
    """The analysed graph and what had to be left opaque.

    ``graph_module``: an ``fx.GraphModule`` over the user's model (for analysis);
    ``leaves``: module paths made leaves because tracing failed inside them;
    ``failures``: path -> the error that made it a leaf;
    ``leaf_types``: binarizer module classes kept opaque on purpose.
    """

    graph_module: fx.GraphModule
    leaves: list[str]
    failures: dict[str, str] = field(default_factory=dict)
    leaf_types: tuple[type, ...] = ()


def outermost(paths) -> list[str]:
    """The paths of ``paths`` that do not lie under another one (sorted).

    A block that becomes a leaf after one of its children already did (an untraceable conv,
    then a tensor-valued ``if`` in the block) holds that child: the child is no longer a leaf
    of the graph, and listing both would make ``detect`` report the child's sites twice.
    """
    ps = set(paths)
    return sorted(p for p in ps if not any(q != p and (q == "" or p.startswith(q + ".")) for q in ps))


def trace_model(model: nn.Module, *, leaf_types: tuple[type, ...] = (), leaf_paths: set[str] = frozenset(),
                max_retries: int = 64) -> TraceResult:
    """Trace ``model`` with leaf-on-failure retries. Raises ``TraceError`` if the root fails.

    ``TraceResult.leaves`` holds the outermost leaves only (a leaf inside another leaf is not
    a leaf of the graph); ``failures`` keeps every failure.
    """
    from ._runtime import rebind_applies

    rebind_applies(model)  # ``self.q = F.apply`` bound before tracing: opaque like ``F.apply(x)``
    leaves = set(leaf_paths)
    failures: dict[str, str] = {}
    last_exc: Exception | None = None
    for _ in range(max_retries):
        tracer = BnnTracer(leaves, leaf_types)
        try:
            with _opaque_apply():
                graph = tracer.trace(model)
            gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__ + "Traced")
            return TraceResult(gm, outermost(leaves - set(leaf_paths)), failures, tuple(leaf_types))
        except Exception as exc:  # noqa: BLE001 - any tracing error is a reason to make a leaf
            last_exc = exc
            where = getattr(exc, "_bnnshift_failed_in", None)
            if not where or where in leaves:
                break
            failures[where] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            leaves.add(where)
    raise TraceError(
        f"cannot trace the model's own forward: {type(last_exc).__name__}: {str(last_exc).splitlines()[0] if str(last_exc) else ''}"[:300],
        hint="move data-dependent code into a submodule (it becomes a leaf) or register a leaf module via a plugin",
    )
