"""BatchNorm statistics after a shift: re-estimate them, and tell when they are stale.

A shift ``t`` changes the input distribution of every layer after a binary activation
(docs/paper.md: the +1 share of ``sign(x - t)`` moves with ``t``). Fine-tuning in train
mode then moves the weights faster than BatchNorm's running averages follow (momentum 0.1,
binary weights whose signs flip), so the *eval-mode* model can be far worse than the same
model in train mode (issue 12: 24.5% eval vs 73% after re-estimation). Re-estimating the
running statistics on a few training batches closes that gap; this module does it and
measures how far the stored statistics are from the statistics a probe batch produces.

    from bnnshift import recalibrate_bn, bn_staleness
    recalibrate_bn(model, loader)            # a DataLoader, or any iterable of batches
    print(bn_staleness(model, x).summary())  # x: one probe batch (N, C, H, W)
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["recalibrate_bn", "bn_staleness", "reestimate_bn", "BNStaleness", "BNReestimate", "STALE_MEAN_SHIFT",
           "STALE_VAR_RATIO", "STALE_ACCURACY_GAP", "FRESH_ATTR"]

# Set on a model by ``recalibrate_bn``: the ``patch.weights_digest`` of the weights its BatchNorm
# statistics were just estimated for. ``patch.save_patched`` records it in patch.json (hashes
# ``bn_statistics_for``), so ``fold`` / ``export`` know the statistics are fresh.
FRESH_ATTR = "_bnnshift_bn_statistics_for"

# A layer is stale when, averaged over its channels, the probe batch's mean is this many
# running standard deviations away from the running mean, or its variance is off by this
# factor. Measured on the small CNN of tests/test_recalibrate.py (/work/shared case 31): trained
# at t = 0 and consistent, worst layer 0.05 std / x1.04; shifted and fine-tuned 60 steps, worst
# 0.17 std, which already costs 24 pp of eval accuracy; re-estimated, 0.02 std / x0.98.
STALE_MEAN_SHIFT = 0.1
STALE_VAR_RATIO = 1.25
# With labels: stale when eval-mode accuracy is this far below the accuracy with batch statistics
# (above the noise of a 1000-sample probe: a freshly re-estimated model shows gaps up to 2 pp).
STALE_ACCURACY_GAP = 0.05


def _bn_modules(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


def _input_of(batch: Any) -> torch.Tensor:
    """A batch is a tensor, or a (x, y, ...) tuple / list whose first item is the input."""
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise ValueError("an empty batch tuple")
        batch = batch[0]
    if isinstance(batch, dict):
        for key in ("input", "x", "image", "pixel_values"):
            if key in batch:
                return batch[key]
        raise ValueError(f"a dict batch without an input key (has {sorted(batch)[:5]})")
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"a batch must be a tensor or an (x, y) tuple, got {type(batch).__name__}")
    return batch


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Any], *, max_batches: int | None = None,
                   device: str | torch.device | None = None) -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``batches``; returns the number of BN modules.

    ``batches``: a ``torch.utils.data.DataLoader`` or any iterable of input tensors
    ``(N, C, ...)`` or ``(x, y, ...)`` tuples (the first item is the input). ``max_batches``
    stops after that many (a full-epoch loader need not run to its end; 10-50 batches of 256
    are enough). ``device``: where to move each input (default: as given).

    Same as ``torch.optim.swa_utils.update_bn``: running statistics reset, ``momentum=None``
    (an exact cumulative average over the batches), forward in train mode without grad, then
    momentum and the train/eval flag restored, also when a forward raises; in addition an empty
    iterable raises ``ValueError`` and leaves the old statistics in place (a reset with no data
    would leave mean 0 / variance 1). A model without tracked BatchNorm returns 0 and runs
    nothing. Dropout is active during the passes (train mode); it only adds noise to the
    estimate. Raises whatever the model's forward raises.

    The batches are used in the order given: draw them at random over the whole data set (a
    class-sorted set in file order gives per-class statistics, without the variance between
    classes). On success the model is marked (:data:`FRESH_ATTR`) so that ``save_patched``
    records in patch.json that its statistics fit its weights (``fold`` then does not ask for
    another re-estimation).
    """
    bns = [m for _, m in _bn_modules(model)]
    if not bns:
        return 0
    saved = [(m, m.momentum, m.running_mean.clone(), m.running_var.clone(),
              None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in bns]
    was = model.training
    it = iter(batches)
    if max_batches is not None:
        it = itertools.islice(it, max(0, int(max_batches)))
    seen = 0
    ok = False
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for batch in it:
            x = _input_of(batch)
            model(x.to(device) if device is not None else x)
            seen += 1
        if seen == 0:
            raise ValueError("recalibrate_bn got no batches: pass a non-empty DataLoader or list of input tensors")
        ok = True
    finally:
        if ok:
            _mark_fresh(model)
        for m, mom, rm, rv, nbt in saved:
            m.momentum = mom
            if not ok:  # an error or no data: the old statistics, not a half-done estimate
                m.running_mean.copy_(rm)
                m.running_var.copy_(rv)
                if nbt is not None:
                    m.num_batches_tracked.copy_(nbt)
        model.train(was)
    return len(bns)


def _mark_fresh(model: nn.Module) -> None:
    try:
        from .patch import weights_digest

        object.__setattr__(model, FRESH_ATTR, weights_digest(model))
    except Exception:  # noqa: BLE001 - the mark is a convenience; never fail the estimate for it
        pass


def _bn_state(model: nn.Module) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    return [(m, m.running_mean.clone(), m.running_var.clone(),
             None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for _, m in _bn_modules(model)]


def _restore_bn_state(state) -> None:
    for m, rm, rv, nbt in state:
        m.running_mean.copy_(rm)
        m.running_var.copy_(rv)
        if nbt is not None:
            m.num_batches_tracked.copy_(nbt)


@dataclass
class BNStaleness:
    """How far each BatchNorm's running statistics are from a probe batch's (eval mode).

    ``layers``: one dict per BN module, ``{"name", "mean_shift", "var_ratio", "stale"}``:
    ``mean_shift`` is the channel average of ``|batch mean - running mean| / sqrt(running var +
    eps)`` (in running standard deviations), ``var_ratio`` the geometric channel mean of
    ``(batch var + eps) / (running var + eps)``. A layer is stale when ``mean_shift >
    STALE_MEAN_SHIFT`` or the ratio is beyond ``STALE_VAR_RATIO`` either way. The probe runs in
    eval mode, i.e. with every earlier layer as deployed, so a stale layer also makes the later
    ones look stale.
    """

    layers: list[dict[str, Any]] = field(default_factory=list)
    probe_size: int = 0
    eval_accuracy: float | None = None
    batch_stat_accuracy: float | None = None

    @property
    def accuracy_gap(self) -> float | None:
        """Accuracy with batch statistics minus eval-mode accuracy (``None`` without labels)."""
        if self.eval_accuracy is None or self.batch_stat_accuracy is None:
            return None
        return self.batch_stat_accuracy - self.eval_accuracy

    @property
    def stale(self) -> bool:
        gap = self.accuracy_gap
        return any(r["stale"] for r in self.layers) or (gap is not None and gap > STALE_ACCURACY_GAP)

    @property
    def worst(self) -> dict[str, Any] | None:
        if not self.layers:
            return None
        return max(self.layers, key=lambda r: max(r["mean_shift"] / STALE_MEAN_SHIFT,
                                                  abs(math.log(r["var_ratio"])) / math.log(STALE_VAR_RATIO)))

    def summary(self) -> str:
        """One line: fresh / stale with the worst layer."""
        if not self.layers:
            return "no BatchNorm with running statistics"
        w = self.worst
        n = sum(r["stale"] for r in self.layers)
        what = (f"stale in {n}/{len(self.layers)} BatchNorm layers" if n
                else f"consistent with the data ({len(self.layers)} BatchNorm layers)")
        acc = ""
        if self.accuracy_gap is not None:
            acc = (f"; accuracy {100 * self.eval_accuracy:.1f}% in eval mode vs {100 * self.batch_stat_accuracy:.1f}% "
                   "with batch statistics")
        if self.accuracy_gap is not None and self.accuracy_gap > STALE_ACCURACY_GAP and not n:
            what = "stale"
        return (f"BN running statistics {what}; worst {w['name']}: mean off by {w['mean_shift']:.2f} running std, "
                f"variance x{w['var_ratio']:.2f}{acc} (probe of {self.probe_size} samples)")

    def to_json(self) -> dict[str, Any]:
        return {"stale": self.stale, "probe_size": self.probe_size, "layers": self.layers,
                "worst": None if self.worst is None else self.worst["name"],
                "eval_accuracy": self.eval_accuracy, "batch_stat_accuracy": self.batch_stat_accuracy}


@torch.no_grad()
def bn_staleness(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *,
                 batch_size: int = 256, seed: int = 0) -> BNStaleness:
    """Compare every BatchNorm's running statistics with the batch statistics of ``x`` (eval mode).

    ``x``: float tensor ``(N, C, ...)`` of real inputs (training data, normalised as in
    training); a few hundred samples are enough. ``y``: optional int64 labels ``(N,)``; then
    the top-1 accuracy in eval mode is compared with the accuracy when every BatchNorm uses the
    statistics of its batch (chunks of ``batch_size``, as in training; dropout stays off).
    The chunks are drawn in a random order fixed by ``seed``, never in the order of ``x``: a
    class-sorted probe would otherwise give single-class batches and a batch-statistics
    accuracy that says nothing about the model (the result does not depend on the order of
    ``x`` beyond sampling noise). Model, mode and running statistics are unchanged. Returns a
    :class:`BNStaleness`.
    """
    bns = _bn_modules(model)
    sums: dict[str, list[torch.Tensor]] = {}

    def hook_for(name):
        def hook(mod, args):
            inp = args[0].detach().double()
            dims = [d for d in range(inp.dim()) if d != 1]
            n = inp.numel() // inp.shape[1]
            s = sums.setdefault(name, [torch.zeros(inp.shape[1], dtype=torch.float64, device=inp.device),
                                       torch.zeros(inp.shape[1], dtype=torch.float64, device=inp.device), 0])
            s[0] += inp.sum(dims)
            s[1] += (inp * inp).sum(dims)
            s[2] += n
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in bns]
    was = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    eval_acc = batch_acc = None
    if y is not None and bns:
        eval_acc = _accuracy(model, x, y, batch_size, batch_stats=None)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(x.device)
        batch_acc = _accuracy(model, x[perm], y.to(x.device)[perm], batch_size, batch_stats=[m for _, m in bns])
    layers = []
    for name, m in bns:
        if name not in sums or sums[name][2] == 0:
            continue  # not on this input's path
        s1, s2, n = sums[name]
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0)
        rm, rv = m.running_mean.double(), m.running_var.double()
        shift = float(((mean - rm).abs() / (rv + m.eps).sqrt()).mean())
        ratio = float(torch.exp(torch.log((var + m.eps) / (rv + m.eps)).mean()))
        stale = shift > STALE_MEAN_SHIFT or not (1 / STALE_VAR_RATIO <= ratio <= STALE_VAR_RATIO)
        layers.append({"name": name, "mean_shift": round(shift, 4), "var_ratio": round(ratio, 4), "stale": stale})
    return BNStaleness(layers=layers, probe_size=int(len(x)), eval_accuracy=eval_acc, batch_stat_accuracy=batch_acc)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
              batch_stats: list[nn.modules.batchnorm._BatchNorm] | None) -> float:
    """Top-1 accuracy in eval mode; with ``batch_stats`` those BN modules normalise with their
    batch's statistics (train mode, momentum 0: running statistics untouched). A tuple / dict /
    dataclass output (a distillation model's ``(logits, features)``) is read with
    :func:`bnnshift.load.pick_logits` (first tensor / ``"logits"``), as ``scan --data`` does."""
    from .load import pick_logits

    was = model.training
    saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in batch_stats or []]
    model.eval()
    try:
        for m, _, _ in saved:
            m.momentum = 0.0
            m.train()
        correct = 0
        for i in range(0, len(x), batch_size):
            logits = pick_logits(model(x[i:i + batch_size]))[0]
            correct += int((logits.argmax(1) == y[i:i + batch_size].to(x.device)).sum())
    finally:
        for m, mom, nbt in saved:
            m.momentum = mom
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)
        model.train(was)
    return correct / max(1, len(x))


