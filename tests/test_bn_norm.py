"""Issue 19 items 1 and 2: the normalisation belongs to the model, and BN re-estimation never makes
a model worse.

Built here: a class-sorted image folder (4 brightness classes, as torchvision's ImageFolder lists
them: class by class), a small binary CNN trained with a non-default normalisation (mean 0.5, std
0.25), shifted with ``patch --mean 0.5 --std 0.25`` and correctly recalibrated (``recalibrate_bn``
on shuffled batches + ``save_patched``, docs/finetune.md). Then ``fold`` / ``export --data`` must
keep its eval accuracy and record the normalisation; a data set that would be normalised with its
own statistics while none is recorded is refused; the re-estimation and the staleness check do not
depend on the order of the data; new statistics that score lower are not kept.
"""
from __future__ import annotations

import json
import shutil
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from bnnshift import bn_staleness, load_patched, recalibrate_bn
from bnnshift.cli import app
from bnnshift.data import load_data
from bnnshift.patch import bn_statistics_current, read_recipe, save_patched
from bnnshift.recalibrate import reestimate_bn

MEAN, STD = 0.5, 0.25  # the user's normalisation (not the folder's own: pixel mean ~0.42, std ~0.17)
LEVELS = (0.2, 0.35, 0.5, 0.65)
SIDE = 12
PER_CLASS = 96

MODEL_PY = textwrap.dedent('''
    import os, json
    import torch
    import torch.nn as nn
    import torch.nn.functional as F


    class SignSTE(nn.Module):
        def forward(self, x):
            c = x.clamp(-1, 1)
            return (torch.sign(x) - c).detach() + c


    class Net(nn.Module):
        def __init__(self, in_chans=3, classes=4):
            super().__init__()
            self.stem = nn.Conv2d(in_chans, 8, 3, padding=1, bias=False)
            self.bn0 = nn.BatchNorm2d(8)
            self.act1 = SignSTE()
            self.conv1 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.act2 = SignSTE()
            self.head = nn.Linear(16, classes)

        def forward(self, x):
            p = os.environ.get("PROBE_OUT")
            if p and self.training and x.shape[0] > 8 and not os.path.exists(p):
                with open(p, "w") as f:
                    json.dump({"min": float(x.min()), "max": float(x.max()), "std": float(x.std())}, f)
            h = self.act1(self.bn0(self.stem(x)))
            h = self.act2(self.bn1(self.conv1(h)))
            return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


    def build():
        return Net(3)


    def build_grey():
        return Net(1)
''')


def _run(args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _images(root, per_class=PER_CLASS, mode="RGB", seed=0):
    """root/{train,val}/<class>/*.png: exposure classes, jitter and noise."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c, level in enumerate(LEVELS):
            d = root / split / f"{c}_level"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                v = level + rng.normal(0, 0.04) + rng.normal(0, 0.08, (SIDE, SIDE, 3))
                a = (np.clip(v, 0, 1) * 255).astype(np.uint8)
                Image.fromarray(a, "RGB").convert(mode).save(d / f"{i:03d}.png")
    return root


def _tensors(root, split, shuffled=False):
    """The user's pipeline: file order (class by class), (pixel - 0.5) / 0.25."""
    files = sorted((root / split).glob("*/*.png"))
    x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in files])
    y = torch.tensor([int(p.parent.name[0]) for p in files])
    x = (x.float() / 255 - MEAN) / STD
    if shuffled:
        p = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))
        x, y = x[p], y[p]
    return x, y


