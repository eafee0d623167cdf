"""Files as users have them (issue 19, item 5; cases 38 and 47): whatever torch's own
``load_state_dict(strict=True)`` accepts loads strictly (tied weights stored once, as safetensors'
``save_model`` writes them; BatchNorm counters left out), Lightning / Hydra prefixes next to extra
buffers, and the ema-pytorch layout with ``--use-ema``. Every model and file is made here."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file, save_model
from typer.testing import CliRunner

from bnnshift.cli import app
from bnnshift.errors import CheckpointError
from bnnshift.load import load_checkpoint

runner = CliRunner()


class SignSTE(nn.Module):
    def forward(self, x):
        c = x.clamp(-1, 1)
        return (torch.sign(x) - c).detach() + c


class TiedMLP(nn.Module):
    """Two hidden Linear layers sharing one weight (a recurrent-style block); the head ties to
    nothing. Used as a module and as the model of a file written for the CLI."""

    def __init__(self):
        super().__init__()
        self.fc0 = nn.Linear(16, 12, bias=False)
        self.bn0 = nn.BatchNorm1d(12)
        self.act = SignSTE()
        self.fc1 = nn.Linear(12, 12, bias=False)
        self.fc2 = nn.Linear(12, 12, bias=False)
        self.fc2.weight = self.fc1.weight
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = self.act(self.bn0(self.fc0(x)))
        h = self.act(self.fc1(h))
        return self.head(F.relu(self.fc2(h)))


class TiedConv(nn.Module):
    """A conv net whose second conv is declared first and tied the other way round."""

    def __init__(self):
        super().__init__()
        self.late = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.early = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.late.weight = self.early.weight
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.sign(self.bn(self.stem(x)))
        h = self.late(torch.sign(self.early(h)))
        return self.head(h.mean((2, 3)))


def _randomised(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.num_batches_tracked.fill_(37)
    return model.eval()


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- tied weights (case 38)
def test_tied_linear_written_by_safetensors_save_model_loads_strictly(tmp_path):
    ref = _randomised(TiedMLP())
    path = tmp_path / "tied.safetensors"
    save_model(ref, str(path))
    from safetensors.torch import load_file
    assert len(load_file(str(path))) == len(ref.state_dict()) - 1  # one name of the shared tensor left out

    got = TiedMLP()
    report = load_checkpoint(got, path)  # strict
    assert report.missing == [] and report.unexpected == []
    assert got.fc2.weight is got.fc1.weight
    assert _same_weights(got.eval(), ref)
    x = torch.randn(5, 16)
    assert torch.equal(got(x), ref(x))
    assert any("tied" in n for n in report.notes)


def test_tied_conv_declared_late_first_loads_from_a_pt_file_missing_the_alias(tmp_path):
    """The other direction and layout: a torch.save'd dict under 'state_dict' that holds only the
    later-declared name of the tie (as a hand-deduplicated checkpoint would)."""
    ref = _randomised(TiedConv(), seed=3)
    sd = {k: v for k, v in ref.state_dict().items() if k != "late.weight"}
    path = tmp_path / "tied.pt"
    torch.save({"epoch": 2, "state_dict": sd}, path)
    got = TiedConv()
    load_checkpoint(got, path)
    assert got.late.weight is got.early.weight
    assert _same_weights(got.eval(), ref)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(got(x), ref(x))


def test_a_missing_key_that_is_not_tied_is_still_refused(tmp_path):
    ref = _randomised(TiedMLP())
    sd = {k: v.clone() for k, v in ref.state_dict().items() if k not in ("fc0.weight", "fc2.weight")}
    save_file(sd, str(tmp_path / "gap.safetensors"))
    with pytest.raises(CheckpointError, match="fc0.weight"):
        load_checkpoint(TiedMLP(), tmp_path / "gap.safetensors")


def test_missing_batchnorm_counters_load_strictly_like_torch(tmp_path):
    ref = _randomised(TiedConv(), seed=5)
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pt")
    torch_own = TiedConv()
    torch_own.load_state_dict(sd, strict=True)  # torch itself accepts it
    got = TiedConv()
    report = load_checkpoint(got, tmp_path / "old.pt")
    assert report.missing == []
    assert _same_weights(got, torch_own)
    assert any("num_batches_tracked" in n for n in report.notes)


# --------------------------------------------------------------------------- prefixes + extra buffers (case 47)
def _lightning(tmp_path, prefix, extras, name="lit.ckpt"):
    ref = _randomised(TiedConv(), seed=7)
    sd = {prefix + k: v for k, v in ref.state_dict().items()}
    sd.update(extras)
    torch.save({"epoch": 1, "global_step": 10, "state_dict": sd, "optimizer_states": []}, tmp_path / name)
    return ref, tmp_path / name


def test_model_prefix_with_two_extra_buffers(tmp_path):
    extras = {"criterion.weight": torch.linspace(0.5, 1.5, 2), "metric.total": torch.tensor(3.0)}
    ref, path = _lightning(tmp_path, "model.", extras)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(TiedConv(), path)  # strict: torch would refuse the unexpected keys too
    assert "criterion.weight" in str(exc.value) and "'model.'" in str(exc.value)
    got = TiedConv()
    report = load_checkpoint(got, path, strict=False)
    assert report.prefix == "model."
    assert sorted(report.unexpected) == ["criterion.weight", "metric.total"]
    assert report.loaded == report.total
    assert _same_weights(got, ref)


def test_net_prefix_only_loads_strictly_and_keys_without_it_stay_unstripped(tmp_path):
    ref, path = _lightning(tmp_path, "net.", {})
    got = TiedConv()
    report = load_checkpoint(got, path)
    assert report.prefix == "net." and _same_weights(got, ref)
    # a prefix carried by only some keys is not stripped when it fits nothing more
    ref2 = _randomised(TiedConv(), seed=8)
    sd = dict(ref2.state_dict())
    sd["net.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "plain_plus.pt")
    got2 = TiedConv()
    report2 = load_checkpoint(got2, tmp_path / "plain_plus.pt", strict=False)
    assert report2.prefix is None and report2.unexpected == ["net.extra"]
    assert _same_weights(got2, ref2)


def test_lightning_checkpoint_through_the_cli_non_strict(tmp_path):
    model_file = tmp_path / "m.py"
    model_file.write_text(
        "import torch, torch.nn as nn\n"
        "class N(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.fc = nn.Linear(16, 8); self.bn = nn.BatchNorm1d(8); self.head = nn.Linear(8, 2)\n"
        "    def forward(self, x):\n"
        "        return self.head(torch.sign(self.bn(self.fc(x.flatten(1)))))\n"
        "def build():\n    return N()\n")
    import importlib.util
    spec = importlib.util.spec_from_file_location("m_lit", model_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ref = _randomised(mod.build(), seed=9)
    sd = {"net." + k: v for k, v in ref.state_dict().items()}
    sd["criterion.weight"] = torch.ones(2)
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "lit.ckpt")
    res = runner.invoke(app, ["patch", f"{model_file}:build", "--checkpoint", str(tmp_path / "lit.ckpt"),
                              "--input-shape", "16", "--shift", "0", "-o", str(tmp_path / "out"), "-q",
                              "--non-strict"])
    assert res.exit_code == 0, res.output
    from bnnshift.patch import load_patched
    pm = load_patched(tmp_path / "out", model=f"{model_file}:build")
    got = pm.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())


# --------------------------------------------------------------------------- ema-pytorch layout
class _EmaPytorchLike(nn.Module):
    """The state_dict layout of ema_pytorch.EMA: ema_model.*, online_model.*, initted, step."""

    def __init__(self, online, ema, include_online=True):
        super().__init__()
        if include_online:
            self.online_model = online
        self.ema_model = ema
        self.register_buffer("initted", torch.tensor(True))
        self.register_buffer("step", torch.tensor(120))


@pytest.mark.parametrize("nested", [False, True])
def test_ema_pytorch_layout_with_and_without_use_ema(tmp_path, nested):
    online, ema = _randomised(TiedConv(), seed=1), _randomised(TiedConv(), seed=2)
    sd = _EmaPytorchLike(online, ema).state_dict()
    obj = {"model": online.state_dict(), "ema": sd} if nested else sd
    torch.save(obj, tmp_path / "ema.pt")
    got = TiedConv()
    report = load_checkpoint(got, tmp_path / "ema.pt", use_ema=True)
    assert _same_weights(got, ema) and not _same_weights(got, online)
    assert any("EMA" in n for n in report.notes)
    got2 = TiedConv()
    load_checkpoint(got2, tmp_path / "ema.pt")
    assert _same_weights(got2, online)


def test_ema_pytorch_without_online_model_loads_the_ema_weights(tmp_path):
    ema = _randomised(TiedMLP(), seed=4)
    save_model(_EmaPytorchLike(None, ema, include_online=False), str(tmp_path / "ema.safetensors"))
    got = TiedMLP()
    report = load_checkpoint(got, tmp_path / "ema.safetensors")
    assert _same_weights(got.eval(), ema) and report.prefix == "ema_model."
