"""The default one-epoch trainer of the search: optimizer defaults, the (compiled) training
step (:mod:`bnnshift.train_step`, re-exported here), BN re-estimation and held-out accuracy.

The hot loop is deliberately plain: data are tensors in memory (``DataBundle``), batches are
index slices of one tensor shared by every candidate, the forward + loss is ``torch.compile``d
once per process and model object (the search reuses ONE patched model and only rewrites its
weights and threshold buffers between candidates, so nothing recompiles), the optimizer is
the fused CPU/GPU Adam/SGD kernel. Any compile error falls back to eager and is reported.

``DefaultTrainer`` is just one ``train_one_epoch(model, *, seed, shift) -> dict``; teams with
their own training code pass theirs to :func:`bnnshift.search.search_with`.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SpecError, TrainingError
from .train_step import COMPILE_CHECK_RTOL, StepRunner, _forward_loss, autocast_dtype, check_precision  # noqa: F401
from .validate import PRECISIONS  # noqa: F401 (the CLI checks --precision before importing torch)

__all__ = [
    "DEFAULT_LR", "DEFAULT_BATCH_SIZE", "DEFAULT_OPTIMIZER", "DEFAULT_SGD_MOMENTUM", "LAST_PART",
    "TrainSetup", "TrainRun", "make_train_setup", "load_train_config", "StepRunner", "DefaultTrainer",
    "recalibrate_bn", "evaluate", "mix_seed", "set_threads", "StepPathChoice", "choose_step_path", "record_compile",
    "StreamTrain", "PRECISIONS", "check_precision",
    "autocast_dtype",
]

# Measured (docs/search.md): Adam 1e-3, batch 256 trains the zoo BNNs on Fashion-MNIST
# well in one epoch; SGD needs a larger LR (0.05 with momentum 0.9).
DEFAULT_OPTIMIZER = "adam"
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.05}
DEFAULT_SGD_MOMENTUM = 0.9
DEFAULT_BATCH_SIZE = 256
LAST_PART = 0.25  # the score's second part: accuracy over the last 25% of the steps


def mix_seed(*parts: Any) -> int:
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def set_threads(device: str) -> None:
    """At most one thread per CPU this process may use (torch's default may oversubscribe a
    container whose affinity is smaller than the host). Only ever lowers the count: a caller's
    own ``torch.set_num_threads`` (a benchmark's ``--threads 1``) or ``OMP_NUM_THREADS`` is kept."""
    if device != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return
    n = os.cpu_count() or 1
    with contextlib.suppress(Exception):
        if hasattr(os, "sched_getaffinity"):
            n = len(os.sched_getaffinity(0))
        if torch.get_num_threads() > n:
            torch.set_num_threads(max(1, n))


@dataclass
class TrainSetup:
    """What one candidate trains with. ``scheduler.step()`` is called after every batch."""

    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    scheduler: Any = None
    raw_output: bool = False  # loss_fn receives the model's whole output (a --train-config's own loss)


def _fused_ok(params: list[torch.Tensor]) -> bool:
    return bool(params) and all(p.is_floating_point() for p in params)


def default_optimizer(model: nn.Module, optimizer: str, lr: float | None, weight_decay: float,
                      momentum: float | None) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    name = optimizer.lower()
    if name not in DEFAULT_LR:
        raise SpecError(f"unknown optimizer {optimizer!r}", hint="use adam or sgd, or --train-config module:function")
    lr = DEFAULT_LR[name] if lr is None else lr
    kw: dict[str, Any] = {}
    if _fused_ok(params):
        kw["fused"] = True  # one kernel per step for all parameters (CPU and CUDA)
    try:
        if name == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **kw)
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay,
                               momentum=DEFAULT_SGD_MOMENTUM if momentum is None else momentum, **kw)
    except (RuntimeError, TypeError, ValueError):
        if not kw:
            raise
        return default_optimizer_unfused(params, name, lr, weight_decay, momentum)


def default_optimizer_unfused(params, name, lr, weight_decay, momentum):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True)
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay,
                           momentum=DEFAULT_SGD_MOMENTUM if momentum is None else momentum, foreach=True)


