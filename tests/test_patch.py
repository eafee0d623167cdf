"""bnnshift.patch and the `patch` CLI: zero shift is the identity (bitwise, outputs and gradients),
a positive shift lowers the +1 share and keeps every gradient, the artifact rebuilds in a fresh
process, config precedence, and one-line errors without partial output."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from bnnshift import registry
from bnnshift.errors import NoSitesError, PatchError, UsageError
from bnnshift.patch import (ShiftConfig, apply_recipe, build_recipe, load_patched, patch_model, read_recipe,
                            save_patched)
from bnnshift.probe import probe_sites
from bnnshift.scan import scan_model
from bnnshift.shift import get_thresholds, threshold_key
from conftest import zoo_quick as build, zoo_quick_args as small  # tests/ is on sys.path (rootdir conftest)
from models import invoke

NAMES = registry.ZOO.names()
# Bi-Real units: gradients equal up to summation order only (see test_zero_shift_is_bitwise_identity)
REASSOCIATED = {"bireal-resnet18", "bireal-resnet34", "resnet20-bireal", "resnet20-bireal-prelu",
                "resnet20-bireal-leakyrelu"}


@functools.lru_cache(maxsize=None)
def report_of(name):
    model, shape = build(name)
    return scan_model(model, shape, name=name)


def data(shape, n=4, seed=1):
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def grads(model):
    return {k: (None if p.grad is None else p.grad.clone()) for k, p in model.named_parameters()}


def calibrate_bn(model, shape):
    """Running statistics from two random batches (as after training, BN re-centres)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for seed in (11, 12):
            model(data(shape, n=16, seed=seed))
    model.eval()


def run_train_step(model, x):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    w = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out * w).sum().backward()
    return out.detach()


# ------------------------------------------------------------------------------ every zoo model


@pytest.mark.parametrize("name", NAMES)
def test_zero_shift_is_bitwise_identity(name):
    rep = report_of(name)
    assert rep.sites, name
    orig, shape = build(name)
    patched, _ = build(name)
    patch_model(patched, rep, 0.0)
    x = data(shape)
    y0, y1 = run_train_step(orig, x), run_train_step(patched, x)
    assert torch.equal(y0, y1)
    g0, g1 = grads(orig), grads(patched)
    assert set(g0) == set(g1)
    for k in g0:
        assert (g0[k] is None) == (g1[k] is None), k
        if g0[k] is None:
            continue
        if name in REASSOCIATED:
            # the binarizer reads the residual stream several times and the shortcut reads it
            # too: the new (x - 0) node sums the binarizer's gradient contributions before they
            # join the shortcut's, a different floating-point summation order (docs/patch.md)
            scale = g0[k].abs().max().clamp_min(1e-12)
            assert ((g0[k] - g1[k]).abs().max() / scale) < 1e-5, k
        else:
            assert torch.equal(g0[k], g1[k]), k
    orig.eval(), patched.eval()
    with torch.no_grad():
        assert torch.equal(orig(x), patched(x))


SLOW = {"bireal-resnet34", "bireal-resnet18", "reactnet-a", "xnor-resnet18", "resnet20-bireal",
        "resnet20-bireal-prelu", "resnet20-bireal-leakyrelu"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in NAMES])
