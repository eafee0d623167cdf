"""``module:function`` / ``file.py:function``: data sets made by the user's own code."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import DataError, SpecError
from .bundle import DataBundle, _normalise_uint8, _subset_indices, broadcast_norm, pixel_stats
from .multi import is_multi, pack, packed_shape
from .spec import _known_kinds_text

def _resolve_function(kind: str, ref: str) -> tuple[Callable[..., Any], str]:
    target, _, func_name = ref.rpartition(":")
    if kind == "file":
        path = Path(target).expanduser()
        path = path.resolve() if path.exists() else path.absolute()
        if not path.is_file():
            raise DataError(f"data file not found: {path}", hint="pass path/to/file.py:function")
        mod_name = "_bnnshift_data_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise DataError(f"cannot import {path}", hint="is it a Python file?")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise DataError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
        canonical = f"{path}:{func_name}"
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            if exc.name and target.startswith(exc.name):
                raise SpecError(
                    f"unknown data spec {ref!r}: no module named {exc.name!r}",
                    hint=f"known kinds: {_known_kinds_text()}",
                ) from None
            raise DataError(f"importing {target} failed: {exc}") from exc
        except Exception as exc:
            raise DataError(f"importing {target} failed: {type(exc).__name__}: {exc}") from exc
        canonical = f"{target}:{func_name}"
    fn = getattr(module, func_name, None)
    if fn is None or not callable(fn):
        raise SpecError(f"{target} has no function {func_name!r}", hint=f"check the data spec {ref!r}")
    return fn, canonical


def _call_with_supported(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Call ``fn(*args, ...)`` passing only the keyword arguments it accepts."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn(*args)
    params = list(sig.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return fn(*args, **kw)
    names = {p.name for p in params[len(args):] if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return fn(*args, **{k: v for k, v in kw.items() if k in names})


def _to_tensor(v: Any) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    try:
        from PIL import Image

        if isinstance(v, Image.Image):
            from torchvision.transforms.functional import pil_to_tensor

            return pil_to_tensor(v)
    except ImportError:  # pragma: no cover
        pass
    return torch.as_tensor(v)


def _dataset_to_tensors(ds: Any, limit: int | None, seed: int, salt: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        n = len(ds)
    except TypeError:
        raise DataError(f"{where}: the data set has no len(); return a map-style Dataset or tensors") from None
    idx = _subset_indices(n, limit, seed, salt)
    sel = range(n) if idx is None else idx.tolist()
    xs, ys = [], []
    for i in sel:
        item = ds[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DataError(f"{where}: data set items must be (x, y) pairs, got {type(item).__name__}")
        x0 = item[0]  # one input, or several ((x, mask), y): bnnshift.data.multi
        xs.append(tuple(_to_tensor(v) for v in x0) if isinstance(x0, (tuple, list)) else _to_tensor(x0))
        yv = _to_tensor(item[1]).reshape(-1)
        if yv.numel() != 1:
            raise DataError(f"{where}: the label of item {i} has {yv.numel()} values; labels are class indices",
                            hint="one-hot or soft labels: return int(y.argmax())")
        ys.append(yv[0])
    if not xs:
        raise DataError(f"{where}: the data set is empty")
    try:
        if isinstance(xs[0], tuple):
            if len({len(v) for v in xs}) != 1:
                raise RuntimeError("items hand different numbers of inputs")
            x: Any = tuple(torch.stack(parts) for parts in zip(*xs))
        else:
            x = torch.stack(xs)
    except (RuntimeError, TypeError) as exc:
        raise DataError(f"{where}: samples have different shapes ({exc})", hint="resize them in the data set's transform") from None
    y = torch.stack(ys)
    check_labels(y, where)
    return x, y.to(torch.int64)


def check_labels(y: torch.Tensor, where: str) -> None:
    """Labels are class indices: shape (N,) or (N, 1), integer values >= 0 (float dtypes allowed
    when every value is whole). Raises ``DataError`` naming what is wrong (one-hot, probabilities,
    regression targets, negative values) instead of casting them to wrong classes."""
    if y.dim() > 1 and y[0].numel() > 1:
        raise DataError(f"{where}: labels must be class indices of shape (N,), got {tuple(y.shape)}",
                        hint="one-hot or soft labels: return y.argmax(1)")
    if torch.is_floating_point(y):
        off = y != y.round()  # NaN too
        if bool(off.any()):
            raise DataError(f"{where}: labels must be integer class indices, got {float(y[off][0]):g}",
                            hint="return class indices (torch.long), not probabilities or regression targets")
    if y.numel() and float(y.min()) < 0:
        raise DataError(f"{where}: labels must be class indices >= 0, got {float(y.min()):g}")


def check_finite(x: torch.Tensor, where: str, split: str = "training") -> None:
    """Raise ``DataError`` when float inputs ``x`` (N, ...) hold NaN or inf (they would poison the
    BatchNorm statistics and every score silently); names the count and the first sample."""
    if not torch.is_floating_point(x) or not x.numel():
        return
    bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(1)
    if bool(bad.any()):
        raise DataError(f"{where}: {int(bad.sum())} {split} sample(s) hold NaN/inf values (first: sample "
                        f"{int(bad.nonzero()[0])})", hint="fix or drop them in the data function")


def _finish_user_tensors(
    tx: torch.Tensor, ty: torch.Tensor, vx: torch.Tensor | None, vy: torch.Tensor | None, name: str,
    norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> DataBundle:
    """Make (N, C, H, W) float32. Integer images are scaled to [0, 1] and normalised with ``norm``
    (mean, std), else their own per-channel statistics. Float images in [0, 1] are pixels: normalised
    with ``norm`` when given, else used as they are. Float images outside [0, 1] were normalised by
    the user's transform: used as they are (with ``norm`` given, a note says it was not applied)."""

    def nchw(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return x.unsqueeze(1)
        if x.dim() == 2:  # flat features -> (N, 1, 1, F)
            return x.view(x.shape[0], 1, 1, x.shape[1])
        if x.dim() != 4:
            raise DataError(f"{name}: images must be (N, C, H, W) or (N, H, W), got {tuple(x.shape)}")
        return x

    tx = nchw(tx)
    vx = nchw(vx) if vx is not None else None
    ty = ty.reshape(-1).to(torch.int64)
    vy = vy.reshape(-1).to(torch.int64) if vy is not None else None
    c = int(tx.shape[1])
    notes: list[str] = []
    pm = ps = None
    if not torch.is_floating_point(tx):
        pm, ps = pixel_stats(tx)
        mean, std = broadcast_norm(*norm, c) if norm is not None else (pm, ps)
        source = "given" if norm is not None else "own"
        tx = _normalise_uint8(tx, mean, std)
        vx = _normalise_uint8(vx, mean, std) if vx is not None else None
    elif norm is not None and tx.numel() and float(tx.min()) >= 0.0 and float(tx.max()) <= 1.0:
        pm, ps = pixel_stats(tx)  # [0, 1] pixels (e.g. ToTensor() alone): normalised as asked
        mean, std = broadcast_norm(*norm, c)
        source = "given"
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        tx = (tx.to(torch.float32) - m) / s
        vx = (vx.to(torch.float32) - m) / s if vx is not None else None
    else:  # float data is used as the user's transform left it
        mean, std, source = (0.0,) * c, (1.0,) * c, "as-is"
        if norm is not None:
            notes.append(f"{name}: the mean/std normalisation (--mean/--std or patch.json's record) is not applied: "
                         "the data function returns float inputs outside [0, 1], already normalised by its own "
                         "transform; they are used as they are (return [0, 1] pixels to have it applied)")
        tx = tx.to(torch.float32)
        vx = vx.to(torch.float32) if vx is not None else None
    labels = torch.cat([ty] + ([vy] if vy is not None else []))
    num_classes = int(labels.max()) + 1 if labels.numel() else 0
    return DataBundle(tx, ty, vx, vy, (c, int(tx.shape[2]), int(tx.shape[3])), num_classes, name, mean, std,
                      norm_source=source, pixel_mean=pm, pixel_std=ps, notes=notes)


def _load_user(kind: str, ref: str, input_shape, download, train_limit, val_limit, seed, norm=None) -> DataBundle:
    fn, canonical = _resolve_function(kind, ref)
    where = f"data function {canonical}"
    try:
        out = _call_with_supported(
            fn, input_shape=input_shape, seed=seed, download=download, train_limit=train_limit, val_limit=val_limit
        )
    except (DataError, SpecError):
        raise
    except Exception as exc:
        raise DataError(f"{where} failed: {type(exc).__name__}: {exc}") from exc
    if isinstance(out, DataBundle):
        out.name = out.name or canonical
        _bundle_as_given(out, norm)
        return out
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 4):
        raise DataError(
            f"{where} returned {type(out).__name__}",
            hint="return a DataBundle, (train_dataset, val_dataset_or_None) or tensors (x, y)",
        )

    def is_array(v: Any) -> bool:
        return isinstance(v, torch.Tensor) or type(v).__module__ == "numpy"

    def tensors(v: Any) -> Any:  # one input, or several ((x, mask), ...): bnnshift.data.multi
        return tuple(_to_tensor(p) for p in v) if is_multi(v) else _to_tensor(v)

    if len(out) == 4 and all(is_array(v) or is_multi(v) or v is None for v in out):  # (x, y, val_x, val_y)
        tx, ty, vx, vy = (None if v is None else tensors(v) for v in out)
    elif len(out) == 2 and (is_array(out[0]) or is_multi(out[0])) and is_array(out[1]):
        tx, ty, vx, vy = tensors(out[0]), _to_tensor(out[1]), None, None
    elif len(out) == 2:
        tx, ty = _dataset_to_tensors(out[0], train_limit, seed, 1, where)
        vx = vy = None
        if out[1] is not None and val_limit != 0:
            vx, vy = _dataset_to_tensors(out[1], val_limit, seed, 2, where)
    else:
        raise DataError(f"{where} returned a 4-tuple that is not tensors (x, y, val_x, val_y)")
    for y in (ty, vy):
        if y is not None:
            check_labels(y, where)
    for x, split in ((tx, "training"), (vx, "held-out")):
        for part in (x if isinstance(x, tuple) else (x,)) if x is not None else ():
            check_finite(part, where, split)
    if isinstance(tx, tuple) or isinstance(vx, tuple):
        return _finish_multi(tx, ty, vx, vy, canonical, norm, where)
    if tx is None or ty is None or tx.shape[0] != ty.reshape(-1).shape[0]:
        raise DataError(f"{where}: x and y have different lengths")
    return _finish_user_tensors(tx, ty, vx, vy, canonical, norm)


