"""Site addressing in one room: one dispatcher of hook modes (``_runtime.hook_slot``), hooks
removed through their ``RemovableHandle``s, one accessor for bnnshift's state on a model.

Sites are made by hand (no scan): each hook mode on a model of its own, so every test is a
fraction of a second. Each shift is checked against the same model with ``x - t`` written
into its forward."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnnshift._runtime import OP, POST_CALL, PRE_CALL, hook_slot
from bnnshift._state import LEGACY_ATTRS, model_state, set_state
from bnnshift._taps import Taps
from bnnshift.probe import probe_sites
from bnnshift.shift import get_thresholds, insert_shifts, remove_shifts, shifted_sites
from bnnshift.sites import APPLY_OP, APPLY_PRE_HOOK, APPLY_PRODUCER, Site

from models import SignAct, SignSTE

T = 0.25


class ModuleSite(nn.Module):
    """A binarizer module, called twice (two pre-hook sites, ``act@0`` / ``act@1``)."""

    def __init__(self, t: float = 0.0):
        super().__init__()
        self.lin0, self.lin1, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.act, self.t = SignAct(), t

    def forward(self, x):
        x = self.act(self.lin0(x) - self.t)
        return self.head(self.act(self.lin1(x) - self.t))


class ProducerSite(nn.Module):
    """``SignSTE.apply(bn(x))``: a shift on the producer's output (a forward hook on ``bn``)."""

    def __init__(self, t: float = 0.0):
        super().__init__()
        self.lin, self.bn, self.head, self.t = nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 3), t

    def forward(self, x):
        return self.head(SignSTE.apply(self.bn(self.lin(x)) - self.t))


class OpSite(nn.Module):
    """``(a + b).sign()`` written inline: the op intercepted (no module to hook)."""

    def __init__(self, t: float = 0.0):
        super().__init__()
        self.a, self.b, self.head, self.t = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3), t

    def forward(self, x):
        return self.head((self.a(x) + self.b(x) - self.t).sign())


CASES = {
    "pre_hook": (ModuleSite, [Site("act@0", "module", "module:SignAct", APPLY_PRE_HOOK, module="act", call_index=0),
                              Site("act@1", "module", "module:SignAct", APPLY_PRE_HOOK, module="act", call_index=1)]),
    "producer_hook": (ProducerSite, [Site("bn:output", "inline", "SignSTE.apply", APPLY_PRODUCER, module="bn",
                                          scope="", op_index=0)]),
    "op": (OpSite, [Site("root:sign", "inline", "sign", APPLY_OP, scope="", op_index=0)]),
}


def _pair(kind: str):
    """(model, the same weights with ``- T`` in forward, its sites)."""
    cls, sites = CASES[kind]
    torch.manual_seed(0)
    model = cls().eval()
    ref = cls(T).eval()
    ref.load_state_dict(model.state_dict())
    return model, ref, [copy.copy(s) for s in sites]


X = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_hook_slot_is_the_one_decision_per_mode():
    (pre, _), (prod,), (op,) = CASES["pre_hook"][1], CASES["producer_hook"][1], CASES["op"][1]
    assert (hook_slot(pre).table, hook_slot(pre).key, hook_slot(pre).module_binarizer) == (PRE_CALL, ("act", 0), True)
    conv_input = Site("c:input", "input", "sign", APPLY_PRE_HOOK, module="c", call_index=1, scope="c", op_index=2)
    assert hook_slot(conv_input).op == ("c", 2) and not hook_slot(conv_input).module_binarizer
    assert (hook_slot(prod).table, hook_slot(prod).key, hook_slot(prod).op) == (POST_CALL, ("bn", 0), ("", 0))
    assert (hook_slot(op).table, hook_slot(op).key) == (OP, ("", 0))
    with pytest.raises(ValueError, match="unknown apply mode"):
        hook_slot(Site("x", "inline", "sign", "rewrite"))


