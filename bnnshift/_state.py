"""bnnshift's state on a model: one accessor to read it, one to write it.

What bnnshift keeps on a model it patched lives in one ``ModelState`` object under one
attribute (``_bnnshift_state``), read with :func:`model_state` and written with
:func:`set_state` (nothing else in bnnshift reads or writes it):

* ``shift``: the ``shift.ShiftRuntime`` that ``insert_shifts`` attached (the hooks' runtime
  and the sites it shifts), None when none is attached;
* ``patch``: the ``patch._PatchState`` of ``patch_model`` / ``apply_recipe`` (shifts, folds,
  sites, config), None on a model that was not patched;
* ``fold_taps``: sites that ``fold`` taps while it proves a fold (folded sites: their hooks
  are gone, their binary activations are still compared).

Older versions kept three attributes (``_bnnshift_shift``, ``_bnnshift_patch``,
``_bnnshift_fold_taps``). They stay readable: :func:`set_state` writes each field's old name
too, and a value found under an old name that differs from the state's (a model object pickled
by an older version, or a caller that set it) is the one :func:`model_state` returns. Nothing of
this is saved in a patched directory (``patch.json`` addresses sites, ``model.safetensors`` holds
tensors), so a directory written by any version loads the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["ATTR", "LEGACY_ATTRS", "ModelState", "model_state", "set_state"]

ATTR = "_bnnshift_state"
# field -> the attribute an older version used for it (still written by set_state, still read)
LEGACY_ATTRS = {"shift": "_bnnshift_shift", "patch": "_bnnshift_patch", "fold_taps": "_bnnshift_fold_taps"}


@dataclass
class ModelState:
    """What bnnshift attached to one model (see the module docstring for each field)."""

    shift: Any = None  # shift.ShiftRuntime | None
    patch: Any = None  # patch._PatchState | None
    fold_taps: list = field(default_factory=list)  # list[sites.Site]


def model_state(model: Any) -> ModelState:
    """bnnshift's state on ``model``, read only (a model bnnshift never touched gets an empty
    ``ModelState`` that is not attached: reading never changes a user's model). Change it with
    :func:`set_state`."""
    d = getattr(model, "__dict__", {})
    st = d.get(ATTR)
    base = st if st is not None else ModelState()
    outside = {name: d[old] for name, old in LEGACY_ATTRS.items()
               if old in d and d[old] is not getattr(base, name)}
    if not outside:
        return base
    if "fold_taps" in outside:
        outside["fold_taps"] = list(outside["fold_taps"] or [])
    return replace(base, **outside)


def set_state(model: Any, **fields: Any) -> ModelState:
    """Set fields of ``model``'s state (``shift=``, ``patch=``, ``fold_taps=``), attaching it when
    needed; each field is also written under its old name (``LEGACY_ATTRS``). Returns the state.
    Raises TypeError for an unknown field."""
    unknown = set(fields) - set(LEGACY_ATTRS)
    if unknown:
        raise TypeError(f"unknown bnnshift state field(s): {', '.join(sorted(unknown))}")
    st = model_state(model)
    if model.__dict__.get(ATTR) is not st:  # first write, or values set under the old names
        st = replace(st, fold_taps=list(st.fold_taps))
        object.__setattr__(model, ATTR, st)
        fields = {**{n: getattr(st, n) for n in LEGACY_ATTRS}, **fields}
    for name, value in fields.items():
        setattr(st, name, value)
        object.__setattr__(model, LEGACY_ATTRS[name], value)
    return st