def load_train_config(ref: str) -> Callable:
    """``module:function`` or ``path/to/file.py:function`` -> the function.

    The function is called as ``fn(model, config)`` (``config`` a ``SearchConfig``) and returns
    a :class:`TrainSetup`, a dict with ``optimizer`` (required), ``loss_fn``, ``scheduler``, or
    just an optimizer.
    """
    target, sep, attr = ref.rpartition(":")
    if not sep or not target or not attr:
        raise SpecError(f"bad --train-config {ref!r}", hint="use module:function or path/to/file.py:function")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser().resolve()
            if not path.is_file():
                raise SpecError(f"train config file {target} does not exist")
            name = "bnnshift_train_config_" + hashlib.sha1(str(path).encode()).hexdigest()[:10]
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            sys.modules[name] = module
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(target)
    except SpecError:
        raise
    except Exception as exc:
        raise SpecError(f"cannot import train config {ref!r}: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SpecError(f"train config {ref!r}: {attr!r} is not a function in {target}")
    return fn


def make_train_setup(model: nn.Module, cfg: Any) -> TrainSetup:
    """The optimizer / loss / schedule for one candidate (the user's ``train_config`` if given)."""
    if getattr(cfg, "train_config", None):
        got = load_train_config(cfg.train_config)(model, cfg)
        if isinstance(got, TrainSetup):
            got.raw_output = got.loss_fn is not F.cross_entropy
            return got
        if isinstance(got, torch.optim.Optimizer):
            return TrainSetup(got)
        if isinstance(got, dict) and isinstance(got.get("optimizer"), torch.optim.Optimizer):
            return TrainSetup(got["optimizer"], got.get("loss_fn") or F.cross_entropy, got.get("scheduler"),
                              raw_output=got.get("loss_fn") is not None)
        raise SpecError(f"train config {cfg.train_config!r} returned {type(got).__name__}",
                        hint="return a TrainSetup, an optimizer or a dict with 'optimizer'")
    return TrainSetup(default_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum))


# ------------------------------------------------------------------------------ --compile auto

# Priors for a model that has never been compiled here (measured on this project's CPU machine,
# docs/search.md): a cold inductor compile of the forward+loss 20-120 s, a compiled step 5-15%
# faster than the eager channels_last step. Without a record the compile must pay back the prior.
COMPILE_PRIOR_SECONDS = 60.0
COMPILE_PRIOR_GAIN = 0.10
CALIBRATION_STEPS = 3  # timed eager steps per memory format (after one warm-up step)


@dataclass
class StepPathChoice:
    """How the search trains (``--compile auto``): compiled or eager, channels_last or not, and why.

    ``eager_step_seconds``: measured seconds per eager step per memory format;
    ``expected_steps``: the schedule's candidate steps; ``record``: the last compile measured
    for this model here (``compile_seconds``, ``compiled_step_seconds``), if any.
    """

    compile: bool
    channels_last: bool
    reason: str
    expected_steps: int = 0
    eager_step_seconds: dict[str, float] = field(default_factory=dict)
    record: dict[str, Any] | None = None
    key: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"compile": self.compile, "memory_format": "channels_last" if self.channels_last else "contiguous",
                "reason": self.reason, "expected_steps": self.expected_steps,
                "eager_step_seconds": self.eager_step_seconds, "record": self.record}


def _cache_file() -> Path:
    root = os.environ.get("BNNSHIFT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bnnshift")
    return Path(root) / "step_times.json"


