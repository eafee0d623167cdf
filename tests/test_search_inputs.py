"""Models with several inputs, ``forward(x, mask)``, from a data function that hands both (issue 22).

The data layer packs the inputs into one (N, 1, 1, F) tensor and a forward pre-hook unpacks
them on the user's model (bnnshift.data.multi): every step path (eager, compiled, channels_last)
and the scan see one tensor per batch. Checked here: the round trip is bitwise (dtypes and
shapes kept), three spellings of the data function, refusals with the fix, and a search with the
defaults that takes the compiled path and scores what the eager search scores.
"""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from bnnshift.cli import app
from bnnshift.data import load_data
from bnnshift.data.multi import check_dtype, install_unpack, pack, unpack
from bnnshift.errors import DataError

from models import SIGN_STE_SOURCE
from test_search_outputs import _force_compiled_path

runner = CliRunner()

MODELS = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn

''') + SIGN_STE_SOURCE + textwrap.dedent('''

    class Masked(nn.Module):  # forward(x, mask): the mask gates the pooled features
        def __init__(self, classes=4):
            super().__init__()
            self.conv0 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
            self.bn0 = nn.BatchNorm2d(8)
            self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.head = nn.Linear(8, classes)

        def forward(self, x, mask):  # (the unpacked dtypes and shapes: test_the_hook_unpacks_...)
            f = self.bn1(self.conv1(SignSTE.apply(self.bn0(self.conv0(x)))))
            f = F.adaptive_avg_pool2d(f, 1).flatten(1)
            return self.head(f * mask.to(f.dtype))


    class Tokens(nn.Module):  # forward(x, mask, ids): a third input of integer ids into a table
        def __init__(self, classes=4):
            super().__init__()
            self.masked = Masked(classes)
            self.table = nn.Embedding(16, classes)

        def forward(self, x, mask, ids):
            return self.masked(x, mask) + self.table(ids).mean(1)


    def build(kind="masked"):
        return {"masked": Masked, "tokens": Tokens}[kind]()


    def _make(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 1, 8, 8, generator=g)
        mask = torch.rand(n, 8, generator=g) > 0.25
        ids = torch.randint(0, 16, (n, 3), generator=g)
        y = (x.mean((1, 2, 3)) > 0).long() * 2 + mask[:, 0].long()
        return x, mask, ids, y


    def tensors(seed=0):  # ((x, mask), y)
        x, mask, _ids, y = _make(256, 1)
        return (x, mask), y


    class Items(torch.utils.data.Dataset):  # a data set whose items are ((x, mask), y)
        def __init__(self, n):
            self.x, self.mask, _ids, self.y = _make(n, 2)

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return (self.x[i], self.mask[i]), self.y[i]


    def items():
        return Items(256), None


    def with_val():  # ((x, mask, ids), y, (val_x, val_mask, val_ids), val_y)
        x, mask, ids, y = _make(256, 3)
        vx, vmask, vids, vy = _make(64, 4)
        return (x, mask, ids), y, (vx, vmask, vids), vy


    def uneven():
        x, mask, _ids, y = _make(64, 5)
        return (x, mask[:60]), y
