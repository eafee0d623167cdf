"""Where a command's model comes from: one options object (:class:`ModelSource`) and one
:func:`open_model` that loads it, chooses the input shape and collects what the user is told.
``scan``, ``patch`` and ``search`` all open their model here (timm ``_builder.py`` style: one
builder every entry point calls)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .errors import BnnshiftError, UsageError
from .load import LoadedModel, choose_input_shape, load_model
from .model_io import _first_layer_shape as first_layer_shape
from .validate import resolve_input_shape


@dataclass
class ModelSource:
    """A model spec and how to load it (the shared CLI options ``MODEL --arg --checkpoint
    --input-shape --non-strict --unsafe-load --use-ema --allow-nonfinite``).

    ``spec``: ``zoo:NAME``, ``file.py:factory``, ``pkg.mod:factory``, ``timm:NAME``,
    ``torchvision:NAME``; ``args``: factory arguments (``key=value`` strings or a mapping);
    ``checkpoint``: a weights file (docs/checkpoints.md); ``input_shape``: one sample's shape
    ``C,H,W`` (text or ints), ``None`` to choose it (:func:`bnnshift.load.choose_input_shape`)."""

    spec: str
    args: Iterable[str] | Mapping[str, Any] | None = None
    checkpoint: str | None = None
    input_shape: Iterable[int] | str | None = None
    strict: bool = True
    allow_unsafe: bool = False
    use_ema: bool = False
    allow_nonfinite: bool = False


@dataclass
class OpenedModel:
    """:func:`open_model`'s result: the loaded model, one sample's input shape (ints, no batch
    dimension) and the lines the user is told (wrappers removed, the checkpoint's load report,
    where the shape came from when the model does not declare it), in that order."""

    loaded: LoadedModel
    shape: tuple[int, ...]
    notes: list[str] = field(default_factory=list)

    @property
    def model(self):
        return self.loaded.model

    @property
    def name(self) -> str:
        """The canonical spec (``zoo:mlp``): the name reports use."""
        return self.loaded.spec.canonical()


def open_model(source: ModelSource, data: str | None = None, *, seed: int = 0) -> OpenedModel:
    """Build ``source``'s model, load its checkpoint (eval mode) and choose the input shape:
    ``source.input_shape`` > the model's declared size > ``data``'s samples > a guess.

    Raises ``SpecError`` / ``UsageError`` (exit 2: bad spec, unknown input shape, an
    ``--input-shape`` the model does not run on while another shape works),
    ``ModelLoadError`` / ``CheckpointError`` (exit 1), as :func:`bnnshift.load.load_model`."""
    loaded = load_model(source.spec, args=source.args, checkpoint=source.checkpoint, strict=source.strict,
                        allow_unsafe=source.allow_unsafe, use_ema=source.use_ema,
                        allow_nonfinite=source.allow_nonfinite)
    explicit = resolve_input_shape(source.input_shape, None) if source.input_shape not in (None, "") else None
    shape, where = choose_input_shape(explicit, loaded, data, seed=seed)
    if explicit is not None:
        _check_explicit_shape(loaded, tuple(shape), data, seed)
    notes = list(loaded.notes)
    if loaded.load_report is not None:
        notes.append(loaded.load_report.line())
    if explicit is None and loaded.input_shape is None:  # not declared by the model: say where from
        said = where if where.startswith("guessed") else f"from {where}"  # "guessed from ..." says it
        notes.append(f"input shape {','.join(map(str, shape))} {said}")
    return OpenedModel(loaded, tuple(shape), notes)


def _forward_error(model, shape: tuple[int, ...]) -> str | None:
    """The first line of the error a forward of zeros of ``shape`` (batch 2, eval mode, on a copy:
    a forward may write its weights) raises, or None when it runs."""
    import copy

    import torch

    try:
        with torch.no_grad():
            copy.deepcopy(model).eval()(torch.zeros((2, *shape)))
    except Exception as exc:  # noqa: BLE001 - any failure: the caller decides whose fault it is
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return None


def _check_explicit_shape(loaded: LoadedModel, shape: tuple[int, ...], data: str | None, seed: int) -> None:
    """Raise ``UsageError`` (exit 2) when the model does not run on the user's ``--input-shape``
    unless the model is at fault: it fails the same on the shape bnnshift would choose without the
    option (the model's declared size, ``data``'s samples, a guess), or, with no such shape, with
    the same message on another shape (the first layer's, every dimension doubled: a
    ``NameError`` is not about the shape); that case is left to the analysis, which reports it
    as a model error (exit 1)."""
    err = _forward_error(loaded.model, shape)
    if err is None:
        return
    try:
        other = tuple(choose_input_shape(None, loaded, data, seed=seed)[0])
    except BnnshiftError:
        other = None  # no other shape known: nothing says the model is at fault
    if other is not None and (other == shape or _forward_error(loaded.model, other) is not None):
        return
    if other is None:
        first = first_layer_shape(loaded.model)
        tries = {tuple(2 * d for d in shape), *([tuple(first[0])] if first else [])} - {shape}
        if any(_forward_error(loaded.model, t) == err for t in tries):
            return
    runs = f" (the model runs on {','.join(map(str, other))})" if other is not None else ""
    raise UsageError(f"bad --input-shape {','.join(map(str, shape))}: the model does not run on it ({err})",
                     hint=f"pass C,H,W of one sample{runs} or check --arg")


def say_load_notes(log, notes: list[str], checkpoint: dict | None = None) -> None:
    """Say ``notes`` (:attr:`OpenedModel.notes`) to ``log`` (``info`` / ``warn``); the checkpoint
    line is a warning (shown even with --quiet) when some keys did not fit (``checkpoint``:
    ``LoadReport.to_json()``)."""
    c = checkpoint or {}
    partial = bool(c.get("missing") or c.get("unexpected") or c.get("shape_mismatch"))
    for n in notes:
        (log.warn if partial and n.startswith("checkpoint ") else log.info)(n)
