"""Tests for bnnshift.data: spec parsing, loaders, batching. Fast, no network, no skips."""
from __future__ import annotations

import gzip
import struct
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bnnshift import registry
from bnnshift.data import (
    DEFAULT_FASHION_MNIST_ROOT,
    DataBundle,
    batch_order_hash,
    describe_specs,
    iterate_batches,
    load_data,
    parse_data_spec,
)
from bnnshift.errors import DataError, SpecError

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every test gets its own extraction cache (never the user's ~/.cache)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("BNNSHIFT_CACHE", str(cache))
    return cache


# ------------------------------------------------------------------ helpers


def _idx_images(x: torch.Tensor) -> bytes:
    n, h, w = x.shape
    return struct.pack(">IIII", 0x0803, n, h, w) + x.to(torch.uint8).numpy().tobytes()


def _idx_labels(y: torch.Tensor) -> bytes:
    return struct.pack(">II", 0x0801, y.shape[0]) + y.to(torch.uint8).numpy().tobytes()


def _write_fake_idx(d: Path, *, gz: bool, n_train: int = 40, n_test: int = 20, size: int = 8) -> None:
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    blobs = {
        "train-images-idx3-ubyte": _idx_images(torch.randint(0, 256, (n_train, size, size), generator=g)),
        "train-labels-idx1-ubyte": _idx_labels(torch.arange(n_train) % 10),
        "t10k-images-idx3-ubyte": _idx_images(torch.randint(0, 256, (n_test, size, size), generator=g)),
        "t10k-labels-idx1-ubyte": _idx_labels(torch.arange(n_test) % 10),
    }
    for name, data in blobs.items():
        if gz:
            with gzip.open(d / f"{name}.gz", "wb") as f:
                f.write(data)
        else:
            (d / name).write_bytes(data)


def _order(n: int, bs: int, **kw) -> list[list[int]]:
    x = torch.arange(n).view(n, 1, 1, 1).float()
    y = torch.arange(n)
    out = []
    for xb, yb in iterate_batches(x, y, bs, **kw):
        assert torch.equal(xb.view(-1).long(), yb)  # x and y stay aligned
        out.append(yb.tolist())
    return out


# ------------------------------------------------------------------ spec parsing


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("fashion-mnist", ("fashion-mnist", None)),
        ("fashion-mnist:/data/fm", ("fashion-mnist", "/data/fm")),
        ("FashionMNIST:/x", ("fashion-mnist", "/x")),
        ("mnist:/data/m", ("mnist", "/data/m")),
        ("cifar10:/c", ("cifar10", "/c")),
        ("cifar100", ("cifar100", None)),
        ("imagefolder:/imgs", ("imagefolder", "/imgs")),
        ("synthetic", ("synthetic", None)),
        ("synthetic:256", ("synthetic", "256")),
        ("my_pkg.data:make", ("module", "my_pkg.data:make")),
        ("some/dir/file.py:build", ("file", "some/dir/file.py:build")),
    ],
)
def test_parse_data_spec(spec, expected):
    assert parse_data_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", "   ", "nonsense", "fashon-mnist:/x", "weird:/not/an/identifier", "synthetic:0", "synthetic:abc", "mnist"])
def test_parse_data_spec_errors(spec):
    with pytest.raises(SpecError) as ei:
        parse_data_spec(spec)
    assert ei.value.exit_code == 2


def test_unknown_kind_lists_known_kinds():
    with pytest.raises(SpecError) as ei:
        load_data("nonsense")
    text = ei.value.one_line()
    for kind in ("fashion-mnist", "mnist", "cifar10", "imagefolder", "synthetic", "module:function"):
        assert kind in text


def test_unimportable_module_is_spec_error():
    with pytest.raises(SpecError, match="no_such_module_xyz"):
        load_data("no_such_module_xyz.sub:fn")


def test_describe_specs_mentions_every_kind():
    text = describe_specs()
    for kind in ("fashion-mnist", "mnist:ROOT", "cifar10", "cifar100", "imagefolder:PATH", "synthetic", ".py:function"):
        assert kind in text