''')


@pytest.fixture
def two(tmp_path, monkeypatch):
    monkeypatch.setenv("BNNSHIFT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "two.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / "two.py"


def test_pack_unpack_is_bitwise_and_keeps_dtypes():
    g = torch.Generator().manual_seed(0)
    parts = (torch.randn(5, 3, 4, 4, generator=g), torch.rand(5, 7, generator=g) > 0.5,
             torch.randint(-(2 ** 20), 2 ** 20, (5, 2), generator=g), torch.randn(5, generator=g).double())
    packed, layout = pack(parts, "test")
    assert packed.shape == (5, 1, 1, 48 + 7 + 2 + 1) and packed.dtype == torch.float32
    back = unpack(packed, layout)
    assert [b.dtype for b in back] == [torch.float32, torch.bool, torch.int64, torch.float32]
    for a, b in zip(parts, back):
        assert b.shape == a.shape
        assert torch.equal(b, a.to(b.dtype))
    rows = unpack(packed[2:4], layout)  # a batch: any rows
    assert torch.equal(rows[2], parts[2][2:4])


def test_the_hook_unpacks_a_packed_batch_and_passes_anything_else_through():
    seen = []

    class Two(torch.nn.Module):
        def forward(self, x, mask):
            seen.append((x.shape, mask.dtype))
            return x.flatten(1).sum(1, keepdim=True) * mask.float().sum(1, keepdim=True)

    x, mask = torch.randn(4, 1, 2, 2), torch.tensor([[True, False]] * 4)
    packed, layout = pack((x, mask), "test")
    m = install_unpack(install_unpack(Two(), layout), layout)  # installed once
    assert len(m._forward_pre_hooks) == 1
    assert torch.equal(m(packed), m(x, mask))
    assert seen == [((4, 1, 2, 2), torch.bool)] * 2


@pytest.mark.parametrize("fn,n,val", [("tensors", 2, False), ("items", 2, False), ("with_val", 3, True)])
def test_data_function_spellings(two, fn, n, val):
    b = load_data(f"{two}:{fn}", train_limit=200, seed=0)
    assert b.inputs is not None and len(b.inputs) == n
    assert b.train_x.shape == (200, 1, 1, 64 + 8 + (3 if n == 3 else 0)) and b.input_shape == (1, 1, b.train_x.shape[3])
    parts = unpack(b.train_x, b.inputs)
    assert parts[0].shape == (200, 1, 8, 8) and parts[1].dtype == torch.bool and parts[1].shape == (200, 8)
    if n == 3:
        assert parts[2].dtype == torch.int64 and int(parts[2].max()) < 16
    assert (b.val_x is not None) == val
    # the labels follow the inputs through the subset: y is a function of x and the mask
    want = (parts[0].mean((1, 2, 3)) > 0).long() * 2 + parts[1][:, 0].long()
    assert torch.equal(b.train_y, want)
    assert any("inputs per sample" in note for note in b.notes)


def test_refusals_name_the_fix(two):
    with pytest.raises(DataError, match="different sample counts"):
        load_data(f"{two}:uneven")
    with pytest.raises(DataError, match="does not apply") as ei:
        load_data(f"{two}:tensors", input_shape=(1, 8, 8))
    assert "--input-shape" in ei.value.hint
    _packed, layout = pack((torch.zeros(2, 1), torch.tensor([[300], [1]])), "test")
    check_dtype(layout, torch.float16)
    with pytest.raises(DataError, match="up to 300"):
        check_dtype(layout, torch.bfloat16)


def _search(tmp_path, two, *extra, fn="tensors", kind="masked"):
    out = tmp_path / ("o" + "".join(c for c in "".join(extra) if c.isalnum())[:40])
    r = runner.invoke(app, ["search", f"{two}:build", "--arg", f"kind={kind}", "--data", f"{two}:{fn}",
                            "--shifts", "0,0.5", "--steps", "25", "--batch-size", "16", *extra,
                            "--out", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["candidates"] and all(c["status"] == "ok" for c in d["candidates"]), d["candidates"]
    return d


def test_two_input_model_searches_with_the_defaults_on_the_compiled_path(two, tmp_path, monkeypatch):
    """The search's defaults (seeds, schedule, --compile auto) with the compiled step forced
    cheaply: every candidate trains compiled, and scores what the eager search scores (float64)."""
    eager = _search(tmp_path, two, "--dtype", "float64", "--no-compile")
    _force_compiled_path(monkeypatch)
    comp = _search(tmp_path, two, "--dtype", "float64")
    assert comp["step_path"]["compile"] is True, comp["step_path"]
    assert all(c["compiled"] is True for c in comp["candidates"]), [c.get("compile_error") for c in comp["candidates"]]
    assert [c["score"] for c in comp["candidates"]] == [c["score"] for c in eager["candidates"]]
    assert comp["sites"] and len(comp["seeds"]) == len(eager["seeds"])


def test_three_inputs_with_integer_ids_and_a_held_out_split(two, tmp_path):
    """forward(x, mask, ids): the scan's random example inputs keep the ids valid table indices,
    and --val measures the held-out split packed the same way."""
    d = _search(tmp_path, two, "--no-compile", "--val", fn="with_val", kind="tokens")
    assert all(c["val_acc"] is not None for c in d["candidates"]), d["candidates"]
    assert any("3 inputs per sample" in n for n in d["notes"]), d["notes"]


def test_bad_inputs_exit_with_one_line(two):
    r = runner.invoke(app, ["search", f"{two}:build", "--data", f"{two}:uneven", "--shifts", "0,0.5", "--steps", "2"])
    assert r.exit_code == 1, r.output
    assert "different sample counts" in r.stderr and "Traceback" not in r.stderr
