"""Which input normalisation a command uses: ``--mean/--std`` > patch.json's record > a timm
model's ``pretrained_cfg`` > none (the data set's default: published constants or its own
statistics). The normalisation belongs to the model; the data set only supplies pixels."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..errors import UsageError

SOURCE_FLAGS = "--mean/--std"
SOURCE_TIMM = "timm pretrained_cfg"
SOURCE_RECORD = "patch.json"


def timm_normalisation(model: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) of a timm model's ``pretrained_cfg`` (None for other models or without timm)."""
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict):
        return None
    try:
        from timm.data import resolve_data_config

        got = resolve_data_config({}, model=model)
    except Exception:  # noqa: BLE001 - no timm or an odd cfg: no default
        got = cfg
    mean, std = got.get("mean"), got.get("std")
    if mean is None or std is None:
        return None
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def choose_normalisation(mean: Sequence[float] | None, std: Sequence[float] | None, *,
                         recorded: Mapping[str, Any] | None = None, model: Any = None) -> dict[str, Any] | None:
    """``{"mean": [..], "std": [..], "source": ...}`` ([0, 1] pixel units) or None (not known).

    ``mean``/``std``: parsed ``--mean/--std`` (one value or one per channel; both or neither,
    else :class:`UsageError`); ``recorded``: ``PatchRecipe.normalisation``; ``model``: for a timm
    ``pretrained_cfg``."""
    if (mean is None) != (std is None):
        raise UsageError("--mean and --std go together", hint="e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225")
    if mean is not None:
        return {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "source": SOURCE_FLAGS}
    if isinstance(recorded, Mapping) and recorded.get("mean") is not None and recorded.get("std") is not None:
        src = str(recorded.get("source") or "")
        return {"mean": [float(v) for v in recorded["mean"]], "std": [float(v) for v in recorded["std"]],
                "source": f"{SOURCE_RECORD} ({src})" if src and not src.startswith(SOURCE_RECORD) else (src or SOURCE_RECORD)}
    got = timm_normalisation(model) if model is not None else None
    if got is not None:
        return {"mean": list(got[0]), "std": list(got[1]), "source": SOURCE_TIMM}
    return None


def load_kwargs(norm: Mapping[str, Any] | None) -> dict[str, Any]:
    """``load_data`` keyword arguments for a chosen normalisation."""
    return {} if not norm else {"mean": tuple(norm["mean"]), "std": tuple(norm["std"])}


def as_record(norm: Mapping[str, Any] | None, channels: int | None = None) -> dict[str, Any] | None:
    """The ``patch.json`` / ONNX record: mean and std broadcast to ``channels`` when one value.
    Raises :class:`UsageError` when their count fits neither 1 nor ``channels``."""
    if not norm:
        return None
    m, s = list(norm["mean"]), list(norm["std"])
    if channels:
        from .bundle import broadcast_norm

        bm, bs = broadcast_norm(m, s, channels)  # UsageError when the count fits neither 1 nor channels
        m, s = list(bm), list(bs)
    src = str(norm.get("source") or "")
    if src.startswith(f"{SOURCE_RECORD} ("):
        src = src[len(SOURCE_RECORD) + 2:-1]
    return {"mean": m, "std": s, "source": src or SOURCE_FLAGS}
