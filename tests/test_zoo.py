"""The first-party zoo (plugins/bnnshift_zoo): every model builds, runs, trains through its
STEs, and its registered counts agree with what actually runs.

Kept fast: ImageNet-style models run at width 1/8 on 32x32.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from bnnshift import registry
from conftest import IMAGENET_STYLE, zoo_quick as build  # tests/ is on sys.path (rootdir conftest)

PAPER_MODELS = [
    "mlp", "lenet5", "vgg-small", "vgg-small-avgpool",
    "resnet20-bireal", "resnet20-bireal-prelu", "resnet20-bireal-leakyrelu",
    "xnor-resnet18", "bireal-resnet18", "bireal-resnet34", "reactnet-a",
]
STYLE_MODELS = [
    "style-torch-sign", "style-tensor-sign", "style-function-ste", "style-detach-ste",
    "style-heaviside", "style-where", "style-scaled", "style-rsign", "style-conv-input",
    "style-control-flow", "style-shared-act", "style-temperature", "style-numpy-scalar",
    "style-hardtanh",
]
ALL_MODELS = PAPER_MODELS + STYLE_MODELS


def binary_layers(model):
    return [m for m in model.modules() if getattr(m, "is_binary_layer", False)]


# ----------------------------------------------------------------------------------------
def test_all_names_registered():
    names = registry.ZOO.names()
    missing = [n for n in ALL_MODELS if n not in names]
    assert not missing, missing


@pytest.mark.parametrize("name", ALL_MODELS)
def test_metadata(name):
    e = registry.ZOO.get(name)
    assert e.name == name and callable(e.factory)
    assert isinstance(e.activation_sites, int) and e.activation_sites >= 1
    assert isinstance(e.weight_binarizers, int) and e.weight_binarizers >= 1
    assert len(e.input_shape) == 3 and e.num_classes == 10
    assert e.description and e.style
    if name.startswith("style-"):
        assert e.input_shape == (1, 28, 28) and e.activation_sites >= 2
    if name in IMAGENET_STYLE:
        assert e.input_shape == (3, 224, 224)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_shape_and_determinism(name):
    model, shape = build(name)
    model.eval()
    x = torch.randn(2, *shape)
    y = model(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    # same seed -> same weights
    again, _ = build(name)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    # every binary layer binarizes its weight once per forward (= weight_binarizers)
    assert len(binary_layers(model)) == registry.ZOO.get(name).weight_binarizers


@pytest.mark.parametrize("name", ALL_MODELS)
def test_gradients_flow_through_stes(name):
    model, shape = build(name)
    model.train()
    torch.manual_seed(1)
    # batch 8, not 2: with 2 samples train-mode BN outputs are exactly +-1 per feature, all
    # inside the STE window, and a BN bias upstream of sign -> linear -> BN then gets an
    # exactly-zero gradient (BN's backward has zero batch mean).
    x, target = torch.randn(8, *shape), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), target).backward()

    def nonzero(p):
        return p.grad is not None and p.grad.abs().sum().item() > 0

    first_binary = binary_layers(model)[0]
    if "no-ste" in registry.ZOO.get(name).tags:
        # torch.sign without STE blocks the gradient: the first binary layer (before the
        # last sign) cannot learn, the head still does. Documents the style, not a bug.
        assert not nonzero(first_binary.weight)
        assert nonzero(model.fc.weight)
        return
    assert nonzero(first_binary.weight), "STE broken: first binary layer gets no gradient"
    dead = [n for n, p in model.named_parameters() if p.requires_grad and not nonzero(p)]
    assert not dead, dead


class BinaryOpRecorder(TorchFunctionMode):
    """Records the output of every binarizing op: torch.sign / Tensor.sign, and optionally
    torch.where with two scalar branches and bool -> float casts (these last two would also
    catch the mask casts inside Bi-Real's BinaryActivation, so they are opt-in)."""

    def __init__(self, where=False, bool_cast=False):
        super().__init__()
        self.where, self.bool_cast, self.outputs = where, bool_cast, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        hit = name == "sign"
        if self.where and name == "where" and len(args) == 3:
            hit = not isinstance(args[1], torch.Tensor) and not isinstance(args[2], torch.Tensor)
        if self.bool_cast and name in ("float", "to", "type") and isinstance(args[0], torch.Tensor):
            hit = args[0].dtype == torch.bool and isinstance(out, torch.Tensor) and out.is_floating_point()
        if hit:
            self.outputs.append(out.detach().clone())
        return out


def record(model, x, **opts):
    rec = BinaryOpRecorder(**opts)
    with torch.no_grad(), rec:
        model(x)
    return rec.outputs


@pytest.mark.parametrize("name", ALL_MODELS)
def test_counts_match_running_binarizers(name):
    """Independent check of the registered counts: run twice on different inputs; a binary
    op whose output changes with the input is an activation site, one whose output does not
    is a weight binarizer. Every activation op must output only two values."""
    entry = registry.ZOO.get(name)
    model, shape = build(name)
    # Fresh BN in eval mode is the identity, and a binary conv on +-1 inputs sums integers:
    # exact zeros, and torch.sign(0) == 0 would make a third value. Random running means
    # (as after training) make exact zeros measure-zero, as they are in a trained model.
    torch.manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
    model.eval()
    opts = {"where": name == "style-where", "bool_cast": name == "style-heaviside"}
    torch.manual_seed(2)
    run1 = record(model, torch.randn(2, *shape), **opts)
    run2 = record(model, torch.randn(2, *shape), **opts)
    assert len(run1) == len(run2)
    act = [a for a, b in zip(run1, run2) if not torch.equal(a, b)]
    weights = [a for a, b in zip(run1, run2) if torch.equal(a, b)]
    alphabet = {0.0, 1.0} if "alphabet-01" in entry.tags else {-1.0, 1.0}
    seen = set()
    for out in act:  # an untrained site may output one value only (e.g. after a ReLU stem)
        values = set(out.unique().tolist())
        assert values <= alphabet, values
        seen |= values
    assert seen == alphabet
    assert len(act) == entry.activation_sites
    assert len(weights) == entry.weight_binarizers


@pytest.mark.parametrize("name", ALL_MODELS)
def test_module_binarizer_calls(name):
    """Forward hooks on the zoo detector's module types: a shared module called at k places
    fires k times. For models whose every activation site is such a module, the number of
    calls is activation_sites; inline/Function styles have none of them (or fewer)."""
    det = registry.DETECTORS.get("bnnshift-zoo")
    det01 = registry.DETECTORS.get("bnnshift-zoo-heaviside")
    types = det.module_types + det01.module_types
    model, shape = build(name)
    calls = []
    for m in model.modules():
        if isinstance(m, types):
            m.register_forward_hook(lambda mod, inp, out: calls.append(mod))
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, *shape))
    inline = {"mlp", "xnor-resnet18", "style-torch-sign", "style-tensor-sign", "style-where",
              "style-conv-input", "style-control-flow", "style-hardtanh"}
    if name in inline:
        assert len(calls) == 0
    else:
        assert len(calls) == registry.ZOO.get(name).activation_sites
    if name in ("reactnet-a", "style-shared-act"):  # shared modules: fewer objects than calls
        assert len({id(m) for m in calls}) < len(calls)


