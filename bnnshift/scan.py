"""The scan pipeline: load -> discover (dynamic pass + trace) -> analyse -> probe -> report.

``scan_model`` works on a model instance (library API); ``scan`` on a model spec (CLI).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from ._guard import copy_model
from .analyse import analyse
from .detect import PROBE_BATCH, Discovery, discover, example_input
from .errors import NoSitesError
from .probe import gradient_check, probe_sites
from .sites import ScanReport, Site
from .validate import resolve_input_shape  # noqa: F401 (public here too: bnnshift.scan.resolve_input_shape)

NO_SITES_HINT = ("if your binarizer is custom, declare it in a plugin: "
                 "registry.register_detector(Detector(name=..., module_types=(YourSign,))) - see docs/plugins.md")


def model_summary(model: nn.Module, input_shape: tuple[int, ...], binary_params: set[str],
                  binary_input_modules: set[str], ops: list | None = None) -> dict[str, Any]:
    """larq-style summary: parameters, binary vs float MACs, memory with 1-bit weights.

    ``ops``: the conv / linear ops of one forward (``summary.weight_ops``), measured here when
    None; a parameter whose effective weight is binary counts as binary."""
    from .summary import macs_per_module, binary_weight_layers, weight_ops

    if ops is None:
        # every conv / linear op, also F.conv2d / F.linear written in a forward
        ops, _ = weight_ops(model, example_input(input_shape, batch=1), binary_params)
    binary_params = set(binary_params) | binary_weight_layers(ops)[1]
    total = binary = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if name in binary_params:
            binary += p.numel()
    per_module = macs_per_module(ops)
    macs = {"binary": sum(n["binary"] for n in per_module.values()),
            "float": sum(n["float"] for n in per_module.values())}
    float_params = total - binary
    return {
        "params": total, "binary_params": binary, "float_params": float_params,
        "binary_macs": macs["binary"], "float_macs": macs["float"],
        # ReActNet's OPs: BOPs / 64 + FLOPs
        "ops": macs["binary"] / 64 + macs["float"],
        "memory_float32_bytes": total * 4,
        "memory_1bit_bytes": int(float_params * 4 + binary / 8),
    }


def scan_model(model: nn.Module, input_shape: Iterable[int], *, name: str = "model",
               batches: Iterable[torch.Tensor] | None = None, data_name: str | None = None,
               require_sites: bool = False, include_hardtanh: bool = True,
               device: torch.device | str | None = None) -> ScanReport:
    """Find and analyse the binary activations of ``model``.

    ``input_shape``: one sample's shape, e.g. (1, 28, 28). ``batches``: real inputs for the
    +1 shares (without them a random batch only checks that each site fires). ``device``: where
    the probes of those batches and the gradient check run (a copy of the model is moved
    there; detection and the summary run on the CPU); None or CPU: the CPU.
    Returns a ``ScanReport``; raises ``NoSitesError`` if ``require_sites`` and none is found.
    """
    input_shape = tuple(int(v) for v in input_shape)
    disc: Discovery = discover(model, input_shape, include_hardtanh=include_hardtanh)
    analyse(disc, model)
    # every forward below runs on a copy: the user's model (weights, buffers, Python
    # attributes its forward sets) is exactly as it was handed in
    work = copy_model(model)
    if require_sites and not disc.sites:
        raise NoSitesError(f"no binary activation found in {name}", hint=NO_SITES_HINT)
    sites = disc.sites
    probe_batches = list(batches) if batches is not None else [example_input(input_shape, batch=PROBE_BATCH, seed=1)]
    warnings = list(disc.warnings)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if sites:
        if dev.type != "cpu":
            work.to(dev)
        probed = probe_sites(work, sites, probe_batches, device=dev)
        for s in sites:
            dead_zone = _dead_zone(s, probed.get(s.name, {}))
            if dead_zone:
                s.alphabet = "{-1,0,+1}"
                warnings.append(dead_zone)
                s.advice = [a for a in s.advice if not a.startswith("search t in")] + [
                    "ternary dead-zone quantizer: a shift moves the zone of zeros with the threshold; the site stays "
                    "ternary at every t"]
                s.zero_fraction = None  # said above; not the sign(0) = 0 kind
            if not s.fired:
                warnings.append(f"site {s.name} did not fire at run time (control flow?)")
            elif not s.binary_checked:
                warnings.append(f"site {s.name} output more than two values at run time")
            if batches is None:
                s.zero_fraction = None  # random inputs through untrained BatchNorm: zeros say nothing
            if s.zero_fraction:
                s.alphabet = "{-1,0,+1}"
                warnings.append(f"site {s.name} is ternary: it outputs 0 on {100 * s.zero_fraction:.1f}% of its outputs "
                                "(signum(0) = 0 where the pre-activation is exactly 0, e.g. an integer sum of +-1 products); "
                                "a shift t that is not a pre-activation value makes it binary")
            rng = producer_range(s, model)
            if rng is not None:
                bound_advice(s, rng)
        warnings.extend(_gradient_warnings(work, sites, probe_batches[0][:8].to(dev)))
        if dev.type != "cpu":
            work.to("cpu")
        if batches is None:
            for s in sites:  # random inputs say nothing about the real distribution
                s.plus_fraction, s.preact = None, None
    if disc.hardtanh_sites:
        probe_sites(work, disc.hardtanh_sites, probe_batches[:1])
    from .summary import binary_weight_layers, layer_summary_and_ops

    # one forward for the per-layer table, the one-line summary and the weight binarizers: a
    # layer whose effective weight (what F.conv2d / F.linear receive) is alpha_c * sign is a
    # binary layer whatever code made it; the graph's count of binarizing ops on parameters is
    # the other lower bound (a binary weight that reaches no conv / linear, e.g. a matmul)
    layers, ops = layer_summary_and_ops(work, example_input(input_shape, batch=1), disc.binary_params)
    n_layers, sources = binary_weight_layers(ops)
    disc.binary_params |= sources
    weight_binarizers = max(disc.weight_binarizers, n_layers)
    summary = model_summary(work, input_shape, disc.binary_params, set(), ops=ops)
    return ScanReport(layer_summary=layers, model=name, input_shape=input_shape, sites=sites, weight_binarizers=weight_binarizers,
                      leaves=disc.trace.leaves if disc.trace is not None else [],
                      leaf_errors=disc.trace.failures if disc.trace is not None else {},
                      traced=disc.trace is not None, hardtanh_sites=disc.hardtanh_sites, summary=summary,
                      warnings=warnings, data=data_name, inplace_writes=list(disc.inplace_writes),
                      excluded_sites=list(disc.excluded))


_PRODUCER_RANGES = {"hardtanh": (-1.0, 1.0), "tanh": (-1.0, 1.0), "Tanh": (-1.0, 1.0), "sigmoid": (0.0, 1.0),
                    "Sigmoid": (0.0, 1.0), "ReLU": (0.0, math.inf), "relu": (0.0, math.inf), "ReLU6": (0.0, 6.0),
                    "relu6": (0.0, 6.0)}


def _dead_zone(s: Site, probed: dict) -> str | None:
    """A warning when ``s`` outputs 0 where its pre-activation is not 0 (a ternary dead-zone
    quantizer, ``where(|x| < delta, 0, sign(x))``), else None. signum(0) = 0 makes zeros only
    where the pre-activation is exactly 0: then the output's zero share equals the input's."""
    zf, pz = probed.get("zero_fraction"), probed.get("preact_zero_fraction")
    if not zf or pz is None or zf <= 2 * pz + 1e-3:
        return None
    return (f"site {s.name} is a ternary dead-zone quantizer: it outputs 0 on {100 * zf:.1f}% of its outputs where "
            f"only {100 * pz:.1f}% of its pre-activations are 0 (a zone around its threshold); a shift moves the "
            "zone, it does not make the site binary")


def producer_range(site: Site, model: nn.Module | None = None) -> tuple[float, float] | None:
    """The interval the site's pre-activation cannot leave, from its producer (hardtanh, clamp,
    tanh, sigmoid, ReLU), or None when it is unbounded. ``clamp`` and non-default ``nn.Hardtanh``
    bounds are read from the measured range / the module."""
    prod = site.producer or ""
    rng = _PRODUCER_RANGES.get(prod)
    if prod == "hardtanh" and model is not None and site.producer_module:
        m = dict(model.named_modules()).get(site.producer_module)
        if isinstance(m, nn.Hardtanh):
            rng = (float(m.min_val), float(m.max_val))
    if prod in ("clamp", "clamp_", "clip") and site.preact and "min" in site.preact:
        rng = (site.preact["min"], site.preact["max"])
    return rng


def bound_advice(site: Site, rng: tuple[float, float]) -> None:
    """Replace the unbounded search advice by the producer's range (outside it the site is constant)."""
    lo, hi = rng
    where = f"({lo:g}, {hi:g})" if math.isfinite(hi) else f"t > {lo:g}"
    msg = (f"pre-activation bounded to [{lo:g}, {hi:g}] by {site.producer}: a shift outside {where} makes the site "
           f"constant (no gradient, no information); search t in {where}")
    site.advice = [a for a in site.advice if not a.startswith("search t in [-1, 2]")] + [msg]


