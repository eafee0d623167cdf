"""Phase 7: export a (patched, possibly folded) model to ONNX and verify it with onnxruntime.

How the verification works (and what it measures):

1. The model is wrapped so that, besides the logits, it returns the value of every binary
   activation site as extra outputs ("taps", ``_taps.Taps``): a binarizer module's output, the
   (shifted) input of a conv that binarizes its own input, the (shifted) output of the producer
   of an inline binarizer, or the output of an intercepted inline op.
2. The wrapper is exported with ``torch.onnx.export(dynamo=True)`` (batch dimension dynamic
   when the model allows it), checked with ``onnx.checker``, and run with onnxruntime on
   several random batches in eval mode. Checks: max abs logit difference (relative to the
   logit scale), top-1 agreement, and the share of tapped binary activations whose sign
   differs between torch and onnxruntime (``sign_flip_share``). Pass: sign-flip share <= 1e-4,
   top-1 agreement >= 0.99, and the logit bound (1e-3 x max(1, max |logit|)) whenever no
   tapped activation flipped (or none could be tapped): a flip legitimately moves the logits.
3. If a check fails, the next of ``TRIES`` is tried: onnxruntime's graph optimizations off,
   then the exporter's optimizer off (constant folding of weight binarization has been seen
   to flip signs). ``VerificationError`` (exit 4) names the failed checks of the last try.
4. On success the taps are removed from the graph (outputs dropped, dead nodes removed), the
   clean graph is checked and run once more against torch, and written atomically.

The graph is captured by the first of ``CAPTURES`` that works: a model that ``torch.export``
cannot trace because of data-dependent Python control flow is exported with the TorchScript
tracer instead (the branch taken on the sample input is baked into the graph; the report says
so). Any other exporter failure is one ``ExportError`` line. Run risky exports through
``export_patched_dir(..., isolate=True)``: a child process (``_isolate``), so that an exporter
crash (segfault) becomes an error message too.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ._io import atomic_write_bytes
from ._isolate import child_command, child_dir, child_error, error_payload, run_child, watch_parent
from ._taps import Taps as _Taps  # noqa: F401 (the taps' old home: ``export._Taps`` still imports)
from ._taps import Tapped as _Tapped
from .errors import BnnshiftError, VerificationError
from .load import logits_picker, pick_logits
from .sites import Site

__all__ = ["ExportError", "ExportReport", "export_onnx", "export_patched_dir"]

DEFAULT_BATCHES = 3
DEFAULT_BATCH_SIZE = 4
ATOL = 1e-3  # logit tolerance, times max(1, max |logit|)
MAX_SIGN_FLIP_SHARE = 1e-4
MIN_TOP1 = 0.99
TIE_RTOL = 1e-5  # |pre-activation - t| <= TIE_RTOL x max(1, max |pre-activation|): a tie


class ExportError(BnnshiftError):
    """The model could not be exported to ONNX (exit 1)."""


@dataclass
class ExportReport:
    """What ``export_onnx`` did. ``attempts``: one entry per try (exporter optimizer, onnxruntime
    graph optimizations, the checks and whether they passed)."""

    path: str
    opset: int | None
    exporter: str
    dynamic_batch: bool
    nodes: int
    optimize: bool
    ort_graph_optimizations: bool
    max_abs_diff: float
    top1_agreement: float
    sign_flip_share: float | None  # flips with a margin (ties and what follows them excluded)
    sites_checked: int
    batches: int
    passed: bool
    attempts: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tie_flips: int = 0  # flips where |pre-activation - t| is within float tolerance: not failures
    flips_after_tie: int = 0  # flips at later sites of a sample that had a tie (consequences)
    tied_samples: int = 0  # samples left out of the logit / top-1 comparison because of a tie
    # from a patched directory: its BN statistics predate its weights (``patch.bn_statistics_stale``);
    # not part of the JSON (the caller says it as a note)
    bn_statistics_stale: bool | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("bn_statistics_stale")
        return d


# --------------------------------------------------------------------------- wrappers


class _Picked(nn.Module):
    """``forward(x) -> logits``: the model with its tuple / dict / dataclass output reduced to the
    logits (``pick``), for the TorchScript exporter (which mis-records the taps' hooks)."""

    def __init__(self, model: nn.Module, pick: Any):
        super().__init__()
        self.model = model
        self._pick = pick

    def forward(self, x):
        return self._pick(self.model(x))




# --------------------------------------------------------------------------- helpers


def _one_line(exc: BaseException) -> str:
    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    msg = (str(root).strip().splitlines() or [""])[0]
    if len(msg) > 240:
        msg = msg[:237] + "..."
    return f"{type(root).__name__}: {msg}" if msg else type(root).__name__


def _is_data_dependent(exc: BaseException) -> bool:
    cur: BaseException | None = exc
    while cur is not None:
        name = type(cur).__name__
        text = str(cur)
        if "DataDependent" in name or "data-dependent" in text or "GuardOnDataDependent" in text:
            return True
        cur = cur.__cause__
    return False


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress on stdout: keep stdout for --json."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def _dce(proto) -> None:
    """Drop nodes whose outputs no longer reach a graph output (after removing the taps)."""
    g = proto.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output) or not node.output:
            keep.append(node)
            needed.update(i for i in node.input if i)
            for a in node.attribute:  # subgraphs (If/Loop) read outer names
                for sg in list(a.g.node if a.HasField("g") else []) + [n for gg in a.graphs for n in gg.node]:
                    needed.update(i for i in sg.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)


