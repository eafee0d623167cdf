"""A model's input shape (declared, guessed, chosen) and its logits (tuple / dict outputs).

Public names are re-exported by :mod:`bnnshift.load`.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch
from torch import nn

from . import registry
from .errors import UsageError
from .modelspec import ModelSpec

if TYPE_CHECKING:
    from .load import LoadedModel

def _cfg_shape(model: nn.Module | None) -> tuple[int, ...] | None:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
    if size:
        with contextlib.suppress(TypeError, ValueError):
            return tuple(int(x) for x in size)
    return None


def _first_layer_shape(model: nn.Module) -> tuple[tuple[int, ...], str] | None:
    """(shape, what it came from) from the first conv / linear in registration order."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            side = (64,) if isinstance(m, nn.Conv1d) else (16, 16, 16) if isinstance(m, nn.Conv3d) else (32, 32)
            return (int(m.in_channels), *side), f"in_channels={m.in_channels} of the first conv {name}"
        if isinstance(m, nn.Linear) and not isinstance(m, nn.LazyLinear):
            return (int(m.in_features),), f"in_features={m.in_features} of the first linear layer {name}"
    return None


def _forward_ok(model: nn.Module, shape: tuple[int, ...]) -> bool:
    """Does a forward of zeros of ``shape`` run? On a copy: a forward may write in place."""
    import copy

    try:
        probe = copy.deepcopy(model).eval()
        with torch.no_grad():
            probe(torch.zeros((2, *shape)))
        return True
    except Exception:  # noqa: BLE001 - any failure means the guess is wrong
        return False


def declared_input_shape(spec: ModelSpec, model: nn.Module | None = None) -> tuple[tuple[int, ...] | None, str | None]:
    """The input shape the model declares (no batch dimension) and where from, or (None, None):
    zoo metadata (with the factory's ``in_chans`` / ``input_size`` arguments), torchvision's 224
    (299 for inception), a ``pretrained_cfg`` / ``default_cfg`` ``input_size`` (timm or any
    model carrying one)."""
    shape = default_input_shape(spec, model)
    if shape is not None:
        return shape, f"{spec.kind} metadata"
    cfg = _cfg_shape(model)
    if cfg is not None:
        return cfg, "the model's pretrained_cfg input_size"
    return None, None


def guess_input_shape(model: nn.Module) -> tuple[tuple[int, ...] | None, str]:
    """A guess from the first conv's ``in_channels`` at 32x32 (or the first linear layer's
    ``in_features``), kept only if a forward pass of zeros on a copy accepts it; (None, reason)."""
    first = _first_layer_shape(model)
    if first is not None and _forward_ok(model, first[0]):
        return first
    return None, "no zoo metadata, pretrained_cfg or first conv/linear layer that accepts a guessed size"


def choose_input_shape(explicit: Iterable[int] | None, loaded: "LoadedModel", data: str | None = None, *,
                       seed: int = 0) -> tuple[tuple[int, ...], str]:
    """The input shape a command uses, and where it came from (said to the user).

    Precedence: ``explicit`` (``--input-shape``, already parsed) > the model's declared size
    (zoo metadata, ``pretrained_cfg``, torchvision; data are resized to it) > the sample shape of
    ``data`` (not ``synthetic``, which follows the model) > a guess from the first conv /
    linear layer that a forward pass accepts. Raises UsageError (exit 2) when none applies.
    """
    if explicit is not None:
        return tuple(int(v) for v in explicit), "--input-shape"
    if loaded.input_shape is not None:
        return tuple(loaded.input_shape), loaded.input_shape_source or "the model's metadata"
    if data:
        from .data import load_data, parse_data_spec

        if parse_data_spec(data)[0] != "synthetic":
            bundle = load_data(data, input_shape=None, train_limit=8, val_limit=0, seed=seed)
            shape = tuple(int(v) for v in bundle.input_shape)
            first = _first_layer_shape(loaded.model)
            if (first is not None and len(first[0]) == 3 and len(shape) == 3 and first[0][0] != shape[0]
                    and _forward_ok(loaded.model, (first[0][0], *shape[1:]))):
                # e.g. greyscale files for an RGB model: the model's channels, the data's H, W (an image
                # folder converts each image; other data sets say the channels differ, naming --input-shape)
                return ((first[0][0], *shape[1:]),
                        f"the samples of --data {bundle.name} (H, W) and {first[1]} (channels)")
            return shape, f"the samples of --data {bundle.name}"
    guess, source = guess_input_shape(loaded.model)
    if guess is not None:
        return tuple(guess), f"guessed from {source} (pass --input-shape to set it)"
    raise UsageError("the model's input shape is unknown",
                     hint="pass --input-shape C,H,W (e.g. 3,32,32) or --data with real samples")