# ------------------------------------------------------------------ synthetic


def test_synthetic_shapes_and_determinism():
    a = load_data("synthetic:200", seed=3)
    b = load_data("synthetic:200", seed=3)
    c = load_data("synthetic:200", seed=4)
    assert a.train_x.shape == (200, 1, 28, 28) and a.train_x.dtype == torch.float32
    assert a.train_y.dtype == torch.int64 and a.num_classes == 10
    assert a.input_shape == (1, 28, 28) and a.name == "synthetic:200"
    assert a.val_x is not None and a.val_x.shape[1:] == a.train_x.shape[1:]
    assert set(a.train_y.tolist()) == set(range(10))
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert torch.equal(a.val_x, b.val_x)
    assert not torch.equal(a.train_x, c.train_x)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert abs(a.train_x.mean().item()) < 0.1 and 0.8 < a.train_x.std().item() < 1.2


def test_synthetic_independent_of_global_rng():
    torch.manual_seed(1)
    a = load_data("synthetic:64")
    torch.manual_seed(999)
    torch.rand(1000)
    b = load_data("synthetic:64")
    assert torch.equal(a.train_x, b.train_x)


def test_synthetic_uses_input_shape_and_default_size():
    b = load_data("synthetic", input_shape=(3, 16, 12))
    assert b.train_x.shape == (512, 3, 16, 12) and b.input_shape == (3, 16, 12)
    assert len(b.mean) == len(b.std) == 3


def test_synthetic_is_learnable():
    b = load_data("synthetic:512", seed=0)
    torch.manual_seed(0)
    model = torch.nn.Linear(28 * 28, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for xb, yb in iterate_batches(b.train_x, b.train_y, 64, seed=0, steps=5):
        loss = F.cross_entropy(model(xb.flatten(1)), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        train_acc = (model(b.train_x.flatten(1)).argmax(1) == b.train_y).float().mean().item()
        val_acc = (model(b.val_x.flatten(1)).argmax(1) == b.val_y).float().mean().item()
    assert train_acc > 0.5, train_acc
    assert val_acc > 0.5, val_acc  # class patterns, not memorisation


def test_limits_are_seeded_subsets():
    a = load_data("synthetic:100", train_limit=30, val_limit=5, seed=1)
    assert a.train_x.shape[0] == 30 and a.val_x.shape[0] == 5
    b = load_data("synthetic:100", train_limit=30, val_limit=5, seed=1)
    assert torch.equal(a.train_x, b.train_x)
    none = load_data("synthetic:100", val_limit=0)
    assert none.val_x is None and none.val_y is None


# ------------------------------------------------------------------ batching


def test_iterate_batches_same_seed_same_order():
    assert _order(100, 10, seed=5) == _order(100, 10, seed=5)


def test_iterate_batches_different_seed_or_epoch_differs():
    base = _order(100, 10, seed=5)
    assert base != _order(100, 10, seed=6)
    assert base != _order(100, 10, seed=5, epoch=1)


def test_iterate_batches_independent_of_global_rng():
    torch.manual_seed(0)
    a = _order(64, 8, seed=2)
    torch.manual_seed(12345)
    torch.randn(100)
    torch.randperm(50)
    b = _order(64, 8, seed=2)
    assert a == b
    # and it does not consume the global RNG either
    torch.manual_seed(7)
    _order(64, 8, seed=2)
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3))


def test_iterate_batches_covers_epoch_and_drop_last():
    batches = _order(25, 10, seed=0)
    assert [len(b) for b in batches] == [10, 10]
    assert len(set(sum(batches, []))) == 20
    batches = _order(25, 10, seed=0, drop_last=False)
    assert [len(b) for b in batches] == [10, 10, 5]
    assert sorted(sum(batches, [])) == list(range(25))


def test_iterate_batches_steps_continue_into_next_epoch():
    two_epochs = _order(20, 5, seed=1) + _order(20, 5, seed=1, epoch=1)
    assert _order(20, 5, seed=1, steps=6) == two_epochs[:6]
    assert _order(20, 5, seed=1, steps=2) == two_epochs[:2]