def _session(model_bytes: bytes, ort_opt: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(os.environ.get("BNNSHIFT_ORT_THREADS", "1"))
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if ort_opt
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _compare(sess, wrapper: _Tapped, batches: list[torch.Tensor], n_taps: int | None,
             exclude: list[Any] | None = None) -> dict[str, Any]:
    """onnxruntime vs torch on ``batches``: logits, top-1 and the binary activations.

    A flipped binary activation whose torch pre-activation is within ``TIE_RTOL`` (relative to
    the site's value scale) of the threshold is a *tie*: both runtimes are right to within float
    rounding. Ties are counted apart, and so is every flip of the same sample at later sites and
    its logits/top-1 (a tie upstream legitimately moves what follows). Only flips with a margin,
    in samples without an earlier tie, fail verification.
    """
    import numpy as np

    max_diff, scale, agree, total = 0.0, 1.0, 0, 0
    flips, elems, ties, after_tie, tied_samples, samples = 0, 0, 0, 0, 0, 0
    in_name = sess.get_inputs()[0].name
    names = [n for n in wrapper._taps.names]
    masks = []
    for bi, xb in enumerate(batches):
        with torch.no_grad():
            ref = wrapper(xb)
        got = sess.run(None, {in_name: xb.numpy()})
        r0 = ref[0].detach().float().numpy()
        g0 = np.asarray(got[0], dtype=np.float32)
        if r0.shape != g0.shape:
            raise VerificationError(f"onnxruntime output shape {g0.shape} != torch {r0.shape}")
        n = r0.shape[0] if r0.ndim >= 1 else 1
        tied = np.zeros(n, dtype=bool)  # samples with a tie flip at an earlier site
        if exclude is not None and bi < len(exclude) and exclude[bi] is not None and exclude[bi].shape == tied.shape:
            tied |= exclude[bi]  # ties found by the tapped run (the clean graph has no taps)
        if n_taps:
            present = [nm for nm in names if nm in wrapper._taps.values]
            for name, a, b in zip(present, ref[1:], got[1:]):
                a = np.sign(a.detach().float().numpy())
                b = np.sign(np.asarray(b, dtype=np.float32))
                elems += a.size
                if a.shape != b.shape:
                    flips += a.size
                    continue
                flip = a != b
                if not flip.any():
                    continue
                per_sample = flip.reshape(flip.shape[0], -1) if flip.ndim >= 1 and flip.shape[0] == n else None
                pre = wrapper._taps.pre_values.get(name)
                tie = np.zeros_like(flip)
                if pre is not None and tuple(pre.shape) == flip.shape:
                    p = pre.detach().double().numpy()
                    tol = TIE_RTOL * max(1.0, float(np.abs(p).max()) if p.size else 1.0)
                    tie = np.abs(p) <= tol
                if per_sample is not None:
                    earlier = np.broadcast_to(tied.reshape(-1, *([1] * (flip.ndim - 1))), flip.shape)
                    after_tie += int((flip & earlier).sum())
                    ties += int((flip & tie & ~earlier).sum())
                    flips += int((flip & ~tie & ~earlier).sum())
                    tied |= (flip & tie).reshape(n, -1).any(1)
                else:
                    ties += int((flip & tie).sum())
                    flips += int((flip & ~tie).sum())
        masks.append(tied.copy())
        clean = ~tied
        samples += n
        tied_samples += int(tied.sum())
        if clean.any() or not n_taps:
            rc, gc = (r0[clean], g0[clean]) if r0.ndim >= 1 and r0.shape[0] == n else (r0, g0)
            max_diff = max(max_diff, float(np.abs(rc - gc).max()) if rc.size else 0.0)
            scale = max(scale, float(np.abs(rc).max()) if rc.size else 1.0)
            if rc.ndim == 2:
                agree += int((rc.argmax(1) == gc.argmax(1)).sum())
                total += rc.shape[0]
    top1 = agree / total if total else 1.0
    share = (flips / elems) if elems else None
    failed = []
    # a flipped binary activation legitimately moves the logits (BNNs amplify float noise at
    # sign(0)): with the flips measured, the logit bound applies when none flipped
    if max_diff > ATOL * scale and (share is None or flips == 0):
        failed.append(f"max abs logit diff {max_diff:.3g} > {ATOL * scale:.3g}")
    if top1 < MIN_TOP1:
        failed.append(f"top-1 agreement {top1:.3f} < {MIN_TOP1}")
    if share is not None and share > MAX_SIGN_FLIP_SHARE:
        failed.append(f"sign-flip share {share:.2e} > {MAX_SIGN_FLIP_SHARE:g} (flips with a margin, ties excluded)")
    if samples and tied_samples == samples:
        failed.append("every sample had a tie at the threshold: nothing left to compare")
    return {"max_abs_diff": max_diff, "top1_agreement": top1, "sign_flip_share": share, "tie_flips": ties,
            "flips_after_tie": after_tie, "tied_samples": tied_samples, "tied_masks": masks, "failed": failed}


def _torchscript(wrapper: nn.Module, x: torch.Tensor, opset: int | None):
    """The TorchScript exporter (``dynamo=False``) on the model alone, its output reduced to the
    logits: the tracer mis-records the taps' hooks on a wrapped model, so the sign-flip check is
    skipped (logits and top-1 are still compared)."""
    import onnx

    buf = io.BytesIO()
    inner = wrapper.model if isinstance(wrapper, _Tapped) else wrapper
    keep = None  # which flattened graph output are the logits (a tuple / dict output)
    if isinstance(wrapper, _Tapped):
        from torch.utils._pytree import tree_leaves

        with torch.no_grad():
            out = inner(x[:1])
        if not isinstance(out, torch.Tensor):
            logits = wrapper._pick(out)
            leaves = [v for v in tree_leaves(out) if isinstance(v, torch.Tensor)]
            keep = next((i for i, v in enumerate(leaves) if v is logits), None)
            if keep is None:  # a wrapper loses the shifts lowered into parameters in this tracer
                inner = _Picked(inner, wrapper._pick)  # the verification that follows checks it
    with _quiet():
        torch.onnx.export(inner, (x,), buf, dynamo=False, opset_version=opset or 17,
                          input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    if keep is not None:  # the model's own graph, its outputs reduced to the logits
        chosen = onnx.ValueInfoProto()
        chosen.CopyFrom(proto.graph.output[keep])
        del proto.graph.output[:]
        proto.graph.output.append(chosen)
        _dce(proto)
    return proto


@dataclass(frozen=True)
class Capture:
    """One way to turn the tapped model into an ONNX graph, tried in order (``CAPTURES``, as
    torch.onnx's ``_capture_strategies``): ``run(wrapper, x, opset, optimize, warn, failure)``
    returns (ModelProto, exporter name, dynamic batch?) or raises; ``after(failure, opset)`` says
    whether it is tried after the previous capture failed with ``failure``; a ``final`` capture's
    own error is the one reported."""

    name: str
    run: Callable[..., tuple[Any, str, bool]]
    after: Callable[[BaseException, int | None], bool]
    final: bool = False


def _dynamo(dynamic: bool):
    def run(wrapper, x, opset, optimize, warn, failure):
        import torch.export as tex

        kw: dict[str, Any] = dict(dynamo=True, optimize=optimize, opset_version=opset,
                                  input_names=["input"], external_data=False)
        if dynamic:
            kw["dynamic_shapes"] = ({0: tex.Dim("batch", min=1, max=4096)},)
        with _quiet():
            prog = torch.onnx.export(wrapper, (x,), **kw)
        got = _default_opset(prog.model_proto, None)
        if opset is None or got == opset:
            return prog.model_proto, "dynamo", dynamic
        # an ExportError (the exporter's own failures are not): the TorchScript exporter is next
        raise ExportError(f"the dynamo exporter wrote opset {got}, not {opset} (its down-conversion failed)")
    return run


def _torchscript_capture(wrapper, x, opset, optimize, warn, failure):
    """The TorchScript exporter after the dynamo exporter failed with ``failure`` (data-dependent
    control flow, or another opset than the asked one); the report says which."""
    asked = f"--opset {opset}: " if opset is not None else ""
    try:
        proto = _torchscript(wrapper, x, opset)
    except Exception as exc2:  # noqa: BLE001
        raise ExportError(f"{asked}ONNX export failed: {_one_line(failure)}; TorchScript exporter: {_one_line(exc2)}",
                          hint=("ask for another --opset, or leave it out (the exporter's own)"
                                if asked else "remove data-dependent Python control flow from forward")) from None
    got = _default_opset(proto, None)
    if opset is not None and got != opset:
        raise ExportError(f"--opset {opset}: the TorchScript exporter wrote opset {got} ({_one_line(failure)})",
                          hint="ask for another --opset, or leave it out (the exporter's own)")
    if _is_data_dependent(failure):
        warn.append("torch.export cannot trace this model (data-dependent control flow: "
                    f"{_one_line(failure)}); exported with the TorchScript tracer, which bakes in the "
                    "branch taken on the sample input; sign flips per site not checked (logits only)")
    else:
        warn.append(f"--opset {opset}: {_one_line(failure)}; exported with the TorchScript exporter "
                    f"(opset {opset}); sign flips per site not checked (logits only)")
    return proto, "torchscript", True


CAPTURES = (
    Capture("dynamo, dynamic batch", _dynamo(True), after=lambda failure, opset: True),
    # a static batch helps a model whose batch dimension cannot be symbolic, not a data-dependent one
    Capture("dynamo, static batch", _dynamo(False),
            after=lambda failure, opset: not _is_data_dependent(failure) and not isinstance(failure, ExportError)),
    Capture("torchscript", _torchscript_capture, final=True,
            after=lambda failure, opset: _is_data_dependent(failure) or (opset is not None
                                                                          and isinstance(failure, ExportError))),
)


def _export(wrapper: nn.Module, x: torch.Tensor, opset: int | None, optimize: bool, warn: list[str]):
    """(ModelProto, exporter name, dynamic batch?) from the first of ``CAPTURES`` that works, or
    raise ExportError (the last failure).

    With ``opset``, the file's default-domain opset is that opset or ExportError: the dynamo
    exporter builds opset 18 and, when down-converting fails, keeps 18 with only a logged
    warning; then the TorchScript exporter, which writes the asked opset, is tried."""
    failure: BaseException | None = None
    for c in CAPTURES:
        if failure is not None and not c.after(failure, opset):
            continue
        if c.final:
            return c.run(wrapper, x, opset, optimize, warn, failure)
        try:
            return c.run(wrapper, x, opset, optimize, warn, failure)
        except Exception as exc:  # noqa: BLE001
            failure = exc
    asked = f"--opset {opset}: " if opset is not None else ""
    raise ExportError(f"{asked}ONNX export failed: {_one_line(failure)}",
                      hint="rerun with BNNSHIFT_DEBUG=1; see docs/patch.md (export)") from None


def _default_opset(proto, asked: int | None) -> int | None:
    """The opset of the default ONNX domain the file really uses (the exporter's when none was asked)."""
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return asked


def _set_metadata(proto, model: nn.Module, extra: dict[str, str] | None) -> None:
    """ONNX ``metadata_props``: bnnshift's version and the shifts per site (JSON), plus ``extra``
    (``export_patched_dir``: the recipe's sha256), so a deployed file says what it is."""
    import onnx

    from ._version import __version__
    from .patch import patch_state

    st = patch_state(model)
    props = {"bnnshift_version": __version__}
    if st is not None:
        props["bnnshift_shifts"] = json.dumps({k: float(v) for k, v in st.shifts.items()}, sort_keys=True)
        if st.folded:
            props["bnnshift_folded"] = json.dumps(dict(st.folded), sort_keys=True)
    props.update(extra or {})
    onnx.helper.set_model_props(proto, props)


WRITES_HINT = ("compute the binary weight in forward without writing the parameter (w = SignSTE.apply(self.weight)); "
               "clamp after optimizer.step() or with torch.nn.utils.parametrize; then load the same weights and export")


def writes_message(written: dict[str, str]) -> str:
    """One line naming the parameters a forward writes and how (``_guard.ParamWrites``)."""
    shown = ", ".join(f"{n} ({how})" for n, how in list(written.items())[:4]) + (", ..." if len(written) > 4 else "")
    return f"the model's forward writes {shown} in place: torch.onnx cannot export a write to a parameter"


@dataclass(frozen=True)
class VerifyTry:
    """One way to get a verified file, tried in order (``TRIES``): the exporter's graph
    optimizer on or off, onnxruntime's graph optimizations on or off. Each try's result, passed
    or failed with its checks, is one entry of ``ExportReport.attempts``."""

    name: str
    optimize: bool  # torch.onnx.export(optimize=...)
    ort_graph_optimizations: bool


# constant folding of weight binarization has been seen to flip signs: the optimizers go off in turn
TRIES = (
    VerifyTry("as exported", True, True),
    VerifyTry("onnxruntime graph optimizations off", True, False),
    VerifyTry("exporter optimizer off", False, True),
    VerifyTry("both optimizers off", False, False),
)


@dataclass
class _Run:
    """What every try of one ``export_onnx`` call shares."""

    model: nn.Module
    wrapper: _Tapped
    data: list[torch.Tensor]
    opset: int | None
    path: Any
    metadata: dict[str, str] | None
    warn: list[str]
    attempts: list[dict[str, Any]] = field(default_factory=list)


def export_onnx(model: nn.Module, input_shape: Iterable[int], path: str | os.PathLike[str], opset: int | None = None, *,
                sites: Iterable[Site] | None = None, batches: int = DEFAULT_BATCHES,
                batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
                metadata: dict[str, str] | None = None, output_index: int | None = None,
                output_key: str | None = None) -> ExportReport:
    """Export ``model`` (eval mode) to ONNX at ``path`` and verify it against torch with onnxruntime.

    ``input_shape``: one sample's shape without the batch dimension (random float32 batches of
    ``batch_size`` are drawn with ``seed``). ``sites``: binary activations to compare (default:
    the sites of a model patched by bnnshift, folded ones included). ``metadata``: extra ONNX
    ``metadata_props`` (bnnshift's version and the shifts are always written).
    ``ExportReport.opset`` is the opset the file uses: the asked ``opset`` or an ``ExportError``
    naming it. A model returning a tuple / list, a dict (or ``ModelOutput``) or a dataclass is
    exported with its logits as the one output (``output_index`` / ``output_key`` pick them as in
    :func:`bnnshift.load.pick_logits`; a UsageError when none fits) and verified like a tensor.
    The ways to a verified file (``TRIES``) are tried in order. Returns an ``ExportReport``;
    raises ``ExportError`` when the exporter fails and ``VerificationError`` when no try passes.
    Nothing is written then.
    """
    shape = tuple(int(v) for v in input_shape)
    if sites is None:
        from .patch import patch_state

        st = patch_state(model)
        sites = list(st.sites) if st is not None else []
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    data = [torch.randn((batch_size, *shape), generator=g) for _ in range(max(1, batches))]
    warn: list[str] = []
    _check_exportable(model, data[0], output_index, output_key, warn)
    taps = _Taps(model, sites)
    run = _Run(model, _Tapped(model, taps, logits_picker(output_index, output_key)), data, opset, path, metadata, warn)
    try:
        report = _try_in_order(run)
    finally:
        taps.remove()
        model.train(was_training)
    if report is not None:
        return report
    last = run.attempts[-1]["failed"] if run.attempts else ["no attempt"]
    asked = f"--opset {opset}: " if opset is not None else ""
    raise VerificationError(f"{asked}ONNX verification failed after {len(run.attempts)} tries: {'; '.join(last)}",
                            hint="the torch model is unchanged; see docs/patch.md (export)")


def _check_exportable(model: nn.Module, x: torch.Tensor, output_index: int | None, output_key: str | None,
                      warn: list[str]) -> None:
    """Refuse a forward that writes its parameters (``ExportError``) and an output without
    logits (``UsageError``), before any forward of ours: a forward that writes its own
    parameters changes them only once; found by the act (a clamp that changes nothing is a write
    too)."""
    from ._guard import inplace_writers

    written = inplace_writers(model, x)
    if written:
        raise ExportError(writes_message(written), hint=WRITES_HINT)
    with torch.no_grad():
        out = model(x[:2])
    if not isinstance(out, torch.Tensor):  # UsageError when no element / item fits
        _, how = pick_logits(out, output_index, output_key)
        if how:
            warn.append(how.split(" (")[0] + "; the ONNX file's one output is it")


def _try_in_order(run: _Run) -> ExportReport | None:
    """``TRIES`` in order until one passes (its report) or none does (None). One graph is captured
    per exporter-optimizer setting; a setting whose graph fails ``onnx.checker`` or whose file
    without the taps fails is not tried further; the TorchScript exporter has no optimizer switch."""
    import onnx

    captured: dict[bool, tuple[Any, str, bool]] = {}
    done: set[bool] = set()  # exporter-optimizer settings with nothing left to try
    for t in TRIES:
        if t.optimize in done:
            continue
        if t.optimize not in captured:
            proto, exporter, dynamic = _export(run.wrapper, run.data[0], run.opset, t.optimize, run.warn)
            try:
                onnx.checker.check_model(proto)
            except Exception as exc:  # noqa: BLE001
                run.attempts.append({"optimize": t.optimize, "ort_graph_optimizations": None,
                                     "failed": [f"onnx.checker: {_one_line(exc)}"]})
                done.add(t.optimize)
                continue
            captured[t.optimize] = (proto, exporter, dynamic)
            if exporter == "torchscript":  # the optimizer switch does not apply
                done.update(o.optimize for o in TRIES if o.optimize != t.optimize)
        report, graph_spent = _one_try(run, t, *captured[t.optimize])
        if report is not None:
            return report
        if graph_spent:  # its taps were stripped and the clean file failed
            done.add(t.optimize)
    return None


def _one_try(run: _Run, t: VerifyTry, proto: Any, exporter: str,
             dynamic: bool) -> tuple[ExportReport | None, bool]:
    """Verify the tapped graph with ``t``'s onnxruntime setting; when it passes, strip the taps,
    check the clean graph once more and write it. Each check is one attempt. Returns (the report
    or None, whether ``proto`` was used up: stripped of its taps)."""
    import onnx

    n_out = len(proto.graph.output)
    batches = run.data if dynamic else [run.data[0]]
    try:
        res = _compare(_session(proto.SerializeToString(), t.ort_graph_optimizations), run.wrapper, batches, n_out - 1)
    except VerificationError as exc:
        res = {"failed": [exc.message]}
    except Exception as exc:  # noqa: BLE001 - onnxruntime refusing the graph
        res = {"failed": [f"onnxruntime: {_one_line(exc)}"]}
    head = {"optimize": t.optimize, "ort_graph_optimizations": t.ort_graph_optimizations, "exporter": exporter}
    run.attempts.append({**head, **{k: v for k, v in res.items() if k != "tied_masks"}})
    if res["failed"]:
        return None, False
    # the deliverable: the same graph without the taps
    del proto.graph.output[1:]
    _dce(proto)
    _set_metadata(proto, run.model, run.metadata)
    onnx.checker.check_model(proto)
    clean = proto.SerializeToString()
    res2 = _compare(_session(clean, t.ort_graph_optimizations), run.wrapper, run.data[:1], 0,
                    exclude=res["tied_masks"][:1])
    if res2["failed"]:
        run.attempts.append({**head, "failed": ["without taps: " + f for f in res2["failed"]]})
        return None, True
    if not t.ort_graph_optimizations:
        run.warn.append("verified with onnxruntime graph optimizations OFF: run it with "
                        "SessionOptions.graph_optimization_level = ORT_DISABLE_ALL")
    atomic_write_bytes(run.path, clean)
    return ExportReport(path=str(run.path), opset=_default_opset(proto, run.opset), exporter=exporter,
                        dynamic_batch=dynamic, nodes=len(proto.graph.node), optimize=t.optimize,
                        ort_graph_optimizations=t.ort_graph_optimizations, max_abs_diff=res["max_abs_diff"],
                        top1_agreement=res["top1_agreement"], sign_flip_share=res["sign_flip_share"],
                        sites_checked=n_out - 1, batches=len(batches), passed=True, attempts=run.attempts,
                        warnings=run.warn, tie_flips=res["tie_flips"], flips_after_tie=res["flips_after_tie"],
                        tied_samples=res["tied_samples"]), True


# --------------------------------------------------------------------------- from a patched directory


def _export_dir_inprocess(out_dir: str, onnx_path: str, opset: int | None, batches: int, *, model: Any = None,
                          model_args: Any = None, trust: bool = False, output_index: int | None = None,
                          output_key: str | None = None) -> ExportReport:
    from .patch import load_patched, read_recipe

    recipe = read_recipe(out_dir)
    if not recipe.input_shape:
        raise ExportError(f"{out_dir}/patch.json has no input_shape", hint="re-run bnnshift patch with --input-shape")
    model = load_patched(out_dir, model=model, args=model_args, trust=trust)
    from ._io import sha256_file
    from .patch import bn_statistics_stale

    meta = {"bnnshift_recipe_sha256": sha256_file(Path(out_dir) / "patch.json")}
    norm = getattr(recipe, "normalisation", None)
    if norm:  # the input normalisation the model expects: {"mean": [..], "std": [..], "source"} (pixels in [0, 1])
        meta["bnnshift_normalisation"] = json.dumps(norm, sort_keys=True)
    stale = bn_statistics_stale(model, recipe)  # said by the caller as a note (``pipeline.export_dir``)
    report = export_onnx(model, recipe.input_shape, onnx_path, opset, batches=batches, metadata=meta,
                         output_index=output_index, output_key=output_key)
    report.bn_statistics_stale = stale
    return report


def export_patched_dir(out_dir: str | os.PathLike[str], onnx_path: str | os.PathLike[str], opset: int | None = None, *,
                       batches: int = DEFAULT_BATCHES, isolate: bool = True, timeout: float | None = 1800,
                       model: Any = None, model_args: Any = None, trust: bool = False,
                       output_index: int | None = None, output_key: str | None = None) -> ExportReport:
    """Export the model of a patched directory (``load_patched``) to ``onnx_path`` and verify it.
    ``output_index`` / ``output_key``: which element / item of a tuple / dict output are the logits
    (:func:`export_onnx`).

    ``model`` / ``model_args`` / ``trust``: as ``load_patched`` (the model from the user, or
    trust the recipe's code spec); an ``nn.Module`` instance exports in this process.
    ``isolate`` runs the export in a subprocess, so an exporter crash is reported as an
    ``ExportError`` instead of killing the caller. Raises ``ExportError`` / ``VerificationError``.
    """
    from .load import ModelSpec

    if model is not None and not isinstance(model, (str, ModelSpec)):
        isolate = False  # an instance cannot cross the process boundary
    if not isolate:
        return _export_dir_inprocess(str(out_dir), str(onnx_path), opset, batches, model=model,
                                     model_args=model_args, trust=trust, output_index=output_index,
                                     output_key=output_key)
    from ._io import atomic_write_from, fault_point

    # the child writes only inside this directory (leftovers of killed exports swept first); the
    # parent moves the file into place, so a child that outlives a killed parent can never write
    # (or overwrite) the destination
    with child_dir(_EXPORT_TMP_PREFIX) as tmp:
        rep = Path(tmp) / "report.json"
        child_onnx = Path(tmp) / "model.onnx"
        cmd = child_command("bnnshift.export", code_dirs=_module_spec_dirs(out_dir, model)) + [
            os.path.abspath(out_dir), str(child_onnx), "--report", str(rep),
            "--batches", str(batches), "--parent-pid", str(os.getpid())]
        if opset is not None:
            cmd += ["--opset", str(opset)]
        if model is not None:
            cmd += ["--model", str(model)]
        for a in _arg_pairs(model_args):
            cmd += ["--arg", a]
        if trust:
            cmd += ["--trust-recipe"]
        if output_index is not None:
            cmd += ["--output-index", str(output_index)]
        if output_key is not None:
            cmd += ["--output-key", str(output_key)]
        proc = _run_child(cmd, timeout)
        data = json.loads(rep.read_text()) if rep.is_file() else None
        if proc.returncode == 0 and data and "report" in data and child_onnx.is_file():
            fault_point("export:before-move")
            atomic_write_from(child_onnx, onnx_path)
            data["report"]["path"] = str(onnx_path)
    if proc.returncode == 0 and data and "report" in data:
        report = ExportReport(**data["report"])
        report.bn_statistics_stale = data.get("bn_statistics_stale")
        return report
    if data and "error" in data:
        raise _child_error(data)
    if proc.returncode < 0:
        raise ExportError(f"the ONNX exporter crashed (signal {-proc.returncode})",
                          hint="the model may binarize in place (.data); export the folded model or simplify forward")
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:240]
    raise ExportError(f"the ONNX export process failed (exit {proc.returncode}): {tail}")


def _child_error(data: dict[str, Any]) -> BnnshiftError:
    """The child's error as the exception it was (its class by name among bnnshift's, so its exit
    code and one line are those of an export in this process), else an ``ExportError`` /
    ``VerificationError`` by exit code."""
    return child_error(data, extra=(ExportError,), default=ExportError,
                       by_exit_code={VerificationError.exit_code: VerificationError})


def _run_child(cmd: list[str], timeout: float | None) -> subprocess.CompletedProcess:
    """Run the exporter child (``_isolate.run_child``); ``ExportError`` after ``timeout`` seconds."""
    return run_child(cmd, timeout, error=ExportError, what="ONNX export", hint="export a smaller model")


def _module_spec_dirs(out_dir: Any, model: Any) -> list[str]:
    """The cwd when the model the child builds is a ``pkg.mod:fn`` spec the user named (with
    ``--model``) or the recipe names (rebuilt only when trusted): ``python -m bnnshift`` resolved
    it against the cwd. A ``file.py:fn`` spec's folder is added by the loader itself, only while
    it imports that file; a ``zoo:`` / ``timm:`` / ``torchvision:`` model needs nothing."""
    kind = None
    try:
        if model is not None:
            from .load import ModelSpec, parse_model_spec

            kind = (model if isinstance(model, ModelSpec) else parse_model_spec(str(model))).kind
        else:
            from .patch import read_recipe

            m = read_recipe(out_dir).model
            kind = m.get("kind") if isinstance(m, dict) else None
    except BnnshiftError:
        return []  # the child reports the problem with the spec / recipe
    return [os.getcwd()] if kind == "module" else []


_EXPORT_TMP_PREFIX = "bnnshift-export-"  # + parent PID + "-": the exporter's temp directory


def _arg_pairs(args: Any) -> list[str]:
    """``--arg`` pairs for the export subprocess (a dict of factory arguments, or the pairs)."""
    if args is None:
        return []
    if isinstance(args, dict):
        return [f"{k}={v!r}" for k, v in args.items()]
    return [str(a) for a in args]


def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bnnshift.export")
    ap.add_argument("out_dir")
    ap.add_argument("onnx_path")
    ap.add_argument("--opset", type=int, default=None)
    ap.add_argument("--batches", type=int, default=DEFAULT_BATCHES)
    ap.add_argument("--report", required=True)
    ap.add_argument("--parent-pid", type=int, default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--arg", action="append", default=None)
    ap.add_argument("--trust-recipe", action="store_true")
    ap.add_argument("--output-index", type=int, default=None)
    ap.add_argument("--output-key", default=None)
    a = ap.parse_args(argv)
    if a.parent_pid is not None:
        watch_parent(a.parent_pid)
    try:
        report = _export_dir_inprocess(a.out_dir, a.onnx_path, a.opset, a.batches, model=a.model, model_args=a.arg,
                                       trust=a.trust_recipe, output_index=a.output_index,
                                       output_key=a.output_key)
        payload, code = {"report": report.to_json(), "bn_statistics_stale": report.bn_statistics_stale}, 0
    except BnnshiftError as exc:
        payload, code = error_payload(exc), exc.exit_code
    except Exception as exc:  # noqa: BLE001
        payload, code = {"error": f"ONNX export failed: {_one_line(exc)}", "hint": None, "exit_code": 1}, 1
    Path(a.report).write_text(json.dumps(payload, default=str))
    return code


if __name__ == "__main__":
    sys.exit(_main())
