"""A larq-style per-layer summary of a BNN: output shape, 1-bit and 32-bit parameters, memory,
binary and float MACs, compression (larq's ``lq.models.summary``, in PyTorch terms).

A parameter counts as 1-bit when the scan found a weight binarizer on it (``Discovery.binary_params``);
a conv / linear whose weight is binary does binary MACs, any other one float MACs. Memory
assumes 1 bit per binary weight and 32 bits per other parameter; compression is the fp32 size
over that size.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["layer_summary"]


def _shape(out: Any) -> list[int] | None:
    if isinstance(out, torch.Tensor):
        return list(out.shape[1:])
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return list(out[0].shape[1:])
    return None


def _macs(mod: nn.Module, out: torch.Tensor) -> int:
    w = getattr(mod, "weight", None)
    if not isinstance(out, torch.Tensor) or w is None or out.dim() == 0:
        return 0
    per_sample = out.numel() // max(1, out.shape[0])
    if isinstance(mod, nn.modules.conv._ConvNd):
        return int(per_sample * w.shape[1] * int(torch.tensor(w.shape[2:]).prod()))
    if isinstance(mod, nn.Linear):
        return int(per_sample * w.shape[-1])
    return 0


@torch.no_grad()
def layer_summary(model: nn.Module, example: torch.Tensor, binary_params: set[str]) -> dict[str, Any]:
    """One row per module that owns parameters (plus totals), from one forward of ``example``.

    ``example``: an input batch ``(N, C, H, W)`` (N = 1 is enough). Returns ``{"layers": [{"layer",
    "type", "output_shape", "params_1bit", "params_32bit", "memory_bytes", "binary_macs",
    "float_macs"}], "totals": {... same sums ..., "memory_fp32_bytes", "compression"}}``. MACs are
    per sample. The model runs in eval mode and is left in its mode; a forward that fails leaves
    shapes and MACs empty (the parameter counts stay).
    """
    rows: dict[str, dict[str, Any]] = {}
    hooks = []
    for path, m in model.named_modules():
        own = list(m.named_parameters(recurse=False))
        if not own:
            continue
        one = sum(p.numel() for n, p in own if (f"{path}.{n}" if path else n) in binary_params)
        total = sum(p.numel() for _, p in own)
        rows[path] = {"layer": path or "(root)", "type": type(m).__name__, "output_shape": None,
                      "params_1bit": int(one), "params_32bit": int(total - one),
                      "memory_bytes": int((total - one) * 4 + (one + 7) // 8), "binary_macs": 0, "float_macs": 0}
        w_binary = (f"{path}.weight" if path else "weight") in binary_params

        def hook(mod, args, out, path=path, w_binary=w_binary):
            r = rows[path]
            if r["output_shape"] is None:
                r["output_shape"] = _shape(out)
            r["binary_macs" if w_binary else "float_macs"] += _macs(mod, out)

        hooks.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        model(example)
    except Exception:  # noqa: BLE001 - best effort: counts without shapes
        pass
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    layers = list(rows.values())
    one = sum(r["params_1bit"] for r in layers)
    f32 = sum(r["params_32bit"] for r in layers)
    mem = sum(r["memory_bytes"] for r in layers)
    fp32 = (one + f32) * 4
    totals = {"params_1bit": one, "params_32bit": f32, "memory_bytes": mem, "memory_fp32_bytes": fp32,
              "binary_macs": sum(r["binary_macs"] for r in layers), "float_macs": sum(r["float_macs"] for r in layers),
              "compression": round(fp32 / mem, 2) if mem else None}
    return {"layers": layers, "totals": totals}
