"""Phase 3: find the binary activations of a model, per call site.

Two views are combined:

1. a *dynamic* pass (``_runtime.SiteRuntime`` in recording mode, one random batch, eval
   mode, on a copy of the model) that sees every module call and every candidate op with
   its real values. It classifies binarizer modules (a module with no weight layer inside
   whose output takes two values while its input does not) and binarizing
   ``Function.apply`` calls, and it is the only view inside untraceable leaves;
2. the FX graph (``trace``), with binarizer modules as leaves, for the structure: which
   op consumes an activation vs only parameters (weight binarizer), and the context.

Both number module calls and candidate ops the same way (execution order per root
forward), which is how a site found here is found again when patched.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from . import registry
from ._guard import ParamWrites, copy_model, inplace_message
from ._runtime import OpEvent, SiteRuntime, binary_part, graph_candidate_label
from .errors import TraceError
from .site_names import call_label, graph_output_name, name_sites, node_scope, op_name, output_name  # noqa: F401 (call_label: re-exported)
from .sites import (APPLY_OP, APPLY_PRE_HOOK, APPLY_PRODUCER, KIND_HARDTANH, KIND_INLINE, KIND_INPUT,
                    KIND_MODULE, Site)
from .trace import TraceResult, trace_model

PROBE_BATCH = 5  # an unusual batch size: activations have it as dim 0, weights almost never


# ---------------------------------------------------------------- value summaries


@dataclass
class ValueSummary:
    is_tensor: bool
    shape: tuple[int, ...] = ()
    distinct: int = 0
    values: tuple[float, ...] = ()  # the distinct values when there are at most 3
    is_float: bool = False
    # two values up to the rounding of an STE expression (``c + (b - c).detach()`` is b only to
    # about one ulp): distinct values counted after rounding to 1e-3 of the largest magnitude
    near_binary: bool = False

    @property
    def binary(self) -> bool:
        # one value is a constant (a scale, a zero point), not a binarization
        if not self.is_tensor or self.distinct <= 1:
            return False
        if self.distinct == 2:
            return True
        # sign(0) = 0 leaves a third value {-a, 0, +a}
        return self.distinct == 3 and 0.0 in self.values and abs(self.values[0] + self.values[2]) < 1e-6


def summarize(t: Any) -> ValueSummary:
    """Distinct values of a tensor, cheaply: a strided sample decides "many" before a full unique."""
    t = binary_part(t)
    if not isinstance(t, torch.Tensor) or t.numel() == 0:
        return ValueSummary(False)
    # per sample: a scaled sign (alpha_i * sign(x), XNOR's K) is binary within each sample
    flat = (t[0] if t.dim() >= 2 else t).detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // 4096)]
    u = torch.unique(sample.float())
    if u.numel() > 3:
        near = False
        if t.is_floating_point():
            scale = float(u.abs().max())
            if scale > 0 and math.isfinite(scale):
                r = torch.unique(torch.round(sample.float() / scale * 1000))
                near = r.numel() == 2
        return ValueSummary(True, tuple(t.shape), int(u.numel()), (), t.is_floating_point(), near)
    if flat.numel() > 1_000_000:
        flat = flat[:: flat.numel() // 1_000_000 + 1]
    u = torch.unique(flat.float())
    vals = tuple(float(v) for v in u[:3]) if u.numel() <= 3 else ()
    return ValueSummary(True, tuple(t.shape), int(u.numel()), vals, t.is_floating_point())


def alphabet_of(s: ValueSummary, bool_out: bool = False) -> str:
    if bool_out:
        return "{0,1}"
    v = [x for x in s.values if x != 0.0] if s.distinct == 3 else list(s.values)
    if len(v) == 2 and abs(v[0] + 1) < 1e-6 and abs(v[1] - 1) < 1e-6:
        return "{-1,+1}"
    if len(s.values) == 2 and s.values[0] == 0.0 and abs(s.values[1] - 1) < 1e-6:
        return "{0,1}"
    if len(v) == 2 and abs(v[0] + v[1]) < 1e-6:
        return "scaled {-a,+a}"
    if len(v) == 1:
        return "constant"
    return "two-valued"


# ---------------------------------------------------------------- dynamic pass


@dataclass
class CallRecord:
    path: str
    index: int
    cls: type
    inp: ValueSummary
    out: ValueSummary
    # the output has the values of another tensor argument (brevitas ``DelayWrapper(x, y) -> y``):
    # the module passes a binarization made elsewhere through, it does not binarize
    passes_arg: bool = False


@dataclass
class DynamicPass:
    calls: list[CallRecord] = field(default_factory=list)
    ops: list[tuple[OpEvent, ValueSummary, ValueSummary]] = field(default_factory=list)
    error: str | None = None
    # fingerprint of each binarizer input: ("call", path, k) / ("op", scope, j) -> fingerprint
    fingerprints: dict[tuple, tuple] = field(default_factory=dict)
    # the module running when each module call was made: (path, k) -> caller path ("" = root)
    callers: dict[tuple[str, int], str] = field(default_factory=dict)

    def op(self, scope: str, index: int):
        for ev, i, o in self.ops:
            if ev.scope == scope and ev.index == index:
                return ev, i, o
        return None


def fingerprint(t: Any) -> tuple | None:
    """A cheap identity of a tensor's values: shape, dtype, float64 sum and a strided sample."""
    if isinstance(t, (tuple, list)) and t and isinstance(t[0], torch.Tensor):
        t = t[0]
    if not isinstance(t, torch.Tensor):
        return None
    flat = t.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // 1024)].double().cpu()
    return (tuple(t.shape), str(t.dtype), float(flat.double().sum()) if flat.numel() else 0.0, tuple(sample.tolist()))


