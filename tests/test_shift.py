"""The shift moves the whole activation along x: forward threshold and STE window together.

sign(BN(x) - t) with the STE applied to BN(x) - t is, by construction, the original model with
BN bias beta - t. So for every site whose producer is a BatchNorm read by nothing else, the
patched model and the original with beta' = beta - t must agree in outputs AND gradients (in
train mode). If only the forward threshold moved (e.g. an inline detach-trick STE left on the
unshifted input) the gradients would differ.
"""
from __future__ import annotations

import copy

import pytest
import torch

from bnnshift.registry import ZOO
from bnnshift.scan import scan_model
from bnnshift.shift import get_thresholds, insert_shifts, remove_shifts, threshold_key

from conftest import zoo_small

T = 0.7


def _bn_foldable(report):
    return [s for s in report.sites if s.foldable and s.foldable.startswith("bn:")]


@pytest.mark.parametrize("name", [n for n in ZOO.names() if n not in ("style-torch-sign",)])
def test_shift_equals_bn_bias_minus_t_in_outputs_and_gradients(name):
    model, shape = zoo_small(name)
    report = scan_model(model, shape)
    sites = _bn_foldable(report)
    if not sites:
        assert all(not s.foldable or s.foldable.startswith("bias:") for s in report.sites)
        return
    torch.manual_seed(1)
    x = torch.randn(8, *shape)
    # one site at a time: with several, beta - t and (BN - t) round differently and an ulp can
    # change which element a later MaxPool picks among equal binary-conv outputs (its gradient)
    for site in sites:
        patched = insert_shifts(copy.deepcopy(model), [site], {site.name: T})
        reference = copy.deepcopy(model)
        mods = dict(reference.named_modules())
        with torch.no_grad():
            mods[site.foldable[3:]].bias -= T
        patched.train()
        reference.train()
        yp, yr = patched(x), reference(x)
        assert torch.allclose(yp, yr, atol=1e-4, rtol=1e-4), site.name
        yp.square().mean().backward()
        yr.square().mean().backward()
        for (n, a), (_, b) in zip(reference.named_parameters(), patched.named_parameters()):
            if a.grad is None:
                assert b.grad is None or torch.count_nonzero(b.grad) == 0
                continue
            assert torch.allclose(a.grad, b.grad, atol=1e-4, rtol=1e-3), (site.name, n)


def test_threshold_keys_are_added_and_original_keys_kept():
    model, shape = zoo_small("reactnet-a")
    report = scan_model(model, shape)
    before = set(model.state_dict())
    patched = insert_shifts(copy.deepcopy(model), report.sites, {s.name: 0.5 for s in report.sites})
    after = set(patched.state_dict())
    assert before <= after
    assert after - before == {threshold_key(s) for s in report.sites}
    assert all(float(t) == 0.5 for t in get_thresholds(patched).values())
    remove_shifts(patched)
    assert set(patched.state_dict()) == before


def test_buffer_schedules_stay_live_after_patching():
    """fx would freeze an annealed temperature; hooks keep the user's forward, so it stays live."""
    model, shape = zoo_small("style-temperature")
    report = scan_model(model, shape)
    patched = insert_shifts(copy.deepcopy(model), report.sites, {s.name: 0.0 for s in report.sites})
    x = torch.randn(4, *shape, requires_grad=True)
    patched.train()
    patched(x).sum().backward()
    g1 = x.grad.clone()
    for name, buf in patched.named_buffers():
        if name.endswith(".k") or name == "k":
            buf.mul_(10.0)  # the training loop anneals the STE sharpness
    x.grad = None
    patched(x).sum().backward()
    assert not torch.equal(g1, x.grad), "the temperature buffer must still drive the STE after patching"


def test_deepcopy_of_a_patched_model_has_its_own_thresholds():
    model, shape = zoo_small("vgg-small")
    report = scan_model(model, shape)
    a = insert_shifts(copy.deepcopy(model), report.sites, {s.name: 0.0 for s in report.sites})
    b = copy.deepcopy(a)
    for t in get_thresholds(b).values():
        t.fill_(1.5)
    x = torch.randn(4, *shape)
    a.eval(), b.eval(), model.eval()
    assert torch.equal(a(x), model(x))
    assert not torch.equal(b(x), model(x))
