"""scan: counts per zoo model, JSON schema, the FX trap, leaves, data statistics."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnnshift.registry import ZOO
from bnnshift.scan import scan_model
from bnnshift.shift import insert_shifts

from conftest import zoo_small
from models import SignSTE

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "scan.schema.json").read_text())


@pytest.mark.parametrize("name", ZOO.names())
def test_zoo_model_scans_to_its_known_counts(name):
    entry = ZOO.get(name)
    model, shape = zoo_small(name)
    report = scan_model(model, shape, name=name)
    assert report.num_sites == entry.activation_sites
    assert report.weight_binarizers == entry.weight_binarizers
    names = [s.name for s in report.sites]
    assert len(set(names)) == len(names), "site names must be unique per call site"
    assert all(s.fired and s.binary_checked for s in report.sites), [s.name for s in report.sites if not s.fired]
    jsonschema.validate(json.loads(json.dumps(report.to_json())), SCHEMA)


def test_context_of_vgg_small_matches_its_architecture():
    model, shape = zoo_small("vgg-small")
    report = scan_model(model, shape)
    pools = [s.pool for s in report.sites]
    # MaxPool after the 2nd and 4th conv: the sites after them are the 2nd and 4th
    assert pools == [None, "MaxPool", None, "MaxPool", None]
    assert all(s.producer == "BatchNorm" and s.foldable and s.foldable.startswith("bn:") for s in report.sites)
    assert any("t >= 0" in a for a in report.sites[1].advice)
    avg = scan_model(zoo_small("vgg-small-avgpool")[0], shape)
    assert [s.pool for s in avg.sites] == [None, "AvgPool", None, "AvgPool", None]


def test_prelu_and_leakyrelu_followers_and_residual_producer():
    r = scan_model(*zoo_small("resnet20-bireal-prelu"))
    assert all(s.follower == "PReLU" for s in r.sites)
    assert any("claim 8" in a for a in r.sites[0].advice)
    plain = scan_model(*zoo_small("resnet20-bireal"))
    assert all(s.follower is None for s in plain.sites)
    assert plain.sites[1].producer == "residual add" and plain.sites[1].foldable is None
    leaky_model = ZOO.get("resnet20-bireal-leakyrelu").factory(width=0.25, slope=0.5)
    leaky = scan_model(leaky_model, (3, 32, 32))
    assert {(s.follower, s.follower_slope) for s in leaky.sites} == {("LeakyReLU", 0.5)}


def test_shared_activation_module_gives_one_site_per_call():
    r = scan_model(*zoo_small("reactnet-a"))
    first_block = [s for s in r.sites if s.module == "feature.0.binary_activation"]
    assert [s.call_index for s in first_block] == [0, 1]
    assert first_block[0].name != first_block[1].name


def test_learnable_bias_is_reported_as_existing_threshold():
    r = scan_model(*zoo_small("style-rsign"))
    assert all(s.own_threshold is not None and s.foldable and s.foldable.startswith("bias:") for s in r.sites)


def test_heaviside_alphabet():
    r = scan_model(*zoo_small("style-heaviside"))
    assert {s.alphabet for s in r.sites} == {"{0,1}"}


def test_control_flow_block_and_conv_input_binarizer_are_found_with_leaves():
    model, shape = zoo_small("style-control-flow")
    r = scan_model(model, shape)
    assert r.leaves, "the block with Python control flow must become a leaf"
    assert r.num_sites == ZOO.get("style-control-flow").activation_sites
    kinds = {s.kind for s in r.sites}
    assert "input" in kinds, "the binarizer inside a conv's forward must be found"
    assert any(s.in_leaf for s in r.sites), "the binarizer inside the leaf must still yield a site"


# --------------------------------------------------------------------------- the FX trap


class _FnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(SignSTE.apply(self.bn(self.fc1(x))))


def test_plain_fx_loses_the_ste_gradient_and_bnnshift_does_not():
    torch.manual_seed(0)
    model = _FnNet()
    x = torch.randn(32, 8)

    def grad_of_fc1(m):
        m.zero_grad()
        m(x).pow(2).sum().backward()
        return m.fc1.weight.grad.clone()

    eager = grad_of_fc1(model)
    assert eager.abs().sum() > 0
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))  # the trap, measured
    traced_grad = grad_of_fc1(traced)
    assert torch.count_nonzero(traced_grad) == 0, "plain FX inlines apply: the STE gradient vanishes"

    report = scan_model(model, (8,))
    assert report.num_sites == 1 and report.sites[0].op == "SignSTE.apply"
    patched = insert_shifts(copy.deepcopy(model), report.sites, {s.name: 0.0 for s in report.sites})
    patched_grad = grad_of_fc1(patched)
    assert torch.equal(patched_grad, eager)


def test_scan_with_data_measures_plus_fraction_and_preactivation():
    model, shape = zoo_small("vgg-small")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, *shape, generator=g) + 0.5 for _ in range(2)]
    # calibrate BN on these batches, as after training: BN then centres on the mean
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for xb in batches:
            model(xb)
    r = scan_model(model, shape, batches=batches, data_name="test")
    for s in r.sites:
        assert 0.0 <= s.plus_fraction <= 1.0
        assert set(s.preact) == {"mean", "median", "std", "skew", "min", "max"}
        assert s.preact["min"] < s.preact["median"] < s.preact["max"]
    # MaxPool skews the pre-activation: mean above median after BN (paper Fig. 4)
    after_pool = [s for s in r.sites if s.pool == "MaxPool"]
    assert after_pool and all(s.preact["mean"] > s.preact["median"] for s in after_pool)
    assert all(s.plus_fraction < 0.5 for s in after_pool), "more -1 than +1 after MaxPool"


def test_model_without_binary_activation_raises_no_sites():
    from bnnshift.errors import NoSitesError

    with pytest.raises(NoSitesError):
        scan_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), (4,), require_sites=True)


@pytest.mark.parametrize("name", ["vgg-small", "xnor-resnet18", "reactnet-a", "style-scaled", "style-temperature",
                                  "style-detach-ste", "style-heaviside", "style-control-flow", "bireal-resnet18"])
def test_detection_does_not_depend_on_the_zoo_detectors(name, monkeypatch):
    """The zoo's detectors name its classes; scan must find the same sites without them."""
    from bnnshift import registry

    monkeypatch.setattr(registry, "binarizer_module_types", lambda: ())
    monkeypatch.setattr(registry.DETECTORS, "_items", {})
    model, shape = zoo_small(name)
    report = scan_model(model, shape)
    entry = ZOO.get(name)
    assert (report.num_sites, report.weight_binarizers) == (entry.activation_sites, entry.weight_binarizers)