def _finish_multi(tx: Any, ty: torch.Tensor, vx: Any, vy: torch.Tensor | None, name: str, norm, where: str
                  ) -> DataBundle:
    """Several inputs per sample (``((x, mask), y)``): the first input normalised as a single
    input is (its own per-sample shape kept), the others as given; both splits packed
    (:func:`bnnshift.data.multi.pack`), the layout in ``bundle.inputs``."""
    if not isinstance(tx, tuple) or (vx is not None and not isinstance(vx, tuple)):
        raise DataError(f"{where}: one split hands several inputs, the other one",
                        hint="return ((x, mask), y, (val_x, val_mask), val_y) or drop the held-out split")
    if tx[0].shape[0] != ty.reshape(-1).shape[0]:
        raise DataError(f"{where}: x and y have different lengths")
    b = _finish_user_tensors(tx[0], ty, vx[0] if vx is not None else None, vy, name, norm)
    first = b.train_x.reshape(tx[0].shape) if tx[0].dim() != 4 else b.train_x
    b.train_x, b.inputs = pack((first, *tx[1:]), where)
    if vx is not None and b.val_x is not None:
        vfirst = b.val_x.reshape(vx[0].shape) if vx[0].dim() != 4 else b.val_x
        b.val_x, _ = pack((vfirst, *vx[1:]), where + " (held-out split)", b.inputs)
    b.input_shape = packed_shape(b.inputs)
    b.notes.append(f"{name}: {len(b.inputs)} inputs per sample ("
                   + ", ".join(f"{tuple(d['shape'])} {d['dtype']}" for d in b.inputs)
                   + "): the model is called as model(" + ", ".join(f"in{i}" for i in range(len(b.inputs))) + ")")
    return b


def _bundle_as_given(bundle: DataBundle, norm) -> None:
    """A DataBundle made by user or plugin code is already normalised: with ``norm`` given, say that
    it is not applied again (unless the bundle records the same normalisation)."""
    if norm is None:
        return
    from ..errors import UsageError

    try:
        same = broadcast_norm(*norm, len(bundle.mean)) == (tuple(bundle.mean), tuple(bundle.std))
    except UsageError:
        same = False
    if same:
        bundle.norm_source = "given"
    else:
        bundle.notes.append(f"{bundle.name}: the mean/std normalisation (--mean/--std or patch.json's record) is not "
                            f"applied: the data source returns a DataBundle already normalised (mean "
                            f"{list(bundle.mean)}, std {list(bundle.std)}); used as it is")
