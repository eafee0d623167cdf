"""The one table of renamed public names (issue 23: one vocabulary, docs/architecture.md's glossary).

Each row is ``(owner, old name, new name)``: ``owner`` is ``module.Class`` for an attribute or
``module.function`` for a keyword argument. The old name keeps working and says so once per
call site with a ``DeprecationWarning`` naming the new one. JSON keys and CLI options are not
renamed (files and scripts keep reading the same). Standard library only.

* :func:`alias_attributes` (a class decorator) adds a property per row of the class;
* :func:`alias_kwargs` (a function decorator) maps an old keyword to the new one.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=type)

# (owner, old name, new name)
RENAMED: tuple[tuple[str, str, str], ...] = (
    # the binarizer's own threshold vs bnnshift's threshold tensor (JSON key stays "threshold")
    ("bnnshift.sites.Site", "threshold", "own_threshold"),
    # the bias sign: was fold_sign / direction / sign (JSON key stays "fold_sign")
    ("bnnshift.sites.Site", "fold_sign", "bias_sign"),
    ("bnnshift.shift.fold_delta", "direction", "bias_sign"),
)


def renamed(owner: str) -> dict[str, str]:
    """Old name -> new name of the rows of ``owner`` (``module.Class`` / ``module.function``)."""
    return {old: new for o, old, new in RENAMED if o == owner}


def _warn(owner: str, old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{owner}: '{old}' is renamed '{new}' (docs/architecture.md, glossary); the old name "
                  "will be removed", DeprecationWarning, stacklevel=stacklevel)


def alias_attributes(cls: C) -> C:
    """Give ``cls`` a read/write property for each old attribute name of the table, forwarding to
    the new one with a ``DeprecationWarning``. Raises ``TypeError`` when a row's new name is not
    an attribute or field of ``cls`` (the table and the class disagree)."""
    owner = f"{cls.__module__}.{cls.__qualname__}"
    fields = set(getattr(cls, "__dataclass_fields__", {})) | set(dir(cls))
    for old, new in renamed(owner).items():
        if new not in fields:
            raise TypeError(f"{owner} has no attribute {new!r} (bnnshift._compat.RENAMED)")

        def get(self, _old=old, _new=new):
            _warn(owner, _old, _new)
            return getattr(self, _new)

        def set_(self, value, _old=old, _new=new):
            _warn(owner, _old, _new)
            setattr(self, _new, value)

        setattr(cls, old, property(get, set_, doc=f"Deprecated: use ``{new}``."))
    return cls


def alias_kwargs(func: F) -> F:
    """Accept each old keyword of the table for ``func`` as its new one, with a
    ``DeprecationWarning``; both at once raise ``TypeError``."""
    owner = f"{func.__module__}.{func.__qualname__}"
    table = renamed(owner)
    if not table:
        return func

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for old, new in table.items():
            if old in kwargs:
                if new in kwargs:
                    raise TypeError(f"{func.__qualname__}() got both {old!r} (old name) and {new!r}")
                _warn(owner, old, new)
                kwargs[new] = kwargs.pop(old)
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
