"""Where a shift is folded, on small models of real BNN spellings (issue 9, cases 11, 23, 29, 30).

A fold is exact or refused per site: the folded model equals the hooked (unfolded) one, a
target read twice (a BN or bias module called before two binarizers) folds only with equal t,
and a learnable bias is found whatever its spelling.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnnshift.fold import fold_shifts
from bnnshift.patch import ShiftConfig, patch_model
from bnnshift.scan import scan_model
from bnnshift.shift import shifted_sites


class SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


class SignAct(nn.Module):
    def forward(self, x):
        c = x.clamp(-1, 1)
        return (torch.sign(x) - c).detach() + c


class BinConv(nn.Conv2d):
    def forward(self, x):
        w = self.weight
        return F.conv2d(x, (torch.sign(w) - w).detach() + w, None, self.stride, self.padding)


class LearnableBias(nn.Module):
    """ReActNet's ``LearnableBias``, in several spellings."""

    def __init__(self, c, spelling="expand_as"):
        super().__init__()
        self.bias = nn.Parameter(torch.linspace(-0.3, 0.4, c).view(1, c, 1, 1))
        self.spelling = spelling

    def forward(self, x):
        if self.spelling == "expand_as":
            return x + self.bias.expand_as(x)
        if self.spelling == "plain":
            return x + self.bias
        if self.spelling == "reversed":
            return self.bias + x
        if self.spelling == "minus":
            return x - self.bias
        return torch.add(x, self.bias)