@dataclass
class BNReestimate:
    """What :func:`reestimate_bn` did: the staleness ``before`` and ``after`` on the probe set,
    whether the new statistics were kept (``accepted``) and the batches used."""

    before: BNStaleness
    after: BNStaleness | None
    accepted: bool
    batches: int
    batch_size: int
    bn_layers: int
    seed: int

    def candidate_accuracy(self) -> float | None:
        """Eval-mode probe accuracy with the new statistics (kept or not); None without BatchNorm."""
        return None if self.after is None else self.after.eval_accuracy

    def lines(self, data_name: str = "the data") -> list[tuple[str, str]]:
        """``[(level, text)]`` for the user: level "warn" or "info"."""
        b, a = self.before, self.after
        if not self.bn_layers:
            return [("info", "no BatchNorm with running statistics; nothing to re-estimate")]
        out = [("warn" if b.stale else "info", b.summary())]
        what = (f"re-estimated on {self.batches} random batch{'es' if self.batches != 1 else ''} of {self.batch_size} "
                f"of {data_name} (seed {self.seed})")
        if a is None:
            return out
        ea, eb = a.eval_accuracy, b.eval_accuracy
        if self.accepted:
            nums = "" if ea is None else f" (probe accuracy {100 * eb:.1f}% -> {100 * ea:.1f}%)"
            out.append(("info", f"{what}: kept the new statistics{nums}; "
                        + a.summary().replace("BN running statistics ", "now ")))
        else:
            out.append(("warn", f"{what}: the new statistics score {100 * ea:.1f}% on the probe, the old "
                        f"{100 * eb:.1f}%: kept the old statistics (re-estimation never makes the model worse; "
                        "if the model needs new statistics, check that --data and --mean/--std are what it was "
                        "trained with)"))
        return out

    def to_json(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "batch_size": self.batch_size, "order_seed": self.seed,
                "before": self.before.to_json(),
                "after": (self.after or self.before).to_json() if self.accepted else self.before.to_json(),
                "candidate": None if self.after is None else self.after.to_json()}


