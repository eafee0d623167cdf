"""A packed directory: the float model as ``bnnshift patch`` / ``fold`` write it
(``model.safetensors`` + ``patch.json``, same trust rules) plus ``packed.safetensors`` (the
packed layers' buffers, ``<module path>.<buffer>``) and ``packed.json`` (written last: layer
configs, the pack report, sha256 of ``packed.safetensors``). No pickle anywhere; nothing in it
runs code unless ``patch.json``'s model spec is trusted (docs/checkpoints.md)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


import torch.nn as nn

from .._io import atomic_save_safetensors, atomic_write_json, replace_dir, sha256_file
from ..errors import CheckpointError
from .layers import PackedConv2d, build_layer
from .pack import PackReport, _set, pack_model

PACKED_JSON = "packed.json"
PACKED_WEIGHTS = "packed.safetensors"
FORMAT = "bnnshift-packed/1"


def _write_packed(packed: nn.Module, report: PackReport | None, directory: Path, input_shape: Any) -> None:
    layers = {p: m for p, m in packed.named_modules() if isinstance(m, PackedConv2d)}
    tensors = {f"{p}.{k}": v.contiguous() for p, m in layers.items() for k, v in m.state_dict().items()
               if v is not None}
    atomic_save_safetensors(tensors, directory / PACKED_WEIGHTS, metadata={"format": FORMAT})
    atomic_write_json(directory / PACKED_JSON, {
        "format": FORMAT, "input_shape": list(input_shape) if input_shape else None,
        "layers": {p: m.config() for p, m in layers.items()},
        "report": report.to_json() if report is not None else None,
        "hashes": {PACKED_WEIGHTS: sha256_file(directory / PACKED_WEIGHTS)}})


@dataclass
class PackOptions:
    """Options of :func:`pack_dir`: ``model`` / ``args`` / ``trust`` as for ``load_patched``;
    ``force``: replace a non-empty OUT."""
    model: Any = None
    args: Any = None
    trust: bool = False
    force: bool = False


def pack_dir(src: str | os.PathLike[str], out: str | os.PathLike[str],
             options: PackOptions | None = None) -> tuple[nn.Module, nn.Module, PackReport]:
    """Pack the patched / folded directory ``src`` into ``out`` (built beside it, swapped in whole).

    Returns ``(float model, packed model, report)``. Raises what ``load_patched`` raises,
    ``NoSitesError`` (exit 3) when nothing packs, ``OutputError`` for an unusable OUT."""
    from ..patch import load_patched, read_recipe, save_patched

    o = options or PackOptions()
    recipe = read_recipe(src)
    model = load_patched(src, model=o.model, args=o.args, trust=o.trust)
    if not recipe.input_shape:
        raise CheckpointError(f"{src}/patch.json has no input_shape", hint="re-run bnnshift patch with --input-shape")
    packed, report = pack_model(model, tuple(recipe.input_shape))
    with replace_dir(out, force=o.force) as tmp:
        save_patched(model, recipe, tmp, force=True)
        _write_packed(packed, report, tmp, recipe.input_shape)
    return model, packed, report


def save_packed(packed: nn.Module, float_model: nn.Module, recipe: Any, out: str | os.PathLike[str], *,
                force: bool = False) -> Path:
    """Write ``packed`` (from :func:`pack`) with its float model and ``recipe`` (a ``PatchRecipe``)
    to the directory ``out`` atomically. Returns the directory."""
    from ..patch import save_patched

    with replace_dir(out, force=force) as tmp:
        save_patched(float_model, recipe, tmp, force=True)
        _write_packed(packed, getattr(packed, "bnnshift_pack_report", None), tmp, recipe.input_shape)
    return Path(out)


def load_packed(directory: str | os.PathLike[str], *, model: Any = None, args: Any = None,
                trust: bool = False) -> nn.Module:
    """The packed model of a directory written by ``bnnshift pack`` (eval mode).

    The float model is rebuilt by ``load_patched`` (``model`` / ``args`` / ``trust`` as there),
    then each recorded layer is replaced by its packed layer read from ``packed.safetensors``
    (sha256 checked). Raises ``CheckpointError`` (exit 1) for a missing, altered or foreign file."""
    from safetensors.torch import load_file

    from ..patch import load_patched

    d = Path(directory)
    try:
        meta = json.loads((d / PACKED_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{d / PACKED_JSON} not found", hint="write it with `bnnshift pack DIR -o OUT`") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {d / PACKED_JSON}: {exc}", hint="re-run bnnshift pack") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{d / PACKED_JSON} is not a {FORMAT} file", hint="re-run bnnshift pack")
    weights = d / PACKED_WEIGHTS
    if not weights.is_file() or sha256_file(weights) != (meta.get("hashes") or {}).get(PACKED_WEIGHTS):
        raise CheckpointError(f"{weights} is missing or does not match packed.json",
                              hint="re-run `bnnshift pack DIR -o OUT --force`")
    net = load_patched(d, model=model, args=args, trust=trust)
    tensors = load_file(str(weights))
    mods = dict(net.named_modules())
    for path, cfg in meta["layers"].items():
        if path not in mods:
            raise CheckpointError(f"{weights}: layer {path!r} is not in the model", hint="re-run bnnshift pack")
        own = {k[len(path) + 1:]: v for k, v in tensors.items() if k.startswith(path + ".") and "." not in k[len(path) + 1:]}
        _set(net, path, build_layer(cfg, own))
        for absorbed in (cfg.get("fused") or {}).get("absorbed", []):  # computed by the threshold
            if absorbed not in mods:
                raise CheckpointError(f"{weights}: module {absorbed!r} is not in the model",
                                      hint="re-run bnnshift pack")
            _set(net, absorbed, nn.Identity())
    report = meta.get("report") or {}
    net.bnnshift_pack_report = PackReport(report.get("packed", {}), report.get("left_float", {}),  # type: ignore[attr-defined]
                                          report.get("proof", {}), report.get("backend", ""),
                                          report.get("thresholds", {}), report.get("no_threshold", {}))
    return net.eval()


def input_shape_of(directory: str | os.PathLike[str]) -> tuple[int, ...] | None:
    """The probe input shape recorded in ``packed.json``."""
    meta = json.loads((Path(directory) / PACKED_JSON).read_text(encoding="utf-8"))
    return tuple(meta["input_shape"]) if meta.get("input_shape") else None


__all__ = ["PackOptions", "input_shape_of", "load_packed", "pack_dir", "save_packed"]
