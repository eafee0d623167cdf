"""DDP with parameters that get no gradient (issue 19 item 5, case 44): bnnshift's DDP wrapper sets
find_unused_parameters only when a probe forward + backward leaves a parameter without a gradient,
and then training steps run on 2 gloo processes. Models are made here."""
from __future__ import annotations

import math
import os

import torch
import torch.multiprocessing as mp
import torch.nn as nn

from bnnshift.load import logits_picker
from bnnshift.parallel import unused_parameters, wrap_ddp


class AuxUnused(nn.Module):
    """An auxiliary head forward never calls (left from distillation)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 8, bias=False)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)
        self.aux_head = nn.Sequential(nn.Linear(8, 3))

    def forward(self, x):
        return self.head(torch.sign(self.bn(self.fc(x))) + 0 * self.bn(self.fc(x)))


class DictFeaturesUnusedInLoss(nn.Module):
    """Returns a dict; the 'proj' item has its own parameters but the logits do not use them."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 8)
        self.head = nn.Linear(8, 3)
        self.proj = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return {"logits": self.head(h), "proj": self.proj(h.detach())}


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)))


def test_unused_parameters_found_without_touching_the_model():
    m = AuxUnused()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    got = unused_parameters(m, torch.randn(4, 12))
    assert got == ["aux_head.0.weight", "aux_head.0.bias"]
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # BN statistics unchanged
    assert all(p.grad is None for p in m.parameters())
    assert unused_parameters(Plain(), torch.randn(4, 12)) == []
    # the logits pick decides: proj gets no gradient from the logits
    assert unused_parameters(DictFeaturesUnusedInLoss(), torch.randn(4, 12), logits_picker(None, "logits")) == [
        "proj.weight", "proj.bias"]


def _worker(rank, world, store, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        out = {}
        for name, cls, pick in (("aux", AuxUnused, None), ("dict", DictFeaturesUnusedInLoss, logits_picker(None, "logits")),
                                ("plain", Plain, None)):
            torch.manual_seed(0)
            m = cls()
            ddp = wrap_ddp(m, torch.device("cpu"), probe=torch.randn(2, 12), pick=pick)
            opt = torch.optim.SGD(m.parameters(), lr=0.1)
            for step in range(3):
                x = torch.randn(4, 12, generator=torch.Generator().manual_seed(step * world + rank))
                y = torch.arange(4) % 3
                o = ddp(x)
                logits = o["logits"] if isinstance(o, dict) else o
                loss = nn.functional.cross_entropy(logits, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            out[name] = (bool(ddp.find_unused_parameters), float(loss))
        results[rank] = out
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_train_models_with_unused_parameters(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, str(tmp_path / "store"), results), nprocs=2, join=True)
        got = dict(results)
    assert set(got) == {0, 1}
    for r in (0, 1):
        assert got[r]["aux"][0] is True and got[r]["dict"][0] is True
        assert got[r]["plain"][0] is False  # only when needed
    assert all(math.isfinite(got[r][k][1]) for r in (0, 1) for k in got[r])