def default_input_shape(spec: ModelSpec, model: nn.Module | None = None) -> tuple[int, ...] | None:
    """One sample's input shape (no batch dimension) if the spec's source knows it, else None."""
    if spec.kind == "zoo":
        try:
            shape = list(registry.ZOO.get(spec.target).input_shape)
        except KeyError:
            return None
        # the factory's own size arguments override the zoo default (e.g. vgg-small on 28x28x1)
        if "in_chans" in spec.args and len(shape) == 3:
            shape[0] = int(spec.args["in_chans"])
        if "input_size" in spec.args and len(shape) == 3:
            shape[1] = shape[2] = int(spec.args["input_size"])
        return tuple(shape)
    if spec.kind == "timm":
        shape = _cfg_shape(model)
        if shape:
            in_chans = spec.args.get("in_chans")
            if isinstance(in_chans, int) and shape:
                shape = (in_chans,) + shape[1:]
            return shape
        return None
    if spec.kind == "torchvision":
        side = 299 if spec.target.startswith("inception") else 224
        return (3, side, side)
    return None


# --------------------------------------------------------------------------- outputs


def pick_logits(out: Any, index: int | None = None, key: str | None = None) -> tuple[torch.Tensor, str | None]:
    """The logits ``(N, classes)`` in a model's output, and a note saying how they were chosen.

    A tensor is the logits (note None). A tuple/list (e.g. a distillation model's
    ``(logits, features)``): element ``index``, default the first tensor. A dict (or a
    ``ModelOutput``) or a ``@dataclass``: item / field ``key``, default ``"logits"``. Raises
    UsageError (exit 2) naming the output's structure and ``--output-index`` / ``--output-key`` when none fits.
    """
    if isinstance(out, torch.Tensor):
        return out, None
    if dataclasses.is_dataclass(out) and not isinstance(out, type) and not isinstance(out, Mapping):
        # a plain @dataclass output: its fields, like the items of a dict (default field "logits")
        items = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        k = key if key is not None else ("logits" if "logits" in items else None)
        if k is None or k not in items or not isinstance(items[k], torch.Tensor):
            raise UsageError(f"the model returns a dataclass {type(out).__name__} (fields: "
                             f"{', '.join(list(items)[:8])}); "
                             f"{'no tensor in field ' + repr(key) if key is not None else 'which field are the logits?'}",
                             hint="pass --output-key FIELD")
        return items[k], (f"the model returns a dataclass {type(out).__name__}: field {k!r} used as the logits "
                          "(--output-key to change)")
    if isinstance(out, Mapping):
        k = key if key is not None else ("logits" if "logits" in out else None)
        if k is None or k not in out or not isinstance(out[k], torch.Tensor):
            raise UsageError(f"the model returns a dict (keys: {', '.join(map(str, list(out)[:8]))}); "
                             f"{'no tensor under ' + repr(key) if key is not None else 'which item are the logits?'}",
                             hint="pass --output-key KEY")
        return out[k], f"the model returns a dict: item {k!r} used as the logits (--output-key to change)"
    if isinstance(out, (tuple, list)):
        kind = type(out).__name__
        if index is not None:
            if not (0 <= index < len(out)) or not isinstance(out[index], torch.Tensor):
                raise UsageError(f"the model returns a {kind} of {len(out)}; element {index} is not a tensor",
                                 hint="pass --output-index N of the logits")
            return out[index], f"the model returns a {kind} of {len(out)}: element {index} used as the logits"
        first = next((i for i, v in enumerate(out) if isinstance(v, torch.Tensor)), None)
        if first is None:
            raise UsageError(f"the model returns a {kind} of {len(out)} without a tensor at its top level",
                             hint="pass --output-index N of the logits")
        return out[first], (f"the model returns a {kind} of {len(out)}: element {first} used as the logits "
                            "(--output-index to change; a --train-config loss_fn receives the whole output)")
    raise UsageError(f"the model returns a {type(out).__name__}, not a tensor of logits",
                     hint="return the logits, a tuple/list (--output-index) or a dict (--output-key)")


def logits_picker(index: int | None = None, key: str | None = None):
    """``out -> logits`` for :func:`pick_logits` with fixed ``index`` / ``key``."""

    def pick(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else pick_logits(out, index, key)[0]

    return pick