def _acc(model, x, y):
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _onnx_acc(path, x, y):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
    return float((torch.from_numpy(out).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(root, images, P without a recorded normalisation, R recorded + recalibrated, R's val accuracy)."""
    root = tmp_path_factory.mktemp("bnnorm")
    (root / "model.py").write_text(MODEL_PY)
    images = _images(root / "images")
    tx, ty = _tensors(images, "train", shuffled=True)
    vx, vy = _tensors(images, "val")
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bnnorm_model", root / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    m = mod.build().train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(120):
        idx = torch.randint(0, len(tx), (64,), generator=g)
        loss = F.cross_entropy(m(tx[idx]), ty[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(m.state_dict(), root / "ck.pt")
    spec_ = f"{root / 'model.py'}:build"
    for name, extra in (("P0", []), ("P", ["--mean", MEAN, "--std", STD])):
        res = _run(["patch", spec_, "--checkpoint", root / "ck.pt", "--input-shape", f"3,{SIDE},{SIDE}",
                    "--shift", "0.3", "-o", root / name, "-q", *extra])
        assert res.exit_code == 0, res.output
    # the user's fine-tuning after the shift, then BN re-estimation on shuffled batches (docs/finetune.md)
    m = load_patched(root / "P").train()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(40):
        idx = torch.randint(0, len(tx), (64,), generator=g)
        loss = F.cross_entropy(m(tx[idx]), ty[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    recalibrate_bn(m, [tx[i:i + 128] for i in range(0, len(tx), 128)])
    save_patched(m, read_recipe(root / "P"), root / "R")
    r_acc = _acc(load_patched(root / "R"), vx, vy)
    assert r_acc >= 0.85, r_acc  # setup: a good, correctly recalibrated model
    return {"root": root, "images": images, "P0": root / "P0", "R": root / "R", "acc": r_acc, "vx": vx, "vy": vy,
            "spec": spec_}


def _copy(src, dst):
    """A copy beside ``src`` (the recipe names ../model.py relative to its directory)."""
    dst = src.parent / f"{dst.parent.name}-{dst.name}"
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- done-when of issue 19


def test_fold_and_export_data_keep_a_recalibrated_models_accuracy_and_record_the_normalisation(setup, tmp_path):
    recipe = read_recipe(setup["R"])
    assert recipe.normalisation == {"mean": [MEAN] * 3, "std": [STD] * 3, "source": "--mean/--std"}
    d = _copy(setup["R"], tmp_path / "F")
    res = _run(["fold", d, "--data", f"imagefolder:{setup['images']}", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    bn = out["bn_statistics"]
    assert bn["normalisation"]["mean"] == [MEAN] * 3 and bn["normalisation"]["std"] == [STD] * 3
    assert bn["normalisation"]["source"].startswith("patch.json")
    assert out["normalisation"]["mean"] == [MEAN] * 3
    a = _acc(load_patched(d), setup["vx"], setup["vy"])
    assert a >= setup["acc"] - 0.005, (a, setup["acc"], bn["before"], bn["candidate"])
    assert read_recipe(d).normalisation["std"] == [STD] * 3
    onnx = tmp_path / "m.onnx"
    res = _run(["export", setup["R"], "--onnx", onnx, "--data", f"imagefolder:{setup['images']}", "--batches", 1, "--json"])
    assert res.exit_code == 0, res.output
    o = _onnx_acc(onnx, setup["vx"], setup["vy"])
    assert o >= setup["acc"] - 0.005, (o, setup["acc"])
    import onnx as onnx_

    meta = {p.key: p.value for p in onnx_.load(str(onnx)).metadata_props}
    assert json.loads(meta["bnnshift_normalisation"])["mean"] == [MEAN] * 3


# ----------------------------------------------------------------------------- case 52: own statistics


@pytest.mark.parametrize("command", ["fold", "export"])
def test_data_with_its_own_statistics_and_nothing_recorded_is_refused(setup, tmp_path, command):
    d = _copy(setup["P0"], tmp_path / "d")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    onnx = tmp_path / "m.onnx"
    extra = ["--onnx", onnx] if command == "export" else []
    res = _run([command, d, *extra, "--data", f"imagefolder:{setup['images']}"])
    assert res.exit_code == 2, res.output
    assert "--mean" in res.output and "normali" in res.output
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before and not onnx.exists()


def test_integer_tensors_from_a_data_function_are_refused_too_then_accepted_with_mean_std(setup, tmp_path):
    """Another spelling of case 52: a file.py:function returning uint8 tensors (x, y, val_x, val_y)."""
    images = setup["images"]
    (tmp_path / "mydata.py").write_text(textwrap.dedent(f'''
        import numpy as np, torch
        from pathlib import Path
        from PIL import Image

        def _split(split):
            files = sorted(Path({str(images)!r}, split).glob("*/*.png"))
            x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in files])
            return x, torch.tensor([int(p.parent.name[0]) for p in files])

        def load():
            tx, ty = _split("train")
            vx, vy = _split("val")
            return tx, ty, vx, vy
    '''))
    d = _copy(setup["P0"], tmp_path / "d")
    res = _run(["fold", d, "--data", f"{tmp_path / 'mydata.py'}:load"])
    assert res.exit_code == 2 and "--mean" in res.output, res.output
    assert read_recipe(d).normalisation is None
    res = _run(["fold", d, "--data", f"{tmp_path / 'mydata.py'}:load", "--mean", MEAN, "--std", f"{STD},{STD},{STD}",
                "--json"])
    assert res.exit_code == 0, res.output
    assert read_recipe(d).normalisation == {"mean": [MEAN] * 3, "std": [STD] * 3, "source": "--mean/--std"}
    # the images' own statistics (mean ~0.42, std ~0.17) are not the model's: said, in --json too
    bn = json.loads(res.stdout)["bn_statistics"]
    assert bn["normalisation"]["source"] == "--mean/--std"


def test_a_clear_mismatch_with_the_recorded_normalisation_is_said(setup, tmp_path):
    d = _copy(setup["R"], tmp_path / "d")
    res = _run(["fold", d, "--data", f"imagefolder:{setup['images']}", "--mean", "0.9", "--std", "0.05", "--json"])
    assert res.exit_code == 0, res.output
    bn = json.loads(res.stdout)["bn_statistics"]
    assert any("differ clearly" in n for n in bn["notes"]), bn["notes"]
    assert "differ clearly" in " ".join(res.stderr.split())
    assert read_recipe(d).normalisation["mean"] == [0.9] * 3  # what the user asked for is what is recorded


# ----------------------------------------------------------------------------- case 55: order of the data


def test_class_sorted_uint8_factory_gives_the_same_fold_as_shuffled(setup, tmp_path):
    """Another spelling of case 55: module:function returning class-sorted uint8 tensors vs the same shuffled."""
    images = setup["images"]
    (tmp_path / "sorted_data.py").write_text(textwrap.dedent(f'''
        import numpy as np, torch
        from pathlib import Path
        from PIL import Image

        def _split(split, shuffled):
            files = sorted(Path({str(images)!r}, split).glob("*/*.png"))
            x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in files])
            y = torch.tensor([int(p.parent.name[0]) for p in files])
            if shuffled:
                p = torch.randperm(len(x), generator=torch.Generator().manual_seed(7))
                x, y = x[p], y[p]
            return x, y

        def in_file_order():
            return (*_split("train", False), *_split("val", False))

        def shuffled():
            return (*_split("train", True), *_split("val", True))
    '''))
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        before = {}
        for v in ("in_file_order", "shuffled"):
            d = _copy(setup["R"], tmp_path / v)
            res = _run(["fold", d, "--data", f"sorted_data:{v}", "--json"])
            assert res.exit_code == 0, res.output
            before[v] = json.loads(res.stdout)["bn_statistics"]["before"]
            a = _acc(load_patched(d), setup["vx"], setup["vy"])
            assert a >= setup["acc"] - 0.005, (v, a, setup["acc"])
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("sorted_data", None)
    s, t = before["in_file_order"], before["shuffled"]
    assert s["stale"] == t["stale"] and abs(s["batch_stat_accuracy"] - t["batch_stat_accuracy"]) <= 0.03, (s, t)


def test_bn_staleness_and_reestimate_bn_do_not_depend_on_the_order(setup):
    """The API spelling: bn_staleness on sorted vs shuffled probes; reestimate_bn on sorted vs shuffled batches."""
    vx, vy = setup["vx"], setup["vy"]
    p = torch.randperm(len(vx), generator=torch.Generator().manual_seed(5))
    m = load_patched(setup["R"])
    a, b = bn_staleness(m, vx, vy, batch_size=64), bn_staleness(m, vx[p], vy[p], batch_size=64)
    assert a.eval_accuracy == b.eval_accuracy
    assert a.stale == b.stale and abs(a.batch_stat_accuracy - b.batch_stat_accuracy) <= 0.03, (a.summary(), b.summary())
    tx, _ = _tensors(setup["images"], "train")  # class by class
    q = torch.randperm(len(tx), generator=torch.Generator().manual_seed(6))
    stats = []
    for x in (tx, tx[q]):
        mm = load_patched(setup["R"])
        for bn in (mm.bn0, mm.bn1):  # make them stale, so the new statistics are kept
            bn.running_var.mul_(3.0)
        rep = reestimate_bn(mm, x, vx, vy, batches=4, batch_size=64, seed=0)
        assert rep.accepted, rep.lines()
        stats.append(torch.cat([mm.bn1.running_mean, mm.bn1.running_var]))
    # a class-sorted set in file order would give per-class batches: running_var far below the shuffled one
    assert torch.allclose(stats[0], stats[1], rtol=0.2, atol=0.05), (stats[0], stats[1])


def test_reestimation_that_scores_lower_keeps_the_old_statistics_bitwise(setup):
    m = load_patched(setup["R"])
    old = {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}
    tx, _ = _tensors(setup["images"], "train", shuffled=True)
    wrong = tx * 2.0 + 1.5  # normalised unlike the model's inputs
    rep = reestimate_bn(m, wrong, setup["vx"], setup["vy"], batches=4, batch_size=64)
    assert not rep.accepted and rep.candidate_accuracy() < rep.before.eval_accuracy
    assert all(torch.equal(m.state_dict()[k], v) for k, v in old.items())
    assert any("kept the old statistics" in line for _, line in rep.lines())


# ----------------------------------------------------------------------------- recalibrate_bn + save_patched


def test_recalibrate_bn_then_save_patched_records_fresh_statistics(setup, tmp_path):
    m = load_patched(setup["R"])
    recipe = read_recipe(setup["R"])
    assert bn_statistics_current(m, recipe)  # the fixture's own recalibrate_bn + save_patched
    res = _run(["fold", _copy(setup["R"], tmp_path / "a")])
    assert res.exit_code == 0 and "re-estimate" not in res.output, res.output
    # weights changed after recalibrate_bn: not fresh, and fold says so
    with torch.no_grad():
        m.conv1.weight.mul_(1.01)
    save_patched(m, read_recipe(setup["R"]), tmp_path / "b")
    assert not bn_statistics_current(load_patched(tmp_path / "b"), read_recipe(tmp_path / "b"))
    res = _run(["fold", tmp_path / "b"])
    assert res.exit_code == 0 and "re-estimate them" in " ".join(res.output.split()), res.output


# ----------------------------------------------------------------------------- case 41: --mean/--std applied


def test_mean_std_apply_to_in_memory_sources_one_value_or_three(setup, tmp_path):
    images = setup["images"]
    one = load_data(f"imagefolder:{images}", input_shape=(3, SIDE, SIDE), mean=MEAN, std=STD)
    three = load_data(f"imagefolder:{images}", input_shape=(3, SIDE, SIDE), mean=(MEAN,) * 3, std=(STD,) * 3)
    assert torch.equal(one.train_x, three.train_x) and one.norm_source == "given"
    ref, _ = _tensors(images, "train")
    got = one.train_x  # same files in the same order as the user's pipeline
    assert torch.allclose(got, ref, atol=1e-5)
    own = load_data(f"imagefolder:{images}", input_shape=(3, SIDE, SIDE))
    assert own.norm_source == "own" and abs(float(own.train_x.mean())) < 1e-3  # the old default, said as "own"
    # float [0, 1] tensors of a data function are pixels: normalised as asked
    (tmp_path / "fdata.py").write_text("import torch\n"
                                       "def load():\n"
                                       "    g = torch.Generator().manual_seed(0)\n"
                                       "    return torch.rand(64, 1, 8, 8, generator=g), torch.arange(64) % 2\n"
                                       "def normed():\n"
                                       "    x, y = load()\n"
                                       "    return (x - 0.5) / 0.5, y\n")
    b = load_data(f"{tmp_path / 'fdata.py'}:load", mean=0.5, std=0.5)
    assert float(b.train_x.min()) >= -1 - 1e-6 and float(b.train_x.max()) <= 1 + 1e-6 and float(b.train_x.min()) < -0.9
    n = load_data(f"{tmp_path / 'fdata.py'}:normed", mean=0.5, std=0.5)  # already normalised: not again, and said
    assert n.norm_source == "as-is" and any("not applied" in t for t in n.notes)


def test_search_in_memory_trains_on_the_given_normalisation(setup, tmp_path, monkeypatch):
    images = setup["images"]
    probe = tmp_path / "probe.json"
    monkeypatch.setenv("PROBE_OUT", str(probe))
    res = _run(["search", setup["spec"], "--data", f"imagefolder:{images}", "--input-shape", f"3,{SIDE},{SIDE}",
                "--shifts", "0", "--steps", "2", "--batch-size", "32", "--no-compile", "--stream", "off",
                "--mean", "0.5", "--std", "0.5", "--json", "-q"])
    assert res.exit_code == 0, res.output
    p = json.loads(probe.read_text())
    assert p["min"] >= -1 - 1e-4 and p["max"] <= 1 + 1e-4 and p["std"] < 0.5, p  # (pixel - 0.5) / 0.5, not own stats
    summary = json.loads(res.stdout)
    assert summary["normalisation"]["mean"] == [0.5] * 3 and summary["normalisation"]["source"] == "given"
    assert summary["config"]["mean"] == [0.5]


# ----------------------------------------------------------------------------- case 42: grey / RGBA folders


@pytest.mark.parametrize("mode,factory,channels", [("RGBA", "build_grey", 1), ("L", "build", 3), ("L", "build_grey", 1)])
def test_grey_and_rgba_folders_meet_1_and_3_channel_models(setup, tmp_path, mode, factory, channels):
    folder = _images(tmp_path / "imgs", per_class=4, mode=mode)
    spec = f"{setup['root'] / 'model.py'}:{factory}"
    res = _run(["scan", spec, "--data", f"imagefolder:{folder}", "--json", "--batch-size", "16"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["input_shape"] == [channels, SIDE, SIDE]
    b = load_data(f"imagefolder:{folder}")  # no shape: the files decide (greyscale -> 1, RGBA -> 3)
    assert b.input_shape[0] == (1 if mode == "L" else 3)
