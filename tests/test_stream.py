"""The streaming data path (issue 13): an ImageFolder of PNGs through DataLoader workers with
augmentation, common random numbers across candidates (same init, order and augmentation draws,
proved by hashes), mixed precision on CPU, and a 2-process torchrun (gloo) search."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from bnnshift.cli import app
from bnnshift.data.stream import (
    BatchHasher,
    SeededBatchSampler,
    StreamOptions,
    make_loader,
    open_stream,
    should_stream,
)
from bnnshift.errors import UsageError
from models import SIGN_STE_SOURCE

ROOT = Path(__file__).resolve().parents[1]

TINY = textwrap.dedent('''
    import torch
    from torch import nn
''') + SIGN_STE_SOURCE + textwrap.dedent('''
    class Tiny(nn.Module):
        def __init__(self, classes=3):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8 * 4 * 4, classes)

        def forward(self, x):
            x = SignSTE.apply(self.bn1(self.conv1(x)))
            x = nn.functional.max_pool2d(self.bn2(self.conv2(x)), 2)
            return self.fc(x.flatten(1))

    def tiny(classes: int = 3):
        return Tiny(classes)
''')


def _write_folder(root: Path, n_train: int, n_val: int, size: int = 8, classes: int = 3) -> Path:
    """PNGs whose class sets the mean brightness (learnable), noise per image."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            c = i % classes
            a = (rng.random((size, size, 3)) * 80 + c * 80).astype(np.uint8)
            Image.fromarray(a).save(root / split / f"c{c}" / f"{i}.png", compress_level=0)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("imgs"), 2000, 300)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("model") / "tiny.py"
    p.write_text(TINY)
    return f"{p}:tiny"


def _run(args):
    return CliRunner().invoke(app, args, catch_exceptions=False)


def _stderr(res) -> str:
    try:
        return res.stderr
    except ValueError:
        return res.output


def _epoch_hash(src, seed: int, workers: int, steps: int = 3, batch: int = 32) -> str:
    sampler = SeededBatchSampler(src.num_train, batch)
    sampler.set_order(seed, steps=steps)
    hasher = BatchHasher(src.num_train, batch)
    for xb, yb in make_loader(src.train, sampler, workers=workers, pin_memory=False, persistent=False):
        assert xb.dtype == torch.float32 and tuple(xb.shape) == (batch, 3, 8, 8)
        hasher.update(xb, yb)
    return hasher.hexdigest()


def test_augmentation_draws_depend_on_seed_and_sample_only(folder):
    src = open_stream(f"imagefolder:{folder}", input_shape=(3, 8, 8),
                      options=StreamOptions(augment="cifar", mean=(0.5,) * 3, std=(0.3,) * 3))
    assert src.num_train == 2000 and src.num_classes == 3
    # the same (seed, order) gives the same augmented batches whoever decodes them
    h0 = _epoch_hash(src, seed=0, workers=0)
    assert _epoch_hash(src, seed=0, workers=2) == h0
    assert _epoch_hash(src, seed=1, workers=0) != h0
    # the draws are real: the same images and order without augmentation hash differently
    plain = open_stream(f"imagefolder:{folder}", input_shape=(3, 8, 8),
                        options=StreamOptions(augment="none", mean=src.mean, std=src.std))
    assert _epoch_hash(plain, seed=0, workers=0) != h0
    # a sample's draw is fixed by its seed, not by the global RNG
    torch.manual_seed(123)
    a = src.train[(5, 77)][0]
    torch.manual_seed(456)
    b = src.train[(5, 77)][0]
    assert torch.equal(a, b)
    assert any(not torch.equal(a, src.train[(5, s)][0]) for s in range(78, 86))
    # the global RNG is left as it was (dropout draws of the candidate do not move)
    torch.manual_seed(9)
    src.train[(3, 1)]
    after = torch.rand(1)
    torch.manual_seed(9)
    assert torch.equal(after, torch.rand(1))


def test_sharded_batches_are_the_global_batch(folder):
    """Under torchrun each rank takes global[rank::world]: together the single-process batch."""
    one = SeededBatchSampler(2000, 64)
    ranks = [SeededBatchSampler(2000, 64, rank=r, world=2) for r in (0, 1)]
    for s in [one] + ranks:
        s.set_order(3, steps=4)
    for full, a, b in zip(one, *ranks):
        assert sorted(full) == sorted(a + b) and len(a) == len(b) == 32
    with pytest.raises(UsageError):
        SeededBatchSampler(2000, 63, world=2)


