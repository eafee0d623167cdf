"""bnnshift.runtime: the packed XNOR-popcount op (C++ kernel == pure-torch reference == F.conv2d
in exact arithmetic), pack() on the zoo's BNN families and on models of our own in several
spellings (each packed layer proved; what cannot pack stays float with the reason), the packed
directory, the CLI, and torch.export through the op's fake kernel. Tiny widths: seconds each."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnnshift.errors import NoSitesError
from bnnshift.load import build_model, parse_model_spec
from bnnshift.runtime import kernel, load_packed, pack_dir, pack_model, ref
from bnnshift.runtime.bench import trained_like


@pytest.fixture(autouse=True)
def _one_thread():
    """The kernels are compared and timed on one thread; the worker's own count is restored (a
    module-level ``set_num_threads`` would change every later test in the same xdist worker)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)




def zoo(name: str, **args) -> nn.Module:
    spec = parse_model_spec(f"zoo:{name}")
    spec.args = args
    return trained_like(build_model(spec))


CASES = [  # (stride, padding, dilation, groups, {0,1} inputs, C, O, k, H)
    (1, 1, 1, 1, False, 70, 8, 3, 7), (2, 1, 1, 2, False, 64, 6, 3, 9), (1, 2, 2, 1, True, 130, 4, 2, 6),
    (1, 1, 1, 6, False, 6, 6, 3, 5), (1, 0, 1, 1, True, 5, 3, 1, 4), (3, 3, 1, 1, False, 9, 5, 5, 8),
]


