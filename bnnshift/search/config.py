"""The flat, hashed search configuration: every field that decides a candidate's score,
except its shift and seed (torch-free: the CLI builds one before importing torch)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .. import validate
from ..vocab import Schedule


@dataclass
class SearchConfig:
    """Everything that decides a candidate's score, except its shift and seed.

    ``lr=None`` means the optimizer's default (Adam 1e-3, SGD 0.05; docs/search.md).
    ``compile``: 'auto' (``search``: compile only when the expected steps pay back the compile,
    measured, see ``bnnshift.train.choose_step_path``; ``run_candidate``: compile), 'on'
    (torch.compile the forward+loss, eager on any error), 'off'.
    ``memory_format``: 'auto' trains models with 2-d convolutions in channels_last (measured
    1.6x faster eager steps on CPU: MaxPool and oneDNN convs avoid layout conversions).
    ``compile``, ``memory_format`` and ``device`` change float rounding only: not hashed.
    ``metric`` ranks the candidates: 'train_acc' (accumulated over the epoch, the paper's
    signal), 'last_acc' (last 25% of the steps) or 'val_acc' (needs ``val``).
    """

    model: str
    data: str
    model_args: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    input_shape: tuple[int, ...] | None = None
    shifts: list[float] = field(default_factory=lambda: [0.0])
    seeds: list[int] = field(default_factory=lambda: [0])
    epochs: int = 1
    steps: int | None = None
    batch_size: int = 256
    optimizer: str = "adam"
    lr: float | None = None
    weight_decay: float = 0.0
    momentum: float | None = None
    train_config: str | None = None
    hardtanh: bool = False
    val: bool = False
    bn_recalib_batches: int = 20
    device: str = "cpu"
    compile: str = "auto"
    memory_format: str = "auto"
    dtype: str = "float32"
    train_limit: int | None = None
    val_limit: int | None = None
    metric: str = "train_acc"
    download: bool = False
    strict: bool = True
    use_ema: bool = False
    allow_nonfinite: bool = False
    output_index: int | None = None
    output_key: str | None = None
    schedule: str = Schedule.FULL.value
    eta: float = 2.0
    min_fraction: float = 0.125
    stop_when_stable: bool = False  # stop a rung once its decision held for stable_fraction of its steps
    stable_fraction: float = 0.25
    rung_min_samples: int = 2000  # halving: a rung that ranks trains each candidate on at least this many samples
    # streaming data path and precision (bnnshift.data.stream, docs/search.md)
    augment: str = "none"
    stream: str = "auto"
    workers: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    precision: str = "fp32"

    # fields that do not change a score (or are the candidate itself); the schedule decides
    # which candidates train how far, not what a candidate scores after n steps
    _NOT_HASHED = ("shifts", "seeds", "device", "compile", "memory_format", "schedule", "eta", "min_fraction",
                   "workers", "stop_when_stable", "stable_fraction", "rung_min_samples")

    def __post_init__(self):
        if self.input_shape is not None:
            self.input_shape = tuple(int(v) for v in self.input_shape)
        validate.check_search_config(self)  # torch-free: the CLI runs the same checks before importing torch
        self.mean, self.std = validate.parse_floats(self.mean, "--mean"), validate.parse_floats(self.std, "--std")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape) if self.input_shape else None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SearchConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def hashed_fields(self) -> dict[str, Any]:
        d = self.to_json()
        for k in self._NOT_HASHED:
            d.pop(k, None)
        for k, default in _HASHED_IF_SET.items():  # added later: journals written before keep their hash
            if d.get(k) == default:
                d.pop(k, None)
        return d

    def config_hash(self, *, data_fingerprint: str | None = None, checkpoint_sha256: str | None = None,
                    input_shape: tuple[int, ...] | None = None) -> str:
        """The journal's key of this configuration: sha256 (16 hex) of every field that changes a
        score (:meth:`hashed_fields`), the data fingerprint, the checkpoint's sha256 (None: no
        checkpoint) and the resolved input shape ``(C, H, W)``; shifts, seeds, device, compile and
        the schedule are excluded (so a resume with more shifts reuses finished candidates).

        Pure: it loads nothing. The fingerprint and the shape come from the data and the model:
        ``SearchContext.open(cfg).config_hash`` is this with them. Raises ``TypeError`` without them.
        """
        if data_fingerprint is None or input_shape is None:
            raise TypeError("config_hash() needs data_fingerprint= and input_shape= (it loads nothing): "
                            "use bnnshift.search.SearchContext.open(cfg).config_hash")
        h = hashlib.sha256()
        h.update(json.dumps(self.hashed_fields(), sort_keys=True, default=str).encode())
        h.update(f"|data={data_fingerprint}|ckpt={checkpoint_sha256}|shape={tuple(input_shape)}".encode())
        return h.hexdigest()[:16]


_HASHED_IF_SET = {"use_ema": False, "allow_nonfinite": False, "output_index": None, "output_key": None}