def test_eval_transform_and_normalisation(folder):
    src = open_stream(f"imagefolder:{folder}", input_shape=(3, 8, 8),
                      options=StreamOptions(augment="imagenet", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    x, y = src.train_eval[(0, 1)]
    raw = torch.from_numpy(np.array(Image.open(src.train.images.folder.samples[0][0]).convert("RGB")))
    raw = raw.permute(2, 0, 1).float() / 255
    # eval: resize to H/0.875 = 9 then centre-crop 8; compare with the same ops by hand
    ref = F.interpolate(raw[None], size=(9, 9), mode="bilinear", align_corners=False, antialias=True)[0, :, :8, :8]
    assert x.shape == (3, 8, 8) and y == 0
    assert torch.allclose(x, (ref - 0.5) / 0.25, atol=0.05)
    # no --mean/--std: the sample statistics of the folder, per channel
    est = open_stream(f"imagefolder:{folder}", input_shape=(3, 8, 8))
    assert all(0.2 < m < 0.8 for m in est.mean) and all(0.1 < s < 0.5 for s in est.std)
    one = open_stream(f"imagefolder:{folder}", input_shape=(3, 8, 8), options=StreamOptions(mean=(0.5,), std=(0.2,)))
    assert one.mean == (0.5,) * 3 and one.std == (0.2,) * 3  # one value: every channel (as in memory)
    with pytest.raises(UsageError):
        open_stream(f"imagefolder:{folder}", input_shape=(3, 8, 8), options=StreamOptions(mean=(0.5, 0.5), std=(0.2,)))


def test_stream_choice(folder):
    assert should_stream("auto", f"imagefolder:{folder}", "cifar", (3, 8, 8))
    assert not should_stream("auto", f"imagefolder:{folder}", "none", (3, 8, 8))  # small: in memory
    assert should_stream("on", "fashion-mnist", "none")
    assert not should_stream("auto", "synthetic:64", "none")
    with pytest.raises(UsageError):
        should_stream("off", f"imagefolder:{folder}", "cifar")
    with pytest.raises(UsageError):
        should_stream("auto", "synthetic:64", "imagenet")


def test_imagefolder_search_streams_with_augmentation_and_workers(folder, tiny_model, tmp_path):
    out = tmp_path / "run"
    res = _run(["search", tiny_model, "--input-shape", "3,8,8", "--data", f"imagefolder:{folder}",
                "--augment", "cifar", "--workers", "2", "--shifts", "0,0.5", "--batch-size", "32", "--steps", "3",
                "--val", "--val-limit", "64", "--bn-recalib-batches", "1", "--no-compile", "--out", str(out),
                "--json"])
    assert res.exit_code == 0, _stderr(res)
    data = json.loads(res.stdout)
    cands = data["candidates"]
    assert [c["shift"] for c in cands] == [0.0, 0.5] and all(c["status"] == "ok" for c in cands)
    assert data["shared_init"] is True and data["shared_batches"] is True
    assert len({c["init_hash"] for c in cands}) == 1 and cands[0]["init_hash"]
    # the hash of the augmented batches: the same images, order and augmentation draws
    assert len({c["batch_order_hash"] for c in cands}) == 1
    src = open_stream(f"imagefolder:{folder}", input_shape=(3, 8, 8), options=StreamOptions(augment="cifar"))
    assert cands[0]["batch_order_hash"] == _epoch_hash(src, seed=0, workers=0, steps=3, batch=32)
    assert all(c["val_acc"] is not None and 0 <= c["val_acc"] <= 1 for c in cands)
    assert data["config"]["augment"] == "cifar" and data["config"]["stream"] == "auto"
    saved = json.loads((out / "search.json").read_text())
    assert [c["batch_order_hash"] for c in saved["candidates"]] == [c["batch_order_hash"] for c in cands]
    assert "winner" in (out / "search.md").read_text()
    assert len((out / "journal.jsonl").read_text().splitlines()) == 2


def test_bf16_autocast_search_on_cpu(tmp_path):
    from bnnshift.train import StepRunner

    lin = torch.nn.Linear(4, 3)
    loss, logits = StepRunner(lin, F.cross_entropy, compile="off", precision="bf16")(torch.randn(2, 4),
                                                                                     torch.tensor([0, 1]))
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    base = ["search", "zoo:mlp", "--arg", "width=0.25", "--data", "synthetic:256", "--shifts", "0",
            "--batch-size", "64", "--steps", "3", "--no-compile", "--device", "cpu", "--json"]
    res = _run(base + ["--precision", "bf16"])
    assert res.exit_code == 0, _stderr(res)
    data = json.loads(res.stdout)
    assert data["config"]["precision"] == "bf16" and data["candidates"][0]["status"] == "ok"
    fp32 = json.loads(_run(base).stdout)
    assert data["config_hash"] != fp32["config_hash"]  # precision changes a score: hashed
    res = _run(base + ["--precision", "fp16"])
    assert res.exit_code == 2 and "fp16 needs a CUDA device" in _stderr(res)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    """2 CPU ranks (gloo): one journal written once, the ranks agree, scores within 1 pp of one
    process with the same global batch (BN statistics are per rank, as in plain DDP)."""
    args = ["search", "zoo:mlp", "--arg", "hidden=64", "--data", "synthetic:2048", "--shifts", "0,0.5",
            "--batch-size", "256", "--steps", "8", "--no-compile", "--device", "cpu", "--json"]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'plugins'}", OMP_NUM_THREADS="1")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "bnnshift"] + args + ["--out", str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    ddp = json.loads(p.stdout)  # rank 0 alone printed (one JSON document)
    lines = (out / "journal.jsonl").read_text().splitlines()
    assert len(lines) == 2 and sorted(json.loads(x)["shift"] for x in lines) == [0.0, 0.5]
    assert sorted(p.name for p in out.iterdir()) == ["journal.jsonl", "search.json", "search.md", "search.png"]
    one = json.loads(_run(args).stdout)
    assert ddp["config_hash"] == one["config_hash"]
    for a, b in zip(ddp["candidates"], one["candidates"]):
        assert a["shift"] == b["shift"] and a["batch_order_hash"] == b["batch_order_hash"]
        assert a["init_hash"] == b["init_hash"]
        assert abs(a["score"] - b["score"]) <= 0.01, (a["score"], b["score"])


def test_idx_streams_uint8_with_the_in_memory_normalisation(tmp_path, monkeypatch):
    """mnist:ROOT streamed: the same images and constants as in memory; --augment none equals
    the in-memory tensors, and the in-memory path refuses nothing it used to load."""
    import struct

    from bnnshift.data import NORMALISATION, load_data

    monkeypatch.setenv("BNNSHIFT_CACHE", str(tmp_path / "cache"))
    g = torch.Generator().manual_seed(1)
    blobs = {"train": (torch.randint(0, 256, (40, 8, 8), generator=g), torch.arange(40) % 10),
             "t10k": (torch.randint(0, 256, (20, 8, 8), generator=g), torch.arange(20) % 10)}
    for prefix, (x, y) in blobs.items():
        (tmp_path / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x0803, x.shape[0], 8, 8) + x.to(torch.uint8).numpy().tobytes())
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x0801, y.shape[0]) + y.to(torch.uint8).numpy().tobytes())
    mem = load_data(f"mnist:{tmp_path}")
    src = open_stream(f"mnist:{tmp_path}", options=StreamOptions(augment="none"))
    assert src.input_shape == (1, 8, 8) and src.num_train == 40 and src.num_val == 20
    assert (src.mean, src.std) == NORMALISATION["mnist"]
    for i in (0, 7, 39):
        x, y = src.train[(i, 123)]
        assert y == int(mem.train_y[i]) and torch.allclose(x, mem.train_x[i], atol=1e-5)
    aug = open_stream(f"mnist:{tmp_path}", options=StreamOptions(augment="cifar"))
    xs = [aug.train[(0, s)][0] for s in range(12)]
    assert any(not torch.allclose(x, mem.train_x[0], atol=1e-5) for x in xs)  # crops/flips happen
    assert all(x.shape == (1, 8, 8) for x in xs)


