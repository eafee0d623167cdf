"""Issue 20: every site found once, exactly, in every spelling.

Each model here carries its own threshold (``self.t`` read where it binarizes), so a patched
model (threshold 0, bnnshift's shift t) can be compared numerically with the model that
thresholds at t by construction: a site shifted twice (``x - 2t``), missed or shifted where it
should not be gives another output.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnnshift import _runtime
from bnnshift.analyse import measure_shift_once
from bnnshift.patch import patch_model
from bnnshift.scan import scan_model
from models import SignSTE

T = 0.375


def _set_t(model: nn.Module, t: float) -> nn.Module:
    for m in model.modules():
        if "t" in m.__dict__:
            m.t = t
    return model


def _run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)  # the same noise for a stochastic binarizer in every model compared
        return m(x)


def _assert_patch_is_threshold(build, shape, n_sites, *, x=None, seed=0):
    """scan finds ``n_sites`` sites, each once; patching every site with T equals the model whose
    own thresholds are T (and t = 0 is bitwise the model)."""
    torch.manual_seed(seed)
    model = build()
    report = scan_model(model, shape)
    assert report.num_sites == n_sites, [s.name for s in report.sites]
    assert not [w for w in report.warnings if "did not fire" in w or "moves its binarizer" in w], report.warnings
    assert all(s.fired for s in report.sites)
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(11)) if x is None else x
    ref0 = copy.deepcopy(model).eval()
    ref = _set_t(copy.deepcopy(model), T).eval()
    zero = patch_model(copy.deepcopy(model), report, 0.0).eval()
    shifted = patch_model(copy.deepcopy(model), report, T).eval()
    assert torch.equal(_run(zero, x), _run(ref0, x))
    y_ref, y0, y = _run(ref, x), _run(ref0, x), _run(shifted, x)
    assert not torch.allclose(y_ref, y0), "the test's threshold must change the output"
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    return report


# ---------------------------------------------------------------- 1. a site found twice


class UntraceableConv(nn.Conv2d):
    """Binarizes its input with an STE; its forward cannot be traced (tensor-valued if)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.t = 0.0

    def forward(self, x):
        if x.abs().sum() < 0:
            x = -x
        return F.conv2d(SignSTE.apply(x - self.t), torch.sign(self.weight), None, self.stride, self.padding)


