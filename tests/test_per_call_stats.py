"""Statistics per call (issue 19, item 3).

A binarizer called at several places per forward (one binary MLP-Mixer binarizer instance for
the token- and the channel-mixing of a block, one ``SignSTE.apply`` written twice, one module
called three times at different input scales) is one site per call. Each call's +1 share,
zero share and gradient are measured at that call, and the constant-site check of ``patch``
and ``search`` reads the same per-call values. The probe's own ``y > 0`` used to be numbered
as the scope's next op: the second call was read from the probe's comparison, and after a
shift every call of the binarizer was called constant (+1 share 0.000).

Every expected value here is computed by hand: ``SignSTE.forward`` appends each call's output
to ``RECORD`` in execution order.
"""
from __future__ import annotations

import copy
import importlib.util
import re

import pytest
import torch

from bnnshift.patch import ShiftConfig, patch_model, patch_state
from bnnshift.probe import gradient_check, probe_sites
from bnnshift.scan import constant_site_warnings, scan_model

MIXER_PY = '''
import torch
from torch import nn

RECORD = None  # a list: every SignSTE output, in execution order


class SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        y = torch.sign(x)
        if RECORD is not None:
            RECORD.append(y.detach().clone())
        return y

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


class BinAct(nn.Module):
    def forward(self, x):
        return SignSTE.apply(x)


class ScaledAct(nn.Module):
    """XNOR-style: sign times a per-row scale (the module's output is not two-valued, the
    site is the apply inside it; its calls are numbered across the forward)."""
    def forward(self, x):
        return SignSTE.apply(x) * x.abs().mean(-1, keepdim=True)


class ModuleBlock(nn.Module):
    """One binarizer instance, called for the token mixing and for the channel mixing."""
    def __init__(self, tokens, dim):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tok, self.ch = nn.Linear(tokens, tokens), nn.Linear(dim, dim)
        self.act = BinAct()

    def forward(self, x):  # (B, T, D)
        x = x + self.tok(self.act(self.norm1(x).transpose(1, 2))).transpose(1, 2)
        return x + self.ch(self.act(self.norm2(x) + 0.3))


class FunctionBlock(ModuleBlock):
    """The same, with the Function's apply written at both places (no binarizer module)."""
    def forward(self, x):
        x = x + self.tok(SignSTE.apply(self.norm1(x).transpose(1, 2))).transpose(1, 2)
        return x + self.ch(SignSTE.apply(self.norm2(x) + 0.3))


class ThriceBlock(ModuleBlock):
    """One binarizer instance called three times, each call at another input scale (the third
    on integers, where sign(0) = 0 gives that call a zero share of its own)."""
    def __init__(self, tokens, dim):
        super().__init__(tokens, dim)
        self.norm3, self.ch2 = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, x):
        x = x + self.tok(self.act(self.norm1(x).transpose(1, 2))).transpose(1, 2)
        x = x + self.ch(self.act(2.5 * self.norm2(x)))
        return x + self.ch2(self.act(torch.round(2.0 * self.norm3(x))))  # integers: sign(0) = 0


class MixedBlock(ModuleBlock):
    """A binarizer module call and an inline apply in the same block's forward."""
    def forward(self, x):
        x = x + self.tok(self.act(self.norm1(x).transpose(1, 2))).transpose(1, 2)
        return x + self.ch(SignSTE.apply(self.norm2(x) + 0.3))


class BlockedBlock(ModuleBlock):
    """The second call's input is never inside the STE window |x| <= 1: no gradient there."""
    def forward(self, x):
        x = x + self.tok(self.act(self.norm1(x).transpose(1, 2))).transpose(1, 2)
        h = self.norm2(x)
        return x + self.ch(self.act(h + 2.0 * h / h.abs().clamp_min(1e-6)))  # |input| >= 2


class Mixer(nn.Module):
    def __init__(self, block, tokens=4, dim=8, blocks=3, classes=10):
        super().__init__()
        self.tokens = tokens
        self.embed = nn.Linear(16 // tokens, dim)
        self.blocks = nn.Sequential(*[block(tokens, dim) for _ in range(blocks)])
        self.head = nn.Linear(dim, classes)

    def forward(self, x):  # (B, 1, 4, 4)
        x = self.embed(x.reshape(x.shape[0], self.tokens, -1))
        return self.head(self.blocks(x).mean(1))


def module_mixer():
    torch.manual_seed(0)
    return Mixer(ModuleBlock)


def scaled_mixer():
    torch.manual_seed(0)
    m = Mixer(ModuleBlock)
    for b in m.blocks:
        b.act = ScaledAct()
    return m


def function_mixer():
    torch.manual_seed(0)
    return Mixer(FunctionBlock)


def thrice_mixer():
    torch.manual_seed(0)
    return Mixer(ThriceBlock, blocks=2)


def mixed_mixer():
    torch.manual_seed(0)
    return Mixer(MixedBlock, blocks=2)


def blocked_mixer():
    torch.manual_seed(0)
    return Mixer(BlockedBlock, blocks=2)
'''

