"""The progress hooks a caller (the CLI's bar) passes to a search: all optional."""
from __future__ import annotations

from typing import Any


class _Progress:
    """Hooks the CLI passes in: ``start(shift, seed, i, n, total_steps)``, ``step(done, total)``,
    ``end(result)``; all optional."""

    def __init__(self, obj: Any):
        self.obj = obj

    def call(self, name: str, *a):
        fn = getattr(self.obj, name, None) if self.obj is not None else None
        if fn is not None:
            fn(*a)