def test_iterate_batches_errors():
    x, y = torch.zeros(5, 1, 2, 2), torch.zeros(5, dtype=torch.int64)
    with pytest.raises(DataError, match="batch"):
        list(iterate_batches(x, y, 10, seed=0))
    with pytest.raises(DataError):
        list(iterate_batches(x, y, 0, seed=0))


def test_batch_order_hash_matches_iterate_batches():
    cases = [
        dict(seed=0), dict(seed=0), dict(seed=1), dict(seed=0, epoch=1), dict(seed=0, steps=3), dict(seed=0, steps=12),
    ]
    orders = [_order(40, 8, **kw) for kw in cases]
    hashes = [batch_order_hash(40, 8, **kw) for kw in cases]
    for i in range(len(cases)):
        for j in range(len(cases)):
            assert (orders[i] == orders[j]) == (hashes[i] == hashes[j]), (cases[i], cases[j])
    assert hashes[0] == hashes[1] and len(set(hashes)) == 5
    assert batch_order_hash(40, 8, seed=0) != batch_order_hash(40, 10, seed=0)
    assert len(hashes[0]) >= 12 and all(c in "0123456789abcdef" for c in hashes[0])


# ------------------------------------------------------------------ fashion-mnist (real Debian files)


def test_fashion_mnist_real_files(_cache):
    root = Path(DEFAULT_FASHION_MNIST_ROOT)
    present = [f for f in IDX_FILES if (root / f"{f}.gz").is_file() or (root / f).is_file()]
    # Deliberately not a skip: CI installs dataset-fashion-mnist, so absent files are a failure.
    assert len(present) == 4, f"Fashion-MNIST missing under {root}: apt-get install -y dataset-fashion-mnist"
    b = load_data("fashion-mnist", train_limit=3000, val_limit=500, seed=0)
    assert b.name == f"fashion-mnist:{root.resolve()}"
    assert b.train_x.shape == (3000, 1, 28, 28) and b.train_x.dtype == torch.float32
    assert b.train_y.shape == (3000,) and b.train_y.dtype == torch.int64
    assert b.val_x.shape == (500, 1, 28, 28) and b.val_y.shape == (500,)
    assert int(b.train_y.min()) == 0 and int(b.train_y.max()) == 9
    assert len(torch.unique(b.train_y)) == 10
    assert abs(b.train_x.mean().item()) < 0.1, b.train_x.mean().item()
    assert 0.85 < b.train_x.std().item() < 1.15, b.train_x.std().item()
    assert b.input_shape == (1, 28, 28) and b.num_classes == 10
    assert b.mean == pytest.approx((0.2860,)) and b.std == pytest.approx((0.3530,))
    # the .gz files were extracted once into the cache; a second load reuses it
    raws = list((_cache / "data").glob("fashion-mnist-*/FashionMNIST/raw/train-images-idx3-ubyte"))
    if any((root / f"{f}.gz").is_file() for f in IDX_FILES):
        assert len(raws) == 1
        mtime = raws[0].stat().st_mtime_ns
        again = load_data("fashion-mnist", train_limit=3000, val_limit=500, seed=0)
        assert raws[0].stat().st_mtime_ns == mtime
        assert again.fingerprint() == b.fingerprint()
        assert not [p for p in (_cache / "data").iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_channel_mismatch_is_data_error():
    with pytest.raises(DataError) as ei:
        load_data("fashion-mnist", input_shape=(3, 28, 28), train_limit=10, val_limit=10)
    msg = ei.value.one_line()
    assert "3 input channels" in msg and "has 1" in msg
    assert "--input-shape" in msg and "in_chans=1" in msg
    assert "\n" not in msg


def test_hw_mismatch_resizes():
    b = load_data("fashion-mnist", input_shape=(1, 32, 32), train_limit=20, val_limit=10)
    assert b.train_x.shape == (20, 1, 32, 32) and b.val_x.shape == (10, 1, 32, 32)
    assert b.input_shape == (1, 32, 32)


# ------------------------------------------------------------------ idx layouts (fake files)


@pytest.mark.parametrize("layout", ["flat-gz", "flat-raw", "torchvision"])
def test_mnist_layouts(tmp_path, layout):
    root = tmp_path / "m"
    if layout == "flat-gz":
        _write_fake_idx(root, gz=True)
    elif layout == "flat-raw":
        _write_fake_idx(root, gz=False)
    else:
        _write_fake_idx(root / "MNIST" / "raw", gz=False)
    b = load_data(f"mnist:{root}")
    assert b.train_x.shape == (40, 1, 8, 8) and b.val_x.shape == (20, 1, 8, 8)
    assert b.name == f"mnist:{root.resolve()}"
    assert b.mean == pytest.approx((0.1307,))
    assert b.train_y.tolist() == [i % 10 for i in range(40)]


def test_missing_root_names_path_and_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as ei:
        load_data(f"fashion-mnist:{missing}")
    msg = ei.value.one_line()
    assert str(missing) in msg and "apt-get install -y dataset-fashion-mnist" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="does not contain"):
        load_data(f"mnist:{empty}")


