"""``--compile auto``: compiled or eager, and the memory format, chosen before the first candidate."""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from ..errors import DataError
from .config import SearchConfig
from .context import SearchContext
from .results import SearchSummary
from .schedule import expected_steps


def _choose_step_path(ctx: SearchContext, cfg: SearchConfig):
    """``--compile auto``: decide compiled vs eager and the memory format before the first
    candidate (``bnnshift.train.choose_step_path``); None for ``--compile on/off``."""
    from ..shift import insert_shifts
    from ..train import DefaultTrainer, StepPathChoice, choose_step_path

    trainer = ctx.trainer
    if cfg.compile != "auto" or not isinstance(trainer, DefaultTrainer):
        return None
    steps = expected_steps(cfg, trainer.num_steps())
    has_conv = any(isinstance(m, nn.Conv2d) for m in ctx.loaded.model.modules()) if ctx.loaded else False
    op_sites = op_mode_sites(ctx.sites)
    if op_sites:
        choice = StepPathChoice(compile=False, channels_last=trainer.channels_last, expected_steps=steps,
                                reason=f"eager: {OP_MODE_REASON.format(sites=', '.join(op_sites[:3]))}")
    elif steps < 50:
        choice = StepPathChoice(compile=False, channels_last=trainer.channels_last,
                                reason=f"eager: only {steps} steps, too few to pay back a compile", expected_steps=steps)
    else:
        x, y = _step_batch(trainer, cfg)
        bs = int(x.shape[0])

        def build() -> nn.Module:
            m = ctx.factory(cfg.seeds[0])
            insert_shifts(m, ctx.sites, {s.name: 0.0 for s in ctx.sites})
            return m.to(device=x.device, dtype=x.dtype)

        key = hashlib.sha256(json.dumps([cfg.model, cfg.model_args, cfg.checkpoint, list(ctx.input_shape or ()), bs,
                                         cfg.dtype, str(x.device), cfg.optimizer, torch.__version__],
                                        sort_keys=True, default=str).encode()).hexdigest()[:16]
        choice = choose_step_path(cfg, build, x[:bs], y[:bs], expected_steps=steps, has_conv=has_conv, key=key)
    _set_path(ctx, "on" if choice.compile else "off", choice.channels_last)
    return choice


# measured (docs/search.md, "A forward torch.fx cannot trace"): torch 2.14, backends eager, aot_eager
# and inductor alike, the compiled forward equals the eager forward at 2t, exactly
OP_MODE_REASON = ("the shift of {sites} is applied by bnnshift's op mode (the forward has control flow "
                  "torch.fx cannot trace, e.g. `if x.dim() == 4`), and torch.compile applies such a shift twice")


def op_mode_sites(sites: list) -> list[str]:
    """The names of the sites whose shift the runtime's op mode applies (``Site.apply ==
    APPLY_OP``: a forward torch.fx could not trace); ``--compile auto`` trains those models eager."""
    from ..sites import APPLY_OP

    return [s.name for s in sites if getattr(s, "apply", None) == APPLY_OP]


def _step_batch(trainer: Any, cfg: SearchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch (inputs, labels) on the training device for ``--compile auto``'s
    measurement: the first ``--batch-size`` samples in memory, or, streaming, the first batch the
    training loader yields in the first seed's order (train transform, this rank's shard): the
    trainer's ``train_x`` holds only the probe samples then, fewer than a batch for large images."""
    if getattr(trainer, "stream", None) is None:
        bs = min(cfg.batch_size, int(trainer.train_x.shape[0]))
        return trainer.train_x[:bs], trainer.train_y[:bs]
    dev, dt = trainer.train_x.device, trainer.train_x.dtype
    sampler = trainer.stream.sampler
    sampler.set_order(cfg.seeds[0], steps=1)
    try:
        xb, yb = next(iter(trainer.stream.loader))
    except StopIteration:
        raise DataError("the training stream yields no batch", hint="lower --batch-size or add samples") from None
    return xb.to(device=dev, dtype=dt), yb.to(dev)


def _set_path(ctx: SearchContext, compile_mode: str | None, channels_last: bool) -> None:
    trainer = ctx.trainer
    trainer.compile_mode = compile_mode
    if trainer.channels_last != channels_last:
        trainer.channels_last = channels_last
        if ctx.model is not None:
            ctx.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _record_compile(ctx: SearchContext, choice, summary: SearchSummary, clock0: list) -> None:
    """After a compiled search: remember its compile time and compiled step time for next time."""
    from ..train import record_compile

    if not (choice.compile and choice.key and summary.compiled and summary.compile_seconds):
        return
    steps = ctx.trainer.step_clock[0] - clock0[0]
    secs = ctx.trainer.step_clock[1] - clock0[1]
    if steps > 0:
        record_compile(choice.key, compile_seconds=summary.compile_seconds, compiled_step_seconds=secs / steps)