class _PointBinLinear(nn.Linear):
    def forward(self, x):
        return nn.functional.linear(SignSTE.apply(x), SignSTE.apply(self.weight), self.bias)


class _PointNetLike(nn.Module):
    """Points folded into the batch, (B*N, C), and a Python loop over the batch: not traceable (case 22).
    The head has 5 outputs: its weight's dim 0 equals the probe batch size."""

    def __init__(self):
        super().__init__()
        self.fc0 = nn.Linear(3, 16)
        self.bn0 = nn.BatchNorm1d(16)
        self.lin = _PointBinLinear(16, 32)
        self.bn1 = nn.BatchNorm1d(32)
        self.head = _PointBinLinear(32, 5)

    def forward(self, x):
        h = torch.cat([x[i].t() for i in range(x.shape[0])], 0)
        h = nn.functional.hardtanh(self.bn0(self.fc0(h)))
        h = nn.functional.hardtanh(self.bn1(self.lin(h)))
        return self.head(h.view(x.shape[0], x.shape[2], -1).mean(1))


def test_sites_follow_the_data_flow_not_the_batch_layout():
    """A binarizer input that depends on the model input is an activation, whatever its dim 0."""
    report = scan_model(_PointNetLike(), (3, 64))
    assert not report.traced
    assert [s.name for s in report.sites] == ["lin:input", "head:input"]
    assert report.weight_binarizers == 2
    assert all(s.fired and s.binary_checked for s in report.sites)


class _SignLinear(nn.Linear):
    def forward(self, x):
        w = self.weight
        return nn.functional.linear(x, (torch.sign(w) - w).detach() + w)


class _NoBNBinaryMLP(nn.Module):
    """The second sign reads an even integer (a sum of 16 products of +-1): exact zeros (case 09)."""

    def __init__(self):
        super().__init__()
        self.fc_in = nn.Linear(12, 16)
        self.bin1 = _SignLinear(16, 16, bias=False)
        self.fc_out = nn.Linear(16, 3)

    def forward(self, x):
        x = self.fc_in(x.flatten(1))
        x = self.bin1((torch.sign(x) - x).detach() + x)
        x = (torch.sign(x) - x).detach() + x
        return self.fc_out(x)