def test_timm_pretrained_cfg_gives_the_normalisation(folder):
    import timm

    from bnnshift.search import _timm_data_defaults

    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    md = _timm_data_defaults(model)
    assert md["mean"] == pytest.approx((0.485, 0.456, 0.406)) and md["std"] == pytest.approx((0.229, 0.224, 0.225))
    assert _timm_data_defaults(torch.nn.Linear(2, 2)) == {}
    src = open_stream(f"imagefolder:{folder}", input_shape=(3, 8, 8), options=StreamOptions(augment="imagenet"),
                      model_defaults={**md, "crop_pct": 0.5})
    assert src.mean == pytest.approx(md["mean"]) and src.options.crop_pct == 0.5
    # --mean/--std win over the model's
    own = open_stream(f"imagefolder:{folder}", input_shape=(3, 8, 8),
                      options=StreamOptions(mean=(0.5,) * 3, std=(0.5,) * 3), model_defaults=md)
    assert own.mean == (0.5, 0.5, 0.5)


def test_storage_under_torchrun_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    res = _run(["search", "zoo:mlp", "--data", "synthetic:64", "--storage", "sqlite:///x.db", "--study", "s"])
    assert res.exit_code == 2 and "under torchrun" in _stderr(res)


def test_halving_keeps_the_streamed_batch_hash(folder, tiny_model):
    """--schedule halving pauses and continues candidates: the survivor's hash is the hash of the
    whole seeded, augmented sequence; candidates stopped at the same rung share theirs."""
    res = _run(["search", tiny_model, "--input-shape", "3,8,8", "--data", f"imagefolder:{folder}",
                "--augment", "cifar", "--workers", "0", "--shifts", "0,0.5,1,1.5", "--batch-size", "32",
                "--steps", "8", "--schedule", "halving", "--min-fraction", "0.25", "--bn-recalib-batches", "1",
                "--rung-min-samples", "0",
                "--no-compile", "--json"])
    assert res.exit_code == 0, _stderr(res)
    data = json.loads(res.stdout)
    assert data["shared_batches"] is True and data["shared_init"] is True
    src = open_stream(f"imagefolder:{folder}", input_shape=(3, 8, 8), options=StreamOptions(augment="cifar"))
    by_steps: dict[int, set] = {}
    for c in data["candidates"]:
        by_steps.setdefault(c["steps"], set()).add(c["batch_order_hash"])
    assert all(len(v) == 1 for v in by_steps.values()) and max(by_steps) == 8 and len(by_steps) >= 2
    for steps, hashes in by_steps.items():  # a rung's batches are the first of the same sequence
        assert hashes == {_epoch_hash(src, seed=0, workers=0, steps=steps, batch=32)}


