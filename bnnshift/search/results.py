"""What a search produces: one candidate's result, a shift's aggregate over seeds, the
summary written to ``search.json`` (torch-free; ``report`` and ``distributed`` read these types)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class CandidateResult:
    """One (shift, seed) training. ``score`` is the config's metric (None when failed)."""

    shift: float
    seed: int
    config_hash: str
    status: str  # 'ok' | 'failed'
    score: float | None = None
    train_acc: float | None = None
    last_acc: float | None = None
    val_acc: float | None = None
    loss: float | None = None
    steps: int | None = None
    failed_step: int | None = None
    error: str | None = None
    init_hash: str | None = None
    batch_order_hash: str | None = None
    first_losses: list[float] = field(default_factory=list)
    plus_fraction: dict[str, float | None] = field(default_factory=dict)
    plus_fraction_mean: float | None = None
    # sites whose +1 share on the probe batch is 0 or 1 after training: constant, they carry no
    # information (e.g. a shift outside a hardtanh's [-1, 1]); the candidate is degenerate
    degenerate: list[str] = field(default_factory=list)
    seconds: float | None = None
    compiled: bool | None = None
    compile_seconds: float | None = None
    compile_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    rung: int | None = None  # successive halving: the last rung reached (0-based); None in a full search
    rung_scores: list[float] = field(default_factory=list)  # train accuracy so far at each rung reached
    resumed: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("resumed", None)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CandidateResult":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class ShiftStats:
    """Aggregate over seeds for one shift."""

    shift: float
    n: int
    failed: int
    mean: float | None
    std: float | None
    stderr: float | None
    loss: float | None
    plus_fraction_mean: float | None
    plus_fraction: dict[str, float | None]
    status: str  # 'ok' | 'failed' | 'partial'
    rung: int | None = None  # successive halving: the rung this shift stopped at (its score is from there)
    steps: int | None = None  # training steps its score covers (halving: fewer than the epoch when eliminated)


@dataclass
class SearchSummary:
    """What a search produced. ``winner`` is the shift with the best mean score."""

    config: dict[str, Any]
    config_hash: str
    metric: str
    sites: list[str]
    seeds: list[int]
    shifts: list[float]
    candidates: list[CandidateResult]
    stats: list[ShiftStats]
    winner: float | None
    baseline: float | None
    noise_note: str
    ahead_of_baseline: bool | None
    seconds: float
    # t = 0 has the best mean: the best other shift (``runner_up``) and whether t = 0 leads it by
    # more than the seed noise (True), within it (False) or with no noise estimate (None)
    runner_up: float | None = None
    baseline_ahead: bool | None = None
    compiled: bool | None = None
    compile_seconds: float | None = None
    compile_error: str | None = None
    resumed: int = 0
    shared_init: bool = True
    shared_batches: bool = True
    out_dir: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    patch_out: str | None = None
    checkpoint: dict[str, Any] | None = None  # load.LoadReport.to_json() of cfg.checkpoint
    notes: list[str] = field(default_factory=list)  # load report line, input shape source, fallbacks
    # the normalisation the inputs were given: {"mean", "std", "source", "pixel_mean", "pixel_std"}
    normalisation: dict[str, Any] | None = None
    schedule: dict[str, Any] = field(default_factory=lambda: {"name": "full"})
    rungs: list[dict[str, Any]] = field(default_factory=list)
    cost: dict[str, Any] = field(default_factory=dict)
    step_path: dict[str, Any] | None = None  # --compile auto: compiled or eager, memory format, and why
    warnings: list[str] = field(default_factory=list)  # no-STE layers, grid outside a site's range, degenerate

    @property
    def all_failed(self) -> bool:
        return bool(self.candidates) and all(not c.ok for c in self.candidates)

    def to_json(self) -> dict[str, Any]:
        from .._version import __version__

        return {
            "bnnshift_version": __version__,
            "command": "search",
            "config": self.config,
            "config_hash": self.config_hash,
            "metric": self.metric,
            "sites": self.sites,
            "seeds": self.seeds,
            "shifts": self.shifts,
            "winner": self.winner,
            "baseline": self.baseline,
            "ahead_of_baseline": self.ahead_of_baseline,
            "runner_up": self.runner_up,
            "baseline_ahead": self.baseline_ahead,
            "noise_note": self.noise_note,
            "shared_init": self.shared_init,
            "shared_batches": self.shared_batches,
            "compiled": self.compiled,
            "compile_seconds": self.compile_seconds,
            "compile_error": self.compile_error,
            "seconds": self.seconds,
            "resumed": self.resumed,
            "schedule": self.schedule,
            "rungs": self.rungs,
            "cost": self.cost,
            "step_path": self.step_path,
            "stats": [asdict(s) for s in self.stats],
            "candidates": [c.to_json() for c in self.candidates],
            "files": self.files,
            "patch_out": self.patch_out,
            "warnings": self.warnings,
            "checkpoint": self.checkpoint,
            "notes": self.notes,
            "normalisation": self.normalisation,
        }