@torch.no_grad()
def reestimate_bn(model: nn.Module, train_x: torch.Tensor, probe_x: torch.Tensor, probe_y: torch.Tensor, *,
                  batches: int = 20, batch_size: int = 256, seed: int = 0) -> BNReestimate:
    """Re-estimate the BatchNorm statistics, keeping them only when they are not worse.

    ``train_x``: float ``(N, C, ...)`` training inputs (normalised as the model expects);
    ``batches`` batches of ``batch_size`` are drawn from it in a random order fixed by ``seed``
    (a permutation of the whole set, never its file order). ``probe_x`` / ``probe_y``: a
    separate probe set (held-out data, or training samples not in the batches), float ``(M, C,
    ...)`` and int64 ``(M,)``. The staleness is measured on the probe before and after
    (:func:`bn_staleness`); the new statistics replace the old only when the eval-mode probe
    accuracy with them is at least as high as with the old ones, otherwise the old ones are
    restored (``accepted`` False). Raises what the model's forward raises (then the old
    statistics are in place).
    """
    n = int(train_x.shape[0])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    use = perm[: max(1, batches) * batch_size]
    chunks = [train_x[use[i:i + batch_size]] for i in range(0, len(use), batch_size)]
    before = bn_staleness(model, probe_x, probe_y, batch_size=batch_size, seed=seed)
    bns = _bn_modules(model)
    if not bns:
        return BNReestimate(before, None, False, len(chunks), batch_size, 0, seed)
    old = _bn_state(model)
    had = getattr(model, FRESH_ATTR, None)
    recalibrate_bn(model, chunks)
    after = bn_staleness(model, probe_x, probe_y, batch_size=batch_size, seed=seed)
    eb, ea = before.eval_accuracy, after.eval_accuracy
    accepted = eb is None or ea is None or ea >= eb
    if not accepted:
        _restore_bn_state(old)
        if had is None:
            try:
                object.__delattr__(model, FRESH_ATTR)
            except AttributeError:
                pass
        else:
            object.__setattr__(model, FRESH_ATTR, had)
    return BNReestimate(before, after, accepted, len(chunks), batch_size, len(bns), seed)