def test_corrupt_gz_is_data_error(tmp_path):
    root = tmp_path / "bad"
    _write_fake_idx(root, gz=True)
    (root / "train-images-idx3-ubyte.gz").write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match="corrupt"):
        load_data(f"mnist:{root}")


def test_corrupt_idx_is_data_error(tmp_path):
    root = tmp_path / "bad"
    _write_fake_idx(root, gz=False)
    (root / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\xff\xff garbage")
    with pytest.raises(DataError, match="corrupt"):
        load_data(f"mnist:{root}")


def test_cifar_without_files_never_downloads(tmp_path):
    with pytest.raises(DataError, match="cifar10 data not found"):
        load_data(f"cifar10:{tmp_path / 'nope'}")


# ------------------------------------------------------------------ user functions, plugins, image folders


def test_file_function_returning_tensors(tmp_path):
    f = tmp_path / "mydata.py"
    f.write_text(textwrap.dedent("""
        import torch
        def make():
            x = torch.arange(60 * 4 * 4, dtype=torch.uint8).view(60, 4, 4)
            y = torch.arange(60) % 3
            return x, y
    """))
    b = load_data(f"{f}:make", train_limit=50)
    assert isinstance(b, DataBundle)
    assert b.train_x.shape == (50, 1, 4, 4) and b.train_x.dtype == torch.float32
    assert b.num_classes == 3 and b.val_x is None
    assert b.name == f"{f.resolve()}:make"


def test_file_function_returning_datasets(tmp_path):
    f = tmp_path / "dsdata.py"
    f.write_text(textwrap.dedent("""
        import torch
        from torch.utils.data import TensorDataset
        def make(seed=0, input_shape=None):
            g = torch.Generator().manual_seed(seed)
            tr = TensorDataset(torch.randn(30, 2, 5, 5, generator=g), torch.arange(30) % 4)
            va = TensorDataset(torch.randn(10, 2, 5, 5, generator=g), torch.arange(10) % 4)
            return tr, va
    """))
    b = load_data(f"{f}:make", val_limit=6)
    assert b.train_x.shape == (30, 2, 5, 5) and b.val_x.shape == (6, 2, 5, 5)
    assert b.num_classes == 4 and b.input_shape == (2, 5, 5)
    with pytest.raises(DataError, match="2"):
        load_data(f"{f}:make", input_shape=(1, 5, 5))


def test_module_function_returning_bundle(tmp_path, monkeypatch):
    (tmp_path / "bnnshift_test_userdata.py").write_text(textwrap.dedent("""
        import torch
        from bnnshift.data import DataBundle
        def build():
            return DataBundle(torch.zeros(8, 1, 3, 3), torch.zeros(8, dtype=torch.int64), None, None,
                              (1, 3, 3), 2, "custom", (0.0,), (1.0,))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    b = load_data("bnnshift_test_userdata:build")
    assert b.name == "custom" and b.train_x.shape == (8, 1, 3, 3)
    with pytest.raises(SpecError, match="nothere"):
        load_data("bnnshift_test_userdata:nothere")


def test_user_function_bad_labels_is_data_error(tmp_path):
    f = tmp_path / "badlabels.py"
    f.write_text(textwrap.dedent("""
        import torch
        from bnnshift.data import DataBundle
        def build():
            return DataBundle(torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 5, 1]), None, None, (1, 2, 2), 2, "x", (0.0,), (1.0,))
    """))
    with pytest.raises(DataError, match="labels"):
        load_data(f"{f}:build")


def test_registered_dataset(monkeypatch):
    seen = {}

    def factory(root, *, seed=0, **kw):
        seen["root"], seen["seed"] = root, seed
        return DataBundle(torch.ones(12, 1, 4, 4), torch.arange(12) % 2, None, None, (1, 4, 4), 2, "", (0.0,), (1.0,))

    monkeypatch.setitem(registry.DATASETS._items, "toyset", factory)
    assert parse_data_spec("toyset:/r") == ("toyset", "/r")
    b = load_data("toyset:/r", seed=7, train_limit=5)
    assert seen == {"root": "/r", "seed": 7}
    assert b.train_x.shape == (5, 1, 4, 4) and b.name == "toyset:/r"
    assert "toyset" in describe_specs()


def test_imagefolder(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    for split, n in (("train", 3), ("val", 2)):
        for ci, cls in enumerate(("cat", "dog")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20 + i, 10), color=(40 * ci, 100, 200)).save(d / f"{i}.png")
    b = load_data(f"imagefolder:{root}", input_shape=(3, 8, 8))
    assert b.train_x.shape == (6, 3, 8, 8) and b.val_x.shape == (4, 3, 8, 8)
    assert b.num_classes == 2 and sorted(b.train_y.tolist()) == [0, 0, 0, 1, 1, 1]
    assert sorted(b.val_y.tolist()) == [0, 0, 1, 1]
    grey = load_data(f"imagefolder:{root / 'train'}", input_shape=(1, 6, 6), train_limit=4)
    assert grey.train_x.shape == (4, 1, 6, 6) and grey.val_x is None
    with pytest.raises(DataError, match="not found"):
        load_data(f"imagefolder:{tmp_path / 'none'}")


@pytest.mark.parametrize("heldout", ["test", "val"])
def test_imagefolder_train_and_test_layout(tmp_path, heldout):
    """CIFAR-10 as users unpack it: ``DIR/train/<class>`` + ``DIR/test/<class>`` (issue 24): the
    ``test/`` folder is the held-out split in memory and when streamed with ``--augment cifar``;
    ``val/`` wins when both exist."""
    from PIL import Image

    from bnnshift.data.stream import StreamOptions, open_stream

    root = tmp_path / "cifar"
    sizes = {"train": 3, heldout: 2}
    if heldout == "val":
        sizes["test"] = 1  # ignored: val/ is the held-out split
    for split, n in sizes.items():
        for ci, cls in enumerate(("airplane", "automobile")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), color=(60 * ci + i, 100, 200)).save(d / f"{i:04d}.jpg")
    b = load_data(f"imagefolder:{root}", input_shape=(3, 32, 32))
    assert b.train_x.shape == (6, 3, 32, 32) and b.val_x.shape == (4, 3, 32, 32)
    assert sorted(b.val_y.tolist()) == [0, 0, 1, 1]
    src = open_stream(f"imagefolder:{root}", input_shape=(3, 32, 32),
                      options=StreamOptions(augment="cifar", mean=(0.4914, 0.4822, 0.4465),
                                            std=(0.2470, 0.2435, 0.2616), workers=0))
    assert (src.num_train, src.num_val, src.num_classes) == (6, 4, 2)
    x, y = src.val[(0, 0)]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y in (0, 1)