def test_compile_auto_measures_a_real_streamed_batch(folder, tiny_model, monkeypatch):
    """--compile auto measures one training step on a --batch-size batch. Streaming, the
    trainer's in-memory tensors hold only the probe samples (here 8 < 32): the batch comes from
    the training loader, in the first seed's order (the same batch the first candidate trains)."""
    import bnnshift.search as search_mod
    import bnnshift.search.context as context_mod
    import bnnshift.train as train_mod
    from bnnshift.search import SearchConfig

    monkeypatch.setattr(context_mod, "PROBE_SAMPLES", 8)
    cfg = SearchConfig(model=tiny_model, data=f"imagefolder:{folder}", input_shape=(3, 8, 8), batch_size=32,
                       steps=100, stream="on", workers=0, compile="auto", seeds=[3], bn_recalib_batches=0)
    ctx = search_mod.SearchContext.open(cfg)
    assert ctx.trainer.stream is not None and ctx.trainer.train_x.shape[0] == 8
    seen = {}

    def fake_choose(cfg_, build, xb, yb, **kw):
        seen["x"], seen["y"] = xb, yb
        return train_mod.StepPathChoice(compile=False, channels_last=False, reason="test", expected_steps=100)

    monkeypatch.setattr(train_mod, "choose_step_path", fake_choose)
    search_mod._choose_step_path(ctx, cfg)
    assert tuple(seen["x"].shape) == (32, 3, 8, 8) and seen["y"].shape == (32,)
    sampler = SeededBatchSampler(ctx.trainer.stream.num_train, 32)
    sampler.set_order(3, steps=1)
    src = open_stream(f"imagefolder:{folder}", input_shape=(3, 8, 8), options=StreamOptions())
    xb, yb = next(iter(make_loader(src.train, sampler, workers=0, pin_memory=False, persistent=False)))
    assert torch.equal(seen["y"], yb) and torch.equal(seen["x"], xb)