@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_reference_and_exact_conv(case):
    s, p, d, g, zo, c, o, k, h = case
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, c, h, h, generator=gen)
    alpha = torch.rand(o, generator=gen) + 0.1  # float32, as captured from a model
    w = torch.where(torch.randn(o, c // g, k, k, generator=gen) > 0, 1.0, -1.0) * alpha.view(-1, 1, 1, 1)
    b = torch.randn(o, generator=gen)
    words, popw = ref.pack_weight(w)
    for dtype in (torch.float32, torch.float64):
        args = (x.to(dtype), words, popw, alpha, b, [s, s], [p, p], [d, d], g, zo)
        want = ref.bconv2d(*args)
        got = torch.ops.bnnshift.bconv2d(args[0], words, ref.transpose_weight(words, g), *args[2:])
        assert kernel.backend() == "cpp"
        assert torch.equal(got, want), (dtype, (got - want).abs().max())
    # exact arithmetic: F.conv2d in float64 on the same +-1 / {0,1} values
    xb = (x > 0).double() if zo else torch.where(x > 0, 1.0, -1.0).double()
    exact = F.conv2d(xb, w.double(), b.double(), s, p, d, g)
    assert torch.equal(ref.bconv2d(x.double(), words, popw, alpha, b, [s, s], [p, p], [d, d], g, zo), exact)


def test_reference_is_used_and_said_once_without_a_compiler(monkeypatch):
    monkeypatch.setattr(kernel, "_state", {})
    monkeypatch.setattr(kernel, "_build", lambda: (_ for _ in ()).throw(RuntimeError("no C++ compiler found")))
    x = torch.randn(1, 8, 4, 4)
    w = torch.where(torch.randn(4, 8, 3, 3) > 0, 1.0, -1.0)
    words, popw = ref.pack_weight(w)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            y = torch.ops.bnnshift.bconv2d(x, words, ref.transpose_weight(words, 1), popw, torch.ones(4), None,
                                           [1, 1], [1, 1], [1, 1], 1, False)
    assert [str(r.message) for r in rec if "reference" in str(r.message)].__len__() == 1
    assert kernel.backend() == "reference"
    assert torch.equal(y, F.conv2d(torch.where(x > 0, 1.0, -1.0), w, None, 1, 1))


ZOO = [  # name, args, input shape, packed count, a layer left float and its reason
    ("vgg-small", {"width": 0.125, "input_size": 16}, (3, 16, 16), 5, ("conv1", "not a binary activation")),  # conv -> MaxPool -> BN -> sign
    ("resnet20-bireal", {"width": 0.25}, (3, 8, 8), 18, ("layers.6.downsample.1", "not a binary")),  # double skip
    ("reactnet-a", {"width": 0.0625}, (3, 32, 32), 31, ("fc", "not a binary")),  # RSign learnable biases, RPReLU
    ("xnor-resnet18", {"width": 0.0625}, (3, 16, 16), 16, ("stem.0", "not a binary")),  # BinActive.apply inline
    ("style-heaviside", {}, (1, 28, 28), 2, ("stem", "not a binary")),  # {0,1} activations
    ("style-conv-input", {}, (1, 28, 28), 2, ("fc", "not a binary")),  # a conv binarizing its own input
]


@pytest.mark.parametrize("name,args,shape,n,floating", ZOO, ids=[z[0] for z in ZOO])
def test_pack_zoo_is_proved(name, args, shape, n, floating):
    m = zoo(name, **args)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    packed, rep = pack_model(m, shape)
    assert len(rep.packed) == n, rep.left_float
    assert rep.proof["exact"] and rep.proof["float64_flips"] == 0 and rep.proof["binary_activations"] > 0
    assert floating[1] in rep.left_float[floating[0]]
    x = torch.randn(4, *shape)
    with torch.no_grad():
        assert torch.allclose(packed(x), m(x), atol=1e-4, rtol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # the user's model is untouched


# --- models of our own: one binarizer in three spellings, a grouped / strided / dilated conv ---
class SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.where(x >= 0, 1.0, -1.0)

    @staticmethod
    def backward(ctx, g):
        return g


class Sign(nn.Module):
    def forward(self, x):
        return torch.sign(x)


class ScaledBinConv(nn.Conv2d):
    """XNOR-Net weights: sign(W) * mean|W| per output channel; binarizes its input with `spell`."""

    def __init__(self, *a, spell="none", **k):
        super().__init__(*a, **k)
        self.spell = spell

    def forward(self, x):
        if self.spell == "function":
            x = SignSTE.apply(x)
        w = self.weight.sign() * self.weight.abs().mean((1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Own(nn.Module):
    def __init__(self, spell: str):
        super().__init__()
        self.spell = spell
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        self.act = Sign()
        self.grouped = ScaledBinConv(16, 16, 3, stride=2, padding=2, dilation=2, groups=4, bias=True,
                                     spell="function" if spell == "function" else "none")
        self.bn1 = nn.BatchNorm2d(16)
        self.conv = ScaledBinConv(16, 8, 3, padding=1, spell="function" if spell == "function" else "none")
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def binarize(self, x):
        if self.spell == "module":
            return self.act(x)
        if self.spell == "inline":
            return x.sign()
        return x  # "function": the convs binarize their own input

    def forward(self, x):
        x = self.binarize(self.bn0(self.stem(x)))
        x = self.binarize(self.bn1(self.grouped(x)))
        x = self.bn2(self.conv(x))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("spell", ["module", "inline", "function"])
def test_pack_own_grouped_strided_dilated(spell):
    torch.manual_seed(0)
    m = trained_like(Own(spell))
    packed, rep = pack_model(m, (3, 12, 12))
    assert set(rep.packed) == {"grouped", "conv"}, rep.left_float
    assert "groups 4" in rep.packed["grouped"] and "dilation [2, 2]" in rep.packed["grouped"]
    assert ("binarizes its input" in rep.packed["conv"]) == (spell == "function")
    assert rep.proof["exact"]
    # torch.where(x >= 0, 1.0, -1.0) returns float32 whatever x is: no float64 run, float32 judges
    assert ("float64_skipped" in rep.proof) == (spell == "function")
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        assert torch.allclose(packed(x), m(x), atol=1e-4)


def test_what_cannot_pack_stays_float_with_the_reason():
    torch.manual_seed(0)
    m = trained_like(Own("module"))
    m.conv.padding_mode = "reflect"  # F.pad before F.conv2d: the op's input is not the module's
    m.grouped.forward = lambda x, c=m.grouped: F.conv2d(x, torch.round(c.weight * 3), c.bias, c.stride, c.padding,
                                                       c.dilation, c.groups)  # a multi-valued weight

    class Reflect(ScaledBinConv):
        def forward(self, x):
            return super().forward(F.pad(x, (1, 1, 1, 1), mode="reflect"))

    r = Reflect(16, 8, 3, padding=0)
    r.load_state_dict(m.conv.state_dict())
    m.conv = r
    with pytest.raises(NoSitesError, match="pack"):
        pack_model(m, (3, 12, 12))
    m2 = trained_like(Own("module"))
    m2.conv = r
    _, rep = pack_model(m2, (3, 12, 12))
    assert "not the module's input" in rep.left_float["conv"]
    assert list(rep.packed) == ["grouped"]


def test_packed_directory_roundtrip_and_tamper(tmp_path):
    src = tmp_path / "p"
    subprocess.run([sys.executable, "-m", "bnnshift", "patch", "zoo:mlp", "--arg", "hidden=32", "--shift", "0.5",
                    "--fold", "-o", str(src), "-q"], check=True, capture_output=True)
    m, packed, rep = pack_dir(src, tmp_path / "out")
    assert set(rep.packed) == {"bfc2", "bfc3"}
    loaded = load_packed(tmp_path / "out")
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), packed(x))
    meta = json.loads((tmp_path / "out" / "packed.json").read_text())
    assert meta["layers"]["bfc2"]["kind"] == "linear" and meta["report"]["proof"]["exact"]
    w = tmp_path / "out" / "packed.safetensors"
    w.write_bytes(w.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(Exception, match="does not match packed.json"):
        load_packed(tmp_path / "out")


def test_cli_pack(tmp_path):
    src = tmp_path / "p"
    subprocess.run([sys.executable, "-m", "bnnshift", "patch", "zoo:mlp", "--arg", "hidden=32", "--shift", "0", "-o", str(src), "-q"],
                   check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "bnnshift", "pack", str(src), "-o", str(tmp_path / "o"), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # t = 0 on an untrained model: BN beta = 0, an integer sum of 0 gives sign(0) = 0 at bfc3's input
    assert set(out["packed"]) == {"bfc2"} and "fc1" in out["left_float"]
    assert "ternary" in out["left_float"]["bfc3"]
    r = subprocess.run([sys.executable, "-m", "bnnshift", "pack", str(src), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "not empty" in r.stderr  # an existing OUT needs --force


def test_torch_export_through_the_fake_kernel():
    m = zoo("mlp", hidden=32)
    packed, _ = pack_model(m, (1, 28, 28))
    x = torch.randn(2, 1, 28, 28)
    ep = torch.export.export(packed, (x,))
    assert any("bnnshift.bconv2d" in str(n.target) for n in ep.graph.nodes)
    with torch.no_grad():
        assert torch.equal(ep.module()(x), packed(x))


def test_bench_rows_cover_layers_and_end_to_end():
    from bnnshift.runtime.bench import bench, summarise

    m = zoo("mlp", hidden=32)
    packed, rep = pack_model(m, (1, 28, 28))
    before = torch.get_num_threads()
    rows = bench(m, packed, (1, 28, 28), batches=(2,), threads=(1,), min_time=0.01,
                 extra={"again": lambda x, nt: (lambda: packed(x))})
    assert {r["what"] for r in rows} == set(rep.packed) | {"end to end"}
    assert all(r["float_ms"] > 0 and r["packed_ms"] > 0 for r in rows)
    assert [r["what"] for r in summarise(rows)] == ["binary layers", "end to end"]
    assert "again_ms" in rows[-1] and torch.get_num_threads() == before  # the caller's thread count restored


def test_float_op_baseline_is_the_same_layer():
    from bnnshift.runtime.layers import PackedConv2d

    torch.manual_seed(0)
    packed, _ = pack_model(trained_like(Own("module")), (3, 12, 12))
    for layer, x in ((packed.grouped, torch.where(torch.randn(2, 16, 12, 12) > 0, 1.0, -1.0)),
                     (packed.conv, torch.where(torch.randn(2, 16, 6, 6) > 0, 1.0, -1.0))):
        assert isinstance(layer, PackedConv2d)
        assert torch.allclose(layer.float_op()(x), layer(x), atol=1e-5)


# --- integer thresholds: packed layer + [MaxPool] + BN + binarizer as one comparison on the popcount ---
THR_CASES = [  # (C, O, k, H, stride, pad, groups, {0,1} input, pool [kh, kw, sh, sw] or [], pool first)
    (70, 8, 3, 8, 1, 1, 1, False, [2, 2, 2, 2], True), (64, 6, 3, 9, 2, 1, 2, False, [], True),
    (130, 4, 2, 7, 1, 1, 1, True, [2, 2, 2, 2], False), (6, 6, 3, 5, 1, 1, 6, False, [3, 3, 1, 1], False),
]


@pytest.mark.parametrize("case", THR_CASES)
def test_threshold_kernel_equals_reference(case):
    c, o, k, h, s, p, g, zo, pool, first = case
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, c, h, h, generator=gen)
    words, popw = ref.pack_weight(torch.where(torch.randn(o, c // g, k, k, generator=gen) > 0, 1.0, -1.0))
    fan = k * k * c // g // 3  # thresholds inside the reachable sums: both bits occur
    thr, flip = torch.randint(-fan, fan + 1, (o,), generator=gen), torch.rand(o, generator=gen) > 0.5
    for dtype in (torch.float32, torch.float64):
        want = ref.bconv2d_bits(x.to(dtype), words, popw, thr, flip, [s, s], [p, p], [1, 1], g, zo, pool, first,
                                -1.0, 1.0)
        assert set(want.unique().tolist()) == {-1.0, 1.0}
        for xin in (x.to(dtype), x.to(dtype).contiguous(memory_format=torch.channels_last)):  # both memory layouts
            got = torch.ops.bnnshift.bconv2d_bits(xin, words, ref.transpose_weight(words, g), popw, thr, flip, [s, s],
                                                  [p, p], [1, 1], g, zo, pool, first, -1.0, 1.0)
            assert torch.equal(got, want)
    # the definition: u = dot >= thr; a pool before the binarizer ORs u, then flips
    dot = ref.bdot(x, words, popw, [s, s], [p, p], [1, 1], g, zo)
    u = (dot >= thr.view(1, -1, 1, 1)).float()
    if pool and first:
        u = F.max_pool2d(u, pool[:2], pool[2:])
    if not pool:
        assert torch.equal(want.float() > 0, (u > 0) != flip.view(1, -1, 1, 1))
    elif first:
        assert torch.equal(want > 0, (u > 0) != flip.view(1, -1, 1, 1))


class GE(nn.Module):  # ties (x == 0) go to +1, in any dtype
    def forward(self, x):
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class Step(nn.Module):  # {0,1} activations, ties to 1
    def forward(self, x):
        return (x >= 0).to(x.dtype)


class GEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, g):
        return g


class GEApply(nn.Module):  # the same binarizer spelled as an autograd Function
    def forward(self, x):
        return GEFunction.apply(x)


class Tied(nn.Module):
    """conv 1x1 on 4 channels of +-1 weights: every dot is in {-4, -2, 0, 2, 4}, and BN (eps 0) puts
    the threshold exactly on one of them: channel 0 at 2, channel 1 at 0 with gamma < 0, channel 2
    constant (gamma = 0), channel 3 at -2. Returns the second binary activation: bitwise comparable."""

    def __init__(self, act: nn.Module, pool: str):
        super().__init__()
        self.pool = pool
        self.a0 = GE()
        self.conv = ScaledBinConv(4, 4, 1, bias=False)
        self.mp = nn.MaxPool2d(2)
        self.bn = nn.BatchNorm2d(4, eps=0.0)
        self.act = act
        self.conv2 = ScaledBinConv(4, 4, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.where(torch.randn(4, 4, 1, 1) > 0, 1.0, -1.0))
            self.conv2.weight.copy_(torch.where(torch.randn(4, 4, 1, 1) > 0, 1.0, -1.0))  # integer outputs
            self.bn.weight.copy_(torch.tensor([1.0, -1.0, 0.0, 0.5]))
            self.bn.bias.copy_(torch.tensor([-2.0, 0.0, 0.5, 1.0]))
        self.eval()

    def forward(self, x):
        y = self.conv(self.a0(x))
        if self.pool == "before":
            y = self.mp(y)
        y = self.act(self.bn(y))
        if self.pool == "after":
            y = self.mp(y)
        return self.conv2(y)


@pytest.mark.parametrize("act", [GE, Step, GEApply])
@pytest.mark.parametrize("pool", ["before", "after", "none"])
def test_threshold_ties_flips_and_constant_channels_exact(act, pool):
    torch.manual_seed(0)
    m = Tied(act(), pool)
    packed, rep = pack_model(m, (4, 6, 6))
    assert list(rep.thresholds) == ["conv"] and rep.proof["exact"], rep.no_threshold
    assert "1 channel(s) flipped" in rep.thresholds["conv"]  # gamma < 0 on channel 1 only; gamma = 0 is constant
    assert isinstance(packed.bn, nn.Identity) and isinstance(packed.act, nn.Identity)
    plain, _ = pack_model(m, (4, 6, 6), thresholds=False)
    x = torch.randn(64, 4, 6, 6)
    ties = 0
    for dtype in (torch.float32, torch.float64):
        with torch.no_grad():
            want = m.to(dtype)(x.to(dtype))
            ties += int((m.bn(m.conv(m.a0(x.to(dtype)))) == 0).sum())
            assert torch.equal(packed.to(dtype)(x.to(dtype)), want)
            assert torch.equal(plain.to(dtype)(x.to(dtype)), want)
    assert ties > 100  # the thresholds were hit exactly, many times
    fl = packed.conv.flip[0].tolist()
    assert fl[1] and not fl[0] and not fl[3]  # gamma < 0 flips the comparison


def test_threshold_refused_where_sign_gives_zero_and_after_avgpool():
    torch.manual_seed(0)
    _, rep = pack_model(Tied(Sign(), "none"), (4, 6, 6))  # sign(0) = 0 on a reachable sum: no threshold
    assert "sign(0) = 0" in rep.no_threshold["conv"] and not rep.thresholds
    m = zoo("vgg-small-avgpool", width=0.125, input_size=16)
    _, rep = pack_model(m, (3, 16, 16))
    assert set(rep.thresholds) == {"conv3", "fc1"} and "AvgPool2d" in rep.no_threshold["conv2"]
    m = zoo("vgg-small", width=0.125, input_size=16)
    packed, rep = pack_model(m, (3, 16, 16))
    assert set(rep.thresholds) == {"conv2", "conv3", "conv4", "fc1"}, rep.no_threshold
    assert "MaxPool before the binarizer" in rep.thresholds["conv2"]
    assert sum(int(packed.get_submodule(p).flip[0].sum()) for p in rep.thresholds) > 0  # gamma < 0 channels
    assert "no binarizer module" in rep.no_threshold["fc2"]  # fc2 -> bn6 -> fc3: float


def test_threshold_layers_roundtrip_through_the_packed_directory(tmp_path):
    src = tmp_path / "p"
    subprocess.run([sys.executable, "-m", "bnnshift", "patch", "zoo:vgg-small", "--arg", "width=0.125", "--arg",
                    "input_size=16", "--shift", "0.5", "--fold", "-o", str(src), "-q"], check=True, capture_output=True)
    _, packed, rep = pack_dir(src, tmp_path / "out")
    assert set(rep.thresholds) == {"conv2", "conv3", "conv4", "fc1"} and rep.proof["exact"], rep.no_threshold
    loaded = load_packed(tmp_path / "out")
    assert isinstance(loaded.bn2, nn.Identity) and loaded.conv2.pool == [2, 2, 2, 2]
    assert loaded.bnnshift_pack_report.thresholds == rep.thresholds
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), packed(x))


def test_torch_compile_of_a_packed_model_with_thresholds():
    torch.manual_seed(0)
    m = Tied(GE(), "before")
    packed, rep = pack_model(m, (4, 6, 6))
    assert rep.thresholds
    x = torch.randn(5, 4, 6, 6)
    compiled = torch.compile(packed, backend="aot_eager", fullgraph=True)  # traced on the fake kernels; no codegen
    with torch.no_grad():
        assert torch.equal(compiled(x), m(x))
    ep = torch.export.export(packed, (x,))
    assert any("bconv2d_bits" in str(n.target) for n in ep.graph.nodes)


class Leaky(Tied):
    """The BN output also feeds a float branch the chain cannot see (no module reads it)."""

    def forward(self, x):
        y = self.bn(self.conv(self.a0(x)))
        return self.conv2(self.act(y)) + y.mean((1, 2, 3), keepdim=True)


def test_threshold_whose_absorbed_output_is_used_elsewhere_is_dropped_by_the_proof():
    torch.manual_seed(0)
    m = Leaky(GE(), "none")
    packed, rep = pack_model(m, (4, 6, 6))
    assert not rep.thresholds and "failed the proof" in rep.no_threshold["conv"]
    assert set(rep.packed) == {"conv", "conv2"} and rep.proof["exact"]
    x = torch.randn(8, 4, 6, 6)
    with torch.no_grad():
        assert torch.allclose(packed(x), m(x), atol=1e-5)
