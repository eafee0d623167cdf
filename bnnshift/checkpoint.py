"""Loading a checkpoint into a model: keys matched strictly or not, tied weights and BN
counters as torch does, NaN/inf refused, and the :class:`LoadReport` of what was loaded.

Public names are re-exported by :mod:`bnnshift.load`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .checkpoint_read import read_state_dict
from .errors import CheckpointError
from .modelspec import exc_text



@dataclass
class LoadReport:
    """What :func:`load_checkpoint` read and matched; ``to_json()`` is the ``checkpoint`` object
    of every ``--json`` output, ``patch.json`` and ``search.json``.

    ``path``/``sha256``: the file; ``inner_key``: the wrapper keys descended (``"state_dict"``,
    ``"model/state_dict"``, None for a bare state_dict); ``prefix``: what was stripped from every
    key (``"module."``, ``"_orig_mod.module."``, None); ``tensors``: tensors found under the
    inner key; ``loaded`` of ``total`` (the model's state_dict entries) were loaded;
    ``shape_mismatch`` is (key, ckpt shape, model shape); ``notes``: EMA present / used,
    wrappers removed, non-finite values allowed.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    loaded: int = 0
    total: int = 0
    path: str | None = None
    sha256: str | None = None
    inner_key: str | None = None
    prefix: str | None = None
    tensors: int = 0
    strict: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def summary(self) -> str:
        mm = len(self.shape_mismatch)
        return (
            f"{len(self.missing)} missing{_few(self.missing)}, "
            f"{len(self.unexpected)} unexpected{_few(self.unexpected)}, "
            f"{mm} shape mismatch{'' if mm == 1 else 'es'}"
            + _few([f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.shape_mismatch])
        )

    def line(self) -> str:
        """The one stderr line: ``checkpoint F: loaded K of N (key 'state_dict', prefix 'module.'
        stripped)`` plus, when not everything fitted, the key summary."""
        where = []
        if self.inner_key:
            where.append(f"key {self.inner_key!r}")
        if self.prefix:
            where.append(f"prefix {self.prefix!r} stripped")
        text = f"checkpoint {self.path}: loaded {self.loaded} of {self.total}"
        if where:
            text += " (" + ", ".join(where) + ")"
        if not self.ok:
            text += "; " + self.summary()
        for n in self.notes:
            text += f"; {n}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "inner_key": self.inner_key,
            "prefix": self.prefix,
            "tensors": self.tensors,
            "loaded": self.loaded,
            "total": self.total,
            "strict": self.strict,
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "shape_mismatch": [[k, list(a), list(b)] for k, a, b in self.shape_mismatch],
            "notes": list(self.notes),
        }


def _few(keys: list[str], n: int = 3) -> str:
    if not keys:
        return ""
    return " (" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + ")"