class SharedNet(nn.Module):
    """Case 11: one normalisation module called before two binarizers."""

    def __init__(self, shared):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.norm = shared
        self.act1 = SignAct()
        self.conv1 = BinConv(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act2 = SignAct()
        self.conv2 = BinConv(8, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.bn1(self.conv1(self.act1(self.norm(self.bn0(self.stem(x))))))
        x = self.conv2(self.act2(self.norm(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class BiasShortcutNet(nn.Module):
    """Case 23: BN -> LearnableBias -> sign module; the BN output also feeds the shortcut."""

    def __init__(self, spelling):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.move = LearnableBias(8, spelling)
        self.act = SignAct()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.bn0(self.conv0(x))
        y = self.conv1(self.act(self.move(x)))
        return self.fc((y + x).mean((2, 3)))


class RSign(nn.Module):
    """Case 29: RSign as one module: learnable ``move`` + an autograd.Function STE."""

    def __init__(self, c):
        super().__init__()
        self.move = nn.Parameter(torch.linspace(-0.2, 0.3, c).view(1, c, 1, 1))

    def forward(self, x):
        return SignSTE.apply(x + self.move)


class RSignResNet(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.act1 = RSign(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.act2 = RSign(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.bn0(self.stem(x))
        x = self.bn1(self.conv1(self.act1(x))) + x
        x = self.bn2(self.conv2(self.act2(x))) + x
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class BiasThenFunction(nn.Module):
    """Case 30: conv -> BN -> LearnableBias -> SignSTE.apply in the parent; no shortcut."""

    def __init__(self, c=8):
        super().__init__()
        self.conv0 = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.move0 = LearnableBias(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.fc = nn.Linear(c * 8 * 8, 10)

    def forward(self, x):
        x = self.bn0(self.conv0(x))
        x = SignSTE.apply(self.move0(x))
        return self.fc(self.conv1(x).flatten(1))


class SignAndScale(torch.autograd.Function):
    """Two outputs: sign(x) and XNOR's scale mean|x| per sample."""

    @staticmethod
    def forward(ctx, x):
        return torch.sign(x), x.abs().mean(dim=(1, 2, 3), keepdim=True)

    @staticmethod
    def backward(ctx, gb, gs):
        return gb


class TwoOutputShortcut(nn.Module):
    """A two-output Function whose input (the BN output) also feeds the shortcut."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.conv = BinConv(c, c, 3, padding=1, bias=False)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.bn(self.stem(x))
        b, alpha = SignAndScale.apply(x)
        y = self.conv(b) * alpha + x
        return self.fc(y.mean((2, 3)))


class CentreScaleSign(nn.Module):
    """A binarizer with a scale declared before its centre: sign((x - c) * s)."""

    def __init__(self, c):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, c).view(1, c, 1, 1))
        self.centre = nn.Parameter(torch.linspace(-0.4, 0.4, c).view(1, c, 1, 1))

    def forward(self, x):
        return torch.sign((x - self.centre) * self.scale)


class CentreScaleNet(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = CentreScaleSign(c)
        self.conv = BinConv(c, c, 3, padding=1, bias=False)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.bn(self.stem(x))
        y = self.conv(self.act(x)) + x
        return self.fc(y.mean((2, 3)))


def _calibrated(model, shape):
    """Non-trivial BN statistics and biases (a fresh BN is the identity in eval mode)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _fold(model, shape, cfg):
    """(hooked model, folded model, fold report) for ``cfg`` (a shift or a ShiftConfig)."""
    report = scan_model(model, shape)
    hooked = patch_model(copy.deepcopy(model), report, cfg)
    folded = copy.deepcopy(hooked)
    rep = fold_shifts(folded, shape)
    return report, hooked.eval(), folded.eval(), rep


def _same(a, b, shape, atol=1e-5):
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max()) <= atol


@pytest.mark.parametrize("shared", ["bn", "bias"])
def test_shared_producer_folds_only_with_equal_t(shared):
    """Case 11: a BN / bias module called before two binarizers folds both or neither."""
    shape = (1, 12, 12)
    model = _calibrated(SharedNet(nn.BatchNorm2d(8) if shared == "bn" else LearnableBias(8)), shape)
    target = "bn:norm" if shared == "bn" else "bias:norm.bias"
    report, hooked, folded, rep = _fold(model, shape, 0.5)
    assert {s.name: s.fold_with for s in report.sites} == {"act1": ["act1", "act2"], "act2": ["act1", "act2"]}
    assert rep.folded == {"act1": target, "act2": target} and not shifted_sites(folded)
    assert _same(hooked, folded, shape)
    # a shared target keeps x - t hooks: the fold is exact in real numbers, not bitwise, and says so
    assert not any(s.shift_into for s in report.sites)
    assert set(rep.rounded) == {"act1", "act2"} and "not bitwise" in rep.rounded["act1"]
    # different t: a fold would move the other call too -> both kept, with the reason
    _, hooked, folded, rep = _fold(model, shape, ShiftConfig(names={"act1": 0.5, "act2": 1.0}))
    assert not rep.folded and set(rep.kept) == {"act1", "act2"}
    assert "different t" in rep.kept["act1"]
    assert _same(hooked, folded, shape, atol=0.0)
    # one of the two not shifted: the shared target would shift it too
    _, hooked, folded, rep = _fold(model, shape, ShiftConfig(names={"act1": 0.5}))
    assert not rep.folded and "act2" in rep.kept["act1"]


@pytest.mark.parametrize("spelling", ["expand_as", "plain", "reversed", "minus", "torch.add"])
def test_learnable_bias_module_is_the_threshold_and_folds(spelling):
    """Case 23: x + b.expand_as(x), x + b, b + x, x - b, torch.add: the bias is the existing
    threshold, t folds into it, and the producer is not a "residual add"."""
    shape = (3, 8, 8)
    model = _calibrated(BiasShortcutNet(spelling), shape)
    report, hooked, folded, rep = _fold(model, shape, 0.5)
    (s,) = report.sites
    sign = -1 if spelling == "minus" else +1
    assert s.producer == "learnable bias"
    assert s.own_threshold["mean"] == pytest.approx(float(-sign * model.move.bias.mean()), abs=1e-6)
    assert rep.folded == {"act": "bias:move.bias"}
    before = model.move.bias.detach().clone()
    assert torch.allclose(folded.move.bias.detach(), before - sign * 0.5)
    assert _same(hooked, folded, shape)


def test_rsign_function_ste_threshold_and_fold():
    """Case 29: RSign = move + autograd.Function STE in a residual net."""
    shape = (1, 12, 12)
    model = _calibrated(RSignResNet(), shape)
    report, hooked, folded, rep = _fold(model, shape, 0.5)
    assert len(report.sites) == 2
    for s, act in zip(report.sites, (model.act1, model.act2)):
        assert s.own_threshold["mean"] == pytest.approx(float(-act.move.mean()), abs=1e-6)
    assert sorted(rep.folded.values()) == ["bias:act1.move", "bias:act2.move"]
    assert _same(hooked, folded, shape)
    for s in report.sites:  # the advice agrees with the fold target (no "cannot fold", no BN fold)
        text = " ".join(s.advice)
        assert f"learnable bias {s.foldable[5:]}" in text, s.advice
        assert "cannot fold" not in text and "beta - t" not in text, s.advice
    # the unfolded model is sign(x - 0.5) by hand
    ref = copy.deepcopy(model)
    for a in (ref.act1, ref.act2):
        a.register_forward_pre_hook(lambda mod, args: (args[0] - 0.5,))
    assert _same(ref, folded, shape)


def test_learnable_bias_then_function_folds():
    """Case 30: LearnableBias module then SignSTE.apply in the parent: folds into the bias."""
    shape = (1, 8, 8)
    model = _calibrated(BiasThenFunction(), shape)
    report, hooked, folded, rep = _fold(model, shape, 0.5)
    (s,) = report.sites
    assert s.producer == "learnable bias" and list(rep.folded.values()) == ["bias:move0.bias"]
    ref = copy.deepcopy(model)
    ref.move0.register_forward_hook(lambda mod, i, o: o - 0.5)
    assert _same(ref, folded, shape)


def _bitwise(hooked, folded, sites, x):
    """(outputs equal bitwise, {site: binary activation equal bitwise}) on ``x``."""
    import types

    from bnnshift._runtime import SiteRuntime
    from bnnshift.export import _Taps

    got = []
    for m in (hooked, folded):
        if getattr(m, "_bnnshift_shift", None) is None:  # fully folded: a bare runtime sees inline ops
            rt = SiteRuntime(m, watch_scopes={s.scope or "" for s in sites if s.apply == "op"})
            m._bnnshift_shift = types.SimpleNamespace(runtime=rt.install(apply_wrapper=True), sites=[])
        taps = _Taps(m, sites)
        try:
            with torch.no_grad():
                y = m(x)
            got.append((y, {n: taps.values[n].clone() for n in taps.names if n in taps.values}))
        finally:
            taps.remove()
    (ya, va), (yb, vb) = got
    assert set(va) == set(vb) == {s.name for s in sites}
    return torch.equal(ya, yb), {n: torch.equal(va[n], vb[n]) for n in va}


@pytest.mark.parametrize("t", [0.3, 1.0])
def test_reactnet_learnable_bias_fold_is_bitwise_the_hooked_patch(t):
    """The zoo's ReActNet-A with trained-like (non-zero) move biases: every RSign (LearnableBias
    -> shared sign module) folds into its move bias, and the folded model equals the hooked
    patch bitwise, outputs and every binary activation. (A hook computing (x + b) - t differs
    from the fold's x + (b - t) by an ulp in about a quarter of the pre-activations, which flips a
    binary activation at an exact tie (test below): the hook lowers b itself.)"""
    from conftest import zoo_small

    model, shape = zoo_small("reactnet-a")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and p.dim() == 4:  # LearnableBias.bias (1, C, 1, 1)
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model = _calibrated(model, shape)
    report, hooked, folded, rep = _fold(model, shape, t)
    assert all(s.producer == "learnable bias" for s in report.sites)
    assert all(s.shift_into == s.foldable and s.foldable.startswith("bias:") for s in report.sites)
    assert len(rep.folded) == len(report.sites) and not rep.kept and not rep.rounded
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(3))
    out_equal, acts_equal = _bitwise(hooked, folded, report.sites, x)
    assert out_equal and all(acts_equal.values()), [n for n, ok in acts_equal.items() if not ok]
    # the hooked patch is the shift: sign(move(x) - t) by a plain pre-hook, to float rounding
    ref = patch_model(copy.deepcopy(model), _without_lowering(report), t).eval()
    with torch.no_grad():
        assert torch.allclose(ref(x), hooked(x), atol=1e-4, rtol=1e-4)


class _TieNet2(nn.Module):
    """input -> LearnableBias -> SignSTE.apply -> 1x1 conv -> fc: the bias reads the input itself,
    so a tie can be written by hand."""

    def __init__(self, c=4):
        super().__init__()
        self.move = LearnableBias(c)
        self.conv = nn.Conv2d(c, c, 1)
        self.fc = nn.Linear(c * 4 * 4, 3)

    def forward(self, x):
        return self.fc(self.conv(SignSTE.apply(self.move(x))).flatten(1))


def test_learnable_bias_fold_is_bitwise_at_an_exact_tie():
    """Why the hook lowers the bias: with b = 0.1, t = 0.3 and an input 0.2 (float32),
    (x + b) - t is exactly 0 (sign +1 for ``x >= 0``) but x + (b - t) is -1.5e-8 (sign -1). The
    hooked patch computes the fold's x + (b - t), so folding changes no binary activation even there."""
    shape = (4, 4, 4)
    torch.manual_seed(0)
    model = _TieNet2().eval()
    with torch.no_grad():
        model.move.bias.fill_(0.1)
    report, hooked, folded, rep = _fold(model, shape, 0.3)
    (s,) = report.sites
    assert s.shift_into == "bias:move.bias" and rep.folded == {s.name: "bias:move.bias"} and not rep.rounded
    x = torch.full((2, *shape), 0.2)
    x[1] = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    out_equal, acts_equal = _bitwise(hooked, folded, report.sites, x)
    assert out_equal and all(acts_equal.values())
    # the plain x - t hook (before this fix) disagrees with the fold at this tie
    plain = patch_model(copy.deepcopy(model), _without_lowering(report), 0.3).eval()
    out_equal, acts_equal = _bitwise(plain, folded, report.sites, x)
    assert not out_equal and not all(acts_equal.values())


def _without_lowering(report):
    r = copy.deepcopy(report)
    for s in r.sites:
        s.shift_into = None
    return r


@pytest.mark.parametrize("build", ["shortcut", "rsign", "function", "bn"])
def test_single_target_folds_are_bitwise_the_hooked_patch(build):
    """Every fold into a target read by one binarizer only (learnable bias module, RSign's own
    bias, bias then Function STE, BN) is bitwise the hooked patch; t = 0 is bitwise the model."""
    shape = {"shortcut": (3, 8, 8), "rsign": (1, 12, 12), "function": (1, 8, 8), "bn": (1, 12, 12)}[build]
    net = {"shortcut": lambda: BiasShortcutNet("plain"), "rsign": RSignResNet, "function": BiasThenFunction,
           "bn": lambda: SharedNet(nn.Identity())}[build]()
    model = _calibrated(net, shape)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4 and p.shape[0] == 1:  # learnable biases: not round numbers
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    report, hooked, folded, rep = _fold(model, shape, 0.3)
    assert rep.folded and not rep.kept and not rep.rounded
    assert all(s.shift_into for s in report.sites)
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(7))
    out_equal, acts_equal = _bitwise(hooked, folded, report.sites, x)
    assert out_equal and all(acts_equal.values())
    zero = patch_model(copy.deepcopy(model), report, 0.0).eval()
    with torch.no_grad():
        assert torch.equal(zero(x), model(x))


def test_two_output_function_whose_input_feeds_a_shortcut():
    """The BN output feeds the Function and the shortcut: no producer hook, no fold; the
    binary output is sign(x - t) and the shortcut keeps x."""
    shape = (1, 8, 8)
    model = _calibrated(TwoOutputShortcut(), shape)
    report, hooked, folded, rep = _fold(model, shape, 0.5)
    (s,) = report.sites
    assert s.apply == "op" and not s.foldable and not rep.folded
    assert "shortcut" in s.fold_reason or "other layers" in s.fold_reason

    class Hand(TwoOutputShortcut):
        def forward(self, x):
            x = self.bn(self.stem(x))
            b, alpha = SignAndScale.apply(x - 0.5)
            return self.fc((self.conv(b) * alpha + x).mean((2, 3)))

    hand = Hand().eval()
    hand.load_state_dict(model.state_dict())
    assert _same(hand, hooked, shape, atol=1e-6)


def test_centre_and_scale_binarizer_threshold_by_measurement():
    """sign((x - c) * s) with s declared first: the centre is the threshold (measured) and t
    folds into it (c' = c + t)."""
    shape = (1, 8, 8)
    model = _calibrated(CentreScaleNet(), shape)
    report, hooked, folded, rep = _fold(model, shape, 0.5)
    (s,) = report.sites
    assert s.own_threshold["mean"] == pytest.approx(float(model.act.centre.mean()), abs=1e-6)
    assert rep.folded == {s.name: "bias:act.centre"}
    assert torch.allclose(folded.act.centre.detach(), model.act.centre.detach() + 0.5)
    assert _same(hooked, folded, shape)


def test_fold_refuses_a_wrong_target_after_measuring(monkeypatch):
    """A fold that changes the model on the probe batch is refused and its hook kept (here
    the recorded direction of the bias is made wrong on purpose)."""
    shape = (3, 8, 8)
    model = _calibrated(BiasShortcutNet("plain"), shape)
    report = scan_model(model, shape)
    # claims x - b: folding would move the threshold by 2t (a wrong sign found at scan time is
    # caught there by measurement and the site loses shift_into: the hook is the plain x - t)
    report.sites[0].bias_sign, report.sites[0].shift_into = -1, None
    hooked = patch_model(copy.deepcopy(model), report, 0.5)
    folded = copy.deepcopy(hooked)
    rep = fold_shifts(folded, shape)
    assert not rep.folded and "refused" in rep.kept["act"] and "change" in rep.kept["act"]
    assert _same(hooked, folded, shape, atol=0.0)


# ------------------------------------------------------------------------------ export ties


class _SignMod(nn.Module):
    def forward(self, x):
        return torch.sign(x)


class _TieNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4, bias=False)
        self.act = _SignMod()
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _FakeSession:
    """Stands for onnxruntime: returns given outputs."""

    def __init__(self, outs):
        self.outs = outs

    def get_inputs(self):
        import types

        return [types.SimpleNamespace(name="input")]

    def run(self, _names, _feed):
        return self.outs


def test_export_counts_a_tie_apart_and_fails_a_margin_flip():
    """A flip where |x - t| is at float rounding is a tie (counted, not failed); a flip with a
    margin fails; the sample with the tie is left out of the logit comparison."""
    from bnnshift.export import _compare, _Taps, _Tapped

    torch.manual_seed(0)
    model = _TieNet().eval()
    t = 0.5
    report = scan_model(model, (4,))
    with torch.no_grad():  # after the scan: the pre-activation is then the input itself
        model.fc1.weight.copy_(torch.eye(4))
    patch_model(model, report, t)
    x = torch.tensor([[t + 1e-7, 2.0, -1.0, 3.0], [1.5, -2.0, 2.0, -3.0], [1.0, 1.0, -1.0, -1.0]])
    taps = _Taps(model, report.sites)
    wrapper = _Tapped(model, taps)
    try:
        with torch.no_grad():
            logits, binary = (v.clone() for v in wrapper(x))
        tie_flip = binary.clone()
        tie_flip[0, 0] *= -1  # |x - t| = 1e-7: a tie
        moved = logits.clone()
        moved[0] += 5.0  # sample 0's logits follow its tie
        res = _compare(_FakeSession([moved.numpy(), tie_flip.numpy()]), wrapper, [x], 1)
        assert res["tie_flips"] == 1 and res["sign_flip_share"] == 0.0 and res["tied_samples"] == 1
        assert not res["failed"]  # sample 0's logits moved, but only because of its tie
        margin_flip = binary.clone()
        margin_flip[1, 1] *= -1  # |x - t| = 2.5
        res = _compare(_FakeSession([logits.numpy(), margin_flip.numpy()]), wrapper, [x], 1)
        assert res["tie_flips"] == 0 and res["sign_flip_share"] == pytest.approx(1 / 12)
        assert any("sign-flip share" in f for f in res["failed"])
    finally:
        taps.remove()


def test_a_lowering_that_does_not_act_as_x_minus_t_is_dropped_at_scan(monkeypatch):
    """``shift_into`` is checked by measurement: if the analysis got the bias's direction wrong
    (forced here), lowering it would move the threshold by -t; the scan drops shift_into and the
    fold, warns, and the hook stays the plain x - t."""
    import bnnshift.analyse as an

    real = an._fold_analysis

    def wrong_sign(disc, model):
        real(disc, model)
        for s in disc.sites:
            if s.shift_into:
                s.bias_sign = -s.bias_sign

    monkeypatch.setattr(an, "_fold_analysis", wrong_sign)
    shape = (3, 8, 8)
    model = _calibrated(BiasShortcutNet("plain"), shape)
    report = scan_model(model, shape)
    (s,) = report.sites
    assert s.shift_into is None and s.foldable is None and "measured" in s.fold_reason
    assert any("does not move the model as x - t" in w for w in report.warnings)
    hooked = patch_model(copy.deepcopy(model), report, 0.5).eval()
    ref = copy.deepcopy(model).eval()
    ref.act.register_forward_pre_hook(lambda mod, args: (args[0] - 0.5,))
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(hooked(x), ref(x))
