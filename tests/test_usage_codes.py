"""Usage mistakes about the model exit 2 with one line (README's exit-code table): an
``--input-shape`` the model does not run on (while it runs on another shape), and a ``--site`` /
``--exclude`` / ``--config`` name or pattern that matches no site. A model whose forward fails on
every shape stays a model error (exit 1). Models written here in three spellings: an XNOR-Net
conv net with ``sign`` in an ``autograd.Function``, a ReActNet-style block with a learnable
bias before ``torch.sign`` (RSign) and a Heaviside ``{0,1}`` MLP returning a dict."""
from __future__ import annotations

import textwrap

import pytest
from typer.testing import CliRunner

from bnnshift.cli import app
from bnnshift.errors import PatchError, UnknownSiteError, UsageError
from models import SIGN_STE_SOURCE

MODELS = textwrap.dedent('''
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

''') + SIGN_STE_SOURCE + "BinActive = SignSTE  # the user's STE, as XNOR-Net names it\n" + textwrap.dedent('''


    class XNORNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            x = BinActive.apply(self.bn(self.conv1(x)))
            w = self.conv2.weight
            x = F.conv2d(x, w.sign() * w.abs().mean((1, 2, 3), keepdim=True), None, 1, 1)
            return self.fc(x.flatten(1))


    class RSignNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.move = nn.Parameter(torch.zeros(1, 4, 1, 1))
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = self.stem(x) + self.move
            x = (torch.sign(y) - y).detach() + y  # detach-trick STE
            x = self.conv(x)
            return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


    class HeavisideMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(20, 8)
            self.bn1 = nn.BatchNorm1d(8)
            self.fc2 = nn.Linear(8, 3)

        def forward(self, x):
            z = self.bn1(self.fc1(x.flatten(1)))
            h = (z > 0).float() + z - z.detach()  # STE
            return {"logits": self.fc2(h), "emb": h}


    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(20, 3)

        def forward(self, x):
            return torch.sign(self.fc(x.flatten(1))) + undefined_name  # noqa: F821
''')


@pytest.fixture()
def models(tmp_path):
    (tmp_path / "trial_models.py").write_text(MODELS)
    return tmp_path / "trial_models.py"


def _one_line(res) -> str:
    """The one error line (scan's warnings about the model may come before it)."""
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and res.stderr.rstrip().endswith(lines[0]), res.stderr
    assert "unexpected" not in lines[0], lines[0]
    return lines[0]


# (model, a shape the model does not run on, a shape it runs on)
SHAPES = [("XNORNet", "1,16", "1,8,8"), ("RSignNet", "1,8,8", "3,8,8"), ("HeavisideMLP", "1,4,4", "1,20")]


@pytest.mark.parametrize("cls,bad,good", SHAPES, ids=[s[0] for s in SHAPES])
def test_input_shape_the_model_does_not_run_on_is_usage(models, cls, bad, good):
    res = CliRunner().invoke(app, ["scan", f"{models}:{cls}", "--input-shape", bad])
    assert res.exit_code == 2, res.output
    assert f"--input-shape {bad}" in _one_line(res)
    ok = CliRunner().invoke(app, ["scan", f"{models}:{cls}", "--input-shape", good])
    assert ok.exit_code == 0, ok.output  # the same model runs: the option was at fault


def test_input_shape_refused_in_patch_before_any_output(models, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["patch", f"{models}:XNORNet", "--input-shape", "3,8,8", "--shift", "0.5",
                                   "-o", str(out)])
    assert res.exit_code == 2 and "--input-shape 3,8,8" in _one_line(res)
    assert not out.exists()


def test_model_failing_on_every_shape_stays_a_model_error(models):
    res = CliRunner().invoke(app, ["scan", f"{models}:Broken", "--input-shape", "1,20"])
    assert res.exit_code == 1, res.output
    assert "undefined_name" in _one_line(res)