SHAPE = (1, 4, 4)
CALLS = {"module_mixer": 6, "scaled_mixer": 6, "function_mixer": 6, "thrice_mixer": 6, "mixed_mixer": 4,
         "blocked_mixer": 4}  # binarizer calls per forward


@pytest.fixture()
def lib(tmp_path):
    p = tmp_path / "mixer.py"
    p.write_text(MIXER_PY)
    spec = importlib.util.spec_from_file_location("bnnshift_test_mixer", p)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.PATH = p
    return mod


def _batches():
    g = torch.Generator().manual_seed(5)
    return [torch.randn(64, *SHAPE, generator=g), torch.randn(32, *SHAPE, generator=g)]


def _by_hand(lib, model, batches) -> list[dict[str, float]]:
    """Per call of SignSTE (execution order): +1 share and zero share over ``batches``."""
    lib.RECORD = []
    model.eval()
    with torch.no_grad():
        per_batch = []
        for xb in batches:
            lib.RECORD = []
            model(xb)
            per_batch.append(lib.RECORD)
    lib.RECORD = None
    assert len({len(r) for r in per_batch}) == 1
    out = []
    for k in range(len(per_batch[0])):
        ys = [r[k] for r in per_batch]
        n = sum(y.numel() for y in ys)
        out.append({"plus": sum(float((y > 0).sum()) for y in ys) / n,
                    "zero": sum(float((y == 0).sum()) for y in ys) / n})
    return out


def _execution_order(sites):
    """Sites in the order their call runs: block, then the call within the block (a module
    site's call index, an op site's index in its scope; in the mixed block the module call
    comes before the inline apply)."""
    def key(s):
        where = s.module if s.apply != "op" else s.scope
        block = int(re.search(r"blocks\.(\d+)", where or "").group(1))
        inline = s.apply == "op" and not (s.scope or "").endswith(".act")
        return block, int(inline), (s.call_index if s.apply != "op" else s.op_index)
    return sorted(sites, key=key)


def _scan(lib, factory, batches):
    model = getattr(lib, factory)()
    rep = scan_model(model, SHAPE, batches=batches)
    assert len(rep.sites) == CALLS[factory], [s.name for s in rep.sites]
    return model, rep


@pytest.mark.parametrize("factory", ["module_mixer", "scaled_mixer", "function_mixer", "thrice_mixer", "mixed_mixer"])
def test_each_call_is_measured_at_its_own_output(lib, factory):
    batches = _batches()
    model, rep = _scan(lib, factory, batches)
    hand = _by_hand(lib, getattr(lib, factory)(), batches)
    sites = _execution_order(rep.sites)
    assert len(hand) == len(sites)
    for s, h in zip(sites, hand):
        assert s.plus_fraction == pytest.approx(h["plus"], abs=1e-9), s.name
        assert s.zero_fraction == pytest.approx(h["zero"], abs=1e-9), s.name
        assert s.binary_checked and s.fired
        assert s.gradient is True, s.name
    # the calls of one binarizer differ: each was read at its own output
    assert len({round(h["plus"], 6) for h in hand}) > len(hand) // 2
    if factory == "thrice_mixer":  # only the third call of each block sees exact zeros
        assert [h["zero"] > 0.05 for h in hand] == [False, False, True] * 2


