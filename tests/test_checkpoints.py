"""Load what users have (issue 10): factories wrapped in DataParallel / torch.compile, the
checkpoint layouts of real training scripts, the load report in every JSON output and artifact,
--unsafe-load finding classes like `python` would, the input shape from --data, and models
whose forward returns (logits, features). Cases 03, 04, 05, 15, 17, 33 of /work/shared/cases."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from bnnshift.cli import app
from bnnshift.errors import CheckpointError, UnsafeCheckpointError
from bnnshift.load import load_checkpoint, load_model
from bnnshift.patch import load_patched, read_recipe

MODELS = Path(__file__).resolve().parent / "models" / "tiny_bnn.py"
SPEC = f"{MODELS}:build"
runner = CliRunner()


@pytest.fixture(autouse=True)
def own_trust_file(tmp_path, monkeypatch):
    monkeypatch.setenv("BNNSHIFT_TRUST_FILE", str(tmp_path / "state" / "trusted_recipes"))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def trained_sd(seed=0):
    """The plain model's state_dict with non-trivial BN statistics (as after training)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_bnn_ref", MODELS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(seed)
    net = mod.build()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
    return net.state_dict(), mod


def x16(n=4):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- wrapped factories (case 03)


@pytest.mark.parametrize("factory,prefix", [("build_dp", "module."), ("build_compiled", "_orig_mod.")])
def test_wrapped_factory_with_its_own_checkpoint_round_trips(tmp_path, factory, prefix):
    sd, mod = trained_sd()
    ckpt = tmp_path / "ckpt.pth.tar"
    torch.save({"state_dict": {prefix + k: v for k, v in sd.items()}, "epoch": 3}, ckpt)  # saved from the wrapper
    spec = f"{MODELS}:{factory}"
    r = invoke("scan", spec, "--checkpoint", ckpt, "--input-shape", "1,16,16", "--json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["checkpoint"]["prefix"] == prefix and rep["checkpoint"]["loaded"] == len(sd)
    assert "using the module inside it" in r.stderr  # the unwrapping is said
    out = tmp_path / "out"
    # both wrappers unwrap to the same TinyBNN: one dynamo export (the compiled one, case 03's
    # command) proves `--onnx` after unwrapping; exporting the same module twice only cost time
    onnx = ["--onnx", tmp_path / "m.onnx"] if factory == "build_compiled" else []
    r = invoke("patch", spec, "--checkpoint", ckpt, "--input-shape", "1,16,16", "--shift", "0.5", "-o", out,
               *onnx, "-q")
    assert r.exit_code == 0, r.stderr
    written = load_file(out / "model.safetensors")
    assert all(torch.equal(written[k], v) for k, v in sd.items())
    m = load_patched(out)
    ref = mod.build()
    ref.load_state_dict(sd)
    ref.eval()
    for a in (ref.act1, ref.act2):
        a.register_forward_pre_hook(lambda _m, args: (args[0] - 0.5,))
    with torch.no_grad():
        assert torch.allclose(m(x16()), ref(x16()), atol=1e-6)
    assert (tmp_path / "m.onnx").is_file() == bool(onnx)


def test_prefix_kept_when_the_model_has_it(tmp_path):
    """A wrapper the loader does not unwrap: the model's own keys carry `module.`, so does the file."""
    sd, mod = trained_sd()
    wrapped = torch.nn.Sequential()
    wrapped.add_module("module", mod.build())
    ckpt = tmp_path / "w.pt"
    torch.save({"module." + k: v for k, v in sd.items()}, ckpt)
    rep = load_checkpoint(wrapped, ckpt)
    assert rep.ok and rep.prefix is None and rep.loaded == len(sd)


# --------------------------------------------------------------------------- layouts (case 04)


def _layouts(sd):
    ema = {k: (v + 1 if v.is_floating_point() else v) for k, v in sd.items()}
    return {
        "tutorial": ({"epoch": 3, "model_state_dict": sd, "optimizer_state_dict": {"state": {}, "param_groups": []},
                      "loss": 0.4}, "model_state_dict", None, sd),
        "numpy": ({"state_dict": sd, "best_acc": np.float64(0.91), "dtype": np.dtype("float32"),
                   "hist": np.arange(3)}, "state_dict", None, sd),
        "namespace": ({"state_dict": sd, "args": argparse.Namespace(lr=0.1, arch="tiny")}, "state_dict", None, sd),
        "lightning": ({"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 1}, "state_dict", "model.", sd),
        "net": ({"net": {"net." + k: v for k, v in sd.items()}}, "net", "net.", sd),
        "ema_present": ({"state_dict": sd, "state_dict_ema": ema}, "state_dict", None, sd),
    }


@pytest.mark.parametrize("name", ["tutorial", "numpy", "namespace", "lightning", "net", "ema_present"])
def test_checkpoint_layouts_load_safely(tmp_path, name):
    sd, mod = trained_sd()
    obj, inner, prefix, want = _layouts(sd)[name]
    p = tmp_path / f"{name}.pth"
    torch.save(obj, p)
    m = mod.build()
    rep = load_checkpoint(m, p)  # weights_only=True: no --unsafe-load needed
    assert rep.ok and (rep.inner_key, rep.prefix) == (inner, prefix)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in want.items())
    if name == "ema_present":
        assert any("--use-ema" in n for n in rep.notes)


def test_use_ema_cli_and_report(tmp_path):
    sd, _ = trained_sd()
    ema = {k: (v + 1 if v.is_floating_point() else v) for k, v in sd.items()}
    p = tmp_path / "ema.pth"
    torch.save({"model": sd, "model_ema": ema}, p)
    out = tmp_path / "out"
    r = invoke("patch", SPEC, "--checkpoint", p, "--use-ema", "--input-shape", "1,16,16", "--shift", "0", "-o", out,
               "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["checkpoint"]["inner_key"] == "model_ema"
    written = load_file(out / "model.safetensors")
    assert torch.equal(written["stem.weight"], ema["stem.weight"])
    q = tmp_path / "plain.pth"
    torch.save(sd, q)
    r = invoke("scan", SPEC, "--checkpoint", q, "--use-ema", "--input-shape", "1,16,16")
    assert r.exit_code == 1 and "--use-ema" in r.stderr


def test_dangerous_global_refused_as_such(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    sd, mod = trained_sd()
    p = tmp_path / "evil.pth"
    torch.save({"state_dict": sd, "x": Evil()}, p)
    for unsafe in (False, True):
        with pytest.raises(UnsafeCheckpointError, match="system") as ei:
            load_checkpoint(mod.build(), p, allow_unsafe=unsafe)
        assert "corrupt" not in ei.value.message
    assert not (tmp_path / "PWNED").exists()


def test_nonfinite_weights_refused_naming_keys(tmp_path):
    sd, mod = trained_sd()
    sd = dict(sd)
    sd["conv1.weight"] = sd["conv1.weight"].clone()
    sd["conv1.weight"][0, 0, 0, 0] = float("nan")
    p = tmp_path / "nan.pt"
    torch.save(sd, p)
    with pytest.raises(CheckpointError, match="conv1.weight") as ei:
        load_checkpoint(mod.build(), p)
    assert "--allow-nonfinite" in ei.value.hint
    r = invoke("scan", SPEC, "--checkpoint", p, "--input-shape", "1,16,16", "--allow-nonfinite", "--json")
    assert r.exit_code == 0, r.stderr
    assert any("non-finite" in n for n in json.loads(r.stdout)["checkpoint"]["notes"])


# --------------------------------------------------------------------------- the load report (case 05)


def test_non_strict_report_everywhere(tmp_path):
    sd, _ = trained_sd()
    ren = {k.replace("conv1.", "binary_conv.").replace("bn1.", "bn_b."): v for k, v in sd.items()}
    p = tmp_path / "renamed.pt"
    torch.save(ren, p)
    ck = ["--checkpoint", p, "--input-shape", "1,16,16"]
    r = invoke("scan", SPEC, *ck)
    assert r.exit_code == 1 and "conv1.weight" in r.stderr
    r = invoke("scan", SPEC, *ck, "--non-strict")
    assert r.exit_code == 0, r.stderr
    n_own = len(sd)
    assert f"loaded {n_own - 6} of {n_own}" in r.stderr and "binary_conv.weight" in r.stderr
    r = invoke("scan", SPEC, *ck, "--non-strict", "--json")
    c = json.loads(r.stdout)["checkpoint"]
    assert (c["loaded"], c["total"], c["strict"]) == (n_own - 6, n_own, False)
    assert "conv1.weight" in c["missing"] and "binary_conv.weight" in c["unexpected"]
    out = tmp_path / "out"
    r = invoke("patch", SPEC, *ck, "--non-strict", "--shift", "0.5", "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["checkpoint"]["missing"] == c["missing"]
    rec = json.loads((out / "patch.json").read_text())["checkpoint"]
    assert rec["missing"] == c["missing"] and rec["path"] == "../renamed.pt" and rec["sha256"]
    r = invoke("fold", out, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["checkpoint"]["missing"] == c["missing"]
    r = invoke("search", SPEC, *ck, "--non-strict", "--data", "synthetic:64", "--shifts", "0,0.5", "--steps", "1",
               "--batch-size", "32", "--compile", "off", "--out", tmp_path / "s", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["checkpoint"]["missing"] == c["missing"]
    assert json.loads((tmp_path / "s" / "search.json").read_text())["checkpoint"]["unexpected"] == c["unexpected"]


def test_no_checkpoint_is_null_in_json(tmp_path):
    r = invoke("scan", SPEC, "--input-shape", "1,16,16", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["checkpoint"] is None


# --------------------------------------------------------------------------- --unsafe-load (case 15)


def test_unsafe_load_finds_the_model_files_folder(tmp_path):
    d = tmp_path / "proj"
    d.mkdir()
    shutil.copy(MODELS, d / "model.py")
    subprocess.run([sys.executable, "-c", "import torch, model; m = model.build(); "
                    "torch.save(m, 'full.pth'); torch.save(m.state_dict(), 'x.pt')"],
                   cwd=d, check=True, env={**os.environ, "PYTHONPATH": str(d)})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        with pytest.raises(UnsafeCheckpointError, match="model.TinyBNN"):
            load_model(f"{d / 'model.py'}:build", checkpoint=d / "full.pth")
        lm = load_model(f"{d / 'model.py'}:build", checkpoint=d / "full.pth", allow_unsafe=True)
    finally:
        os.chdir(cwd)
    assert lm.load_report.ok and lm.load_report.loaded == len(lm.model.state_dict())
    sd = torch.load(d / "x.pt", weights_only=True)  # the same seed: the pickled model's weights
    assert all(torch.equal(lm.model.state_dict()[k], v) for k, v in sd.items())


# --------------------------------------------------------------------------- shapes and outputs (cases 33, 17)

DATA = '''
import torch

def load(**kwargs):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 12, 12, generator=g)
    y = torch.randint(0, 10, (96,), generator=g)
    return x, y, x[:32], y[:32]
'''


def test_scan_and_search_take_the_shape_from_data(tmp_path):
    (tmp_path / "data.py").write_text(DATA)
    data = f"{tmp_path / 'data.py'}:load"
    r = invoke("scan", SPEC, "--data", data, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["input_shape"] == [1, 12, 12]
    assert "from the samples of --data" in r.stderr
    r = invoke("search", SPEC, "--data", data, "--shifts", "0,0.5", "--steps", "1", "--batch-size", "32",
               "--compile", "off", "--json")
    assert r.exit_code == 0, r.stderr
    assert all(c["status"] == "ok" for c in json.loads(r.stdout)["candidates"])
    r = invoke("search", SPEC, "--data", data, "--input-shape", "12", "--shifts", "0", "--steps", "1")
    assert r.exit_code == 2 and "C,H,W" in r.stderr


def test_scan_without_data_guesses_from_the_first_conv(tmp_path):
    r = invoke("scan", SPEC, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["input_shape"] == [1, 32, 32] and "first conv" in r.stderr


TRAIN_CONFIG = '''
import torch
import torch.nn.functional as F

def setup(model, config):
    def loss_fn(out, y):
        assert isinstance(out, (tuple, list)), "the loss receives the raw output"
        logits, feats = out
        return F.cross_entropy(logits, y) + 0.0 * sum(f.mean() for f in feats)
    return {"optimizer": torch.optim.Adam(model.parameters(), lr=1e-3), "loss_fn": loss_fn}
'''


def test_kd_model_searched_through_the_cli(tmp_path):
    (tmp_path / "train_config.py").write_text(TRAIN_CONFIG)
    kd = f"{MODELS}:build_kd"
    common = ["--input-shape", "1,16,16", "--data", "synthetic:64", "--shifts", "0,0.5", "--steps", "2",
              "--batch-size", "32", "--compile", "off"]
    r = invoke("search", kd, *common, "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert all(c["status"] == "ok" for c in d["candidates"]) and any("element 0" in n for n in d["notes"])
    r = invoke("search", kd, *common, "--train-config", f"{tmp_path / 'train_config.py'}:setup", "--json")
    assert r.exit_code == 0, r.stderr
    assert all(c["status"] == "ok" for c in json.loads(r.stdout)["candidates"])
    r = invoke("search", kd, *common, "--output-index", "1")
    assert r.exit_code == 2 and "element 1" in r.stderr


def test_pick_logits_of_output_structures():
    from bnnshift.errors import UsageError
    from bnnshift.load import pick_logits

    t, f = torch.zeros(2, 3), torch.ones(2, 4, 5, 5)
    assert pick_logits(t) == (t, None)
    got, note = pick_logits((t, [f]))
    assert got is t and "element 0" in note
    assert pick_logits([f.flatten(1), t], index=1)[0] is t
    assert pick_logits({"logits": t, "aux": f})[0] is t
    assert pick_logits({"out": t}, key="out")[0] is t
    with pytest.raises(UsageError, match="keys: out") as ei:
        pick_logits({"out": t})
    assert "--output-key" in ei.value.hint
    with pytest.raises(UsageError, match="element 1 is not a tensor"):
        pick_logits((t, [f]), index=1)


def test_half_model_runs_in_float32_and_says_so():
    r = invoke("scan", f"{MODELS}:build_half", "--input-shape", "1,16,16", "--json")
    assert r.exit_code == 0, r.stderr
    assert "float16" in r.stderr and json.loads(r.stdout)["num_sites"] == 2
