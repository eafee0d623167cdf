"""Paused candidates' training states of successive halving (memory, ``OUT/states/``)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..errors import OutputError
from ..journal import JOURNAL_NAME

# successive halving keeps candidates' training states in memory while they fit in this many
# bytes in total; beyond it they live only in --out (states/) and are read back per rung
STATE_MEMORY_BUDGET = 1 << 30


class _StateStore:
    """Paused candidates' training states (``DefaultTrainer.snapshot``): in memory while they fit
    in ``STATE_MEMORY_BUDGET``, and in ``OUT/states/`` whenever there is an output directory
    (written atomically, before the rung record that names them, so ``--resume`` finds them)."""

    PATTERN = "t*_seed*_step*.pt"

    def __init__(self, out_dir: Path | None, *, fresh: bool):
        self.dir = out_dir / "states" if out_dir is not None else None
        self.mem: dict[tuple[str, int], tuple[int, dict]] = {}
        self.in_memory = True
        self.files: dict[tuple[str, int], tuple[int, Path]] = {}
        if fresh:  # a new search into a --force'd directory: states of an older one are stale
            self._clear()

    def _clear(self) -> None:
        if self.dir is not None and self.dir.is_dir():
            for p in self.dir.glob(self.PATTERN):
                p.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.dir.rmdir()

    @staticmethod
    def _bytes(state: dict) -> int:
        total = 0
        stack = [state]
        while stack:
            o = stack.pop()
            if isinstance(o, torch.Tensor):
                total += o.numel() * o.element_size()
            elif isinstance(o, dict):
                stack.extend(o.values())
            elif isinstance(o, (list, tuple)):
                stack.extend(o)
        return total

    def put(self, key: tuple[str, int], steps: int, state: dict, n_candidates: int) -> str | None:
        rel = None
        if self.dir is not None:
            from .._io import _atomic_target

            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / f"t{key[0]}_seed{key[1]}_step{steps}.pt"
            try:
                with _atomic_target(path) as tmp:
                    torch.save(state, tmp)
            except (OSError, RuntimeError) as exc:  # a full disk: torch's zip writer raises RuntimeError
                if isinstance(exc, RuntimeError) and "write" not in str(exc).lower():
                    raise
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
                    (str(exc).strip().splitlines() or ["write failed"])[-1][:160]
                raise OutputError(f"cannot save the training state {path}: {reason}",
                                  hint="free some space (or lower the number of shifts); the journal keeps every "
                                       "finished rung: rerun the same command with --resume") from None
            old = self.files.get(key)
            self.files[key] = (steps, path)
            rel = f"states/{path.name}"
            if old is not None and old[1] != path:
                old[1].unlink(missing_ok=True)
        if self.in_memory and self.dir is not None and self._bytes(state) * n_candidates > STATE_MEMORY_BUDGET:
            self.in_memory = False  # large model: read the states back from --out
            self.mem.clear()
        if self.in_memory or self.dir is None:
            self.mem[key] = (steps, state)
        return rel

    def hold(self, key: tuple[str, int], steps: int, state: dict, n_candidates: int) -> None:
        """A state between two turns of ``--stop-when-stable`` (not journaled): in memory while the
        states fit, else written to ``states/`` like :meth:`put`."""
        if self.dir is None or (self.in_memory and self._bytes(state) * n_candidates <= STATE_MEMORY_BUDGET):
            self.mem[key] = (steps, state)
        else:
            self.put(key, steps, state, n_candidates)

    def known(self, key: tuple[str, int], steps: int, rel: str | None) -> None:
        """A state written by an earlier (killed) process, named by its rung record."""
        if rel and self.dir is not None:
            from ..journal import resolve_inside

            # a path read from the journal: data, kept inside OUT/states/ (never removed elsewhere)
            path = resolve_inside(self.dir, rel[len("states/"):] if isinstance(rel, str) and rel.startswith("states/")
                                  else rel, f"journal {self.dir.parent / JOURNAL_NAME}")
            if path.is_file() and steps > self.files.get(key, (-1, None))[0]:
                self.files[key] = (steps, path)

    def get(self, key: tuple[str, int]) -> tuple[int, dict] | None:
        if key in self.mem:
            return self.mem[key]
        got = self.files.get(key)
        if got is None:
            return None
        try:
            return got[0], torch.load(got[1], map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a torn or foreign file: retrain from step 0 instead
            return None

    def drop(self, key: tuple[str, int]) -> None:
        self.mem.pop(key, None)
        got = self.files.pop(key, None)
        if got is not None:
            got[1].unlink(missing_ok=True)

    def close(self) -> None:
        self.mem.clear()
        self.files.clear()
        self._clear()