# the same mistake spelled as an exact name (on every model), a glob, an exclude and a config file key
SITES = [("XNORNet", "1,8,8", ["--site", "nosuch=0.5"], "no site named 'nosuch'"),
         ("RSignNet", "3,8,8", ["--site", "nosuch=0.5"], "no site named 'nosuch'"),
         ("HeavisideMLP", "1,20", ["--site", "nosuch=0.5"], "no site named 'nosuch'"),
         ("XNORNet", "1,8,8", ["--shift", "0.5", "--site", "layer9.*=1"], "'layer9.*' matches no site"),
         ("RSignNet", "3,8,8", ["--shift", "0.5", "--exclude", "re:zz.*"], "'re:zz.*' matches no site"),
         ("HeavisideMLP", "1,20", ["--config", "CFG"], "no site named 'gone'")]


@pytest.mark.parametrize("cls,shape,args,msg", SITES, ids=[f"{s[0]}-{s[2][-2]}" for s in SITES])
def test_unknown_site_is_usage(models, tmp_path, cls, shape, args, msg):
    cfg = tmp_path / "shifts.toml"
    cfg.write_text("shift = 0.5\n[sites]\ngone = 1.0\n")
    out = tmp_path / "out"
    args = [str(cfg) if a == "CFG" else a for a in args]
    res = CliRunner().invoke(app, ["patch", f"{models}:{cls}", "--input-shape", shape, *args, "-o", str(out)])
    assert res.exit_code == 2, res.output
    line = _one_line(res)
    assert msg in line and "existing sites:" in line
    assert not out.exists()


def test_unknown_site_error_is_still_a_patch_error():
    exc = UnknownSiteError("no site named 'x'")
    assert isinstance(exc, PatchError) and isinstance(exc, UsageError) and exc.exit_code == 2


@pytest.mark.parametrize("attr,want", [("NoSuch", "defines: BinActive, Broken, HeavisideMLP, RSignNet, SignSTE, XNORNet"),
                                       ("XnorNet", "did you mean XNORNet"), ("rsignnet", "did you mean RSignNet")])
def test_unknown_attribute_names_what_the_file_defines(models, attr, want):
    res = CliRunner().invoke(app, ["scan", f"{models}:{attr}"])
    assert res.exit_code == 2, res.output
    line = _one_line(res)
    assert want in line and "torch" not in line.split("(")[-1] and "nn," not in line, line  # not its imports


def test_unknown_shape_hint_does_not_offer_patch_a_data_option(models, tmp_path):
    """patch has no --data: its line must not tell the user to pass one (it did: "or --data")."""
    res = CliRunner().invoke(app, ["patch", f"{models}:XNORNet", "--shift", "0.5", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    line = _one_line(res)
    assert "--input-shape" in line and "or --data" not in line


FACTORIES = textwrap.dedent('''
    import torch.nn as nn


    class Net(nn.Module):
        def __init__(self, width=4, num_classes=3):
            super().__init__()
            self.fc = nn.Linear(20, num_classes)

        def forward(self, x):
            return self.fc(x.flatten(1))


    def build(width: int = 4, *, depth: int = 2):
        return Net(width)


    def build_any(**kw):
        return Net(**{k: v for k, v in kw.items() if k == "width"})
''')


@pytest.mark.parametrize("attr,arg,want", [("Net", "nosucharg=3", "it takes: width, num_classes"),
                                           ("build", "widht=8", "did you mean width?"),
                                           ("build", "dpeth=3", "did you mean depth")])
def test_unknown_factory_argument_is_usage(tmp_path, attr, arg, want):
    (tmp_path / "trial_factories.py").write_text(FACTORIES)
    res = CliRunner().invoke(app, ["scan", f"{tmp_path / 'trial_factories.py'}:{attr}", "--arg", arg,
                                   "--input-shape", "20"])
    assert res.exit_code == 2, res.output  # was exit 1: "building ... failed: TypeError: unexpected keyword"
    line = _one_line(res)
    assert f"unknown --arg {arg.split('=')[0]!r}" in line and want in line


def test_factory_with_kwargs_takes_any_argument_name(tmp_path):
    (tmp_path / "trial_factories.py").write_text(FACTORIES)
    res = CliRunner().invoke(app, ["scan", f"{tmp_path / 'trial_factories.py'}:build_any", "--arg", "other=1",
                                   "--input-shape", "20"])
    assert "unknown --arg" not in res.stderr, res.stderr
