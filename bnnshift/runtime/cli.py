"""The library call behind ``bnnshift pack`` (the CLI only parses and prints)."""
from __future__ import annotations

from typing import Any


def run_pack(src: str, out: str, *, bench: bool = False, model: Any = None, args: Any = None, trust: bool = False,
             force: bool = False) -> dict[str, Any]:
    """Pack ``src`` into ``out``; with ``bench`` time it. Returns the JSON payload (``packed``,
    ``left_float``, ``proof``, ``backend``, ``bench`` rows) plus ``_lines``: human lines to print."""
    from .bench import bench as run_bench
    from .bench import summarise
    from .io import PackOptions, pack_dir

    model_f, packed, report = pack_dir(src, out, PackOptions(model=model, args=args, trust=trust, force=force))
    p = report.proof
    lines = [f"{out}: {len(report.packed)} layers packed ({report.backend} kernel), {len(report.left_float)} left float"]
    lines += [f"packed {k}: {v}" for k, v in report.packed.items()]
    lines += [f"float  {k}: {v}" for k, v in report.left_float.items()]
    lines += [f"threshold {k}: {v}" for k, v in report.thresholds.items()]
    lines += [f"no threshold {k}: {v}" for k, v in report.no_threshold.items()]
    f64 = (p.get("float64_skipped") or f"equal in float64 (logits {p['float64_max_abs_diff']:.1e} apart)")
    lines.append(f"proof: {p['binary_activations']} binary activations {f64}; float32: {p['float32_flips']} flips, "
                 f"logits {p['float32_max_abs_diff']:.1e} apart")
    payload: dict[str, Any] = {"out_dir": str(out), **report.to_json(), "bench": None}
    if bench:
        from .io import input_shape_of

        rows = run_bench(model_f, packed, input_shape_of(out))
        payload["bench"] = rows
        lines.append(f"{'what':<28} {'batch':>5} {'threads':>7} {'float ms':>10} {'packed ms':>10} {'speedup':>8}")
        for r in summarise(rows) + [r for r in rows if r["what"] != "end to end"]:
            lines.append(f"{r['what']:<28} {r['batch']:>5} {r['threads']:>7} {r['float_ms']:>10.3f} "
                         f"{r['packed_ms']:>10.3f} {r['speedup']:>7.2f}x")
    payload["_lines"] = lines
    return payload