@pytest.mark.parametrize("name,kwargs,shape", [
    ("vgg-small", {"width": 0.25, "input_size": 28, "in_chans": 1}, (1, 28, 28)),
    ("vgg-small-avgpool", {"width": 0.25, "input_size": 28, "in_chans": 1}, (1, 28, 28)),
    ("lenet5", {"input_size": 32, "in_chans": 3}, (3, 32, 32)),
    ("mlp", {"input_size": 32, "in_chans": 3, "width": 0.25}, (3, 32, 32)),
    ("xnor-resnet18", {"width": 0.125, "in_chans": 1}, (1, 28, 28)),
    ("bireal-resnet18", {"width": 0.125, "in_chans": 1}, (1, 28, 28)),
    ("bireal-resnet34", {"width": 0.125, "in_chans": 1}, (1, 28, 28)),
    ("reactnet-a", {"width": 0.125, "in_chans": 1}, (1, 28, 28)),
    ("resnet20-bireal", {"width": 0.25, "in_chans": 1}, (1, 28, 28)),
    ("style-numpy-scalar", {"input_size": 32, "in_chans": 3}, (3, 32, 32)),
    ("resnet20-bireal-leakyrelu", {"width": 0.25, "slope": 0.5, "num_classes": 7}, (3, 32, 32)),
])
def test_other_input_shapes(name, kwargs, shape):
    torch.manual_seed(0)
    model = registry.ZOO.get(name).factory(**kwargs).eval()
    y = model(torch.randn(2, *shape))
    assert y.shape == (2, kwargs.get("num_classes", 10)) and torch.isfinite(y).all()