def _prefix_hint(report: LoadReport) -> str | None:
    """If the unexpected keys all share a first component whose removal explains the missing ones."""
    if not report.unexpected or not report.missing:
        return None
    heads = {k.split(".", 1)[0] for k in report.unexpected if "." in k}
    if len(heads) != 1 or not all("." in k for k in report.unexpected):
        return None
    head = heads.pop()
    stripped = {k.split(".", 1)[1] for k in report.unexpected}
    if set(report.missing) <= stripped:
        return f"the checkpoint's keys carry an extra {head + '.'!r} prefix; re-save the inner model's state_dict"
    return None


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """State-dict keys that name one and the same tensor (``conv2.weight = conv1.weight``), in
    registration order; only groups of two or more."""
    groups: dict[int, list[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        if t is not None:
            groups.setdefault(id(t), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _bn_counter(model: nn.Module, key: str) -> bool:
    """``key`` is a BatchNorm's ``num_batches_tracked``: torch's ``load_state_dict(strict=True)``
    keeps the model's own counter when a plain dict lacks it."""
    owner, _, leaf = key.rpartition(".")
    if leaf != "num_batches_tracked":
        return False
    try:
        mod = model.get_submodule(owner) if owner else model
    except AttributeError:
        return False
    return isinstance(mod, nn.modules.batchnorm._BatchNorm)


def _fill_as_torch_does(model: nn.Module, sd: dict[str, torch.Tensor]
                        ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keys that are absent but that torch's own ``load_state_dict(strict=True)`` does not miss:
    a tensor tied to a key that is present (safetensors' ``save_model`` stores one name per
    shared tensor) is given that key's value; a missing BatchNorm ``num_batches_tracked`` is left
    to torch, which keeps the model's own. Returns (the dict, notes saying what was accepted)."""
    sd = dict(sd)
    notes: list[str] = []
    tied: list[str] = []
    for group in _tied_groups(model):
        present = [k for k in group if k in sd]
        if not present:
            continue
        for k in group:
            if k not in sd:
                sd[k] = sd[present[0]]
                tied.append(f"{k} = {present[0]}")
    if tied:
        notes.append(f"tied weights loaded from the key they share a tensor with: {', '.join(tied[:3])}"
                     + (", ..." if len(tied) > 3 else ""))
    counters = [k for k in model.state_dict() if k not in sd and _bn_counter(model, k)]
    if counters:
        notes.append(f"{len(counters)} BatchNorm num_batches_tracked absent: the model's own kept "
                     "(as torch's load_state_dict does)")
    return sd, notes


def _nonfinite(sd: Mapping[str, torch.Tensor]) -> list[str]:
    return [k for k, v in sd.items() if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all())]


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    strict: bool = True,
    allow_unsafe: bool = False,
    use_ema: bool = False,
    allow_nonfinite: bool = False,
    search_dirs: Iterable[str] = (),
) -> LoadReport:
    """Load a checkpoint into ``model`` and return the :class:`LoadReport`.

    Strict refuses any missing/unexpected/mis-shaped key (before touching the model); non-strict
    loads what fits but refuses a checkpoint of which no parameter fits. NaN/inf values in the
    keys to load are refused naming them unless ``allow_nonfinite``. ``search_dirs``: folders
    put on ``sys.path`` (after the current one) while unpickling with ``allow_unsafe``.
    Raises CheckpointError / UnsafeCheckpointError.
    """
    own = model.state_dict()
    read = read_state_dict(path, allow_unsafe=allow_unsafe, use_ema=use_ema, model_keys=own.keys(),
                           search_dirs=search_dirs)
    sd = read.sd
    p = Path(path).expanduser()
    report = LoadReport(path=str(p), inner_key=read.inner_key, prefix=read.prefix, tensors=len(sd),
                        total=len(own), strict=strict, notes=list(read.notes))
    sd, accepted = _fill_as_torch_does(model, sd)
    report.notes.extend(accepted)
    report.missing = [k for k in own if k not in sd and not _bn_counter(model, k)]
    report.unexpected = [k for k in sd if k not in own]
    for k, v in sd.items():
        if k in own and isinstance(own[k], torch.Tensor):
            target = own[k]
            if isinstance(target, nn.parameter.UninitializedParameter) or (
                hasattr(nn.parameter, "UninitializedBuffer") and isinstance(target, nn.parameter.UninitializedBuffer)
            ):
                continue
            if tuple(v.shape) != tuple(target.shape):
                report.shape_mismatch.append((k, tuple(v.shape), tuple(target.shape)))

    def fail(what: str) -> CheckpointError:
        where = [f"under {read.inner_key!r}"] if read.inner_key else []
        if read.prefix:
            where.append(f"prefix {read.prefix!r} stripped")
        where = f" ({', '.join(where)})" if where else ""
        return CheckpointError(
            f"checkpoint {p}{where} {what}: {report.summary()}",
            hint=_prefix_hint(report) or "check the model spec and --arg values, or pass --non-strict to load what fits",
        )

    if strict and not report.ok:
        raise fail("does not fit the model")
    bad = {k for k, _, _ in report.shape_mismatch}
    fitting = {k: v for k, v in sd.items() if k not in bad}
    report.loaded = sum(1 for k in fitting if k in own)
    params = {k for k, _ in model.named_parameters()}
    if not strict and own and (report.loaded == 0 or (params and not any(k in params for k in fitting))):
        raise fail(f"has no parameter that fits the model (loaded {report.loaded} of {len(own)})")
    nonfinite = _nonfinite({k: v for k, v in fitting.items() if k in own})
    if nonfinite:
        if not allow_nonfinite:
            raise CheckpointError(
                f"checkpoint {p} holds NaN/inf values in {len(nonfinite)} tensor(s){_few(nonfinite)}",
                hint="the training diverged before this checkpoint; use an earlier one, or pass --allow-nonfinite",
            )
        report.notes.append(f"non-finite values loaded (--allow-nonfinite) in {', '.join(nonfinite[:3])}")
    try:
        result = model.load_state_dict(fitting, strict=strict)
    except RuntimeError as exc:  # e.g. a module's own _load_from_state_dict refusing a value
        raise CheckpointError(
            f"checkpoint {p} could not be loaded into the model: {exc_text(exc)}",
            hint="check the model spec and --arg values",
        ) from exc
    # load_state_dict's own view is authoritative for modules with custom loading hooks.
    report.missing = [k for k in result.missing_keys if k not in bad]
    report.unexpected = list(result.unexpected_keys)
    return report

