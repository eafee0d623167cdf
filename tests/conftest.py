"""Shared test helpers: small instances of the zoo models, tiny hand-written BNNs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# recipes written by tests are recorded in a throw-away trust record, not the developer's own
os.environ.setdefault("BNNSHIFT_TRUST_FILE", os.path.join(__import__("tempfile").mkdtemp(prefix="bnnshift-trust-"),
                                                          "trusted_recipes"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Every test leaves torch's thread count as it found it (a benchmark's ``--threads 1`` run
    in process, a kernel test on one thread): later tests in the same xdist worker that compare
    float sums across processes bitwise see the same count as before."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)

IMAGENET_STYLE = {"xnor-resnet18", "bireal-resnet18", "bireal-resnet34", "reactnet-a"}


def zoo_small(name: str, seed: int = 0):
    """(model, input_shape) of zoo model ``name`` at a size that keeps tests fast."""
    from bnnshift.registry import ZOO

    e = ZOO.get(name)
    torch.manual_seed(seed)
    kwargs, shape = {}, tuple(e.input_shape)
    if name in IMAGENET_STYLE:
        kwargs, shape = {"width": 0.25 if name != "reactnet-a" else 0.125}, (3, 32, 32)
    elif name.startswith("vgg-small") or name.startswith("resnet20"):
        kwargs = {"width": 0.25}
    elif name == "mlp":
        kwargs = {"width": 0.25}
    return e.factory(**kwargs), shape


def zoo_quick_args(name: str):
    """(factory kwargs, one-sample input shape) of zoo model ``name`` as tests/test_zoo.py and
    tests/test_patch.py build it: ImageNet-style models at width 1/8 on 32x32, resnet20 /
    vgg-small at width 1/4, the others as registered (``zoo_small`` keeps ImageNet-style models
    at 1/4 and narrows the MLP)."""
    from bnnshift.registry import ZOO

    entry = ZOO.get(name)
    if name in IMAGENET_STYLE:
        return {"width": 0.125}, (3, 32, 32)
    if name.startswith(("resnet20", "vgg-small")):
        return {"width": 0.25}, entry.input_shape
    return {}, entry.input_shape


def zoo_quick(name: str, seed: int = 0, **override):
    """(model, input_shape) of ``zoo_quick_args(name)``, factory kwargs overridden by ``override``,
    built after ``torch.manual_seed(seed)``."""
    from bnnshift.registry import ZOO

    kwargs, shape = zoo_quick_args(name)
    kwargs.update(override)
    torch.manual_seed(seed)
    return ZOO.get(name).factory(**kwargs), shape


@pytest.fixture
def zoo_names():
    from bnnshift.registry import ZOO

    return ZOO.names()


@pytest.fixture
def own_trust_file(tmp_path, monkeypatch):
    """A trust record of this test only (``BNNSHIFT_TRUST_FILE``): use with
    ``pytestmark = pytest.mark.usefixtures("own_trust_file")``."""
    f = tmp_path / "state" / "trusted_recipes"
    monkeypatch.setenv("BNNSHIFT_TRUST_FILE", str(f))
    return f


MLP_PATCHED_AT = 0.5  # the shift of the session's patched MLP


@pytest.fixture(scope="session")
def patched_mlp_source(tmp_path_factory):
    """zoo:mlp (width 0.25) patched at t = 0.5, not folded: patched once per session
    (``pipeline.patch_spec``). Read it, never change it: ``patched_mlp`` hands out copies."""
    from bnnshift.patch import ShiftConfig
    from bnnshift.pipeline import PatchOptions, patch_spec
    from bnnshift.source import ModelSource

    out = tmp_path_factory.mktemp("patched-mlp") / "p"
    torch.manual_seed(0)  # the zoo's init draws from the global generator: the same weights in every session
    patch_spec(PatchOptions(ModelSource("zoo:mlp", args=["width=0.25"]), out, ShiftConfig(shift=MLP_PATCHED_AT)))
    return out


@pytest.fixture
def patched_mlp(patched_mlp_source, tmp_path):
    """A fresh copy of the session's patched MLP directory at ``tmp_path / "p"`` (yours to
    change: fold it, fine-tune it, break it)."""
    import shutil

    return Path(shutil.copytree(patched_mlp_source, tmp_path / "p"))