class IfAfterConvBlock(nn.Module):
    def __init__(self, c, conv=UntraceableConv):
        super().__init__()
        self.conv = conv(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.mean() > 1e9:  # tensor-valued if after the conv: the block becomes a leaf too
            y = y * 2
        return y + x


class TwoBlocks(nn.Module):
    def __init__(self, block=IfAfterConvBlock):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1, self.b2 = block(8), block(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.b2(self.b1(self.stem(x))).mean((2, 3)))


def test_untraceable_conv_inside_untraceable_block_is_one_site_shifted_once():
    report = _assert_patch_is_threshold(TwoBlocks, (3, 8, 8), 2)
    assert report.leaves == ["b1", "b2"]  # outermost leaves only
    assert sorted(s.name for s in report.sites) == ["b1.conv:input", "b2.conv:input"]


class SharedConvBlock(nn.Module):
    """Variant: one untraceable conv called twice in a block with a tensor-valued if between."""

    def __init__(self, c):
        super().__init__()
        self.conv = UntraceableConv(c, c, 3, padding=1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bn1(self.conv(x))
        while (y.abs().max() > 1e9).item():  # tensor-valued loop condition
            y = y / 2
        return self.bn2(self.conv(y)) + x


def test_shared_untraceable_conv_each_call_once():
    report = _assert_patch_is_threshold(lambda: TwoBlocks(SharedConvBlock), (3, 8, 8), 4)
    assert sorted(s.name for s in report.sites) == ["b1.conv:input@0", "b1.conv:input@1",
                                                    "b2.conv:input@0", "b2.conv:input@1"]


class InlineSignConv(nn.Conv2d):
    """Variant: torch.sign written inline (no Function), untraceable by an assert on a value."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.t = 0.0

    def forward(self, x):
        assert bool(torch.isfinite(x).all())
        a = x - self.t
        xb = a.clamp(-1, 1) + (torch.sign(a) - a.clamp(-1, 1)).detach()
        return F.conv2d(xb, self.weight, None, self.stride, self.padding)


def test_inline_sign_conv_in_untraceable_block_once():
    _assert_patch_is_threshold(lambda: TwoBlocks(lambda c: IfAfterConvBlock(c, InlineSignConv)), (3, 8, 8), 2)


def test_measurement_catches_a_site_shifted_twice():
    """The proof at scan time fails where two sites shift one value (the pre-fix double report)."""
    from bnnshift.sites import APPLY_OP, KIND_INLINE, Site

    torch.manual_seed(0)
    model = TwoBlocks()
    report = scan_model(model, (3, 8, 8))
    s = report.site("b1.conv:input")
    twin = Site(name="b1.conv:sign", kind=KIND_INLINE, op="SignSTE.apply", apply=APPLY_OP, scope=s.scope,
                op_index=s.op_index)
    res = measure_shift_once(model, [s, twin], torch.randn(5, 3, 8, 8))
    assert res["b1.conv:sign"] == 1.0 and res["b1.conv:input"] == 2.0, res
    assert measure_shift_once(model, [s], torch.randn(5, 3, 8, 8)) == {"b1.conv:input": 1.0}


# ---------------------------------------------------------------- 2. self.q = F.apply


def _orig_apply(cls):
    """``cls.apply`` as a model built before bnnshift's first probe binds it (torch's own)."""
    return _runtime._ORIG_APPLY.__get__(None, cls)


class BoundApplyConv(nn.Conv2d):
    def __init__(self, *a, bind=None, **k):
        super().__init__(*a, **k)
        self.q = bind(SignSTE) if bind else SignSTE.apply
        self.t = 0.0

    def forward(self, x):
        return F.conv2d(self.q(x - self.t), self.weight, None, self.stride, self.padding)


class BoundNet(nn.Module):
    def __init__(self, bind=None, conv=BoundApplyConv):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.bn1 = conv(8, 8, 3, padding=1, bind=bind), nn.BatchNorm2d(8)
        self.c2 = conv(8, 8, 3, padding=1, bind=bind)

    def forward(self, x):
        return self.c2(self.bn1(self.c1(self.bn(self.stem(x)) + 0.1))).mean((2, 3))


@pytest.mark.parametrize("bind", [_orig_apply, None], ids=["bound-before-first-probe", "bound-now"])
def test_apply_bound_at_construction_found_in_any_process_history(bind):
    report = _assert_patch_is_threshold(lambda: BoundNet(bind), (3, 8, 8), 2)
    assert [s.op for s in report.sites] == ["SignSTE.apply"] * 2
    # a second model built after this scan gives the same sites
    again = scan_model(BoundNet(bind), (3, 8, 8))
    assert [(s.name, s.op, s.apply) for s in again.sites] == [(s.name, s.op, s.apply) for s in report.sites]


binarize = _orig_apply(SignSTE)  # a module-level reference taken at import


class GlobalApplyAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.t = 0.0

    def forward(self, x):
        return binarize(x - self.t)


class ListApplyConv(nn.Conv2d):
    """Variant: references kept in a list attribute, called by index."""

    def __init__(self, *a, bind=None, **k):
        super().__init__(*a, **k)
        self.ops = [_orig_apply(SignSTE), torch.sign]
        self.t = 0.0

    def forward(self, x):
        return F.conv2d(self.ops[0](x - self.t), self.weight, None, self.stride, self.padding)


def test_apply_bound_in_a_list_attribute():
    _assert_patch_is_threshold(lambda: BoundNet(conv=ListApplyConv), (3, 8, 8), 2)


def test_module_level_bound_apply_in_a_parent_forward():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn1 = nn.Linear(12, 16), nn.BatchNorm1d(16)
            self.act = GlobalApplyAct()
            self.fc2 = nn.Linear(16, 3)

        def forward(self, x):
            return self.fc2(self.act(self.bn1(self.fc1(x))))

    report = _assert_patch_is_threshold(Net, (12,), 1)
    assert report.sites[0].op in ("SignSTE.apply", "module:GlobalApplyAct")


# ---------------------------------------------------------------- 3. multi-output Functions


class SignScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x), x.abs().mean(dim=1, keepdim=True)

    @staticmethod
    def backward(ctx, g, gs):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


class MeanSign(torch.autograd.Function):
    """(mean, sign): the binary output second."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.save_for_backward(x)
        return x.mean(dim=1, keepdim=True) * k, torch.sign(x)

    @staticmethod
    def backward(ctx, gm, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype), None


class InlineTwoOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)
        self.t = 0.0

    def forward(self, x):
        b, s = SignScale.apply(self.bn0(self.c0(x)) - self.t)
        y = self.bn1(self.c1(b * s))
        b2, _ = SignScale.apply(y - self.t)
        return self.c2(b2).mean((2, 3))


