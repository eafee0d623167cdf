"""The user's model is never changed by bnnshift.

Every forward bnnshift runs for its own purposes (the dynamic pass of ``detect``, the probe,
the summary, the export pre-check) runs on a ``copy.deepcopy`` of the user's model. This
module holds the tools that make that checkable:

* ``snapshot`` / ``changed_tensors``: the values of every parameter and buffer, and which of
  them differ later (BatchNorm running statistics excluded: a train-mode forward updates
  them by design);
* ``inplace_writers``: run one forward under ``no_grad`` on a copy and name the parameters
  and buffers it wrote, e.g. BinaryNet-style ``self.weight.data = sign(self.latent)``. Such a
  model binarizes its own weights in place: its saved weights would be the binarized ones if
  bnnshift ran it, and ``torch.onnx`` cannot trace the ``.data`` assignment.
"""
from __future__ import annotations

import copy
from typing import Iterator

import torch
from torch import nn

__all__ = ["snapshot", "changed_tensors", "inplace_writers", "inplace_message", "copy_model"]


def _uncopyable(v) -> bool:
    if isinstance(v, (torch.Tensor, nn.Module, type(None), bool, int, float, str, type)):
        return False
    try:
        copy.deepcopy(v)
        return False
    except Exception:  # noqa: BLE001 - any failure (KeyError / RecursionError of a delegating __getattr__)
        return True


def copy_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that bnnshift may run: ``copy.deepcopy``, or, when some attribute
    object cannot be deep-copied (a layer recipe whose ``__getattr__`` delegates, so that
    ``copy.deepcopy`` fails with ``KeyError`` / ``RecursionError``), a deep copy that shares
    those objects with the original (they are configuration read by ``forward``: parameters,
    buffers and submodules are still copied). Raises ``ModelLoadError`` (exit 1) naming the
    class when even that fails."""
    try:
        return copy.deepcopy(model)
    except Exception as first:  # noqa: BLE001 - located and handled below
        memo: dict[int, object] = {}
        for m in model.modules():
            for k, v in m.__dict__.items():
                if k in ("_parameters", "_buffers", "_modules"):
                    continue
                items = list(v.values()) if isinstance(v, dict) else list(v) if isinstance(v, (list, tuple)) else [v]
                for e in items:
                    if _uncopyable(e):
                        memo[id(e)] = e
        culprits = sorted({type(e).__qualname__ for e in memo.values()})
        if not culprits:  # a module itself cannot be copied: name the innermost one
            for m in reversed(list(model.modules())):
                try:
                    copy.deepcopy(m)
                except Exception:  # noqa: BLE001
                    culprits = [type(m).__qualname__]
                    break
        if memo:
            try:
                return copy.deepcopy(model, memo)
            except Exception:  # noqa: BLE001
                pass
        from .errors import ModelLoadError

        what = ", ".join(culprits) if culprits else type(model).__qualname__
        raise ModelLoadError(
            f"the model cannot be copied (copy.deepcopy of {what} fails with {type(first).__name__}), and bnnshift "
            "runs its own forwards only on a copy",
            hint=f"make {what} deep-copyable (e.g. a __getattr__ that raises AttributeError for unknown names, "
                 "or a __deepcopy__)") from None


def _bn_stat_names(model: nn.Module) -> set[str]:
    out: set[str] = set()
    for path, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for b in ("running_mean", "running_var", "num_batches_tracked"):
                out.add(f"{path}.{b}" if path else b)
    return out


def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=True)
    yield from model.named_buffers(remove_duplicate=True)


def snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """name -> (the tensor object, its ``.data`` at this moment, a clone of its values)."""
    return {n: (t, t.data, t.detach().clone()) for n, t in _tensors(model) if isinstance(t, torch.Tensor)}


def changed_tensors(model: nn.Module, snap: dict, *, include_bn_stats: bool = False,
                    params_only: bool = False) -> list[str]:
    """Names of parameters/buffers of ``model`` whose values (or storage) differ from ``snap``."""
    skip = set() if include_bn_stats else _bn_stat_names(model)
    out = []
    for n, t in (model.named_parameters() if params_only else _tensors(model)):
        if n in skip or n not in snap:
            continue
        _, data, value = snap[n]
        cur = t.detach()
        if cur.shape != value.shape or cur.dtype != value.dtype or not torch.equal(cur, value):
            out.append(n)
    return out


def inplace_writers(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Parameters that one ``no_grad`` eval forward of ``x`` writes (run on a copy).

    Returns [] when the forward fails (the caller reports that failure its own way).
    """
    work = copy.deepcopy(model)
    work.eval()
    snap = snapshot(work)
    try:
        with torch.no_grad():
            work(x)
    except Exception:  # noqa: BLE001 - only writes are asked here
        return []
    return changed_tensors(work, snap, params_only=True)


def inplace_message(names: list[str]) -> str:
    """The one warning bnnshift gives for a forward that writes its own parameters."""
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return (f"the model's forward writes {shown} in place (binarizes or clamps weights in place, e.g. "
            "`weight.data = binarize(latent)`): bnnshift ran it only on copies, saved weights are the loaded ones; "
            "ONNX export needs a forward that computes the binary weight without assigning .data "
            "(w = SignSTE.apply(self.weight))")