def test_unit_shift_lowers_plus_share_and_keeps_gradients(name):
    """t = 1 at every site. Each site's +1 share is compared with the same site at t = 0 while
    every other site keeps t = 1 (same upstream): the shift alone must lower it. Downstream
    shares of a random-init model can rise (BN running stats do not re-centre), so the
    comparison is per site."""
    rep = report_of(name)
    orig, shape = build(name)
    patched, _ = build(name)
    calibrate_bn(patched, shape)  # random-init running stats would leave pre-activations on an integer grid
    patch_model(patched, rep, 1.0)
    x = data(shape, n=4, seed=2)
    thresholds = get_thresholds(patched)
    sites = rep.sites
    if len(sites) > 4:  # first, last and two between: per-site probes are the slow part
        sites = [sites[0], sites[len(sites) // 3], sites[2 * len(sites) // 3], sites[-1]]
    for s in sites:
        b = probe_sites(patched, [s], [x], update=False)[s.name]["plus_fraction"]
        with torch.no_grad():
            thresholds[s.name].fill_(0.0)
        a = probe_sites(patched, [s], [x], update=False)[s.name]["plus_fraction"]
        with torch.no_grad():
            thresholds[s.name].fill_(1.0)
        assert a is not None and b is not None, s.name
        assert b < a or a == 0.0, (s.name, a, b)
    run_train_step(orig, x)
    run_train_step(patched, x)
    g0, g1 = grads(orig), grads(patched)
    top = max(g.abs().max() for g in g0.values() if g is not None)
    for k, g in g0.items():
        # "had a gradient": above float noise (a scale in front of a train-mode BN gets ~1e-9)
        if g is not None and g.abs().max() > 1e-6 * top:
            assert g1[k] is not None and g1[k].abs().sum() > 0, k


# ------------------------------------------------------------------------------ STE and trainable


@pytest.mark.parametrize("name,param", [("style-function-ste", "block1.bn.weight"),
                                        ("style-function-ste", "stem.weight"),
                                        ("xnor-resnet18", "layers.0.bn1.weight")])
def test_function_ste_gradient_reaches_weights_before_site(name, param):
    rep = report_of(name)
    orig, shape = build(name)
    patched, _ = build(name)
    patch_model(patched, rep, 0.0)
    x = data(shape)
    run_train_step(orig, x)
    run_train_step(patched, x)
    g0 = dict(orig.named_parameters())[param].grad
    g1 = dict(patched.named_parameters())[param].grad
    assert g0 is not None and g0.abs().sum() > 0
    assert torch.equal(g0, g1)


@pytest.mark.parametrize("per_channel", [False, True])
def test_trainable_threshold_gets_gradient(per_channel):
    rep = report_of("vgg-small")
    model, shape = build("vgg-small")
    patch_model(model, rep, 0.5, trainable=True, per_channel=per_channel)
    th = get_thresholds(model)
    assert all(isinstance(t, nn.Parameter) for t in th.values())
    assert all(torch.all(t == 0.5) for t in th.values())
    names = {n for n, _ in model.named_parameters()}
    assert {threshold_key(s) for s in rep.sites} <= names
    run_train_step(model, data(shape))
    for name, t in th.items():
        assert t.grad is not None and t.grad.abs().sum() > 0, name
        assert t.grad.shape == t.shape


def test_state_dict_keys_preserved():
    rep = report_of("style-shared-act")
    orig, _ = build("style-shared-act")
    patched, _ = build("style-shared-act")
    patch_model(patched, rep, 0.3)
    k0, k1 = set(orig.state_dict()), set(patched.state_dict())
    assert k0 <= k1
    assert k1 - k0 == {threshold_key(s) for s in rep.sites}
    assert len(k1 - k0) == 3  # one threshold per call site of the shared module


class _Sign(nn.Module):
    def forward(self, x):
        return torch.sign(x)


class _WhereSign(nn.Module):
    def forward(self, x):
        return torch.where(x >= 0, 1.0, -1.0)


@pytest.mark.parametrize("act,at_t", [(_Sign, 0.0), (_WhereSign, 1.0)])
def test_sign_zero_convention_preserved(act, at_t):
    """At x == t the patched model gives what the model's own binarizer gives at 0."""
    model = nn.Sequential(nn.Identity(), act())
    rep = scan_model(model, (6,))
    assert len(rep.sites) == 1
    patch_model(model, rep, 0.5)
    x = torch.tensor([[0.5, 0.4, 0.6, -1.0, 2.0, 0.5]])
    y = model(x)
    assert y[0, 0] == at_t and y[0, 5] == at_t
    assert y[0, 1:5].tolist() == [-1.0, 1.0, -1.0, 1.0]


# ------------------------------------------------------------------------------ config


def _sites(names_kinds):
    from bnnshift.sites import Site

    return [Site(name=n, kind=k, op="sign", apply="pre_hook", module=n) for n, k in names_kinds]


def test_config_precedence_and_exclude():
    sites = _sites([("layer1.act", "module"), ("layer2.act", "module"), ("layer2.conv:input", "input"),
                    ("root:sign", "inline")])
    cfg = ShiftConfig(shift=0.1, kinds={"input": 0.2}, patterns={"layer2.*": 0.3, "re:layer2\\.c.*": 0.4},
                      names={"layer1.act": 0.5}, exclude=["root:*"])
    assert cfg.resolve(sites) == {"layer1.act": 0.5, "layer2.act": 0.3, "layer2.conv:input": 0.4}


def test_config_to_json_round_trips():
    """``to_json`` (what patch.json records) reads back through ``from_mapping`` to the same config
    and the same resolution, pattern order included (issue 23: it raised "unknown key 'patterns'")."""
    sites = _sites([("layer1.act", "module"), ("layer2.act", "module"), ("layer2.conv:input", "input"),
                    ("root:sign", "inline")])
    cfg = ShiftConfig(shift=0.1, kinds={"input": 0.2}, patterns={"re:layer2\\.c.*": 0.4, "layer2.*": 0.3},
                      names={"layer1.act": 0.5}, exclude=["root:*"])
    back = ShiftConfig.from_mapping(json.loads(json.dumps(cfg.to_json())))
    assert back == cfg
    assert back.resolve(sites) == cfg.resolve(sites) == {"layer1.act": 0.5, "layer2.act": 0.3,
                                                          "layer2.conv:input": 0.3}
    # the shifts-file spelling still works and means the same
    assert ShiftConfig.from_mapping({"shift": 0.1, "kinds": {"input": 0.2},
                                     "sites": {"re:layer2\\.c.*": 0.4, "layer2.*": 0.3, "layer1.act": 0.5},
                                     "exclude": ["root:*"]}) == cfg
    with pytest.raises(UsageError, match="unknown key 'pattern'"):
        ShiftConfig.from_mapping({"pattern": {}})


def test_config_errors():
    sites = _sites([("act1", "module"), ("act2", "module")])
    with pytest.raises(PatchError, match="'block9.\\*' matches no site") as exc:
        ShiftConfig(patterns={"block9.*": 1.0}).resolve(sites)
    assert "act1" in exc.value.one_line()
    with pytest.raises(PatchError, match="no site named 'act3'"):
        ShiftConfig(names={"act3": 1.0}).resolve(sites)
    with pytest.raises(PatchError, match="exclude"):
        ShiftConfig(shift=1.0, exclude=["zzz"]).resolve(sites)
    with pytest.raises(UsageError, match="not a number"):
        ShiftConfig(shift="abc")
    with pytest.raises(UsageError, match="unknown site kind"):
        ShiftConfig(kinds={"weird": 1.0})


def test_config_from_toml(tmp_path):
    p = tmp_path / "shifts.toml"
    p.write_text(textwrap.dedent("""
        shift = 0.5
        exclude = ["act5"]
        [kinds]
        module = 1.0
        [sites]
        "act[12]" = 0.8
        "act3" = 1.2
    """))
    cfg = ShiftConfig.from_toml(p)
    rep = report_of("vgg-small")
    assert cfg.resolve(rep.sites) == {"act1": 0.8, "act2": 0.8, "act3": 1.2, "act4": 1.0}
    bad = tmp_path / "bad.toml"
    bad.write_text('[sites]\n"act1" = "high"\n')
    with pytest.raises(UsageError, match="not a number"):
        ShiftConfig.from_toml(bad)


# ------------------------------------------------------------------------------ hardtanh


class FPNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 6)
        self.act = nn.Hardtanh()
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_hardtanh_shift_moves_the_clip_window():
    torch.manual_seed(0)
    model = FPNet()
    rep = scan_model(model, (8,), include_hardtanh=True)
    assert not rep.sites and [s.name for s in rep.hardtanh_sites] == ["act"]
    x = torch.randn(16, 8)
    with torch.no_grad():
        expected = model.fc2(torch.nn.functional.hardtanh(model.fc1(x) - 0.7))
    patch_model(model, rep, None, hardtanh_shift=0.7)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    with pytest.raises(NoSitesError):
        patch_model(FPNet(), scan_model(FPNet(), (8,)), 1.0)


# ------------------------------------------------------------------------------ artifact


FRESH = textwrap.dedent("""
    import sys, torch
    _load = torch.load
    def strict_load(*a, **k):
        assert k.get("weights_only") is True, "unsafe torch.load"
        return _load(*a, **k)
    torch.load = strict_load
    from bnnshift.patch import load_patched
    torch.set_num_threads(int(sys.argv[1]))  # the parent's: float sums in the same order, bitwise comparable
    for d in sys.argv[2:]:
        x = torch.load(d + "/io.pt", weights_only=True)["x"]
        m = load_patched(d)
        with torch.no_grad():
            torch.save({"y": m(x)}, d + "/fresh.pt")
""")


def test_rebuild_in_fresh_process(tmp_path):
    dirs = []
    for name, kw in [("vgg-small", dict(per_channel=True)), ("xnor-resnet18", {}), ("style-where", {}),
                     ("style-shared-act", dict(trainable=True)), ("reactnet-a", {})]:
        from bnnshift.load import parse_model_spec

        rep = report_of(name)
        kwargs, shape = small(name)
        model, _ = build(name)
        model.eval()
        patch_model(model, rep, ShiftConfig(shift=0.7, patterns={"*1*": -0.3}), **kw)
        recipe = build_recipe(model, spec=parse_model_spec(f"zoo:{name}", kwargs), input_shape=shape)
        out = save_patched(model, recipe, tmp_path / name)
        x = data(shape, seed=5)
        with torch.no_grad():
            y = model(x)
        torch.save({"x": x, "y": y}, out / "io.pt")
        dirs.append(out)
        assert read_recipe(out).hashes["model.safetensors"]
    subprocess.run([sys.executable, "-c", FRESH, str(torch.get_num_threads()), *map(str, dirs)], check=True,
                   timeout=300)
    for d in dirs:
        ref = torch.load(d / "io.pt", weights_only=True)["y"]
        got = torch.load(d / "fresh.pt", weights_only=True)["y"]
        assert torch.equal(ref, got), d.name


def test_apply_recipe_on_users_instance(tmp_path):
    rep = report_of("style-rsign")
    model, shape = build("style-rsign")
    model.eval()
    patch_model(model, rep, 0.4)
    out = save_patched(model, build_recipe(model, spec=None, input_shape=shape), tmp_path / "o")
    mine, _ = build("style-rsign")  # same weights (same seed), no threshold yet
    apply_recipe(mine, out)
    mine.eval()
    x = data(shape)
    with torch.no_grad():
        assert torch.equal(mine(x), model(x))
    with pytest.raises(UsageError, match="no model spec"):
        load_patched(out)


# ------------------------------------------------------------------------------ CLI




def test_patch_spec_shifts_by_site_and_exclude_then_loads(tmp_path):
    from bnnshift.pipeline import PatchOptions, patch_spec
    from bnnshift.source import ModelSource

    out = tmp_path / "out"
    cfg = ShiftConfig(shift=0.5)
    cfg.add_site("act2", "1.2")
    cfg.exclude = ["act5"]
    payload = patch_spec(PatchOptions(ModelSource("zoo:vgg-small", args=["width=0.25"]), out, cfg)).to_json()
    assert {"out_dir", "files", "model", "input_shape", "sites", "hardtanh_sites", "fold", "onnx"} <= set(payload)
    shifts = {s["name"]: s["shift"] for s in payload["sites"]}
    assert shifts == {"act1": 0.5, "act2": 1.2, "act3": 0.5, "act4": 0.5}
    assert all(s["applied"] == "pre_hook" and s["threshold_key"] for s in payload["sites"])
    m = load_patched(out)
    assert {k: float(v) for k, v in get_thresholds(m).items()} == pytest.approx(shifts)


def _no_output(out):
    return not (out / "model.safetensors").exists() and not (out / "patch.json").exists()


@pytest.mark.parametrize("args,code,msg", [
    (["--site", "nope=1"], 2, "no site named 'nope'"),
    (["--site", "block9.*=1"], 2, "matches no site"),
    (["--site", "act1=abc"], 2, "not a number"),
    (["--shift", "nan"], 2, "not finite"),
    ([], 2, "no shift given"),
])
def test_cli_bad_input_one_line_no_output(tmp_path, args, code, msg):
    out = tmp_path / "out"
    r = invoke("patch", "zoo:vgg-small", "--arg", "width=0.25", *args, "-o", str(out))
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and msg in lines[0], r.stderr
    assert _no_output(out)


def test_cli_output_dir_errors(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    r = invoke("patch", "zoo:style-rsign", "--shift", "1", "-o", str(busy))
    assert r.exit_code == 1 and "not empty" in r.stderr and "--force" in r.stderr
    assert _no_output(busy)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = invoke("patch", "zoo:style-rsign", "--shift", "1", "-o", str(blocker / "sub"))
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1
    r = invoke("patch", "zoo:style-rsign", "--shift", "1", "-o", str(busy), "--force")
    assert r.exit_code == 0, r.output
    assert (busy / "patch.json").exists() and (busy / "keep.txt").exists()


def test_cli_no_binary_activation_exit_3(tmp_path):
    f = tmp_path / "fp.py"
    f.write_text("import torch.nn as nn\n"
                 "def build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 2))\n")
    out = tmp_path / "out"
    r = invoke("patch", f"{f}:build", "--input-shape", "1,4,4", "--shift", "1", "-o", str(out))
    assert r.exit_code == 3, r.output
    assert "no binary activation" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() or _no_output(out)