@pytest.mark.parametrize("factory", ["module_mixer", "scaled_mixer", "function_mixer", "thrice_mixer", "mixed_mixer"])
def test_after_a_shift_each_call_has_its_own_share_and_none_is_called_constant(lib, factory):
    batches = _batches()
    model, rep = _scan(lib, factory, batches)
    before = _by_hand(lib, getattr(lib, factory)(), batches)
    patch_model(model, rep, 1.0)
    shifts = patch_state(model).shifts
    assert set(shifts) == {s.name for s in rep.sites}
    after = _by_hand(lib, model, batches)
    # the shift moved every call (sign(x - 1) has fewer +1 than sign(x)) and none is constant
    assert all(a["plus"] < b["plus"] for a, b in zip(after, before))
    assert all(0.0 < a["plus"] < 1.0 for a in after)
    res = probe_sites(copy.deepcopy(model), rep.sites, batches, update=False)
    for s, h in zip(_execution_order(rep.sites), after):
        assert res[s.name]["plus_fraction"] == pytest.approx(h["plus"], abs=1e-9), s.name
        assert res[s.name]["zero_fraction"] == pytest.approx(h["zero"], abs=1e-9), s.name
    assert constant_site_warnings(model, rep.sites, shifts, batches) == []


def test_a_call_shifted_out_of_its_range_is_the_only_one_called_constant(lib):
    """The constant check reads per-call values: only the call whose range the shift leaves."""
    batches = _batches()
    model, rep = _scan(lib, "thrice_mixer", batches)
    sites = _execution_order(rep.sites)
    # the second call of block 0 sees 2.5 * LayerNorm(x): at most 2.5 * sqrt(7) < 7
    target = sites[1]
    shifts = {s.name: (8.0 if s is target else 0.5) for s in sites}
    patch_model(model, rep, ShiftConfig(names=shifts))
    hand = _by_hand(lib, model, batches)
    assert [h["plus"] == 0.0 for h in hand] == [s is target for s in sites]
    warns = constant_site_warnings(model, rep.sites, patch_state(model).shifts, batches)
    assert len(warns) == 1 and f"site {target.name} is constant" in warns[0]


def test_the_gradient_check_is_per_call(lib):
    """One binarizer instance, two calls per block: the second call's input never lies in the
    STE window, so no gradient passes there; the first call's does."""
    batches = _batches()
    model, rep = _scan(lib, "blocked_mixer", batches)
    sites = _execution_order(rep.sites)
    blocked = {s.name for i, s in enumerate(sites) if i % 2 == 1}
    assert {s.name for s in sites if s.gradient is False} == blocked
    assert {s.name for s in sites if s.gradient is True} == {s.name for s in sites} - blocked
    gc = gradient_check(copy.deepcopy(model), rep.sites, batches[0])
    assert gc is not None and {n for n, v in gc.reaches.items() if v is False} == blocked
    assert any(all(n in w for n in blocked) and w.startswith("no gradient reaches") for w in rep.warnings)


def test_search_does_not_call_the_calls_of_a_shared_binarizer_degenerate(lib):
    from bnnshift.search import SearchConfig, run_candidate

    cfg = SearchConfig(model=f"{lib.PATH}:function_mixer", data="synthetic:64", input_shape=SHAPE, steps=1,
                       batch_size=32, train_limit=64, compile="off")
    r = run_candidate(cfg, 1.0, 0)
    assert r.degenerate == []
    shares = r.plus_fraction
    assert len(shares) == 6 and all(0.0 < v < 1.0 for v in shares.values())
    # the two calls of each block are measured apart (LayerNorm + 0.3 vs LayerNorm, shifted by 1)
    model = lib.function_mixer()
    rep = scan_model(model, SHAPE)
    order = [s.name for s in _execution_order(rep.sites)]
    assert all(shares[order[2 * b]] != shares[order[2 * b + 1]] for b in range(3))