@pytest.mark.parametrize("kind", list(CASES))
def test_each_mode_shifts_exactly_and_removes_through_its_handles(kind):
    model, ref, sites = _pair(kind)
    with torch.no_grad():
        plain = model(X)
        user = model.head.register_forward_hook(lambda m, i, o: o * 1.0)  # the user's own hook stays
        before = _hooks(model)
        insert_shifts(model, sites, {s.name: T for s in sites})
        assert torch.equal(model(X), ref(X))
        assert _hooks(model) > before
        twin = copy.deepcopy(model)  # its runtime's handles refer to the twin's own hook dicts
        remove_shifts(model)
        assert _hooks(model) == before and torch.equal(model(X), plain)
        assert not any(k.startswith("bnnshift_threshold_") for k in model.state_dict())
        assert torch.equal(twin(X), ref(X)) and shifted_sites(twin)  # the copy keeps its shifts
        remove_shifts(twin)
        assert torch.equal(twin(X), plain) and _hooks(twin) == before
    user.remove()


@pytest.mark.parametrize("kind", list(CASES))
def test_probe_and_taps_read_each_mode_where_the_shift_puts_it(kind):
    model, ref, sites = _pair(kind)
    insert_shifts(model, sites, {s.name: T for s in sites})
    got = probe_sites(model, sites, [X], update=False)
    assert all(got[s.name]["fired"] and got[s.name]["binary"] for s in sites)
    assert torch.equal(model(X), ref(X))  # the probe put the patch's hooks back
    taps = Taps(model, sites)
    try:
        with torch.no_grad():
            model(X)
        assert taps.names == [s.name for s in sites]
        for s in sites:
            v = taps.values[s.name].float()
            if s.apply != APPLY_PRODUCER:  # a producer's tap is its shifted output, whose sign is the site's
                assert set(v.unique().tolist()) <= {-1.0, 0.0, 1.0}
            assert got[s.name]["plus_fraction"] == pytest.approx(float((v > 0).float().mean()))
    finally:
        taps.remove()
    assert torch.equal(model(X), ref(X))


def test_state_is_one_attribute_read_by_one_accessor_and_the_old_names_still_read():
    model, _, sites = _pair("op")
    assert model_state(model).shift is None and "_bnnshift_state" not in model.__dict__  # reading attaches nothing
    insert_shifts(model, sites, {s.name: T for s in sites})
    st = model_state(model)
    assert model.__dict__["_bnnshift_state"] is st and [s.name for s in st.shift.sites] == ["root:sign"]
    assert model._bnnshift_shift is st.shift  # the old name is still readable
    set_state(model, fold_taps=sites)
    assert model._bnnshift_fold_taps is sites
    with pytest.raises(TypeError, match="unknown"):
        set_state(model, shifts={})


def test_a_model_carrying_only_the_old_attributes_is_read_and_migrated():
    """A model object pickled by an older version holds ``_bnnshift_shift`` (no ``_bnnshift_state``)."""
    model, ref, sites = _pair("producer_hook")
    with torch.no_grad():
        plain = model(X)
    insert_shifts(model, sites, {s.name: T for s in sites})
    old = pickle.loads(pickle.dumps(model))
    del old.__dict__["_bnnshift_state"]
    assert set(LEGACY_ATTRS.values()) <= set(old.__dict__)
    assert [s.name for s in shifted_sites(old)] == ["bn:output"] and set(get_thresholds(old)) == {"bn:output"}
    with torch.no_grad():
        assert torch.equal(old(X), ref(X))
        remove_shifts(old)  # written through the one accessor: the old name follows
        assert old._bnnshift_shift is None and model_state(old).shift is None
        assert torch.equal(old(X), plain) and _hooks(old) == 0


def test_fold_drops_one_site_through_the_dispatcher():
    from bnnshift.fold import _drop_site

    model, ref, sites = _pair("pre_hook")
    insert_shifts(model, sites, {s.name: T for s in sites})
    _drop_site(model, sites[0])  # act@0 unshifted, act@1 still shifted
    half = ModuleSite().eval()
    half.load_state_dict({k: v for k, v in model.state_dict().items() if "bnnshift" not in k})
    with torch.no_grad():
        x = half.act(half.lin0(X))
        want = half.head(half.act(half.lin1(x) - T))
        assert torch.equal(model(X), want)
    assert [s.name for s in shifted_sites(model)] == ["act@1"]
