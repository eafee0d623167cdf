"""Model specs, model building, checkpoint loading and atomic writes (bnnshift.load, bnnshift._io)."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from bnnshift import _io, registry
from bnnshift.errors import (
    CheckpointError,
    ModelLoadError,
    OutputError,
    SpecError,
    UnsafeCheckpointError,
)
from bnnshift.load import (
    LoadReport,
    ModelSpec,
    build_model,
    default_input_shape,
    load_checkpoint,
    load_model,
    load_state_dict_file,
    parse_arg_pairs,
    parse_model_spec,
)


# --------------------------------------------------------------------------- fixtures


class TinyNet(nn.Module):
    """A small BNN-ish model: conv -> bn -> sign -> linear."""

    def __init__(self, width: int = 4, num_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = torch.sign(self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3)))


def tiny_factory(width: int = 4, num_classes: int = 3) -> nn.Module:
    return TinyNet(width=width, num_classes=num_classes)


ZOO_NAME = "test-load-tiny"


@pytest.fixture
def zoo_model():
    registry.register_zoo_model(ZOO_NAME, tiny_factory, input_shape=(1, 8, 8), num_classes=3)
    yield ZOO_NAME
    registry.ZOO._items.pop(ZOO_NAME, None)


MODEL_FILE = '''
import torch
from torch import nn
from helper_blocks import make_block   # sibling import must work


class FileNet(nn.Module):
    def __init__(self, width=4, binary=False):
        super().__init__()
        self.block = make_block(width)
        self.binary = binary

    def forward(self, x):
        return self.block(x)


def build(width=4, binary=False):
    return FileNet(width=width, binary=binary)


def broken(width=4):
    raise ValueError("width must be even, got %d" % width)


def not_a_model():
    return {"weights": 1}


the_answer = 42
'''

HELPER_FILE = '''
from torch import nn

def make_block(width):
    return nn.Sequential(nn.Linear(width, width), nn.Linear(width, 2))
'''


@pytest.fixture
def model_file(tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    (d / "helper_blocks.py").write_text(HELPER_FILE)
    f = d / "my_model.py"
    f.write_text(MODEL_FILE)
    return f


def _tiny_sd(**kw):
    torch.manual_seed(0)
    return TinyNet(**kw).state_dict()


def _same(a: nn.Module, sd: dict) -> bool:
    own = a.state_dict()
    return own.keys() == sd.keys() and all(torch.equal(own[k], sd[k]) for k in own)


# --------------------------------------------------------------------------- parsing


def test_parse_each_kind(model_file, tmp_path):
    z = parse_model_spec("zoo:bnn_mlp")
    assert (z.kind, z.target, z.attr) == ("zoo", "bnn_mlp", None)
    t = parse_model_spec("timm:resnet10t")
    assert (t.kind, t.target) == ("timm", "resnet10t")
    tv = parse_model_spec("torchvision:resnet18")
    assert (tv.kind, tv.target) == ("torchvision", "resnet18")
    m = parse_model_spec("torchvision.models:resnet18")
    assert (m.kind, m.target, m.attr) == ("module", "torchvision.models", "resnet18")
    f = parse_model_spec(f"{model_file}:build")
    assert (f.kind, f.target, f.attr) == ("file", str(model_file.resolve()), "build")


def test_parse_relative_file_is_made_absolute(model_file, monkeypatch):
    monkeypatch.chdir(model_file.parent.parent)
    f = parse_model_spec("models/my_model.py:FileNet")
    assert f.kind == "file" and Path(f.target).is_absolute() and Path(f.target) == model_file.resolve()


@pytest.mark.parametrize(
    "spec",
    ["zoo:a", "timm:resnet10t", "torchvision:resnet18", "torchvision.models:resnet18", "pkg.sub.mod:Outer.build"],
)
def test_canonical_round_trips(spec):
    s = parse_model_spec(spec, ["depth=3"])
    assert s.canonical() == spec
    assert parse_model_spec(s.canonical(), s.args) == s
    assert ModelSpec.from_json(json.loads(json.dumps(s.to_json()))) == s


def test_canonical_round_trips_file(model_file):
    s = parse_model_spec(f"{model_file}:build", {"width": 8})
    assert parse_model_spec(s.canonical(), s.args) == s
    assert ModelSpec.from_json(s.to_json()) == s


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        "resnet18",  # no ':'
        "zoo:",
        "timm:",
        "torchvision:  ",
        ":build",
        "mymodule:",
        "models/missing_file.py:build",
        "some/dir/not_python.txt:build",
        "my-module:build",  # not a module path
        "pkg.mod:not a name",
        "pkg..mod:build",
    ],
)
def test_bad_spec_strings(bad):
    with pytest.raises(SpecError) as ei:
        parse_model_spec(bad)
    assert "\n" not in ei.value.message
    assert ei.value.hint
    assert ei.value.exit_code == 2


def test_spec_from_json_rejects_garbage():
    with pytest.raises(SpecError):
        ModelSpec.from_json({"kind": "ftp", "target": "x"})
    with pytest.raises(SpecError):
        ModelSpec.from_json({"target": "x"})


def test_parse_arg_pairs_values():
    got = parse_arg_pairs(
        [
            "depth=18",
            "lr=0.5",
            "eps=1e-3",
            "binary=true",
            "affine=False",
            "act=none",
            "dims=1,2,3",
            "sizes=[4, 8]",
            "name=resnet",
            "quoted='42'",
            "expr=a=b",  # only the first '=' separates
            " spaced = 7",
            "empty=",
        ]
    )
    assert got == {
        "depth": 18,
        "lr": 0.5,
        "eps": 1e-3,
        "binary": True,
        "affine": False,
        "act": None,
        "dims": (1, 2, 3),
        "sizes": [4, 8],
        "name": "resnet",
        "quoted": "42",
        "expr": "a=b",
        "spaced": 7,
        "empty": "",
    }
    assert isinstance(got["depth"], int) and isinstance(got["binary"], bool)


@pytest.mark.parametrize("bad", ["depth", "=3", "not a key=1", "1x=2"])
def test_parse_arg_pairs_rejects(bad):
    with pytest.raises(SpecError) as ei:
        parse_arg_pairs([bad])
    assert repr(bad) in ei.value.message


def test_parse_model_spec_takes_args_list_and_dict():
    assert parse_model_spec("zoo:x", ["a=1", "b=no"]).args == {"a": 1, "b": False}
    assert parse_model_spec("zoo:x", {"a": 1}).args == {"a": 1}
    with pytest.raises(SpecError):
        parse_model_spec("zoo:x", ["a"])


# --------------------------------------------------------------------------- building


def test_build_zoo_with_args(zoo_model):
    m = build_model(parse_model_spec(f"zoo:{zoo_model}", ["width=6", "num_classes=5"]))
    assert isinstance(m, TinyNet)
    assert m.conv.out_channels == 6 and m.fc.out_features == 5
    spec = parse_model_spec(f"zoo:{zoo_model}")
    assert default_input_shape(spec, m) == (1, 8, 8)


def test_build_zoo_unknown_suggests_close_names(zoo_model):
    with pytest.raises(SpecError) as ei:
        build_model("zoo:test-load-tinny")
    assert "test-load-tinny" in ei.value.message
    assert f"zoo:{zoo_model}" in ei.value.hint


def test_build_file_factory_and_class_with_sibling_import(model_file):
    m = build_model(parse_model_spec(f"{model_file}:build", ["width=6", "binary=true"]))
    assert type(m).__name__ == "FileNet" and m.binary is True
    assert m.block[0].in_features == 6
    c = build_model(f"{model_file}:FileNet")
    assert type(c).__name__ == "FileNet" and c.block[0].in_features == 4
    assert default_input_shape(parse_model_spec(f"{model_file}:build"), m) is None
    # the model's directory is only on sys.path while importing/building
    import sys

    assert str(model_file.parent) not in sys.path


def test_build_file_sees_edits(model_file):
    build_model(f"{model_file}:build")
    model_file.write_text(MODEL_FILE + "\ndef build2():\n    return nn.Linear(2, 2)\n")
    os.utime(model_file, ns=(1, 10**18))  # make sure the stamp changes even on coarse clocks
    assert isinstance(build_model(f"{model_file}:build2"), nn.Linear)


def test_build_module_spec(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg_testload"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        "from torch import nn\nclass Net(nn.Sequential):\n    def __init__(self, n=2):\n"
        "        super().__init__(nn.Linear(n, n))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    m = build_model(parse_model_spec("userpkg_testload.nets:Net", ["n=5"]))
    assert m[0].in_features == 5
    with pytest.raises(SpecError, match="module userpkg_testload.nope not found"):
        build_model("userpkg_testload.nope:Net")
    with pytest.raises(SpecError) as ei:
        build_model("userpkg_testload.nets:Nett")
    assert "Net" in ei.value.hint


def test_build_timm_tiny():
    spec = parse_model_spec("timm:test_resnet", ["num_classes=7"])
    m = build_model(spec)
    assert isinstance(m, nn.Module)
    assert m.get_classifier().out_features == 7
    shape = default_input_shape(spec, m)
    assert shape is not None and len(shape) == 3 and shape[0] == 3
    out = m.eval()(torch.zeros(1, *shape))
    assert out.shape == (1, 7)


def test_build_timm_unknown_and_pretrained_refused():
    with pytest.raises(SpecError) as ei:
        build_model("timm:resnet10tt")
    assert "timm:resnet10t" in ei.value.hint
    with pytest.raises(SpecError, match="never downloaded"):
        build_model(parse_model_spec("timm:test_resnet", ["pretrained=true"]))


def test_build_torchvision():
    spec = parse_model_spec("torchvision:squeezenet1_1", ["num_classes=4"])
    m = build_model(spec)
    assert m(torch.zeros(1, 3, 64, 64)).shape == (1, 4)
    assert default_input_shape(spec, m) == (3, 224, 224)
    with pytest.raises(SpecError) as ei:
        build_model("torchvision:resnet19")
    assert "torchvision:resnet18" in ei.value.hint
    with pytest.raises(SpecError, match="never downloaded"):
        build_model(parse_model_spec("torchvision:resnet18", ["weights=DEFAULT"]))


def test_factory_that_raises_is_model_load_error(model_file):
    with pytest.raises(ModelLoadError) as ei:
        build_model(f"{model_file}:broken")
    e = ei.value
    assert not isinstance(e, SpecError)
    assert e.message.startswith("building ") and "failed: ValueError: width must be even, got 4" in e.message
    assert "\n" not in e.message


def test_factory_bad_kwarg_hint_shows_signature(model_file):
    with pytest.raises(SpecError) as ei:  # a name the signature lacks: usage (exit 2), before the call
        build_model(parse_model_spec(f"{model_file}:build", ["depth=3"]))
    assert "unknown --arg 'depth'" in ei.value.message
    assert "width" in ei.value.hint and "binary" in ei.value.hint


def test_factory_must_return_module(model_file):
    with pytest.raises(ModelLoadError, match="returned a dict, not a torch.nn.Module"):
        build_model(f"{model_file}:not_a_model")
    with pytest.raises(SpecError, match="not a class or function"):
        build_model(f"{model_file}:the_answer")


def test_missing_attr_suggests(model_file):
    with pytest.raises(SpecError) as ei:
        build_model(f"{model_file}:buld")
    assert "build" in ei.value.hint


def test_file_with_import_error_is_model_load_error(tmp_path):
    f = tmp_path / "bad_model.py"
    f.write_text("import torch\nraise RuntimeError('boom at import')\n")
    with pytest.raises(ModelLoadError, match="importing .*bad_model.py failed: RuntimeError: boom at import"):
        build_model(f"{f}:anything")
    g = tmp_path / "syntax_model.py"
    g.write_text("def build(:\n    pass\n")
    with pytest.raises(ModelLoadError, match="SyntaxError"):
        build_model(f"{g}:build")


def test_file_deleted_after_parsing(model_file):
    spec = parse_model_spec(f"{model_file}:build")
    model_file.unlink()
    with pytest.raises(SpecError, match="does not exist"):
        build_model(spec)


# --------------------------------------------------------------------------- checkpoints


def test_safetensors_round_trip(tmp_path):
    sd = _tiny_sd()
    p = tmp_path / "w.safetensors"
    _io.atomic_save_safetensors(sd, p, metadata={"spec": "zoo:x"})
    got = load_state_dict_file(p)
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    m = TinyNet()
    rep = load_checkpoint(m, p)
    assert rep.ok and rep.loaded == len(sd) and _same(m, sd)


def test_safetensors_sniffed_without_suffix(tmp_path):
    sd = _tiny_sd()
    p = tmp_path / "weights.bin"
    _io.atomic_save_safetensors(sd, p)
    assert load_state_dict_file(p).keys() == sd.keys()


def test_pt_round_trip(tmp_path):
    sd = _tiny_sd()
    p = tmp_path / "w.pt"
    torch.save(sd, p)
    m = TinyNet()
    assert load_checkpoint(m, p).ok and _same(m, sd)


def test_legacy_pt_format(tmp_path):
    sd = _tiny_sd()
    p = tmp_path / "legacy.pth"
    torch.save(sd, p, _use_new_zipfile_serialization=False)
    assert load_state_dict_file(p).keys() == sd.keys()


@pytest.mark.parametrize("inner", ["state_dict", "model", "net", "module"])
def test_inner_keys_are_unwrapped(tmp_path, inner):
    sd = _tiny_sd()
    p = tmp_path / "ckpt.pt"
    torch.save({"epoch": 7, "optimizer": {"state": {}, "param_groups": []}, inner: sd, "best_acc": 0.9}, p)
    m = TinyNet()
    assert load_checkpoint(m, p).ok and _same(m, sd)


def test_ema_only_when_asked(tmp_path):
    sd = _tiny_sd()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    p = tmp_path / "ckpt.pt"
    torch.save({"state_dict_ema": ema, "state_dict": sd}, p)
    assert torch.equal(load_state_dict_file(p)["fc.weight"], sd["fc.weight"])
    assert torch.equal(load_state_dict_file(p, use_ema=True)["fc.weight"], ema["fc.weight"])
    q = tmp_path / "ema_only.pt"
    torch.save({"state_dict_ema": ema, "epoch": 3}, q)
    assert torch.equal(load_state_dict_file(q)["fc.weight"], ema["fc.weight"])


def test_nested_wrappers(tmp_path):
    sd = _tiny_sd()
    p = tmp_path / "ckpt.pt"
    torch.save({"model": {"state_dict": sd, "arch": "tiny"}}, p)
    assert load_state_dict_file(p).keys() == sd.keys()


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_prefixes_stripped(tmp_path, prefix):
    sd = _tiny_sd()
    p = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {prefix + k: v for k, v in sd.items()}}, p)
    m = TinyNet()
    assert load_checkpoint(m, p).ok and _same(m, sd)


def test_prefix_kept_unless_all_keys_have_it(tmp_path):
    sd = _tiny_sd()
    mixed = {("module." + k if k.startswith("conv") else k): v for k, v in sd.items()}
    p = tmp_path / "ckpt.pt"
    torch.save(mixed, p)
    assert set(load_state_dict_file(p)) == set(mixed)


def test_non_tensor_values_dropped_and_empty_refused(tmp_path):
    sd = _tiny_sd()
    p = tmp_path / "ckpt.pt"
    torch.save({**sd, "epoch": 3, "note": "hi"}, p)
    assert set(load_state_dict_file(p)) == set(sd)
    q = tmp_path / "empty.pt"
    torch.save({"epoch": 3, "acc": 0.5}, q)
    with pytest.raises(CheckpointError, match="holds no tensors .*epoch, acc"):
        load_state_dict_file(q)
    r = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], r)
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_state_dict_file(r)


def test_strict_mismatch_lists_keys(tmp_path):
    sd = _tiny_sd()
    sd["fc.weights"] = sd.pop("fc.weight")  # as in the wild: weight -> weights
    p = tmp_path / "renamed.pt"
    torch.save(sd, p)
    m = TinyNet()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(m, p)
    e = ei.value
    assert e.message == (
        f"checkpoint {p} does not fit the model: 1 missing (fc.weight), 1 unexpected (fc.weights), "
        "0 shape mismatches"
    )
    assert "--non-strict" in e.hint
    assert _same(m, before), "a refused strict load must not modify the model"


def test_strict_mismatch_truncates_long_key_lists(tmp_path):
    sd = {f"x{i}.weight": torch.zeros(1) for i in range(6)}
    p = tmp_path / "other.pt"
    torch.save(sd, p)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(TinyNet(), p)
    msg = ei.value.message
    assert "7 missing (conv.weight, bn.weight, bn.bias, ...)" in msg  # bn.num_batches_tracked: torch keeps its own
    assert "6 unexpected (x0.weight, x1.weight, x2.weight, ...)" in msg
    assert "\n" not in msg


def test_shape_mismatch_is_reported_not_crashing(tmp_path):
    p = tmp_path / "wide.pt"
    torch.save(_tiny_sd(num_classes=5), p)
    m = TinyNet(num_classes=3)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(m, p)
    msg = ei.value.message
    assert "0 missing, 0 unexpected, 2 shape mismatches" in msg
    assert "fc.weight: checkpoint [5, 4] vs model [3, 4]" in msg
    assert "size mismatch" not in msg and "\n" not in msg  # not torch's RuntimeError text
    # non-strict loads what fits and reports the rest
    rep = load_checkpoint(m, p, strict=False)
    assert isinstance(rep, LoadReport) and not rep.ok
    assert rep.shape_mismatch == [("fc.weight", (5, 4), (3, 4)), ("fc.bias", (5,), (3,))]
    assert rep.missing == [] and rep.unexpected == []
    assert torch.equal(m.conv.weight, _tiny_sd(num_classes=5)["conv.weight"])


def test_non_strict_partial_and_nothing_fits(tmp_path):
    sd = _tiny_sd()
    del sd["fc.bias"]
    sd["extra.weight"] = torch.zeros(2)
    p = tmp_path / "partial.pt"
    torch.save(sd, p)
    m = TinyNet()
    rep = load_checkpoint(m, p, strict=False)
    assert rep.missing == ["fc.bias"] and rep.unexpected == ["extra.weight"]
    assert torch.equal(m.fc.weight, sd["fc.weight"])
    q = tmp_path / "alien.pt"
    torch.save({"foo": torch.zeros(1)}, q)
    with pytest.raises(CheckpointError, match="has no parameter that fits"):
        load_checkpoint(TinyNet(), q, strict=False)


def test_lightning_model_prefix_stripped_and_reported(tmp_path):
    sd = _tiny_sd()
    p = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 3}, p)  # a LightningModule's
    m = TinyNet()
    rep = load_checkpoint(m, p)
    assert rep.ok and _same(m, sd)
    assert (rep.inner_key, rep.prefix, rep.loaded, rep.total) == ("state_dict", "model.", len(sd), len(sd))


def test_extra_prefix_hint(tmp_path):
    sd = {"encoder." + k: v for k, v in _tiny_sd().items()}  # not a wrapper prefix: never guessed
    p = tmp_path / "enc.ckpt"
    torch.save({"state_dict": sd}, p)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(TinyNet(), p)
    assert "'encoder.' prefix" in ei.value.hint


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict_file(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is not a file"):
        load_state_dict_file(tmp_path)


@pytest.mark.parametrize("name", ["random.pt", "random.safetensors", "random.bin"])
def test_random_bytes_are_corrupt(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as ei:
        load_state_dict_file(p)
    assert not isinstance(ei.value, UnsafeCheckpointError)
    assert ei.value.message == f"checkpoint {p} is corrupt or not a PyTorch/safetensors file"


def test_truncated_checkpoints_are_corrupt(tmp_path):
    src = tmp_path / "full.pt"
    torch.save(_tiny_sd(), src)
    assert zipfile.is_zipfile(src)
    data = src.read_bytes()
    for cut in (len(data) // 2, 100, 10):
        p = tmp_path / f"cut{cut}.pt"
        p.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="is corrupt or not a PyTorch/safetensors file"):
            load_state_dict_file(p)
    st = tmp_path / "full.safetensors"
    _io.atomic_save_safetensors(_tiny_sd(), st)
    d = st.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(d[: len(d) - 50])
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_state_dict_file(tmp_path / "cut.safetensors")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_state_dict_file(tmp_path / "empty.pt")


def test_pickled_module_refused_then_allowed(tmp_path):
    torch.manual_seed(1)
    model = TinyNet()
    p = tmp_path / "whole_model.pt"
    torch.save(model, p)
    with pytest.raises(UnsafeCheckpointError) as ei:
        load_state_dict_file(p)
    e = ei.value
    assert f"{TinyNet.__module__}.TinyNet" in e.message
    assert e.message.startswith(f"checkpoint {p} needs unpickling of code (globals: ")
    assert "--unsafe-load" in e.hint and "state_dict" in e.hint
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(TinyNet(), p)  # never an automatic fallback
    sd = load_state_dict_file(p, allow_unsafe=True)
    assert _same(model, sd)
    m = TinyNet()
    assert load_checkpoint(m, p, allow_unsafe=True).ok and _same(m, model.state_dict())


def test_pickled_module_inside_dict_allowed_when_unsafe(tmp_path):
    model = TinyNet()
    p = tmp_path / "dict_model.pt"
    torch.save({"model": model, "epoch": 1}, p)
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict_file(p)
    assert _same(model, load_state_dict_file(p, allow_unsafe=True))


class _Custom:
    def __init__(self):
        self.x = 1


def test_custom_class_in_checkpoint_refused(tmp_path):
    p = tmp_path / "custom.pt"
    torch.save({"state_dict": _tiny_sd(), "cfg": _Custom()}, p)
    with pytest.raises(UnsafeCheckpointError, match=r"_Custom"):
        load_state_dict_file(p)
    assert set(load_state_dict_file(p, allow_unsafe=True)) == set(_tiny_sd())


def test_unsafe_with_unimportable_class(tmp_path):
    p = tmp_path / "gone.pt"
    torch.save({"state_dict": _tiny_sd(), "cfg": _Custom()}, p)
    # rename the class's module inside the pickle to one that does not exist (same length)
    mod = _Custom.__module__.encode()
    fake = b"z" * len(mod)
    q = tmp_path / "gone2.pt"
    with zipfile.ZipFile(p) as zin, zipfile.ZipFile(q, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert mod in data
                data = data.replace(mod, fake)
            zout.writestr(info, data)
    with pytest.raises(CheckpointError, match="cannot be imported"):
        load_state_dict_file(q, allow_unsafe=True)


def test_load_model_end_to_end(zoo_model, tmp_path):
    sd = _tiny_sd(width=6)
    p = tmp_path / "w.safetensors"
    _io.atomic_save_safetensors(sd, p)
    lm = load_model(f"zoo:{zoo_model}", args=["width=6"], checkpoint=str(p))
    assert _same(lm.model, sd) and not lm.model.training
    assert lm.spec.args == {"width": 6} and lm.spec.kind == "zoo"
    assert lm.checkpoint == str(p.resolve())
    assert lm.checkpoint_sha256 == _io.sha256_file(p) and len(lm.checkpoint_sha256) == 64
    assert lm.load_report.ok and lm.input_shape == (1, 8, 8)
    # a ModelSpec plus extra args: the extra args win
    lm2 = load_model(parse_model_spec(f"zoo:{zoo_model}", ["width=3"]), args={"width": 6})
    assert lm2.model.conv.out_channels == 6 and lm2.checkpoint is None and lm2.load_report is None
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model(f"zoo:{zoo_model}", checkpoint=str(p))  # width 4 model, width 6 weights


# --------------------------------------------------------------------------- _io


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_atomic_writes_round_trip(tmp_path):
    _io.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    _io.atomic_write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    _io.atomic_write_json(tmp_path / "j.json", {"b": 1, "a": [1, 2]})
    text = (tmp_path / "j.json").read_text()
    assert text == '{\n  "b": 1,\n  "a": [\n    1,\n    2\n  ]\n}\n'  # indent 2, order kept, newline
    _io.atomic_write_text(tmp_path / "t.txt", "second")
    assert (tmp_path / "t.txt").read_text() == "second"
    assert _leftovers(tmp_path) == []
    mode = (tmp_path / "t.txt").stat().st_mode & 0o777
    assert mode == 0o666 & ~_io._UMASK  # not mkstemp's 0600


def test_atomic_json_failure_leaves_old_file(tmp_path):
    p = tmp_path / "r.json"
    _io.atomic_write_json(p, {"ok": True})
    with pytest.raises(TypeError):
        _io.atomic_write_json(p, {"bad": object()})
    assert json.loads(p.read_text()) == {"ok": True}
    assert _leftovers(tmp_path) == []


def test_atomic_failure_mid_write_removes_temp(tmp_path, monkeypatch):
    p = tmp_path / "r.txt"
    p.write_text("old")

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_io.os, "fsync", boom)
    with pytest.raises(OutputError, match="cannot write .*r.txt: No space left on device"):
        _io.atomic_write_text(p, "new")
    monkeypatch.undo()
    assert p.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_failure_interrupt_removes_temp(tmp_path, monkeypatch):
    p = tmp_path / "r.txt"

    def interrupt(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(_io.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _io.atomic_write_bytes(p, b"x")
    monkeypatch.undo()
    assert not p.exists() and list(tmp_path.iterdir()) == []


def test_atomic_safetensors_failure_leaves_nothing(tmp_path):
    p = tmp_path / "w.safetensors"
    _io.atomic_save_safetensors({"a": torch.ones(2)}, p)
    with pytest.raises(TypeError):
        _io.atomic_save_safetensors({"a": torch.zeros(2), "b": "not a tensor"}, p)
    with pytest.raises(TypeError):
        _io.atomic_save_safetensors({"a": torch.zeros(2)}, p, metadata={"n": 3})
    assert torch.equal(load_state_dict_file(p)["a"], torch.ones(2))
    assert _leftovers(tmp_path) == []


def test_atomic_safetensors_metadata_and_shared_tensors(tmp_path):
    from safetensors import safe_open

    w = torch.randn(4, 4)
    p = tmp_path / "w.safetensors"
    _io.atomic_save_safetensors({"a": w, "tied": w, "t": w.t()}, p, metadata={"spec": "zoo:x"})
    with safe_open(str(p), "pt") as f:
        assert f.metadata() == {"spec": "zoo:x"}
    got = load_state_dict_file(p)
    assert torch.equal(got["a"], w) and torch.equal(got["tied"], w) and torch.equal(got["t"], w.t())


def test_atomic_write_creates_missing_parents_but_a_file_parent_is_output_error(tmp_path):
    # outputs behave like mkdir -p (docs/cli.md); a parent that is a file cannot be made a dir
    dest = tmp_path / "no" / "such" / "f.txt"
    assert _io.atomic_write_text(dest, "x") == dest and dest.read_text() == "x"
    (tmp_path / "plain").write_text("")
    with pytest.raises(OutputError, match="cannot write"):
        _io.atomic_write_text(tmp_path / "plain" / "f.txt", "x")


def test_prepare_output_dir(tmp_path):
    new = tmp_path / "a" / "b"
    assert _io.prepare_output_dir(new, force=False) == new and new.is_dir()
    assert _io.prepare_output_dir(new, force=False) == new  # empty: fine
    assert list(new.iterdir()) == []  # the write probe is removed
    (new / "report.json").write_text("{}")
    with pytest.raises(OutputError) as ei:
        _io.prepare_output_dir(new, force=False)
    assert ei.value.message == f"output directory {new} is not empty"
    assert ei.value.hint == "pass --force to overwrite"
    assert _io.prepare_output_dir(new, force=True) == new
    assert (new / "report.json").exists()  # --force overwrites, it does not wipe
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        _io.prepare_output_dir(f, force=True)
    with pytest.raises(OutputError) as ei:
        _io.prepare_output_dir(f / "sub", force=True)
    assert ei.value.message.startswith(f"cannot create output directory {f / 'sub'}")
    assert "\n" not in ei.value.message


def test_prepare_output_dir_not_writable(tmp_path, monkeypatch):
    d = tmp_path / "ro"
    d.mkdir()

    def deny(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(_io.tempfile, "mkstemp", deny)  # chmod does not stop root
    with pytest.raises(OutputError) as ei:
        _io.prepare_output_dir(d, force=False)
    assert ei.value.message == f"output directory {d} is not writable: Permission denied"


def test_sha256_file(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"abc")
    assert _io.sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_sha256_state_dict_stable_and_sensitive():
    sd = _tiny_sd()
    h = _io.sha256_state_dict(sd)
    assert h == _io.sha256_state_dict(dict(reversed(list(sd.items()))))  # order-independent
    assert h == _io.sha256_state_dict({k: v.clone() for k, v in sd.items()})
    nc = {k: (v.t().contiguous().t() if v.dim() == 2 else v) for k, v in sd.items()}  # strides
    assert h == _io.sha256_state_dict(nc)
    changed = dict(sd)
    changed["fc.bias"] = sd["fc.bias"].clone()
    changed["fc.bias"][0] += 1
    assert _io.sha256_state_dict(changed) != h
    assert _io.sha256_state_dict({**sd, "fc.bias": sd["fc.bias"].double()}) != h  # dtype
    assert _io.sha256_state_dict({**sd, "fc.bias": sd["fc.bias"].view(1, -1)}) != h  # shape
    renamed = {("fc.b" if k == "fc.bias" else k): v for k, v in sd.items()}
    assert _io.sha256_state_dict(renamed) != h
    bf = {"x": torch.ones(3, dtype=torch.bfloat16), "m": torch.tensor([True, False]), "s": torch.tensor(2)}
    assert len(_io.sha256_state_dict(bf)) == 64
    # a known value pins the format (changing it invalidates stored hashes)
    pinned = {"b": torch.arange(3, dtype=torch.int64), "a": torch.zeros(2)}
    assert _io.sha256_state_dict(pinned) == "ed525ef0748e06596f30fbd83baf037f7422a49c139c8da73e49e2319b7c0b9e"


def test_two_model_files_with_their_own_sibling_module_in_one_process(tmp_path):
    """Two model files in two folders, each importing its own ``blocks.py``: loaded one after the
    other in one process, each gets its own sibling (not the one cached by the first import)."""
    from bnnshift.load import _import_file

    mods = []
    for width in (3, 5):
        d = tmp_path / f"proj{width}"
        d.mkdir()
        (d / "blocks.py").write_text(f"WIDTH = {width}\n")
        (d / "net.py").write_text("from blocks import WIDTH\n")
        mods.append(_import_file(str(d / "net.py")))
    assert [m.WIDTH for m in mods] == [3, 5]
