"""One vocabulary (issue 23, item 3): the str enums of bnnshift.vocab are their JSON strings, so
--json payloads, patch.json and journal hashes read the same; renamed public names keep working
through the one table bnnshift._compat.RENAMED, with a DeprecationWarning."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
import warnings

import pytest

from bnnshift import _compat
from bnnshift.sites import ScanReport, Site
from bnnshift.vocab import HookMode, Schedule, SiteKind

ENUMS = [SiteKind, HookMode, Schedule]
MEMBERS = [m for e in ENUMS for m in e]


@pytest.mark.parametrize("m", MEMBERS, ids=lambda m: f"{type(m).__name__}.{m.name}")
def test_a_member_is_its_json_string(m):
    v = m.value
    assert m == v and v == m and hash(m) == hash(v)
    assert {v: 1}[m] == 1 and {m: 1}[v] == 1  # a dict keyed by either finds the other
    assert str(m) == v and f"{m}" == v and f"{m:>12}" == f"{v:>12}" and "%s" % m == v
    assert json.dumps(m) == json.dumps(v) and json.dumps({m: [m]}) == json.dumps({v: [v]})
    assert type(m).parse(v) is m and type(m).coerce(v) is m


def test_parse_names_the_choices_and_coerce_keeps_an_unknown_string():
    with pytest.raises(ValueError, match="one of: module, input, inline, hardtanh"):
        SiteKind.parse("modules")
    assert SiteKind.coerce("a-newer-kind") == "a-newer-kind"


@pytest.mark.parametrize("kind", list(SiteKind))
@pytest.mark.parametrize("apply", list(HookMode))
def test_site_kind_and_hook_mode_round_trip_the_scan_payload(kind, apply):
    site = Site(name="act", kind=kind, op="sign", apply=apply, module="act", own_threshold={"mean": 0.25},
                bias_sign=-1)
    report = ScanReport(model="m", input_shape=(3, 8, 8), sites=[site], weight_binarizers=0, leaves=[])
    text = json.dumps(report.to_json())
    d = json.loads(text)["sites"][0]
    assert d["kind"] == kind.value and d["apply"] == apply.value
    assert f'"kind": "{kind.value}"' in text and f'"apply": "{apply.value}"' in text
    back = Site.from_json(d)
    assert back == site and back.kind is kind and back.apply is apply
    assert json.dumps(back.to_json()) == json.dumps(site.to_json())


def test_site_json_keys_are_unchanged_by_the_rename():
    """The glossary's field names in the code, the old keys (and order) in files: a patch.json or a
    --json payload written before reads the same."""
    s = Site(name="a", kind=SiteKind.MODULE, op="sign", apply=HookMode.PRE_HOOK, own_threshold={"mean": 1.0},
             bias_sign=1)
    keys = list(s.to_json())
    assert "threshold" in keys and "fold_sign" in keys
    assert "own_threshold" not in keys and "bias_sign" not in keys
    assert keys[keys.index("follower_slope") + 1] == "threshold"
    assert keys[keys.index("fold_with") + 1] == "fold_sign"
    old = {"name": "a", "kind": "input", "op": "sign", "apply": "op", "threshold": {"mean": -2.0}, "fold_sign": -1,
           "a_key_from_a_newer_version": 1}
    back = Site.from_json(old)
    assert back.own_threshold == {"mean": -2.0} and back.bias_sign == -1 and back.apply is HookMode.OP


def test_schedule_leaves_the_journal_hash_and_config_json_unchanged():
    from bnnshift.search import SearchConfig

    kw = dict(model="zoo:mlp", data="synthetic", model_args={"width": 0.25}, train_limit=256, batch_size=64, steps=4)
    as_str = SearchConfig(schedule="halving", **kw)
    as_enum = SearchConfig(schedule=Schedule.HALVING, **kw)
    assert json.dumps(as_enum.to_json(), sort_keys=True) == json.dumps(as_str.to_json(), sort_keys=True)
    h = dict(data_fingerprint="fp", input_shape=(1, 28, 28))
    assert as_enum.config_hash(**h) == as_str.config_hash(**h)
    import bnnshift.validate as validate
    from bnnshift.search.schedule import Schedule as from_search

    assert from_search is Schedule and validate.SCHEDULES == ("full", "halving")


def test_scanned_sites_carry_the_enums():
    """A scan's sites hold the enums (the branches compare members) and its payload the strings."""
    import torch
    from models import SmallBNN

    from bnnshift.scan import scan_model

    torch.manual_seed(0)
    report = scan_model(SmallBNN().eval(), SmallBNN.SHAPE)
    assert len(report.sites) == 2
    assert all(isinstance(s.kind, SiteKind) and isinstance(s.apply, HookMode) for s in report.sites)
    d = json.loads(json.dumps(report.to_json()))
    assert {x["kind"] for x in d["sites"]} == {s.kind.value for s in report.sites}
    assert all(type(x["kind"]) is str and type(x["apply"]) is str for x in d["sites"])


# ------------------------------------------------------------------------------ the alias table

def _owner(owner: str):
    mod, _, name = owner.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), name)
    except ModuleNotFoundError:  # module.Class
        mod2, _, cls = mod.rpartition(".")
        return getattr(getattr(importlib.import_module(mod2), cls), name)


@pytest.mark.parametrize("owner,old,new", _compat.RENAMED, ids=[f"{o}:{a}" for o, a, _ in _compat.RENAMED])
def test_every_row_of_the_alias_table_resolves(owner, old, new):
    obj = _owner(owner)
    if isinstance(obj, type):
        assert new in obj.__dataclass_fields__ or hasattr(obj, new)
        assert isinstance(getattr(obj, old), property)
    else:
        import inspect

        params = inspect.signature(obj).parameters
        assert new in params and old not in params


def test_old_site_attributes_warn_and_forward():
    s = Site(name="a", kind=SiteKind.MODULE, op="sign", apply=HookMode.PRE_HOOK)
    with pytest.warns(DeprecationWarning, match="'fold_sign' is renamed 'bias_sign'"):
        s.fold_sign = -1
    assert s.bias_sign == -1
    s.own_threshold = {"mean": 0.5}
    with pytest.warns(DeprecationWarning, match="'threshold' is renamed 'own_threshold'"):
        assert s.threshold == {"mean": 0.5}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new names say nothing
        assert s.bias_sign == -1 and s.own_threshold["mean"] == 0.5


def test_fold_delta_old_keyword_warns_and_gives_the_same_delta():
    import torch

    from bnnshift.shift import fold_delta

    t, b = torch.tensor([0.5, -0.25]), torch.zeros(2)
    with pytest.warns(DeprecationWarning, match="'direction' is renamed 'bias_sign'"):
        old = fold_delta(t, b, direction=-1)
    assert torch.equal(old, fold_delta(t, b, bias_sign=-1)) and torch.equal(old, t)
    with pytest.raises(TypeError, match="both"):
        fold_delta(t, b, direction=1, bias_sign=1)


def test_a_table_row_whose_new_name_is_missing_is_refused(monkeypatch):
    from dataclasses import dataclass

    monkeypatch.setattr(_compat, "RENAMED", ((f"{__name__}.Thing", "old", "nowhere"),))

    @dataclass
    class Thing:
        here: int = 0

    Thing.__qualname__ = "Thing"
    with pytest.raises(TypeError, match="no attribute 'nowhere'"):
        _compat.alias_attributes(Thing)


def test_vocab_and_compat_are_torch_free():
    code = "import sys, bnnshift.vocab, bnnshift._compat; print('torch' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stderr[-500:]