def constant_site_warnings(patched: nn.Module, sites: list[Site], shifts: dict[str, float],
                           batches: list[torch.Tensor]) -> list[str]:
    """Warnings for sites that a patch makes constant on ``batches`` (+1 share 0 or 1).

    Runs a copy of the patched model (the patch's own hooks apply). A constant site carries
    no information and, behind a clipped STE, no gradient: typically ``t`` outside the range
    a hardtanh / clamp / tanh / sigmoid / ReLU producer leaves the pre-activation in.
    """
    work = copy_model(patched)
    res = probe_sites(work, [s for s in sites if s.name in shifts], batches, update=False)
    out = []
    for s in sites:
        r = res.get(s.name)
        if r is None or r.get("plus_fraction") is None or 0.0 < r["plus_fraction"] < 1.0:
            continue
        rng = producer_range(s)
        why = (f"its pre-activation is bounded to [{rng[0]:g}, {rng[1]:g}] by {s.producer}" if rng
               else "the shift is outside the range of its pre-activation")
        out.append(f"site {s.name} is constant at t = {shifts[s.name]:g} on the probe batch (+1 share "
                   f"{r['plus_fraction']:.3f}): {why}; it carries no information and passes no gradient "
                   "- pick a shift inside that range or exclude the site")
    return out