def test_style_specifics():
    from bnnshift_zoo import models_styles as S

    # style-temperature: k lives in a buffer and the training loop can change it
    model, _ = build("style-temperature")
    assert "block1.act.k" in dict(model.named_buffers())
    model.set_temperature(5.0)
    assert model.block2.act.k.item() == 5.0

    # style-where: sign(0) = +1; style-heaviside: alphabet {0, 1}
    assert S.where_sign(torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]
    assert S.HeavisideSTE()(torch.tensor([-2.0, 0.0, 3.0])).tolist() == [0.0, 0.0, 1.0]

    # style-control-flow: the guarded block really breaks plain fx tracing
    model, _ = build("style-control-flow")
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model.block1)

    # leakyrelu slope is configurable
    model, _ = build("resnet20-bireal-leakyrelu", slope=0.75)
    slopes = {m.negative_slope for m in model.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.75}


def test_detectors_registered():
    names = registry.DETECTORS.names()
    for n in ("bireal", "reactnet", "xnor-net", "binarynet", "larq-like", "bnnshift-zoo"):
        assert n in names
    zoo = registry.DETECTORS.get("bnnshift-zoo")
    assert zoo.module_types and "SignSTE" in zoo.class_names
    assert "BinaryActivation" in registry.DETECTORS.get("bireal").class_names
    assert "HeavisideSTE" in registry.DETECTORS.get("bnnshift-zoo-heaviside").class_names


@pytest.mark.parametrize("kw", [{"functions": (torch.autograd.Function,)}, {"alphabet": "{0,1}"},
                                {"functions": (torch.autograd.Function,), "alphabet": "{-1,+1}"}])
def test_detector_fields_never_read_warn_and_are_not_kept(kw):
    """issue 23 item 7: Detector.functions / .alphabet were documented but never read."""
    with pytest.warns(DeprecationWarning, match="ignored"):
        d = registry.Detector(name="old-plugin", module_types=(nn.Identity,), **kw)
    assert d.module_types == (nn.Identity,) and not hasattr(d, "functions") and not hasattr(d, "alphabet")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        registry.Detector("new-plugin", (nn.Identity,), None, ("X",))  # positional order unchanged


def _zoo_binarizers():
    from bnnshift_zoo import layers as L
    from bnnshift_zoo import models_styles as S

    return [
        ("SignActivation", L.SignActivation()),
        ("BinaryActivation", L.BinaryActivation()),
        ("StraightThroughSign", S.StraightThroughSign()),
        ("ApproxSign", S.ApproxSign()),
        ("HeavisideSTE", S.HeavisideSTE()),
        ("ScaledSign-learnable", S.ScaledSign("learnable")),
        ("ScaledSign-mean", S.ScaledSign("mean")),
        ("RSign", S.RSign(3)),
        ("TemperatureSign", S.TemperatureSign()),
        ("SignSTE", L.SignSTE.apply),
        ("BinActive", L.BinActive.apply),
        ("where_sign", S.where_sign),
    ]


@pytest.mark.parametrize("name,fn", _zoo_binarizers(), ids=[n for n, _ in _zoo_binarizers()])
def test_each_binarizer_has_an_ste(name, fn):
    """Per-binarizer check: in residual models (Bi-Real, ReActNet) every parameter still gets
    a gradient through the real shortcuts even if a sign had no STE, so the model-level
    gradient test cannot catch a dead STE there; this one can."""
    x = (torch.rand(2, 3, 4, 4) * 1.6 - 0.8).requires_grad_()  # inside every STE window
    y = fn(x)
    assert len(torch.unique(y.detach()[0])) == 2  # per sample: ScaledSign-mean scales per sample
    (g,) = torch.autograd.grad(y.sum(), x)
    assert (g != 0).float().mean() > 0.9, name
    far = torch.full((1, 3, 1, 1), 5.0, requires_grad=True)  # outside: grad cancelled
    if name not in ("ScaledSign-mean", "TemperatureSign"):  # mean|x| / tanh: never exactly 0
        (g_far,) = torch.autograd.grad(fn(far).sum(), far)
        assert g_far.abs().max() == 0, name
