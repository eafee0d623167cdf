"""Several processes for one candidate: ``torchrun --nproc-per-node N -m bnnshift search ...``.

Each candidate trains with ``DistributedDataParallel``: every rank builds the same model from
the same seed, takes its shard ``global_batch[rank::world]`` of bnnshift's seeded batch order
(``--batch-size`` is the global batch), gradients are averaged by DDP, the step's loss and the
accuracy counts are summed over ranks, so every rank computes the same score. Rank 0 alone
writes the journal and the report; the other ranks resume from a copy of rank 0's journal
(:func:`share_journal`), so all ranks skip the same finished candidates; at the end the ranks
check that they agree on the candidates and their scores (:func:`agree`).

Backends: ``nccl`` on CUDA, ``gloo`` on CPU (tested here with 2 CPU processes).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from .errors import TrainingError, UsageError

log = logging.getLogger(__name__)

__all__ = ["DistInfo", "dist_info", "init_from_env", "resolve_device", "all_reduce_", "broadcast_object", "agree",
           "wrap_ddp", "sync_buffers", "barrier"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def dist_info() -> DistInfo:
    """The process group's rank/world (or the single-process default)."""
    if not _initialized():
        return DistInfo()
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                    int(os.environ.get("LOCAL_RANK", "0")))


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str) -> DistInfo:
    """Join the torchrun job described by the environment (``WORLD_SIZE`` > 1): NCCL when
    ``device`` resolves to CUDA, else gloo. A no-op without torchrun or when already joined."""
    if _initialized() or not launched_by_torchrun():
        return dist_info()
    if not torch.distributed.is_available():
        raise UsageError("this torch build has no torch.distributed", hint="run without torchrun")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=int(os.environ.get("BNNSHIFT_DIST_TIMEOUT", "1800")))
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return dist_info()


def resolve_device(device: str, info: DistInfo | None = None) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` under torchrun -> ``cuda:LOCAL_RANK``.
    Raises UsageError for CUDA without a GPU or a bad device string."""
    info = info or dist_info()
    dev = device.strip().lower()
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available here", hint="use --device cpu")
        if dev == "cuda" and info.active:
            dev = f"cuda:{info.local_rank}"
    try:
        out = torch.device(dev)
    except RuntimeError:
        raise UsageError(f"bad --device {device!r}", hint="cpu, cuda, cuda:N or auto") from None
    if out.type not in ("cpu", "cuda"):
        raise UsageError(f"bad --device {device!r}", hint="cpu, cuda, cuda:N or auto")
    if out.type == "cuda" and out.index is not None and out.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) here")
    return out


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (a no-op in one process)."""
    if _initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not _initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def agree(obj: Any, what: str) -> None:
    """Raise TrainingError unless every rank holds an equal ``obj`` (JSON-like)."""
    if not _initialized() or torch.distributed.get_world_size() == 1:
        return
    got: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(got, obj)
    if any(g != got[0] for g in got[1:]):
        raise TrainingError(f"the torchrun ranks disagree on {what}",
                            hint="every rank must run the same command on the same data")


def barrier() -> None:
    if _initialized():
        torch.distributed.barrier()


def unused_parameters(model: torch.nn.Module, probe: torch.Tensor | None,
                      pick: Any = None) -> list[str] | None:
    """Names of the trainable parameters that get no gradient from one training-mode forward +
    backward of ``probe`` (a few samples, shape ``(n, *input_shape)``), run on a deep copy so
    the model's weights, BatchNorm statistics and gradients stay untouched. The backward starts
    from ``pick(output)`` (the logits), or from every floating tensor of the output. None when
    the probe cannot run (then DDP is told to look for unused parameters itself)."""
    import copy

    if probe is None or probe.shape[0] < 1:
        return None
    try:
        twin = copy.deepcopy(model).train()
        with torch.enable_grad():
            out = twin(probe[:2])
            if pick is not None:
                roots = [pick(out)]
            else:
                roots = [t for t in _tensors_in(out) if t.is_floating_point() and t.requires_grad]
            roots = [r for r in roots if isinstance(r, torch.Tensor) and r.requires_grad]
            if not roots:
                return None
            sum(r.float().sum() for r in roots).backward()
        return [n for n, p in twin.named_parameters() if p.requires_grad and p.grad is None]
    except Exception:  # noqa: BLE001 - the probe only decides a DDP flag; DDP then finds out itself
        return None


def _tensors_in(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors_in(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors_in(v)]
    if hasattr(out, "__dataclass_fields__"):
        return [t for f in out.__dataclass_fields__ for t in _tensors_in(getattr(out, f))]
    return []


def wrap_ddp(model: torch.nn.Module, device: torch.device, probe: torch.Tensor | None = None,
             pick: Any = None) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` on ``device`` (the model itself in one process).

    ``find_unused_parameters=True`` only when needed: when a parameter gets no gradient from a
    probe forward + backward (:func:`unused_parameters`; an auxiliary head forward never uses),
    or when the probe cannot tell. ``probe``: a few input samples on ``device``."""
    if not _initialized() or torch.distributed.get_world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    unused = unused_parameters(model, probe, pick)
    find = unused is None or bool(unused)
    if unused and dist_info().is_main:
        log.info("DDP: %d parameter(s) get no gradient (%s): find_unused_parameters=True",
                 len(unused), ", ".join(unused[:3]) + (", ..." if len(unused) > 3 else ""))
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find)


@torch.no_grad()
def sync_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BN running statistics) on every rank, so probes agree after training."""
    if not _initialized() or torch.distributed.get_world_size() == 1:
        return
    for b in model.buffers():
        torch.distributed.broadcast(b, src=0)
