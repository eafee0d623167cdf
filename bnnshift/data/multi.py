"""Models with several inputs (``forward(x, mask)``): the data layer's side.

A data function (``module:function`` / ``file.py:function``) hands several inputs per sample
as a tuple where it would hand one tensor: ``((x, mask), y)``, ``((x, mask), y, (vx, vmask), vy)``
or data set items ``((x, mask), y)``. The first input is the image, normalised as a single
input would be; the others are used as they are. Every input has the sample count N first.

Everything downstream (batching, the trainer's eager / compiled / channels_last / AMP steps,
the scan's probes, BN re-estimation) moves one tensor per batch, so the inputs travel *packed*:
each flattened per sample and concatenated into one float32 ``(N, 1, 1, F)`` tensor, F the sum
of the per-sample sizes. :func:`install_unpack` registers a forward pre-hook on the user's
model that turns a packed batch back into ``model(x, mask)`` with each input's own shape and
dtype (the module tree and its names are unchanged; the hook is not part of a saved state).

Exactness: float inputs are cast to float32 (then to the search's ``--dtype``); bool and
integer inputs travel as float values and are cast back to their dtype, exact while their
magnitude is an integer the packed dtype represents (2^24 in float32; :func:`check_dtype`
refuses the rest).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..errors import DataError

# the largest integer magnitude each packed dtype represents exactly (its mantissa bits + 1)
EXACT_INT = {torch.float32: 2 ** 24, torch.float64: 2 ** 53, torch.float16: 2 ** 11, torch.bfloat16: 2 ** 8}


def is_multi(v: Any) -> bool:
    """Whether ``v`` is a tuple / list of several inputs (not one tensor or array)."""
    return isinstance(v, (tuple, list)) and len(v) >= 2 and all(
        isinstance(p, torch.Tensor) or type(p).__module__ == "numpy" for p in v)


def layout_of(parts: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
    """The per-sample shape, dtype and size of each input (``parts`` each ``(N, ...)``), with the
    largest integer magnitude of a bool / integer input (``max_abs``, for :func:`check_dtype`)."""
    out = []
    for p in parts:
        d: dict[str, Any] = {"shape": [int(v) for v in p.shape[1:]], "dtype": str(p.dtype).removeprefix("torch."),
                             "size": int(math.prod(p.shape[1:]))}
        if not torch.is_floating_point(p):
            d["max_abs"] = int(p.abs().max()) if p.numel() and p.dtype != torch.bool else int(p.numel() > 0)
            if p.dtype != torch.bool and p.numel():
                d["min"], d["max"] = int(p.min()), int(p.max())
        out.append(d)
    return out


def pack(parts: Sequence[torch.Tensor], where: str, layout: list[dict[str, Any]] | None = None
         ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """``parts`` (each ``(N, ...)``, same N) as one float32 ``(N, 1, 1, F)`` tensor and its layout.

    ``layout``: the training split's, which a held-out split must match (per-sample shapes and
    dtypes); its integer ranges are widened to this split's. Raises :class:`DataError` for different sample counts, complex inputs, an integer
    beyond float32's exact range, or a split whose inputs differ from the training split's.
    """
    n = {int(p.shape[0]) if p.dim() else -1 for p in parts}
    if len(n) != 1 or -1 in n:
        raise DataError(f"{where}: the inputs have different sample counts {sorted(n)}",
                        hint="return ((x, mask), y) with N samples first in every input")
    for i, p in enumerate(parts):
        if p.is_complex():
            raise DataError(f"{where}: input {i} is complex ({p.dtype})", hint="return real tensors")
    lay = layout_of(parts)
    for i, d in enumerate(lay):
        if d.get("max_abs", 0) > EXACT_INT[torch.float32]:
            raise DataError(f"{where}: input {i} holds integers up to {d['max_abs']}, beyond float32's exact "
                            f"{EXACT_INT[torch.float32]}", hint="return smaller integers (e.g. indices into a table)")
    if layout is not None:
        got = [(d["shape"], d["dtype"]) for d in lay]
        want = [(d["shape"], d["dtype"]) for d in layout]
        if got != want:
            raise DataError(f"{where}: the held-out inputs {got} differ from the training inputs {want}",
                            hint="return the same inputs, shapes and dtypes for both splits")
        for d, v in zip(layout, lay):
            if "min" in v:
                d["min"], d["max"] = min(d.get("min", v["min"]), v["min"]), max(d.get("max", v["max"]), v["max"])
            if "max_abs" in v:
                d["max_abs"] = max(d.get("max_abs", 0), v["max_abs"])
    n0 = next(iter(n))
    flat = torch.cat([p.reshape(n0, -1).to(torch.float32) for p in parts], dim=1)
    return flat.view(n0, 1, 1, flat.shape[1]), lay


def unpack(packed: torch.Tensor, layout: list[dict[str, Any]]) -> tuple[torch.Tensor, ...]:
    """The inputs of a packed ``(B, 1, 1, F)`` batch: each ``(B, *shape)``, float inputs in the
    packed tensor's dtype (the search's ``--dtype``), bool / integer inputs in their own (integers
    rounded and clamped to the range both splits hold: exact on the data's batches, and the scan's
    random example inputs stay valid indices; bool: nonzero is True)."""
    flat = packed.reshape(packed.shape[0], -1)
    out, at = [], 0
    for d in layout:
        part = flat[:, at:at + d["size"]].reshape(packed.shape[0], *d["shape"])
        at += d["size"]
        dt = getattr(torch, d["dtype"])
        if "min" in d:  # a no-op on the data's own integers; keeps a random example input (the scan's) in range
            part = part.round().clamp(d["min"], d["max"])
        out.append(part if dt.is_floating_point else part.to(dt))
    return tuple(out)


def packed_shape(layout: list[dict[str, Any]]) -> tuple[int, int, int]:
    """The per-sample shape of the packed tensor: ``(1, 1, F)``."""
    return (1, 1, sum(int(d["size"]) for d in layout))


class UnpackInputs:
    """Forward pre-hook: ``model(packed)`` -> ``model(*unpack(packed))``. Any other call (the
    inputs already apart, another shape) passes through unchanged."""

    def __init__(self, layout: list[dict[str, Any]]):
        self.layout = [dict(d) for d in layout]
        self.width = packed_shape(self.layout)[2]

    def __call__(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        if len(args) == 1 and isinstance(args[0], torch.Tensor) and args[0].dim() == 4 and \
                tuple(args[0].shape[1:]) == (1, 1, self.width):
            return unpack(args[0], self.layout)
        return None


def install_unpack(model: torch.nn.Module, layout: list[dict[str, Any]] | None) -> torch.nn.Module:
    """Register :class:`UnpackInputs` on ``model`` (once; nothing when ``layout`` is None).
    Returns ``model``."""
    if layout and not any(isinstance(h, UnpackInputs) for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(UnpackInputs(layout))
    return model


def check_dtype(layout: list[dict[str, Any]] | None, dtype: torch.dtype) -> None:
    """Raise :class:`DataError` when a bool / integer input does not survive the packed tensor's
    cast to ``dtype`` (``--dtype float16`` / ``bfloat16`` represent fewer integers)."""
    limit = EXACT_INT.get(dtype)
    for i, d in enumerate(layout or []):
        if limit is not None and d.get("max_abs", 0) > limit:
            raise DataError(f"input {i} holds integers up to {d['max_abs']}: --dtype {str(dtype).removeprefix('torch.')} "
                            f"represents integers exactly only up to {limit}", hint="use --dtype float32")