def test_function_returning_sign_and_scale_fires():
    report = _assert_patch_is_threshold(InlineTwoOutput, (3, 8, 8), 2)
    assert all(s.binary_checked for s in report.sites)


class TupleAct(nn.Module):
    """Variant: a binarizer module returning (mean, sign) from a two-argument Function."""

    def __init__(self):
        super().__init__()
        self.t = 0.0

    def forward(self, x):
        m, b = MeanSign.apply(x - self.t, 2.0)
        return m, b


def test_module_returning_mean_and_sign_fires():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn1 = nn.Linear(12, 16), nn.BatchNorm1d(16)
            self.act = TupleAct()
            self.fc2 = nn.Linear(16, 3)

        def forward(self, x):
            m, b = self.act(self.bn1(self.fc1(x)))
            return self.fc2(b) + m

    report = _assert_patch_is_threshold(Net, (12,), 1)
    assert report.sites[0].fired and report.sites[0].binary_checked


class ConvWithTwoOutput(nn.Conv2d):
    """Variant: a conv binarizing its own input with (sign, scale)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.t = 0.0

    def forward(self, x):
        b, s = SignScale.apply(x - self.t)
        return F.conv2d(b, self.weight, None, self.stride, self.padding) * s


def test_conv_input_quantizer_with_two_outputs():
    _assert_patch_is_threshold(lambda: BoundNet(conv=lambda *a, bind=None, **k: ConvWithTwoOutput(*a, **k)),
                               (3, 8, 8), 2)


# ---------------------------------------------------------------- 4. gradient check in train mode


class ClippedNet(nn.Module):
    """Binary convs whose integer outputs (sums of +-1 products, |x| >> 1) go through BatchNorm
    with untrained running statistics: in eval mode every value is outside the STE's window."""

    def __init__(self, act="function"):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(32)
        self.c1, self.bn1 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 3)
        self.act = act

    def binarize(self, x):
        if self.act == "function":
            return SignSTE.apply(x)
        c = F.hardtanh(x)
        return c + (torch.sign(x) - c).detach()

    def forward(self, x):
        h = self.binarize(self.bn0(self.stem(x) * 50))
        h = F.conv2d(h, torch.sign(self.c1.weight), None, 1, 1)  # even integers
        h = self.binarize(self.bn1(h * 4 + 3))  # |h * 4 + 3| >= 3
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("act", ["function", "inline-hardtanh-ste"])
def test_gradient_check_in_train_mode_sees_clipped_ste(act):
    torch.manual_seed(0)
    model = ClippedNet(act)
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():  # the trap: in eval mode the window is closed on this batch
        h = F.conv2d(torch.sign(model.bn0(model.stem(x) * 50)), torch.sign(model.c1.weight), None, 1, 1)
        pre = model.eval().bn1(h * 4 + 3)
    assert not bool((pre.abs() <= 1).any())
    report = scan_model(model, (3, 8, 8))
    assert report.num_sites == 2
    assert all(s.gradient is True for s in report.sites), [(s.name, s.gradient) for s in report.sites]
    assert not [w for w in report.warnings if "no gradient" in w], report.warnings
    # running statistics of the user's model untouched
    assert torch.equal(model.bn1.running_mean, torch.zeros(32))


def test_gradient_check_still_flags_plain_sign():
    class Plain(ClippedNet):
        def binarize(self, x):
            return torch.sign(x)

    torch.manual_seed(0)
    report = scan_model(Plain(), (3, 8, 8))
    assert [s.gradient for s in report.sites] == [False, False]
    assert [w for w in report.warnings if "no gradient" in w]


# ---------------------------------------------------------------- 5. models copy.deepcopy cannot copy


