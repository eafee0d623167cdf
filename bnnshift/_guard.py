"""The user's model is never changed by bnnshift.

Every forward bnnshift runs for its own purposes (the dynamic pass of ``detect``, the probe,
the summary, the export pre-check) runs on a ``copy.deepcopy`` of the user's model. This
module holds the tools that make that checkable:

* ``snapshot`` / ``changed_tensors``: the values of every parameter and buffer, and which of
  them differ later (BatchNorm running statistics excluded: a train-mode forward updates
  them by design);
* ``ParamWrites`` / ``inplace_writers``: the parameters a forward writes, found by the act (a
  ``.data =`` assignment, an in-place op on ``p.data`` or on ``p`` under ``no_grad``,
  ``copy_``, ``__setitem__``), not by a changed value: a clamp each step that changes nothing
  is a write too, e.g. BinaryNet-style ``self.weight.data = sign(self.latent)``. Such a model
  binarizes or clamps its own weights in place: its saved weights would be the written ones if
  bnnshift ran it, and ``torch.onnx`` cannot export the write.
"""
from __future__ import annotations

import copy
import gc
from typing import Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["ParamWrites", "snapshot", "changed_tensors", "inplace_writers", "inplace_message", "copy_model"]


def _uncopyable(v) -> bool:
    if isinstance(v, (torch.Tensor, nn.Module, type(None), bool, int, float, str, type)):
        return False
    try:
        copy.deepcopy(v)
        return False
    except Exception:  # noqa: BLE001 - any failure (KeyError / RecursionError of a delegating __getattr__)
        return True


COLLECT_ABOVE_BYTES = 64 << 20


def _nbytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.parameters()) + \
        sum(t.numel() * t.element_size() for t in model.buffers())


def copy_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that bnnshift may run: ``copy.deepcopy``, or, when some attribute
    object cannot be deep-copied (a layer recipe whose ``__getattr__`` delegates, so that
    ``copy.deepcopy`` fails with ``KeyError`` / ``RecursionError``), a deep copy that shares
    those objects with the original (they are configuration read by ``forward``: parameters,
    buffers and submodules are still copied). Raises ``ModelLoadError`` (exit 1) naming the
    class when even that fails.

    Memory: for a model over ``COLLECT_ABOVE_BYTES``, copies that bnnshift dropped are collected
    first (a patched copy holds reference cycles: hooks -> runtime -> model), so a scan or a
    patch never holds more than one copy of the model besides the model itself (a collection
    costs ~0.1 s: small models skip it)."""
    if _nbytes(model) > COLLECT_ABOVE_BYTES:
        gc.collect()
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


_NOT_WRITES = {"requires_grad_", "retain_grad", "share_memory_", "pin_memory", "record_stream"}


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001 - a tensor without storage (meta, sparse) is never a parameter's
        return None


class ParamWrites(TorchFunctionMode):
    """Records the parameters of ``model`` that code run inside it writes, by the act.

    Use as a context manager around a forward. ``writes``: ``{parameter name: spelling}`` in
    the order first seen, the spelling one of ``".data = ..."``, ``"p.data.<op>(...)"``
    (an in-place op on ``.data`` or on any view sharing the parameter's storage) and
    ``"p.<op>(...) under no_grad"``; ``<op>`` is ``copy_``, ``clamp_``, ``__setitem__``...
    A write that leaves every value as it was (a clamp inside the range) is recorded too."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.names = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}
        self.by_storage = {}
        for n, p in model.named_parameters(remove_duplicate=True):
            ptr = _storage(p)
            if ptr:
                self.by_storage.setdefault(ptr, n)
        self.writes: dict[str, str] = {}

    def _note(self, name: str | None, how: str) -> None:
        if name is not None and name not in self.writes:
            self.writes[name] = how

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if target is not None:
            fname = getattr(func, "__name__", "")
            if fname == "__set__" and getattr(func, "__self__", None) is torch.Tensor.data:
                self._note(self.names.get(id(target)), ".data = ...")
            elif (fname.endswith("_") and not fname.startswith("_") and fname not in _NOT_WRITES) or \
                    fname in ("__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__"):
                name = self.names.get(id(target))
                if name is not None:
                    self._note(name, f"p.{fname}(...) under no_grad")
                else:
                    ptr = _storage(target)
                    self._note(self.by_storage.get(ptr) if ptr else None, f"p.data.{fname}(...)")
        return func(*args, **kwargs)


def inplace_writers(model: nn.Module, x: torch.Tensor) -> dict[str, str]:
    """Parameters that one ``no_grad`` eval forward of ``x`` writes, by the act
    (``ParamWrites``; run on a copy): ``{name: spelling}``.

    Returns {} when the forward fails (the caller reports that failure its own way).
    """
    work = copy_model(model)
    work.eval()
    watch = ParamWrites(work)
    try:
        with torch.no_grad(), watch:
            work(x)
    except Exception:  # noqa: BLE001 - only writes are asked here
        return {}
    return dict(watch.writes)


def inplace_message(names: list[str] | dict[str, str]) -> str:
    """The one warning bnnshift gives for a forward that writes its own parameters
    (``names``: parameter names, or ``{name: spelling}`` from ``ParamWrites``)."""
    items = list(names.items()) if isinstance(names, dict) else [(n, None) for n in names]
    shown = ", ".join(f"{n} ({how})" if how else n for n, how in items[:6]) + (", ..." if len(items) > 6 else "")
    return (f"the model's forward writes {shown} in place (binarizes or clamps weights in place, e.g. "
            "`weight.data = binarize(latent)`, `p.data.clamp_(-1, 1)`): bnnshift ran it only on copies, saved "
            "weights are the loaded ones; ONNX export needs a forward that computes the binary weight without "
            "writing the parameter (w = SignSTE.apply(self.weight); a clamp belongs after optimizer.step())")
