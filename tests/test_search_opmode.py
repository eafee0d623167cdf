"""A forward torch.fx cannot trace (``if x.dim() == 4``): its sites are shifted by bnnshift's op
mode, and torch.compile applies such a shift twice (issue 22 item 5). ``--compile auto`` trains
those models eager and says why; the cause is pinned numerically."""
from __future__ import annotations

import pytest
import torch

from models import SIGN_STE_SOURCE, patched_model

CHECKS = {  # three spellings of a dimension check torch.fx cannot trace
    "dim": "if x.dim() == 4:\n            x = x.flatten(1)",
    "ndim": "if x.ndim > 2:\n            x = x.reshape(x.shape[0], -1)",
    "len_shape": "if len(x.shape) == 4:\n            x = torch.flatten(x, 1)",
    "none": "x = x.flatten(1)",  # traceable: no op-mode site
}


def _source(check: str, binarizer: str) -> str:
    return f'''import torch
import torch.nn as nn
{SIGN_STE_SOURCE}

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32, bias=False)
        self.bn1 = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        {CHECKS[check]}
        return self.fc2({binarizer}(self.bn1(self.fc1(x))))


def build():
    torch.manual_seed(0)
    return Net()
'''


def _load(tmp_path, check: str, binarizer: str = "SignSTE.apply"):
    import importlib.util

    f = tmp_path / f"net_{check}.py"
    f.write_text(_source(check, binarizer))
    spec = importlib.util.spec_from_file_location(f.stem, f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return f, mod


@pytest.mark.parametrize("binarizer", ["SignSTE.apply", "torch.sign"])
def test_compile_applies_an_op_mode_shift_twice(tmp_path, binarizer):
    """The cause, pinned (torch 2.14; backend 'eager', i.e. dynamo alone): the compiled forward
    of the patched model at t = 0.5 is the eager forward at t = 1.0. If a torch upgrade fixes
    it, this test fails and the eager fallback of ``--compile auto`` can go."""
    from bnnshift.search.steppath import op_mode_sites
    from bnnshift.shift import shifted_sites

    _, mod = _load(tmp_path, "dim", binarizer)
    m = patched_model(mod.build(), (1, 8, 8), 0.5).eval()
    assert op_mode_sites(shifted_sites(m))  # the dimension check made it an op-mode site
    x = torch.randn(8, 1, 8, 8)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(m, backend="eager", dynamic=False)(x)
        name = next(k for k, _ in m.named_buffers() if "threshold" in k)
        eager_t = m(x)
        dict(m.named_buffers())[name].fill_(1.0)
        eager_2t = m(x)
    torch._dynamo.reset()
    assert not torch.equal(compiled, eager_t) and torch.equal(compiled, eager_2t)


@pytest.mark.parametrize("check", ["dim", "ndim", "len_shape"])
def test_compile_auto_trains_op_mode_models_eager_and_says_why(tmp_path, check):
    from bnnshift.search import SearchConfig, SearchContext
    from bnnshift.search.steppath import _choose_step_path

    f, _ = _load(tmp_path, check)
    cfg = SearchConfig(model=f"{f}:build", data="synthetic:256", input_shape=(1, 8, 8),
                       batch_size=32, steps=8, compile="auto", bn_recalib_batches=1, shifts=[0.0, 0.5])
    choice = _choose_step_path(SearchContext.open(cfg), cfg)
    assert not choice.compile and "applies such a shift twice" in choice.reason and "if x.dim() == 4" in choice.reason


def test_a_traceable_forward_is_not_refused_compile(tmp_path):
    from bnnshift.search import SearchConfig, SearchContext
    from bnnshift.search.steppath import _choose_step_path

    f, _ = _load(tmp_path, "none")
    cfg = SearchConfig(model=f"{f}:build", data="synthetic:256", input_shape=(1, 8, 8),
                       batch_size=32, steps=8, compile="auto", bn_recalib_batches=1, shifts=[0.0, 0.5])
    choice = _choose_step_path(SearchContext.open(cfg), cfg)
    assert "twice" not in choice.reason and "too few" in choice.reason