class Recipe:
    """A layer recipe whose __getattr__ delegates: copy.deepcopy fails (KeyError / RecursionError)."""

    def __init__(self, **kw):
        self._d = kw

    def __getattr__(self, k):
        return self._d[k]


class RecipeAct(nn.Module):
    def __init__(self, recipe):
        super().__init__()
        self.recipe = recipe
        self.t = 0.0

    def forward(self, x):
        a = x - self.t
        c = a.clamp(-self.recipe.clip, self.recipe.clip)
        return c + (torch.sign(a) - c).detach()


class RecipeNet(nn.Module):
    def __init__(self, where="root"):
        super().__init__()
        r = Recipe(width=16, clip=1.0)
        if where == "root":
            self.cfg = r
        else:  # variant: inside a list attribute of a submodule
            self.extras = [r]
        self.fc1, self.bn = nn.Linear(12, r.width), nn.BatchNorm1d(r.width)
        self.act = RecipeAct(r)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.act(self.bn(self.fc1(x))))


@pytest.mark.parametrize("where", ["root", "list"])
def test_model_deepcopy_cannot_copy_is_scanned_and_patched(where):
    with pytest.raises((KeyError, RecursionError)):
        copy.deepcopy(RecipeNet(where))
    torch.manual_seed(0)
    model = RecipeNet(where)
    report = scan_model(model, (12,))
    assert [s.name for s in report.sites] == ["act"]
    x = torch.randn(6, 12)
    ref = RecipeNet(where)
    ref.load_state_dict(model.state_dict())
    ref.act.t = T
    patched = patch_model(model, report, T).eval()
    with torch.no_grad():
        torch.testing.assert_close(patched(x), ref.eval()(x), rtol=1e-5, atol=1e-5)


def test_model_that_cannot_be_copied_is_refused_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from bnnshift import validate
    from bnnshift.cli import app

    (tmp_path / "m.py").write_text(
        "import torch, torch.nn as nn\n"
        "class NoCopy(nn.Linear):\n"
        "    def __deepcopy__(self, memo):\n"
        "        raise RuntimeError('not copyable')\n"
        "class Act(nn.Module):\n"
        "    def forward(self, x):\n"
        "        c = x.clamp(-1, 1)\n"
        "        return c + (torch.sign(x) - c).detach()\n"
        "def build():\n"
        "    return nn.Sequential(NoCopy(12, 16), nn.BatchNorm1d(16), Act(), nn.Linear(16, 3))\n")
    res = CliRunner().invoke(app, ["scan", f"{tmp_path / 'm.py'}:build", "--input-shape", "12"])
    assert res.exit_code == validate.CATALOGUE["model-not-copyable"][1] == 1, res.output
    err = res.stderr if hasattr(res, "stderr") else res.output
    assert "NoCopy" in err and "cannot be copied" in err and "Traceback" not in err
    assert len([ln for ln in err.strip().splitlines() if ln.strip()]) <= 2, err


# ---------------------------------------------------------------- 6. stochastic binarizers


class NoisySign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x + (torch.rand_like(x) * 2 - 1) * 0.5)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


class StochasticRound(nn.Module):
    """Stochastic rounding to +-1 (P(+1) = (x + 1) / 2) with a clipped STE: no sign op at all."""

    def __init__(self):
        super().__init__()
        self.t = 0.0

    def forward(self, x):
        c = (x - self.t).clamp(-1, 1)
        b = torch.where(torch.rand_like(c) < (c + 1) / 2, 1.0, -1.0)
        return c + (b - c).detach()


class StochasticNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act = StochasticRound()
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)
        self.t = 0.0

    def forward(self, x):
        h = NoisySign.apply(self.bn0(self.c0(x)) - self.t)
        h = self.act(self.bn1(self.c1(h)))
        return self.c2(h).mean((2, 3))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_stochastic_binarizers_found_and_shifted_whatever_the_init(seed):
    report = _assert_patch_is_threshold(StochasticNet, (3, 8, 8), 2, seed=seed)
    assert [s.name for s in report.sites] == ["root:NoisySign", "act"]
    assert not [w for w in report.warnings if "measured" in w], report.warnings


