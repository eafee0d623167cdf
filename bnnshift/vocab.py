"""The words bnnshift branches on, as ``str`` enums (the glossary is at the top of
docs/architecture.md).

Each member *is* its JSON string: ``SiteKind.MODULE == "module"``, it hashes as ``"module"``
(a dict keyed by either finds the other), ``json.dumps`` writes ``"module"`` and ``str()`` /
f-strings give ``module``. So ``scan`` / ``patch`` ``--json`` payloads, ``patch.json`` and the
search journal (and its ``config_hash``) read the same whether a value came from an enum or from
a file. Standard library only: imported by torch-free modules.
"""
from __future__ import annotations

import enum

__all__ = ["HookMode", "Schedule", "SiteKind", "Vocabulary"]


class Vocabulary(str, enum.Enum):
    """A ``str`` enum whose ``str()`` and ``format()`` are its value (Python 3.10+ alike).

    ``parse(value)`` returns the member for a known string and raises ``ValueError`` naming the
    choices otherwise."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def parse(cls, value: str) -> "Vocabulary":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a {cls.__name__}; one of: "
                             f"{', '.join(m.value for m in cls)}") from None

    @classmethod
    def coerce(cls, value):
        """The member for ``value`` when it is one of the values, else ``value`` unchanged (records
        read from an older or a newer file keep their string)."""
        try:
            return cls(value)
        except ValueError:
            return value


class SiteKind(Vocabulary):
    """``Site.kind``: what kind of binarizer a site is (docs/architecture.md, "Sites")."""

    MODULE = "module"  # a binarizer module: each call is a site
    INPUT = "input"  # a conv/linear that binarizes its own input in forward
    INLINE = "inline"  # sign / Function.apply / comparison written in a composite forward
    HARDTANH = "hardtanh"  # full-precision hardtanh (for --hardtanh-shift), not a binary site


class HookMode(Vocabulary):
    """``Site.apply``: where the shift's hook subtracts ``t`` at run time."""

    PRE_HOOK = "pre_hook"  # from the first input of module call (module, call_index)
    PRODUCER = "producer_hook"  # from the output of producer call (module, call_index)
    OP = "op"  # from the first input of candidate op (scope, op_index)


class Schedule(Vocabulary):
    """``--schedule``: ``full`` trains every (shift, seed) the whole epoch; ``halving`` is successive
    halving over the shifts (:class:`bnnshift.search.halving.HalvingLoop`). The JSON strings of
    ``search.json`` / the journal; the torch-free choices are ``bnnshift.validate.SCHEDULES``."""

    FULL = "full"
    HALVING = "halving"
