"""The training step: precision (``check_precision``, ``autocast_dtype``), forward + loss, and
:class:`StepRunner` (compiled once, eager on any compile error or when the compiled first step's
loss and gradients differ from eager). Re-exported by :mod:`bnnshift.train`."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .validate import PRECISIONS


def check_precision(precision: str, device: torch.device | str, dtype: str = "float32") -> None:
    """Raise UsageError (exit 2) for a precision this device cannot train in: fp16 needs CUDA
    (CPU autocast to float16 has no GradScaler path and is slower than bf16), mixed precision
    needs float32 weights."""
    from .errors import UsageError

    if precision not in PRECISIONS:
        raise UsageError(f"unknown --precision {precision!r}", hint=f"use one of {', '.join(PRECISIONS)}")
    dev = torch.device(device).type
    if precision == "fp16" and dev != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device", hint="use --precision bf16 on CPU (or --device cuda)")
    if precision != "fp32" and dtype != "float32":
        raise UsageError(f"--precision {precision} needs --dtype float32 weights")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The ``torch.autocast`` dtype of a precision (None: fp32, no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


# ------------------------------------------------------------------------------ the step


def _forward_loss(model: nn.Module, loss_fn: Callable, precision: str = "fp32", device_type: str = "cpu",
                  pick: Callable | None = None, raw_output: bool = False):
    """forward + loss -> (loss, logits); ``pick`` takes the logits out of a tuple/dict output
    (``load.pick_logits``), the user's own loss gets the whole output (``raw_output``)."""
    amp = autocast_dtype(precision)

    def step(xb: torch.Tensor, yb: torch.Tensor):
        with torch.autocast(device_type, dtype=amp) if amp is not None else contextlib.nullcontext():
            out = model(xb)
            logits = pick(out) if pick is not None else out
            loss = loss_fn(out if raw_output else logits, yb)
        return loss, logits
    return step


# The compiled first step is checked against an eager step on the same batch (StepRunner):
# relative L2 difference of the loss and all gradients above this -> eager for good.
COMPILE_CHECK_RTOL = 1e-3


@dataclass
class StepRunner:
    """Forward + loss of one model, compiled once (``compile`` in {'auto', 'on', 'off'}).

    'auto' compiles when torch.compile is usable here; on ANY error during the first compiled
    step, or when that step's loss and gradients differ from an eager step on the same batch
    (``COMPILE_CHECK_RTOL``), the runner switches to eager for good and records why
    (``compile_error``). The first step itself is always the eager one (exact).
    """

    model: nn.Module
    loss_fn: Callable
    compile: str = "auto"
    precision: str = "fp32"  # forward + loss under torch.autocast (bf16, fp16) or not (fp32)
    device_type: str = "cpu"
    pick: Callable | None = None  # logits of a tuple/dict output (load.pick_logits)
    raw_output: bool = False
    compiled: bool = False
    compile_seconds: float | None = None
    compile_error: str | None = None
    _eager: Callable | None = None
    _fn: Callable | None = None
    _verified: bool = False

    def __post_init__(self):
        self._eager = _forward_loss(self.model, self.loss_fn, self.precision, self.device_type, self.pick,
                                     self.raw_output)
        self._fn = self._eager
        if self.compile in ("auto", "on", True):
            try:
                self._fn = torch.compile(self._eager, dynamic=False)
                self.compiled = True
            except Exception as exc:  # noqa: BLE001 - any compile problem means eager
                self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.compiled = False
        self._fn = self._eager
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        self.compile_error = f"{type(exc).__name__}: {first}"

    @property
    def verified(self) -> bool:
        return self._verified or not self.compiled

    def first_call(self, xb, yb, restore: Callable[[], None], backward: Callable | None = None):
        """The first compiled forward+loss+backward (of the runner, and of every candidate): fall
        back to eager on any error or on a loss/gradient difference to eager; returns the eager
        step's ``(loss, logits)``, its gradients in ``.grad``.

        ``restore`` puts the model back to its state before the step (the failed attempt may
        have updated BN running statistics), so the fallback is bitwise the eager path.
        ``backward(loss)`` (default ``loss.backward()``; a GradScaler's scaled backward for fp16).
        """
        backward = backward or (lambda loss: loss.backward())
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(xb.device) if xb.is_cuda else None
        inner = restore

        def restore() -> None:  # the model, and the dropout stream: the eager rerun is the eager step
            inner()
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, xb.device)

        t0 = time.perf_counter()
        try:
            loss, logits = self._fn(xb, yb)
            backward(loss)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)
            restore()
            loss, logits = self._eager(xb, yb)
            backward(loss)
        else:
            if not self._verified:
                self.compile_seconds = time.perf_counter() - t0
            if self.compiled:
                loss, logits = self._check_against_eager(loss, xb, yb, restore, backward)
        self._verified = True
        return loss, logits

    def _check_against_eager(self, loss, xb, yb, restore: Callable[[], None], backward: Callable):
        """The compiled first step must give the eager step's loss and gradients (relative L2
        difference <= ``COMPILE_CHECK_RTOL``); else the runner stays eager and says why.

        Measured: a shifted site whose tensor is also returned by the forward (a distillation
        student's features) gets wrong gradients from torch.compile (relative difference 0.1,
        torch 2.14 inductor and aot_eager), while float32 rounding stays near 1e-5. The step
        itself is the eager one either way (restored, then rerun), so the first step is exact."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        g_c = [p.grad.detach().clone() if p.grad is not None else None for p in params]
        l_c = loss.detach().double()
        restore()
        loss, logits = self._eager(xb, yb)
        backward(loss)
        num = float((l_c - loss.detach().double()) ** 2)
        den = float(loss.detach().double() ** 2)
        for gc, p in zip(g_c, params):
            ge = p.grad
            if (gc is None) != (ge is None):
                num, den = math.inf, 1.0
                break
            if gc is not None:
                num += float((gc.double() - ge.detach().double()).pow(2).sum())
                den += float(ge.detach().double().pow(2).sum())
        rel = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
        if not rel <= COMPILE_CHECK_RTOL:
            self.compiled = False
            self._fn = self._eager
            self.compile_error = (f"the compiled step's loss and gradients differ from eager by {rel:.2g} "
                                  f"(relative, > {COMPILE_CHECK_RTOL:g}): trained in eager")
        return loss, logits

    def __call__(self, xb, yb):
        return self._fn(xb, yb)