class BernoulliAct(nn.Module):
    """Variant: a {0,1} stochastic binarizer, Bernoulli(sigmoid(x)) with an STE."""

    def __init__(self):
        super().__init__()
        self.t = 0.0

    def forward(self, x):
        p = torch.sigmoid(x - self.t)
        return p + (torch.bernoulli(p) - p).detach()


class NoisyInputConv(nn.Conv2d):
    """Variant: a conv binarizing its own input as sign(x + gaussian noise), inline STE."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.t = 0.0

    def forward(self, x):
        a = x - self.t
        c = a.clamp(-1, 1)
        return F.conv2d(c + (torch.sign(a + 0.2 * torch.randn_like(a)) - c).detach(), self.weight, None, 1, 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_stochastic_variants_bernoulli_and_noisy_conv_input(seed):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c0, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.act = BernoulliAct()
            self.cm, self.bnm = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c1 = NoisyInputConv(8, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.c2 = NoisyInputConv(8, 4, 3, padding=1)

        def forward(self, x):
            h = self.bnm(self.cm(self.act(self.bn0(self.c0(x)))))
            return self.c2(self.bn1(self.c1(h))).mean((2, 3))

    report = _assert_patch_is_threshold(Net, (3, 8, 8), 3, seed=seed)
    assert [s.name for s in report.sites] == ["act", "c1:sign", "c2:sign"]


# ---------------------------------------------------------------- 7. shift-invariant inputs


class BinaryAttention(nn.Module):
    """{0,1} attention: a threshold on a softmax of the scores (a shift of the scores changes nothing)."""

    def forward(self, s):
        return (torch.softmax(s, -1) > 1.0 / s.shape[-1]).float()


class NormSign(nn.Module):
    """Variant: a normalisation right before the sign (layer norm without affine)."""

    def forward(self, x):
        a = F.layer_norm(x, x.shape[-1:])
        c = a.clamp(-1, 1)
        return c + (torch.sign(a) - c).detach()


class AttnNet(nn.Module):
    def __init__(self, style="module"):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.fc1, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(6)
        self.attn, self.norm_sign = BinaryAttention(), NormSign()
        self.style = style
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        s = self.q(x) @ self.k(x).transpose(1, 2)
        if self.style == "module":
            a = self.attn(s)
        elif self.style == "inline":
            a = (F.softmax(s, dim=-1) > 0.2).float()
        else:
            a = self.norm_sign(s)
        hb = self.bn(self.fc1(a @ self.v(x)))
        c = hb.clamp(-1, 1)
        return self.out((c + (torch.sign(hb) - c).detach()).mean(1))


@pytest.mark.parametrize("style,where", [("module", "site attn"), ("inline", "root:gt"), ("norm", "site norm_sign")])
def test_threshold_on_a_shift_invariant_input_is_said_and_not_shifted(style, where):
    torch.manual_seed(0)
    model = AttnNet(style)
    report = scan_model(model, (6, 8))
    assert [s.name for s in report.sites] == ["bn:output"]
    said = [w for w in report.warnings if w.startswith(where) and "shift-invariant input" in w]
    assert len(said) == 1, report.warnings
    if style != "inline":  # the measurement behind it: the binarizer's output is the same for x - t
        x = torch.randn(5, 6, 6)
        m = model.attn if style == "module" else model.norm_sign
        assert torch.equal(m(x), m(x - 0.5))


def test_binarizer_module_with_ordinary_input_is_kept():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn = nn.Linear(12, 16), nn.BatchNorm1d(16)
            self.act, self.fc2 = GlobalApplyAct(), nn.Linear(16, 3)

        def forward(self, x):
            return self.fc2(self.act(self.bn(self.fc1(x))))

    report = scan_model(Net(), (12,))
    assert report.num_sites == 1 and not [w for w in report.warnings if "shift-invariant" in w]


# ---------------------------------------------------------------- 8. ternary dead zones


class DeadZone(nn.Module):
    def forward(self, x):
        q = torch.where(x.abs() < 0.5, torch.zeros_like(x), torch.sign(x))
        c = x.clamp(-1, 1)
        return c + (q - c).detach()


class TernaryFn(torch.autograd.Function):
    """Variant: a dead zone in a Function with its width as an argument, called inline."""

    @staticmethod
    def forward(ctx, x, delta):
        return torch.sign(x) * (x.abs() >= delta).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g, None


class TernaryNet(nn.Module):
    def __init__(self, style):
        super().__init__()
        self.fc1, self.bn = nn.Linear(12, 16), nn.BatchNorm1d(16)
        self.act, self.style = DeadZone(), style
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        h = self.bn(self.fc1(x))
        if self.style == "module":
            h = self.act(h)
        elif self.style == "function":
            h = TernaryFn.apply(h, 0.5)
        else:  # signum of an integer pre-activation: zeros only where it is exactly 0
            h = torch.sign(torch.round(h * 2))
        return self.fc2(h)


@pytest.mark.parametrize("style", ["module", "function"])
def test_ternary_dead_zone_is_advised_as_ternary(style):
    torch.manual_seed(0)
    report = scan_model(TernaryNet(style), (12,), batches=[torch.randn(64, 12)])
    (s,) = report.sites
    assert s.alphabet == "{-1,0,+1}"
    assert [w for w in report.warnings if "dead-zone" in w and "does not make the site binary" in w], report.warnings
    assert not [w for w in report.warnings if "makes it binary" in w]
    assert any("stays ternary" in a for a in s.advice)


def test_signum_of_exact_zeros_is_not_a_dead_zone():
    torch.manual_seed(0)
    report = scan_model(TernaryNet("integer"), (12,), batches=[torch.randn(64, 12)])
    assert not [w for w in report.warnings if "dead-zone" in w], report.warnings
    assert [w for w in report.warnings if "makes it binary" in w], report.warnings


@pytest.mark.parametrize("style,name,op", [("module", "attn", "module:BinaryAttention"), ("inline", "root:gt", "gt"),
                                           ("norm", "norm_sign", "module:NormSign")])
def test_shift_invariant_sites_listed_with_the_reason_and_left_at_zero(style, name, op):
    """Each excluded binarizer is in the report / JSON per site with its reason; patch leaves it at t = 0."""
    import json
    from pathlib import Path

    import jsonschema

    from bnnshift.patch import describe

    torch.manual_seed(0)
    model = AttnNet(style)
    report = scan_model(model, (6, 8))
    assert [(e["name"], e["op"]) for e in report.excluded_sites] == [(name, op)]
    assert "shift-invariant input" in report.excluded_sites[0]["reason"]
    payload = json.loads(json.dumps(report.to_json()))
    schema = json.loads((Path(__file__).parents[1] / "docs" / "scan.schema.json").read_text())
    jsonschema.validate(payload, schema)
    assert payload["excluded_sites"] == report.excluded_sites
    patched = patch_model(copy.deepcopy(model), report, T)
    assert [r["name"] for r in describe(patched)] == ["bn:output"]


# ---------------------------------------------------------------- 10. names say where each call runs


class CopysignAct(nn.Module):
    """A binarizer module with no candidate op (found by its values): sign written as copysign."""

    def __init__(self):
        super().__init__()
        self.t = 0.0

    def forward(self, x):
        return torch.copysign(torch.ones_like(x), x - self.t)


class CallerBlock(nn.Module):
    def __init__(self, act, twice=False):
        super().__init__()
        self.fc, self.bn, self.act, self.twice = nn.Linear(16, 16), nn.BatchNorm1d(16), act, twice
        self.fc2 = nn.Linear(16, 16)

    def forward(self, x):
        h = self.act(self.bn(self.fc(x)))
        return self.act(self.fc2(h)) if self.twice else h


class SharedCallers(nn.Module):
    def __init__(self, twice=False):
        super().__init__()
        self.act = CopysignAct()
        self.b1, self.b2 = CallerBlock(self.act, twice), CallerBlock(self.act)
        self.bn, self.fc = nn.BatchNorm1d(16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.act(self.bn(self.b2(self.b1(x)))))


@pytest.mark.parametrize("twice,names", [(False, ["act@b1", "act@b2", "act@root"]),
                                         (True, ["act@b1/0", "act@b1/1", "act@b2", "act@root"])])
def test_calls_of_a_shared_instance_are_named_where_they_run(twice, names):
    report = _assert_patch_is_threshold(lambda: SharedCallers(twice), (16,), len(names))
    assert [s.name for s in report.sites] == names
    assert [s.call_index for s in report.sites] == list(range(len(names)))  # the address stays the call