def _gradient_warnings(work: nn.Module, sites: list[Site], x: torch.Tensor) -> list[str]:
    """Flag sites that no gradient passes (no straight-through estimator) and the layers that cannot learn."""
    gc = gradient_check(work, sites, x)
    work.zero_grad(set_to_none=True)  # memory: the gradients are a whole model's worth, read above
    if gc is None:
        return []
    out = []
    for s in sites:
        s.gradient = gc.reaches.get(s.name)
    blocked = [s.name for s in sites if s.gradient is False]
    if blocked:
        frozen = gc.frozen
        shown = ", ".join(frozen[:8]) + (", ..." if len(frozen) > 8 else "")
        out.append(f"no gradient reaches {', '.join(blocked)}: a binarizer without a straight-through estimator "
                   "(a plain signum has derivative 0) at or after these sites; training cannot change "
                   f"{shown or 'the layers before them'} (wrap the binarizer in an STE, e.g. an autograd.Function "
                   "with a clipped identity backward)")
    return out


def scan(spec: str, *, args: Iterable[str] | dict | None = None, checkpoint: str | None = None,
         input_shape: Iterable[int] | str | None = None, data: str | None = None, data_batches: int = 4,
         batch_size: int = 256, strict: bool = True, allow_unsafe: bool = False, seed: int = 0,
         use_ema: bool = False, allow_nonfinite: bool = False, notes: list[str] | None = None,
         device: torch.device | str | None = None, mean: Iterable[float] | None = None,
         std: Iterable[float] | None = None) -> ScanReport:
    """Scan a model given by spec (``zoo:mlp``, ``file.py:factory``...). See ``scan_model``
    (``device``: where the data's probes run; ``mean``/``std``: the model's input normalisation
    for ``data``, [0, 1] pixel units, default a timm model's ``pretrained_cfg``, else the data
    set's; ``report.normalisation`` says which applied).
    The input shape: ``input_shape``, else ``load.choose_input_shape``; ``notes`` receives what
    the user should be told (wrappers removed, the checkpoint's load report, the shape's source)."""
    from .source import ModelSource, open_model

    opened = open_model(ModelSource(spec, args=args, checkpoint=checkpoint, input_shape=input_shape, strict=strict,
                                    allow_unsafe=allow_unsafe, use_ema=use_ema, allow_nonfinite=allow_nonfinite),
                        data, seed=seed)
    loaded, shape = opened.loaded, opened.shape
    if notes is not None:
        notes.extend(opened.notes)
    batches = None
    data_name = None
    normalisation = None
    data_notes: list[str] = []
    if data:
        from .data import iterate_batches, load_data
        from .validate import check_batch_norm_batch

        check_batch_norm_batch(loaded.model, batch_size)

        from .data.norm import choose_normalisation, load_kwargs

        norm = choose_normalisation(None if mean is None else tuple(mean), None if std is None else tuple(std),
                                    model=loaded.model)
        bundle = load_data(data, input_shape=shape, train_limit=batch_size * data_batches, seed=seed,
                           **load_kwargs(norm))
        data_name = bundle.name
        normalisation = bundle.normalisation_json()
        data_notes = list(bundle.notes)
        batches = [xb for xb, _ in iterate_batches(bundle.train_x, bundle.train_y, batch_size, seed=seed,
                                                    drop_last=False, steps=data_batches)]
    model = loaded.model
    recalibrated = False
    if batches is not None and checkpoint is None:
        # untrained weights: BN running statistics are the init's (mean 0, var 1), which do not
        # centre the pre-activations; measure as after training, with BN re-estimated. The model
        # is scan's own (loaded here, never returned): no copy (memory: one copy at a time)
        from .train import recalibrate_bn

        with torch.no_grad():
            recalibrated = recalibrate_bn(model, batches) > 0
    report = scan_model(model, shape, name=loaded.spec.canonical(), batches=batches, data_name=data_name,
                        require_sites=True, device=device)
    report.checkpoint = loaded.checkpoint_json()
    report.warnings.extend(data_notes)
    if normalisation is not None:
        report.normalisation = normalisation
    if recalibrated:
        report.warnings.append("no --checkpoint: BatchNorm statistics were re-estimated on the data before "
                               "measuring +1 shares (random-init running statistics do not centre)")
    return report