def depends_on_input(a: DynamicPass, b: DynamicPass, key: tuple) -> bool | None:
    """Did the value at ``key`` change when only the model's input changed (data flow)?

    ``a`` and ``b`` are dynamic passes of two identical copies on two different inputs.
    None when ``key`` was not seen in both (control flow took another path).
    """
    fa, fb = a.fingerprints.get(key), b.fingerprints.get(key)
    if fa is None or fb is None:
        return None
    return fa != fb


PROBE_ELEMENTS = 1 << 21  # at most 2M input values (8 MB in float32) per probe batch


def probe_batch_size(input_shape: tuple[int, ...], want: int) -> int:
    """The batch size of a probe of inputs of ``input_shape`` (one sample): ``want``, fewer for
    large inputs so that the input batch holds at most ``PROBE_ELEMENTS`` values (a 3x300x300
    detector input: 7 samples), never fewer than 2."""
    n = max(1, math.prod(int(v) for v in input_shape))
    return max(2, min(int(want), PROBE_ELEMENTS // n))


def example_input(input_shape: tuple[int, ...], batch: int = PROBE_BATCH, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *input_shape), generator=g)


def dynamic_pass(model: nn.Module, x: torch.Tensor, *, train_mode: bool = True) -> DynamicPass:
    """Run ``x`` through ``model`` (no grad) recording calls and candidate ops.

    Train mode by default (callers pass a copy): BatchNorm then normalises with batch
    statistics, as in training, instead of the fresh running statistics of an untrained
    model, which pass integer-valued binary-conv outputs through unchanged.
    """
    result = DynamicPass()
    rt = SiteRuntime(model, watch_scopes=None)
    mods = dict(model.named_modules())
    pending: dict[tuple[str, int], ValueSummary] = {}
    pending_args: dict[tuple[str, int], list] = {}  # fingerprints of the 2nd..4th tensor arguments

    stack: list[str] = []

    def any_pre(path, k, args):
        if stack:
            result.callers[(path, k)] = stack[-1]
        stack.append(path)
        pending[(path, k)] = summarize(args[0] if args else None)
        result.fingerprints[("call", path, k)] = fingerprint(args[0] if args else None)
        others = [fingerprint(a) for a in args[1:4] if isinstance(a, torch.Tensor)]
        if others:
            pending_args[(path, k)] = others

    def record_op(ev):
        result.ops.append((ev, summarize(ev.inputs[0] if ev.inputs else None), summarize(ev.output)))
        result.fingerprints[("op", ev.scope, ev.index)] = fingerprint(ev.inputs[0] if ev.inputs else None)

    def any_post(path, k, output):
        if stack and stack[-1] == path:
            stack.pop()
        fp = fingerprint(output)
        result.fingerprints[("out", path, k)] = fp
        result.calls.append(CallRecord(path, k, type(mods[path]), pending.pop((path, k), ValueSummary(False)),
                                       summarize(output), fp is not None and fp in pending_args.pop((path, k), ())))

    rt.any_pre, rt.any_post = any_pre, any_post
    rt.record_ops = record_op
    was_training = model.training
    model.train(train_mode)
    try:
        rt.install(track_all_calls=True)
        # the same random stream on every pass: stochastic binarizers see the same noise, so
        # only the model's input differs between the two passes of ``discover``
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model(x)
    except Exception as exc:  # noqa: BLE001
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        rt.remove()
        model.train(was_training)
    return result


def _has_weight_layer(m: nn.Module) -> bool:
    for sub in m.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            return True
        for p in sub.parameters(recurse=False):
            if p.dim() >= 2:
                return True
    return False


def binarizer_module_paths(model: nn.Module, dyn: DynamicPass) -> set[str]:
    """Modules whose forward binarizes their input (innermost such modules)."""
    mods = dict(model.named_modules())
    forced_types = registry.binarizer_module_types()
    forced_names = {n for _, d in registry.DETECTORS.items() for n in d.class_names}
    found: set[str] = set()
    for path, m in mods.items():
        if path and (isinstance(m, forced_types) if forced_types else False):
            found.add(path)
        elif path and type(m).__name__ in forced_names and not _has_weight_layer(m):
            found.add(path)
    for rec in dyn.calls:
        if not rec.path or rec.path in found:
            continue
        if type(mods[rec.path]).__module__.startswith("torch.nn."):
            continue  # a torch layer (Hardtanh on large inputs, ReLU...) is never a binarizer
        if rec.out.binary and rec.inp.is_tensor and rec.inp.is_float and rec.inp.distinct > 8 \
                and not rec.passes_arg and not _has_weight_layer(mods[rec.path]):
            found.add(rec.path)
        elif rec.out.near_binary and rec.inp.is_tensor and rec.inp.is_float and rec.inp.distinct > 8 \
                and not rec.passes_arg and not _has_weight_layer(mods[rec.path]) \
                and not any(under_bin(ev.scope, rec.path) for ev, _, _ in dyn.ops):
            # an STE expression around a binarization that no candidate op makes (stochastic
            # rounding ``where(rand < p, 1, -1)``): only the module's output says it binarizes
            found.add(rec.path)
    # a binarizer wrapped in layers that pass the same values in and out (brevitas:
    # QuantIdentity > act_quant > proxy > tensor_quant > delay_wrapper) is one site: the
    # outermost, the module the user wrote
    found = {p for p in found if not any(q != p and p.startswith(q + ".") and _same_call_values(dyn, p, q)
                                         for q in found)}
    # otherwise keep the innermost: drop a module if one of its descendants binarizes
    return {p for p in found if not any(q != p and q.startswith(p + ".") for q in found)}


def _same_call_values(dyn: DynamicPass, a: str, b: str) -> bool:
    """Do module paths ``a`` and ``b`` see the same inputs and give the same outputs on every call?"""
    def values(path: str, kind: str) -> set:
        return {fp for (k, p, *_), fp in dyn.fingerprints.items() if k == kind and p == path}

    ia, ib = values(a, "call"), values(b, "call")
    return bool(ia) and ia == ib and values(a, "out") == values(b, "out")


# ---------------------------------------------------------------- graph helpers


def activation_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on a model input (placeholder)."""
    act: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            act.add(n)
        elif any(a in act for a in n.all_input_nodes):
            act.add(n)
    return act


def is_weight_layer(m: nn.Module | None) -> bool:
    return m is not None and any(p.dim() >= 2 for p in m.parameters(recurse=False))


# ---------------------------------------------------------------- discovery


@dataclass
class Discovery:
    sites: list[Site]
    weight_binarizers: int
    trace: TraceResult | None
    dyn: DynamicPass
    binarizer_modules: set[str]
    node_of_site: dict[str, fx.Node] = field(default_factory=dict)
    hardtanh_sites: list[Site] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    trace_error: str | None = None
    binary_params: set[str] = field(default_factory=set)  # weights that a weight binarizer reads
    inplace_writes: list[str] = field(default_factory=list)  # parameters the forward assigns (.data = ...)
    # binarizers left at t = 0 with the reason: {"name", "op", "alphabet", "reason"} (ScanReport.excluded_sites)
    excluded: list[dict[str, Any]] = field(default_factory=list)


def _dynamic_output_name(dyn: DynamicPass, ev: OpEvent, bin_paths: set[str], calls: dict[str, int]) -> str | None:
    """Untraced: the module call whose output has the values the op reads (deepest, latest)."""
    fp = dyn.fingerprints.get(("op", ev.scope, ev.index))
    if fp is None:
        return None
    best = None
    for key, other in dyn.fingerprints.items():
        if key[0] != "out" or other != fp or not key[1]:
            continue
        path, k = key[1], key[2]
        if path == ev.scope or ev.scope.startswith(path + ".") or path in bin_paths:
            continue  # still running when the op ran, or a binarizer
        rank = (path.count("."), k)
        if best is None or rank > best[0]:
            best = (rank, path, k)
    return output_name(best[1], best[2], calls, dyn.callers) if best else None


@dataclass
class _Passes:
    """discover's two dynamic passes: the kept copy ``work`` (``dyn``) and the twin's on another
    input (``dyn2``, fingerprints only); ``writes``: parameters the forward writes (by the act)."""

    work: nn.Module
    dyn: DynamicPass
    dyn2: DynamicPass
    writes: dict[str, Any]
    mods: dict[str, nn.Module]
    bin_paths: set[str]
    calls_per_path: dict[str, int]


@dataclass
class _Found:
    """What discover collects, in the order it finds it (sites in execution order)."""

    warnings: list[str] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)
    bases: dict[int, str] = field(default_factory=dict)  # id(site) -> "module:output" name base
    site_notes: list[tuple[Site, str]] = field(default_factory=list)  # worded once the site has its name
    node_of_site: dict[int, fx.Node] = field(default_factory=dict)
    weight_binarizers: int = 0
    binary_params: set[str] = field(default_factory=set)
    hardtanh_sites: list[Site] = field(default_factory=list)
    excluded: list[dict[str, Any]] = field(default_factory=list)


def _run_passes(model: nn.Module, input_shape: tuple[int, ...]) -> _Passes:
    """The same model on another input: what changes depends on the input (an activation), what
    does not is computed from parameters only (a weight binarizer), whatever the layout. One copy
    at a time (memory): the twin's pass first, then the copy that is kept. Raises TraceError
    when the model does not run on inputs of ``input_shape``."""
    twin = copy_model(model)  # the user's model never runs here (its forward may write its weights)
    dyn2 = dynamic_pass(twin, example_input(tuple(input_shape), seed=7))
    del twin
    dyn2.ops = []  # only its fingerprints are read: no activations kept
    work = copy_model(model)
    x = example_input(tuple(input_shape))
    watch = ParamWrites(work)  # writes to parameters found by the act, not by a changed value
    with watch:
        dyn = dynamic_pass(work, x)
    writes = dict(watch.writes)
    if dyn2.error and not dyn.error:
        dyn2 = dyn
    if dyn.error:
        raise TraceError(f"the model does not run on inputs of shape {tuple(x.shape)}: {dyn.error.splitlines()[0][:200]}",
                         hint="check --input-shape (C,H,W of one sample) and the model arguments")
    calls_per_path: dict[str, int] = {}
    for rec in dyn.calls:
        calls_per_path[rec.path] = max(calls_per_path.get(rec.path, 0), rec.index + 1)
    return _Passes(work, dyn, dyn2, writes, dict(work.named_modules()), binarizer_module_paths(work, dyn),
                   calls_per_path)


def _trace(p: _Passes, found: _Found) -> tuple[TraceResult | None, str | None]:
    """The graph of the kept copy (binarizer modules and Hardtanh as leaves), or (None, the
    error's line) with a warning when it cannot be traced."""
    try:
        return trace_model(p.work, leaf_paths=set(p.bin_paths) | {q for q, m in p.mods.items()
                                                                  if isinstance(m, nn.Hardtanh)}), None
    except TraceError as exc:
        found.warnings.append(f"the model could not be traced ({exc.message}); sites come from the dynamic pass "
                              "only, without context")
        return None, exc.one_line()


class _GraphWalk:
    """Sites the graph shows, node by node: binarizer module calls (outside untraced leaves),
    Hardtanh calls (``include_hardtanh``) and binarizing ops; a binarizer whose first input does
    not depend on the model's input is a weight binarizer (counted, not a site)."""

    def __init__(self, p: _Passes, trace: TraceResult, found: _Found, include_hardtanh: bool):
        self.p, self.found, self.include_hardtanh = p, found, include_hardtanh
        self.graph = trace.graph_module.graph
        self.act = activation_nodes(self.graph)
        self.leaf_set = set(trace.leaves)
        self.op_counts: dict[str, int] = {}
        self.call_counts: dict[str, int] = {}
        self.call_index_of: dict[fx.Node, int] = {}

    def run(self) -> None:
        for n in self.graph.nodes:
            if n.op == "call_module":
                k = self.call_counts.get(n.target, 0)
                self.call_counts[n.target] = k + 1
                self.call_index_of[n] = k
                self._module_call(n, k)
                continue
            label = graph_candidate_label(n)
            if label is not None:
                self._op(n, label)

    def _module_call(self, n: fx.Node, k: int) -> None:
        p, found = self.p, self.found
        if n.target in p.bin_paths and n.target not in self.leaf_set:
            m = p.mods[n.target]
            if n.args and isinstance(n.args[0], fx.Node) and n.args[0] not in self.act:
                found.weight_binarizers += 1
                return
            s = Site(name="", kind=KIND_MODULE, op=f"module:{type(m).__name__}", apply=APPLY_PRE_HOOK,
                     module=n.target, call_index=k)
            rec = next((r for r in p.dyn.calls if r.path == n.target and r.index == k), None)
            if rec is not None:
                s.alphabet = alphabet_of(rec.out)
            found.sites.append(s)
            found.node_of_site[id(s)] = n
        elif self.include_hardtanh and isinstance(p.mods.get(n.target), nn.Hardtanh):
            s = Site(name="", kind=KIND_HARDTANH, op="module:Hardtanh", apply=APPLY_PRE_HOOK,
                     module=n.target, call_index=k)
            found.hardtanh_sites.append(s)

    def _op(self, n: fx.Node, label: str) -> None:
        p, found = self.p, self.found
        scope, scope_call = node_scope(n)
        j = self.op_counts.get(scope, 0)
        self.op_counts[scope] = j + 1
        rec = p.dyn.op(scope, j)
        if rec is None or rec[0].label != label:
            found.warnings.append(f"binarizing op #{j} in {scope or 'the root forward'} was not seen "
                                  "at run time in the same order; skipped")
            return
        ev, in_sum, out_sum = rec
        out_t = binary_part(ev.output)
        is_bool = isinstance(out_t, torch.Tensor) and out_t.dtype == torch.bool and out_sum.distinct == 2
        if not (out_sum.binary or is_bool):
            return  # e.g. an apply that is not a binarizer
        first = n.args[0] if n.args else None
        if not isinstance(first, fx.Node) or first not in self.act:
            found.weight_binarizers += 1
            found.binary_params.update(_param_ancestors(n))
            return
        if in_sum.binary:
            found.warnings.append(f"binarizing op #{j} in {scope or 'the root forward'} reads an "
                                  "input that is already binary; not a site")
            return
        opname = op_name(ev, label, n.target)
        owner = p.mods.get(scope)
        # a conv/linear whose forward binarizes its own input -> hook the conv call
        if scope and is_weight_layer(owner) and _comes_from_outside(first, scope):
            s = Site(name="", kind=KIND_INPUT, op=opname, apply=APPLY_PRE_HOOK, module=scope,
                     call_index=scope_call, scope=scope, op_index=j)
        else:
            s = self._inline_site(n, first, opname, scope, j)
        s.alphabet = alphabet_of(out_sum, is_bool)
        found.sites.append(s)
        found.node_of_site[id(s)] = n

    def _inline_site(self, n: fx.Node, first: fx.Node, opname: str, scope: str, j: int) -> Site:
        p, found = self.p, self.found
        s = Site(name="", kind=KIND_INLINE, op=opname, apply=APPLY_OP, scope=scope, op_index=j)
        base = graph_output_name(first, scope, self.call_index_of, p.calls_per_path, p.dyn.callers)
        if base:
            found.bases[id(s)] = base
        prod = first
        # shift the producer's output when everything that reads it is this binarizer
        # (the op itself, or an inline STE approximant that re-joins it): the STE
        # window then moves with the threshold, as the paper's shift along x
        if prod.op == "call_module" and _exclusive_to_binarizer(prod, n, p.mods):
            s.apply, s.module, s.call_index = APPLY_PRODUCER, prod.target, self.call_index_of[prod]
        elif len(prod.users) > 1 and _exclusive_to_binarizer(prod, n, p.mods):
            found.site_notes.append((s, "an inline STE reads the same input and no module produces it; the "
                                        "shift moves the forward threshold only"))
        return s


def _under(leaf: str, path: str) -> bool:
    return leaf == "" or path == leaf or path.startswith(leaf + ".")


def _leaf_sites(p: _Passes, leaf: str, found: _Found) -> None:
    """Sites inside the untraced leaf ``leaf`` (``""``: the whole model, when it could not be
    traced), from the run-time pass; activation vs weight binarizer by the twin's pass."""
    for rec in p.dyn.calls:
        if rec.path in p.bin_paths and _under(leaf, rec.path):
            if _is_activation(p.dyn, p.dyn2, ("call", rec.path, rec.index), rec.inp):
                found.sites.append(Site(name="", kind=KIND_MODULE, op=f"module:{rec.cls.__name__}",
                                        apply=APPLY_PRE_HOOK, module=rec.path, call_index=rec.index,
                                        in_leaf=leaf or None, alphabet=alphabet_of(rec.out)))
            else:
                found.weight_binarizers += 1
    for ev, in_sum, out_sum in p.dyn.ops:
        if not _under(leaf, ev.scope) or any(under_bin(ev.scope, b) for b in p.bin_paths):
            continue
        out_t = binary_part(ev.output)
        is_bool = isinstance(out_t, torch.Tensor) and out_t.dtype == torch.bool and out_sum.distinct == 2
        if not (out_sum.binary or is_bool):
            continue
        if not _is_activation(p.dyn, p.dyn2, ("op", ev.scope, ev.index), in_sum):
            found.weight_binarizers += 1
            continue
        if in_sum.binary:
            continue
        opname = op_name(ev, ev.label)
        if ev.scope and is_weight_layer(p.mods.get(ev.scope)) and ev.scope != leaf:
            # input quantizer of a conv inside the leaf: hook that conv's call
            s = Site(name="", kind=KIND_INPUT, op=opname, apply=APPLY_PRE_HOOK, module=ev.scope,
                     call_index=_call_index_at(p.dyn, ev), scope=ev.scope, op_index=ev.index, in_leaf=leaf or None)
        else:
            s = Site(name="", kind=KIND_INLINE, op=opname, apply=APPLY_OP, scope=ev.scope, op_index=ev.index,
                     in_leaf=leaf or None)
            base = _dynamic_output_name(p.dyn, ev, p.bin_paths, p.calls_per_path)
            if base:
                found.bases[id(s)] = base
        s.alphabet = alphabet_of(out_sum, is_bool)
        found.sites.append(s)


def discover(model: nn.Module, input_shape: tuple[int, ...], *, include_hardtanh: bool = True) -> Discovery:
    """Find activation sites and weight binarizers of ``model`` for inputs of ``input_shape``.

    Returns a ``Discovery``; ``sites`` are in execution order, with addressing filled in and
    context left to ``analyse``. Raises TraceError when the model does not run on such inputs.
    """
    p = _run_passes(model, input_shape)
    found = _Found(warnings=[inplace_message(p.writes)] if p.writes else [])
    trace, trace_error = _trace(p, found)
    if trace is not None:
        _GraphWalk(p, trace, found, include_hardtanh).run()
        graph = trace.graph_module.graph
        for entry in _softmax_thresholds(graph, p.mods, activation_nodes(graph)):
            found.excluded.append(entry)
            found.warnings.append(f"{entry['name']}: {entry['reason']}")
    # sites inside untraced leaves (or everywhere when the model could not be traced)
    for leaf in (list(trace.leaves) if trace is not None else [""]):
        _leaf_sites(p, leaf, found)

    sites = one_site_per_call(found.sites)
    name_sites(sites, p.calls_per_path, found.bases, p.dyn.callers)
    name_sites(found.hardtanh_sites, p.calls_per_path, callers=p.dyn.callers)
    found.warnings.extend(f"site {s.name}: {note}" for s, note in found.site_notes)
    for s in sites + found.hardtanh_sites:
        s.producer_module = s.module if s.apply == APPLY_PRODUCER else None
    _release_copy(p.work, trace, model, p.dyn)
    return Discovery(sites, found.weight_binarizers, trace, p.dyn, p.bin_paths,
                     {s.name: found.node_of_site[id(s)] for s in sites if id(s) in found.node_of_site},
                     found.hardtanh_sites, found.warnings, trace_error, found.binary_params, list(p.writes),
                     found.excluded)


def _release_copy(work: nn.Module, trace: TraceResult | None, model: nn.Module, dyn: DynamicPass) -> None:
    """Free the memory of discover's copy once its forwards are done (peak memory: the model plus
    one copy). The graph keeps the copy's modules for structure only (types, shapes, users);
    nothing runs them again, so their parameters and buffers become the model's own tensors of
    the same name (the loaded values: ``analyse`` reads values from the model anyway), and the
    recorded ops drop the tensors they held (a weight binarizer's input is a parameter)."""
    theirs = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    swap: dict[int, torch.Tensor] = {}
    for name, t in list(work.named_parameters(remove_duplicate=False)) + list(work.named_buffers(remove_duplicate=False)):
        u = theirs.get(name)
        if isinstance(u, torch.Tensor) and u.shape == t.shape and u.dtype == t.dtype:
            swap[id(t)] = u
    holders = list(work.modules()) + (list(trace.graph_module.modules()) if trace is not None else [])
    for m in holders:
        for store in (m._parameters, m._buffers):
            for k, v in list(store.items()):
                if v is not None and id(v) in swap:
                    store[k] = swap[id(v)]
    dyn.ops = [(dataclasses.replace(ev, inputs=(), output=None, used_inputs=()), i, o) for ev, i, o in dyn.ops]


_SOFTMAX_FUNCS = {torch.softmax, torch.nn.functional.softmax, torch.special.softmax}
_COMPARE_OPS = {"gt", "ge", "lt", "le", "__gt__", "__ge__", "__lt__", "__le__", "greater", "less",
                "greater_equal", "less_equal"}


def _is_softmax(n: Any, mods: dict[str, nn.Module]) -> bool:
    if not isinstance(n, fx.Node):
        return False
    if n.op == "call_function":
        return n.target in _SOFTMAX_FUNCS
    if n.op == "call_method":
        return n.target == "softmax"
    return n.op == "call_module" and isinstance(mods.get(str(n.target)), nn.Softmax)


def _softmax_thresholds(g: fx.Graph, mods: dict[str, nn.Module], act: set) -> list[dict[str, Any]]:
    """Every {0,1} threshold on a softmax output (binary attention), as an excluded site
    (``{"name", "op", "alphabet", "reason"}``): it is reported, and it is not a site of the default
    shift: softmax(x - t) = softmax(x), so a shift of the scores before it changes nothing, and its
    own threshold is the model's (a probability, not a pre-activation)."""
    out = []
    for n in g.nodes:
        name = getattr(n.target, "__name__", str(n.target))
        if n.op not in ("call_function", "call_method") or name not in _COMPARE_OPS or len(n.args) < 2:
            continue
        a, b = n.args[0], n.args[1]
        p, lit = (a, b) if _is_softmax(a, mods) else (b, a) if _is_softmax(b, mods) else (None, None)
        if p is None or p not in act:
            continue
        scope, _ = node_scope(n)
        level = f"{lit:g}" if isinstance(lit, (int, float)) else "a tensor"
        out.append({"name": f"{scope or 'root'}:{name.strip('_')}", "op": name.strip("_"), "alphabet": "{0,1}",
                    "reason": f"a {{0,1}} threshold at {level} on a softmax output (binary attention); shift-invariant "
                              "input (softmax(x - t) = softmax(x): a shift of the scores changes nothing), so it is "
                              "not shifted by default; its threshold is the model's own"})
    return out


def site_identity(s: Site) -> tuple:
    """What a site *is*: the call that binarizes, independent of how it was found.

    An op-based site (inline op, a conv's input quantizer, a shift on the op's producer) is
    its binarizing op, ``("op", scope, op_index)``: the ``op_index``-th candidate op run while
    module ``scope`` is the innermost running module, per root forward. A module binarizer is
    its call, ``("call", module path, call_index)``.
    """
    if s.scope is not None and s.kind != KIND_MODULE:
        return ("op", s.scope, s.op_index)
    return ("call", s.module, s.call_index)


def one_site_per_call(sites: list[Site]) -> list[Site]:
    """``sites`` with every call kept once (the first found: graph before run time).

    The graph, each untraced leaf and the run-time pass may each find the same call (a leaf
    inside a leaf, a site seen both in the graph and inside a leaf); two sites of one call
    would shift its binarizer's input twice (``x - 2t``)."""
    seen: set[tuple] = set()
    out = []
    for s in sites:
        key = site_identity(s)
        if key in seen:
            continue
        seen.add(key)
        out.append(s)
    return out


def _is_activation(dyn: DynamicPass, dyn2: DynamicPass, key: tuple, inp: ValueSummary) -> bool:
    """Does the binarizer's input depend on the model's input (data flow, not its layout)?"""
    if not inp.is_tensor:
        return False
    dep = depends_on_input(dyn, dyn2, key)
    if dep is not None:
        return dep
    return inp.shape[:1] == (PROBE_BATCH,)  # not seen on the second input: best guess by layout


def _closure(node: fx.Node, mods: dict[str, nn.Module], limit: int = 32) -> set[fx.Node]:
    """Nodes reached from ``node`` through users, stopping at module calls and weight ops."""
    out: set[fx.Node] = set()
    frontier = [node]
    while frontier and len(out) < limit:
        cur = frontier.pop()
        for u in cur.users:
            if u in out or u.op == "output":
                continue
            if u.op == "call_module" or (u.op == "call_function" and getattr(u.target, "__name__", "") in
                                         ("conv1d", "conv2d", "conv3d", "linear")):
                continue
            out.add(u)
            frontier.append(u)
    return out


def _exclusive_to_binarizer(x: fx.Node, site: fx.Node, mods: dict[str, nn.Module]) -> bool:
    """Is every reader of ``x`` the binarizer ``site`` or part of its own STE expression?"""
    site_closure = _closure(site, mods) | {site}
    for u in x.users:
        if u is site:
            continue
        if not ((_closure(u, mods) | {u}) & site_closure):
            return False
    return True


def _param_ancestors(node: fx.Node) -> set[str]:
    out: set[str] = set()
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            out.add(str(n.target))
        stack.extend(n.all_input_nodes)
    return out


def under_bin(scope: str, b: str) -> bool:
    return scope == b or scope.startswith(b + ".")


def _comes_from_outside(node: fx.Node, scope: str) -> bool:
    """Does ``node`` (or the chain of single-input ops before it) come from outside ``scope``?"""
    cur = node
    for _ in range(8):
        s, _ = node_scope(cur)
        if not (s == scope or s.startswith(scope + ".")) or cur.op == "placeholder":
            return True
        inputs = [a for a in cur.all_input_nodes if a.op != "get_attr"]
        if len(inputs) != 1:
            return False
        cur = inputs[0]
    return False


def _call_index_at(dyn: DynamicPass, ev: OpEvent) -> int:
    """Which call of module ``ev.scope`` was running when ``ev`` happened (order of ops)."""
    ops_in_scope = [e for e, _, _ in dyn.ops if e.scope == ev.scope]
    calls = max((r.index + 1 for r in dyn.calls if r.path == ev.scope), default=1)
    if calls <= 1 or not ops_in_scope:
        return 0
    per_call = max(1, len(ops_in_scope) // calls)
    return min(calls - 1, ev.index // per_call)