def _read_records() -> dict[str, Any]:
    import json

    try:
        d = json.loads(_cache_file().read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def record_compile(key: str, *, compile_seconds: float, compiled_step_seconds: float) -> None:
    """Remember how long this model's compile took and its compiled step time (best effort;
    the next ``--compile auto`` decision for the same model, shape, batch and torch uses it)."""
    from ._io import atomic_write_json

    recs = _read_records()
    recs[key] = {"compile_seconds": round(float(compile_seconds), 3),
                 "compiled_step_seconds": float(compiled_step_seconds), "when": time.time()}
    with contextlib.suppress(Exception):
        _cache_file().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(_cache_file(), recs)


def _time_eager_steps(model: nn.Module, cfg: Any, x: torch.Tensor, y: torch.Tensor, channels_last: bool) -> float:
    """Median seconds of an eager training step on ``model`` (a throwaway copy).

    The step is the training step's own forward + loss (:func:`_forward_loss`): the same output
    picker (``cfg.output_index`` / ``cfg.output_key``, tuple/dict/dataclass outputs), the same
    ``--train-config`` loss on the whole output, the same autocast precision, so a model that
    trains in eager is timed the same way (issue 22)."""
    from .load import logits_picker

    setup = make_train_setup(model, cfg)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train()
    step = _forward_loss(model, setup.loss_fn, getattr(cfg, "precision", "fp32"), x.device.type,
                         logits_picker(getattr(cfg, "output_index", None), getattr(cfg, "output_key", None)),
                         setup.raw_output)
    scaler = torch.amp.GradScaler(x.device.type) if getattr(cfg, "precision", "fp32") == "fp16" else None
    times = []
    for i in range(CALIBRATION_STEPS + 1):
        t0 = time.perf_counter()
        setup.optimizer.zero_grad(set_to_none=True)
        loss, _ = step(x, y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(setup.optimizer)
            scaler.update()
        else:
            loss.backward()
            setup.optimizer.step()
        if i:
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def choose_step_path(cfg: Any, build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, *,
                     expected_steps: int, has_conv: bool, key: str) -> StepPathChoice:
    """``--compile auto``: compile only when the expected steps pay the compile back.

    Eager step time is measured on throwaway copies of the patched model (``build()``), in
    channels_last and contiguous for a model with 2-d convolutions (the faster is used). The
    compile's cost and per-step gain come from the last compile of the same model here
    (``record_compile``; torch's inductor cache makes a repeat compile cheap), else from the
    priors ``COMPILE_PRIOR_SECONDS`` / ``COMPILE_PRIOR_GAIN``. Compiles iff
    ``expected_steps * (eager - compiled step) > compile seconds``.
    """
    fmt = getattr(cfg, "memory_format", "auto")
    formats = [True, False] if (fmt == "auto" and has_conv) else [fmt == "channels_last" and has_conv]
    eager: dict[str, float] = {}
    for cl in formats:
        eager["channels_last" if cl else "contiguous"] = _time_eager_steps(build(), cfg, x, y, cl)
    best_name = min(eager, key=eager.get)
    best = eager[best_name]
    cl = best_name == "channels_last"
    rec = _read_records().get(key)
    if rec and rec.get("compiled_step_seconds") and rec.get("compile_seconds") is not None:
        gain_per_step = best - float(rec["compiled_step_seconds"])
        cost = float(rec["compile_seconds"])
        source = f"last compile here {cost:.1f}s, compiled step {float(rec['compiled_step_seconds']) * 1e3:.1f} ms"
    else:
        gain_per_step = best * COMPILE_PRIOR_GAIN
        cost = COMPILE_PRIOR_SECONDS
        source = (f"no compile recorded for this model: prior {COMPILE_PRIOR_SECONDS:.0f}s compile, "
                  f"{COMPILE_PRIOR_GAIN:.0%} faster steps")
    gain = expected_steps * gain_per_step
    do = gain > cost
    fmt_note = (f"{best_name} ({best * 1e3:.1f} ms/step" + (
        f" vs {min(v for k, v in eager.items() if k != best_name) * 1e3:.1f} ms" if len(eager) > 1 else "") + ")")
    reason = (f"{'compiled' if do else 'eager'}: {expected_steps} steps x {gain_per_step * 1e3:.1f} ms saved "
              f"= {gain:.1f}s {'>' if do else '<='} compile {cost:.1f}s ({source}); eager {fmt_note}")
    return StepPathChoice(compile=do, channels_last=cl, reason=reason, expected_steps=int(expected_steps),
                          eager_step_seconds={k: round(v, 6) for k, v in eager.items()}, record=rec, key=key)


# ------------------------------------------------------------------------------ BN, eval


# recalibrate_bn lives in bnnshift.recalibrate (public: bnnshift.recalibrate_bn); kept importable here
from .recalibrate import recalibrate_bn  # noqa: E402


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor | Iterable, y: torch.Tensor | None = None,
             batch_size: int = 1024, pick: Callable | None = None) -> float:
    """Top-1 accuracy in eval mode on tensors ``x`` (N, ...) / ``y`` (N,), or, with ``y=None``, on
    an iterable ``x`` of ``(xb, yb)`` batches (the streaming path's eval loader). ``pick``: the
    logits of a tuple/dict output (``load.logits_picker``)."""
    def fwd(xb):
        out = model(xb)
        return pick(out) if pick is not None else out

    was = model.training
    model.eval()
    correct = seen = 0
    try:
        if y is None:
            for xb, yb in x:
                correct += int((fwd(xb).argmax(1) == yb).sum())
                seen += int(yb.shape[0])
        else:
            for i in range(0, int(x.shape[0]), batch_size):
                correct += int((fwd(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
            seen = int(x.shape[0])
    finally:
        model.train(was)
    return correct / max(1, seen)


# ------------------------------------------------------------------------------ trainer


@dataclass
class StreamTrain:
    """The streaming path's training batches: a DataLoader whose batch sampler
    (:class:`bnnshift.data.stream.SeededBatchSampler`) is re-ordered per candidate."""

    loader: Any
    sampler: Any
    num_train: int


@dataclass
class DefaultTrainer:
    """``train_one_epoch(model, *, seed, shift) -> dict`` for the CLI and ``search(cfg)``.

    Trains ``steps`` batches (one epoch by default) in the order fixed by ``seed``; returns
    ``train_acc`` (accumulated over the first epoch, the paper's signal, even when ``epochs``
    > 1 trains on: then ``epoch_train_acc`` has one value per epoch), ``last_acc``
    (last 25% of the steps), ``loss`` (mean), ``first_losses``, ``steps`` and, when a loss is
    NaN/inf, ``failed_step`` (1-based). ``progress(done, total)`` is called every few steps.

    Batches come from ``train_x``/``train_y`` in memory, or from ``stream`` (then the result
    also has ``batch_order_hash``: a hash of the augmented batches, ``BatchHasher``).
    ``precision``: forward + loss under ``torch.autocast`` (bf16, fp16 with a GradScaler).
    Under torchrun (``bnnshift.parallel``) the model is wrapped in DistributedDataParallel,
    each rank trains on its shard of every global batch of ``cfg.batch_size``, the loss and
    the accuracy counts are summed over ranks every step.
    """

    cfg: Any
    train_x: torch.Tensor
    train_y: torch.Tensor
    progress: Callable[[int, int], None] | None = None
    runners: dict = field(default_factory=dict)
    channels_last: bool = False
    compile_mode: str | None = None  # set by --compile auto's decision ('on'/'off'); None: cfg.compile
    step_clock: list = field(default_factory=lambda: [0, 0.0])  # steps, seconds after each runner's first step
    record_curve: bool = False  # benchmarks: keep the first epoch's cumulative correct count per step
    stream: StreamTrain | None = None
    precision: str = "fp32"
    ddp: dict = field(default_factory=dict)

    @property
    def num_train(self) -> int:
        return self.stream.num_train if self.stream is not None else int(self.train_x.shape[0])

    def num_steps(self) -> int:
        n = self.num_train // self.cfg.batch_size
        if self.cfg.steps:
            return int(self.cfg.steps)
        return n * max(1, int(self.cfg.epochs))

    def runner(self, model: nn.Module, loss_fn: Callable, raw_output: bool = False) -> StepRunner:
        from .load import logits_picker

        mode = self.compile_mode or self.cfg.compile
        key = (id(model), loss_fn, mode, raw_output)
        r = self.runners.get(key)
        if r is None:
            pick = logits_picker(getattr(self.cfg, "output_index", None), getattr(self.cfg, "output_key", None))
            r = StepRunner(model, loss_fn, compile=mode, precision=self.precision,
                           device_type=self.train_x.device.type, pick=pick, raw_output=raw_output)
            self.runners[key] = r
        return r

    def _wrap(self, model: nn.Module) -> nn.Module:
        """The DDP wrapper of ``model`` under torchrun (one per model object, reused)."""
        from .parallel import dist_info, wrap_ddp

        if not dist_info().active:
            return model
        w = self.ddp.get(id(model))
        if w is None or w.module is not model:
            from .load import logits_picker

            pick = logits_picker(getattr(self.cfg, "output_index", None), getattr(self.cfg, "output_key", None))
            w = self.ddp[id(model)] = wrap_ddp(model, self.train_x.device, probe=self.train_x[:2], pick=pick)
        return w

    def _batches(self, run: "TrainRun", until: int):
        """(xb, yb) of steps ``run.step .. until - 1`` on the training device: this rank's shard
        of each global batch (the augmented batches are hashed into ``run.hasher``)."""
        from .parallel import dist_info

        info = dist_info()
        if self.stream is not None:
            dev, dt = self.train_x.device, self.train_x.dtype
            self.stream.sampler.set_order(run.seed, steps=run.total, start=run.step, stop=until)
            for xb, yb in self.stream.loader:
                if run.hasher is not None:
                    run.hasher.update(xb, yb)
                yield xb.to(device=dev, dtype=dt, non_blocking=True), yb.to(dev, non_blocking=True)
            return
        from .data import iterate_batches

        batches = itertools.islice(iterate_batches(self.train_x, self.train_y, self.cfg.batch_size, seed=run.seed,
                                                   steps=run.total), run.step, until)
        for xb, yb in batches:
            if info.active:
                xb, yb = xb[info.rank::info.world], yb[info.rank::info.world]
            yield xb, yb

    def __call__(self, model: nn.Module, *, seed: int, shift: float) -> dict[str, Any]:
        run = self.start(model, seed=seed, shift=shift)
        failed = self.advance(run, model, run.total)
        return failed if failed is not None else self.result(run)

    # -- resumable pieces (successive halving trains a candidate to a rung, pauses, continues)

    def start(self, model: nn.Module, *, seed: int, shift: float) -> "TrainRun":
        """A fresh run of one candidate at step 0 (optimizer built, dropout stream seeded)."""
        from .parallel import dist_info

        world = dist_info().world
        if world > 1 and self.cfg.batch_size % world:
            raise TrainingError(f"--batch-size {self.cfg.batch_size} is not divisible by the {world} processes",
                                hint=f"use a multiple of {world}")
        setup = make_train_setup(model, self.cfg)
        total = self.num_steps()
        per_epoch = total if self.cfg.steps else max(1, self.num_train // self.cfg.batch_size)
        torch.manual_seed(mix_seed(seed, "train"))  # dropout etc.: same stream for every t
        run = TrainRun(seed=int(seed), shift=float(shift), total=total, per_epoch=per_epoch,
                       last_from=total - max(1, int(round(total * LAST_PART))), setup=setup, scaler=self._scaler())
        run.hasher = self._hasher(run.batch_digests)
        return run

    def _hasher(self, digests: list[str] | None):
        from .data.stream import BatchHasher

        return BatchHasher(self.num_train, self.cfg.batch_size, digests) if self.stream is not None else None

    def _scaler(self):
        return torch.amp.GradScaler(self.train_x.device.type) if self.precision == "fp16" else None

    def advance(self, run: "TrainRun", model: nn.Module, until: int) -> dict[str, Any] | None:
        """Train steps ``run.step .. until - 1`` in the seed's batch order (the data position is
        ``run.step``). Returns None, or the failure dict on a NaN/inf loss."""
        from .parallel import all_reduce_, dist_info, sync_buffers

        info = dist_info()
        setup = run.setup
        runner = self.runner(self._wrap(model), setup.loss_fn, setup.raw_output)
        total = run.total
        until = min(int(until), total)
        model.train()
        opt = setup.optimizer
        scaler = run.scaler

        def backward(loss: torch.Tensor) -> None:
            (scaler.scale(loss) if scaler is not None else loss).backward()

        every = max(1, total // 50)
        for i, (xb, yb) in enumerate(self._batches(run, until), start=run.step):
            opt.zero_grad(set_to_none=True)
            if self.channels_last and xb.dim() == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            # a candidate's first step (every candidate: a wrong compiled gradient may show only at
            # some thresholds) is checked against eager (StepRunner.first_call)
            check = not runner.verified or (runner.compiled and i == 0)
            timed = not check
            t0 = time.perf_counter()
            if check:
                snapshot = {k: v.clone() for k, v in model.state_dict().items()}
                def restore():
                    model.load_state_dict(snapshot)
                    opt.zero_grad(set_to_none=True)

                loss, logits = runner.first_call(xb, yb, restore, backward)
            else:
                loss, logits = runner(xb, yb)
                backward(loss)
            hit_t = (logits.detach().argmax(1) == yb).sum()
            if info.active:  # the global batch: mean loss, summed hits; NaN on any rank stops every rank
                g = all_reduce_(torch.stack([loss.detach().double(), hit_t.double(),
                                             torch.tensor(float(yb.shape[0]), dtype=torch.float64,
                                                          device=hit_t.device)]))
                lv, hit, n = float(g[0]) / info.world, int(g[1]), int(g[2])
            else:
                lv, hit, n = float(loss.detach()), int(hit_t), int(yb.shape[0])
            if not math.isfinite(lv):
                run.step = i + 1
                return {"failed_step": i + 1, "error": f"loss is {lv} at step {i + 1}", "steps": i + 1,
                        "first_losses": run.first_losses + [lv], "compiled": runner.compiled,
                        "compile_seconds": runner.compile_seconds, "compile_error": runner.compile_error}
            if len(run.first_losses) < 3:
                run.first_losses.append(lv)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            if timed:
                self.step_clock[0] += 1
                self.step_clock[1] += time.perf_counter() - t0
            if setup.scheduler is not None:
                setup.scheduler.step()
            run.correct += hit
            run.seen += n
            if i % run.per_epoch == 0:
                run.epoch_hits.append(0)
                run.epoch_seen.append(0)
            run.epoch_hits[-1] += hit
            run.epoch_seen[-1] += n
            if self.record_curve and len(run.epoch_hits) == 1:
                run.curve.append(run.epoch_hits[0])
            if len(run.epoch_hits) == 1:  # the first epoch's per-step counts (--stop-when-stable's paired noise)
                run.step_hits.append(hit)
                run.step_seen.append(n)
            if i >= run.last_from:
                run.last_correct += hit
                run.last_seen += n
            run.loss_sum += lv
            run.step = i + 1
            if self.progress is not None and ((i + 1) % every == 0 or i + 1 == total):
                self.progress(i + 1, total)
        run.compiled, run.compile_seconds, run.compile_error = (runner.compiled, runner.compile_seconds,
                                                                runner.compile_error)
        sync_buffers(model)  # rank 0's BN statistics everywhere: probes and pauses agree
        return None

    def result(self, run: "TrainRun") -> dict[str, Any]:
        """The candidate's record after its last step (the same keys as ``__call__``)."""
        if run.seen == 0:
            raise TrainingError("no training step ran", hint="use more data or a smaller --batch-size")
        epoch_acc = [h / max(1, n) for h, n in zip(run.epoch_hits, run.epoch_seen)]
        out = {"train_acc": epoch_acc[0] if len(epoch_acc) > 1 else run.correct / run.seen,
               "epoch_train_acc": epoch_acc,
               "last_acc": run.last_correct / max(1, run.last_seen),
               "loss": run.loss_sum / run.step, "first_losses": list(run.first_losses), "steps": run.step,
               "compiled": run.compiled, "compile_seconds": run.compile_seconds,
               "compile_error": run.compile_error, **({"correct_curve": list(run.curve)} if run.curve else {})}
        if run.hasher is not None:  # streaming: the hash of the augmented batches this run saw
            out["batch_order_hash"] = run.hasher.hexdigest()
        return out

    def partial(self, run: "TrainRun") -> dict[str, Any]:
        """The score so far at a rung: train accuracy accumulated over the steps done (within the
        first epoch), mean loss, steps."""
        seen = run.epoch_seen[0] if run.epoch_seen else 0
        acc = (run.epoch_hits[0] / seen) if seen else None
        out = {"train_acc": acc, "loss": run.loss_sum / max(1, run.step), "steps": run.step,
               "first_losses": list(run.first_losses), "compiled": run.compiled,
               "compile_seconds": run.compile_seconds, "compile_error": run.compile_error}
        if run.hasher is not None:  # streaming: the batches trained so far
            out["batch_order_hash"] = run.hasher.hexdigest()
        return out

    def snapshot(self, run: "TrainRun", model: nn.Module) -> dict[str, Any]:
        """Everything needed to continue ``run`` later bitwise: model and optimizer/scheduler
        state, the global RNG state (dropout stream), the data position and the accumulators.
        Tensors are cloned to CPU; the dict saves with ``torch.save`` and loads with
        ``weights_only=True``."""
        def cpu(obj):
            if isinstance(obj, torch.Tensor):
                return obj.detach().to("cpu", copy=True)
            if isinstance(obj, dict):
                return {k: cpu(v) for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return type(obj)(cpu(v) for v in obj)
            return obj

        sched = run.setup.scheduler
        state = {"model": cpu(model.state_dict()), "optimizer": cpu(run.setup.optimizer.state_dict()),
                 "scheduler": cpu(sched.state_dict()) if sched is not None and hasattr(sched, "state_dict") else None,
                 "rng": torch.get_rng_state(), "run": run.counters(),
                 "scaler": run.scaler.state_dict() if run.scaler is not None else None}
        if self.train_x.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.train_x.device)
        return state

    def restore(self, model: nn.Module, state: dict[str, Any]) -> "TrainRun":
        """Put ``model`` back at a snapshot and rebuild the run (a new optimizer loading the saved
        state): continuing it gives bitwise the steps an uninterrupted run would have taken."""
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(state["model"][k])
        setup = make_train_setup(model, self.cfg)
        setup.optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler") is not None and setup.scheduler is not None:
            setup.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.train_x.device)
        run = TrainRun.from_counters(state["run"], setup)
        run.scaler = self._scaler()
        if run.scaler is not None and state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
        run.hasher = self._hasher(run.batch_digests)  # a streamed run's hash continues
        return run


@dataclass
class TrainRun:
    """One candidate's training in progress (``DefaultTrainer.start`` / ``advance``): the data
    position ``step`` and the accumulators of the scores (counts of correct samples, not rates,
    so a paused and continued run adds up exactly as an uninterrupted one)."""

    seed: int
    shift: float
    total: int
    per_epoch: int
    last_from: int
    setup: TrainSetup | None = None
    step: int = 0
    correct: int = 0
    seen: int = 0
    last_correct: int = 0
    last_seen: int = 0
    loss_sum: float = 0.0
    first_losses: list[float] = field(default_factory=list)
    epoch_hits: list[int] = field(default_factory=list)
    epoch_seen: list[int] = field(default_factory=list)
    curve: list[int] = field(default_factory=list)
    step_hits: list[int] = field(default_factory=list)  # correct samples per step, first epoch
    step_seen: list[int] = field(default_factory=list)  # samples per step, first epoch
    compiled: bool | None = None
    compile_seconds: float | None = None
    compile_error: str | None = None
    scaler: Any = None  # torch.amp.GradScaler for fp16
    hasher: Any = None  # streaming: BatchHasher over the batches trained so far (its digests below)
    batch_digests: list[str] = field(default_factory=list)

    _COUNTERS = ("seed", "shift", "total", "per_epoch", "last_from", "step", "correct", "seen", "last_correct",
                 "last_seen", "loss_sum", "first_losses", "epoch_hits", "epoch_seen", "curve",
                 "batch_digests", "step_hits", "step_seen")

    def counters(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else v) for k in self._COUNTERS for v in [getattr(self, k)]}

    @classmethod
    def from_counters(cls, d: dict[str, Any], setup: TrainSetup) -> "TrainRun":
        return cls(setup=setup, **{k: (list(d[k]) if isinstance(d[k], list) else d[k]) for k in cls._COUNTERS
                                   if k in d})


def signature_accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
