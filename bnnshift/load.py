"""Load the user's model: build it from a spec, load its checkpoint safely, put it in eval mode.

The front door of loading (:func:`load_model`, :class:`LoadedModel`); the work lives by concern
in :mod:`bnnshift.modelspec` (specs ``zoo:`` / ``file.py:fn`` / ``pkg.mod:fn`` / ``timm:`` /
``torchvision:``, building, wrappers removed), :mod:`bnnshift.model_io` (input shape, logits of
tuple / dict outputs), :mod:`bnnshift.checkpoint_read` (a checkpoint file read safely into a
state dict) and :mod:`bnnshift.checkpoint` (loading it into the model, :class:`LoadReport`).
Their public names are re-exported here, so ``from bnnshift.load import X`` keeps working.

Checkpoints are loaded with ``torch.load(weights_only=True)`` or safetensors; a checkpoint that
needs code to unpickle is refused unless the caller explicitly allows it (``--unsafe-load``).
Pretrained weights are never downloaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ._io import sha256_file
from .checkpoint import LoadReport, load_checkpoint
from .checkpoint_read import load_state_dict_file, scan_pickle_globals
from .model_io import (
    choose_input_shape,
    declared_input_shape,
    default_input_shape,
    guess_input_shape,
    logits_picker,
    pick_logits,
)
from .modelspec import (
    KINDS,
    ModelSpec,
    _coerce_args,
    _import_file,  # noqa: F401  (re-exported: tests import it from here)
    build_model,
    coerce_args,
    parse_arg_pairs,
    parse_arg_value,
    parse_model_spec,
    unwrap_model,
)

__all__ = [
    "KINDS",
    "ModelSpec",
    "LoadReport",
    "LoadedModel",
    "parse_model_spec",
    "parse_arg_pairs",
    "parse_arg_value",
    "build_model",
    "unwrap_model",
    "coerce_args",
    "default_input_shape",
    "declared_input_shape",
    "guess_input_shape",
    "choose_input_shape",
    "pick_logits",
    "load_state_dict_file",
    "load_checkpoint",
    "load_model",
    "logits_picker",
    "scan_pickle_globals",
]


@dataclass
class LoadedModel:
    """A built model with its checkpoint loaded. ``input_shape``: one sample's shape if known
    (``input_shape_source`` says from where); ``notes``: wrappers removed and the like."""

    model: nn.Module
    spec: ModelSpec
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    load_report: LoadReport | None = None
    input_shape: tuple[int, ...] | None = None
    input_shape_source: str | None = None
    notes: list[str] = field(default_factory=list)

    def checkpoint_json(self) -> dict[str, Any] | None:
        """The ``checkpoint`` object of JSON outputs (None without a checkpoint)."""
        return self.load_report.to_json() if self.load_report is not None else None



def load_model(
    spec: str | ModelSpec,
    *,
    args: Iterable[str] | Mapping[str, Any] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    strict: bool = True,
    allow_unsafe: bool = False,
    use_ema: bool = False,
    allow_nonfinite: bool = False,
) -> LoadedModel:
    """Build the model (wrappers removed), load its checkpoint (if any) and put it in eval mode.

    The result carries the :class:`LoadReport` (``load_report``), the input shape the model's
    metadata declares (:func:`declared_input_shape`) and notes for the user (wrappers removed, ...)."""
    if isinstance(spec, str):
        mspec = parse_model_spec(spec, args)
    else:
        mspec = ModelSpec(spec.kind, spec.target, spec.attr, {**spec.args, **_coerce_args(args)})
    notes: list[str] = []
    model = build_model(mspec, notes=notes)
    half = _float32_if_half(model)
    if half:
        notes.append(half)
    report = None
    ckpt = None
    digest = None
    if checkpoint is not None:
        ckpt_path = Path(checkpoint).expanduser()
        dirs = [str(Path(mspec.target).parent)] if mspec.kind == "file" else []
        report = load_checkpoint(model, ckpt_path, strict=strict, allow_unsafe=allow_unsafe, use_ema=use_ema,
                                 allow_nonfinite=allow_nonfinite, search_dirs=dirs)
        ckpt = str(ckpt_path.resolve())
        digest = sha256_file(ckpt_path)
        report.path, report.sha256 = ckpt, digest
    model.eval()
    shape, source = declared_input_shape(mspec, model)
    return LoadedModel(
        model=model,
        spec=mspec,
        checkpoint=ckpt,
        checkpoint_sha256=digest,
        load_report=report,
        input_shape=shape,
        input_shape_source=source,
        notes=notes,
    )


def _float32_if_half(model: nn.Module) -> str | None:
    """A float16/bfloat16 model runs here in float32 (CPU analysis and training); returns the note."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    low = sorted(str(d).replace("torch.", "") for d in dtypes if d in (torch.float16, torch.bfloat16))
    if not low:
        return None
    model.float()
    return f"the model's parameters are {', '.join(low)}: running it in float32 (the shifts are the same)"