def test_ternary_sign_site_reports_its_zero_share_and_names_say_where():
    torch.manual_seed(0)
    report = scan_model(_NoBNBinaryMLP(), (12,), batches=[torch.randn(256, 12)])
    first, second = report.sites
    # named after the module whose output they binarize, not an FX node name like root:sign_1
    assert (first.name, second.name) == ("fc_in:output", "bin1:output")
    assert first.zero_fraction == 0.0 and first.alphabet == "{-1,+1}"
    assert 0.05 < second.zero_fraction < 0.5 and second.alphabet == "{-1,0,+1}"
    assert any("bin1:output" in w and "ternary" in w for w in report.warnings)
    names = {s.name for s in report.sites}
    assert not any("root:" in w or "sign_" in w for w in report.warnings), report.warnings
    assert all(w.split(" ")[1].rstrip(":") in names for w in report.warnings if w.startswith("site "))


class _PlainSignConv(nn.Conv2d):
    def __init__(self, *a, ste: bool = False, **k):
        super().__init__(*a, **k)
        self.ste = ste

    def forward(self, x):
        xb = SignSTE.apply(x) if self.ste else torch.sign(x)
        return nn.functional.conv2d(xb, SignSTE.apply(self.weight), None, self.stride, self.padding)


class _NoSteNet(nn.Module):
    def __init__(self, ste: bool):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = _PlainSignConv(8, 8, 3, padding=1, bias=False, ste=ste)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.bn1(self.conv1(self.bn0(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def test_a_site_without_ste_is_flagged_with_the_layers_that_cannot_learn():
    bad = scan_model(_NoSteNet(ste=False), (1, 8, 8))
    good = scan_model(_NoSteNet(ste=True), (1, 8, 8))
    assert [s.gradient for s in bad.sites] == [False]
    assert [s.gradient for s in good.sites] == [True]
    msg = [w for w in bad.warnings if "no gradient reaches conv1:input" in w]
    assert len(msg) == 1 and "stem.weight" in msg[0] and "bn0.weight" in msg[0] and "fc.weight" not in msg[0]
    assert not any("no gradient" in w for w in good.warnings)


def test_a_brevitas_binary_activation_is_exactly_one_site():
    """brevitas wraps one binarization in five modules and computes constant scales: one site, the user's module."""
    from brevitas.nn import QuantIdentity, QuantLinear
    from brevitas.quant.binary import SignedBinaryActPerTensorConst, SignedBinaryWeightPerTensorConst

    from bnnshift.patch import patch_model

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(20, 32)
            self.bn1 = nn.BatchNorm1d(32)
            self.act1 = QuantIdentity(act_quant=SignedBinaryActPerTensorConst)
            self.fc2 = QuantLinear(32, 10, bias=False, weight_quant=SignedBinaryWeightPerTensorConst)

        def forward(self, x):
            return self.fc2(self.act1(self.bn1(self.fc1(x))))

    torch.manual_seed(0)
    model = Net().eval()
    report = scan_model(model, (20,))
    assert [(s.name, s.kind, s.alphabet) for s in report.sites] == [("act1", "module", "{-1,+1}")]
    assert report.sites[0].gradient is True
    # its binary weight quantizer (proxy > tensor_quant: clamp, sign, scale > delay_wrapper(x, y) -> y)
    # is exactly one weight binarizer, as the activation is one site
    assert report.weight_binarizers == 1
    x = torch.randn(8, 20)
    plain = copy.deepcopy(model)  # the reference: the patched model's bn1 now reads beta - t (shift_into)
    patch_model(model, report, 0.5)
    with torch.no_grad():
        got = model(x)
        h = torch.where(plain.bn1(plain.fc1(x)) - 0.5 >= 0, 1.0, -1.0)
        want = plain.fc2(h)
    assert torch.allclose(got, want, atol=1e-6)


def test_brevitas_binary_conv_weights_count_one_each():
    """Two brevitas binary conv layers (weights and activations): 2 weight binarizers, 2 sites."""
    from brevitas.nn import QuantConv2d, QuantIdentity
    from brevitas.quant.binary import SignedBinaryActPerTensorConst, SignedBinaryWeightPerTensorConst

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 8, 3, padding=1)
            self.bn0 = nn.BatchNorm2d(8)
            self.act1 = QuantIdentity(act_quant=SignedBinaryActPerTensorConst)
            self.conv1 = QuantConv2d(8, 8, 3, padding=1, bias=False, weight_quant=SignedBinaryWeightPerTensorConst)
            self.bn1 = nn.BatchNorm2d(8)
            self.act2 = QuantIdentity(act_quant=SignedBinaryActPerTensorConst)
            self.conv2 = QuantConv2d(8, 8, 3, padding=1, bias=False, weight_quant=SignedBinaryWeightPerTensorConst)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = self.bn1(self.conv1(self.act1(self.bn0(self.stem(x)))))
            return self.fc(self.conv2(self.act2(x)).mean((2, 3)))

    torch.manual_seed(0)
    report = scan_model(Net().eval(), (1, 8, 8))
    assert [s.name for s in report.sites] == ["act1", "act2"]
    assert report.weight_binarizers == 2


class _PassThrough(nn.Module):
    """brevitas' DelayWrapper: returns its second argument (the binarization made before it)."""

    def forward(self, x, y):
        return y


class _QuantWeight(nn.Module):
    """A weight quantizer that calls sign and a scaling, then hands the result to an inner module
    that passes it through: one weight binarization."""

    def __init__(self):
        super().__init__()
        self.delay = _PassThrough()

    def forward(self, w):
        wc = w.clamp(-0.05, 0.05)  # brevitas clamps first: the inner module sees other values
        y = torch.sign(wc) * w.abs().mean()
        return self.delay(wc, y)


class _QuantLinear(nn.Linear):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.quant = _QuantWeight()

    def forward(self, x):
        return F.linear(x, self.quant(self.weight), self.bias)


def test_a_module_passing_a_binarization_through_is_not_another_binarizer():
    """The same kind as brevitas without brevitas: sign + scale in the quantizer, and a module that
    returns its second argument; 2 binary layers -> 2 weight binarizers; the activation quantizer
    written the same way is one site."""

    class Act(nn.Module):
        def __init__(self):
            super().__init__()
            self.delay = _PassThrough()

        def forward(self, x):
            xc = x.clamp(-1, 1)
            return self.delay(xc, torch.sign(xc))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(12, 16)
            self.bn1 = nn.BatchNorm1d(16)
            self.act = Act()
            self.fc2 = _QuantLinear(16, 16)
            self.fc3 = _QuantLinear(16, 3)

        def forward(self, x):
            return self.fc3(self.fc2(self.act(self.bn1(self.fc1(x)))))

    torch.manual_seed(0)
    report = scan_model(Net().eval(), (12,))
    assert [s.name for s in report.sites] == ["act"]
    assert report.weight_binarizers == 2


def test_a_constant_compare_or_scale_is_not_a_site():
    """Outputs constant on real inputs (a mask that is always true, a constant scale) do not binarize."""

    class ConstScale(nn.Module):
        def forward(self, x):
            return torch.ones(1) * 0.5 + 0 * x.mean()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(12, 16)
            self.bn = nn.BatchNorm1d(16)
            self.scale = ConstScale()
            self.fc2 = nn.Linear(16, 3)

        def forward(self, x):
            h = self.bn(self.fc1(x))
            valid = (h.abs() >= 0).float()  # a compare with 0 that is always true: a mask, not a binarizer
            s = self.scale(h)
            return self.fc2(torch.sign(h) * valid * s)

    report = scan_model(Net(), (12,))
    assert [s.name for s in report.sites] == ["bn:output"]
    assert report.weight_binarizers == 0


def test_a_recipe_written_with_the_old_fx_site_names_still_loads(tmp_path):
    """Names are labels: a patch.json whose inline sites carry the old names (root:sign, root:sign_1)
    rebuilds the same patched model."""
    from bnnshift.patch import build_recipe, load_patched, patch_model, save_patched

    model, shape = zoo_small("mlp")
    report = scan_model(model, shape)
    assert [s.name for s in report.sites] == ["bn1:output", "bn2:output"]
    patch_model(model, report, 0.5)
    recipe = build_recipe(model, spec={"kind": "zoo", "target": "mlp", "args": {"width": 0.25}}, input_shape=shape)
    out = save_patched(model, recipe, tmp_path / "new")
    data = json.loads((out / "patch.json").read_text())
    for d, old in zip(data["sites"], ["root:sign", "root:sign_1"]):
        d["name"] = old
    (out / "patch.json").write_text(json.dumps(data))
    again = load_patched(out, verify_hash=False)
    x = torch.randn(8, *shape)
    model.eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
