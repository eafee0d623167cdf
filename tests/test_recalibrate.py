"""BatchNorm statistics after a shift and fine-tuning (issue 12, case 31): ``recalibrate_bn``
(public), ``bn_staleness``, and ``fold`` / ``export --data`` re-estimating and warning."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import bnnshift
from bnnshift.cli import app
from bnnshift.recalibrate import bn_staleness, recalibrate_bn

MODELS = Path(__file__).parent / "models"
sys.path.insert(0, str(MODELS))
import finetune_cnn as fc  # noqa: E402

SPEC = f"{MODELS / 'finetune_cnn.py'}:build"
DATA = f"{MODELS / 'finetune_cnn.py'}:load"


def bn_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Dropout(0.5), torch.nn.Flatten(), torch.nn.LazyLinear(3),
                               torch.nn.BatchNorm1d(3))


def test_public_and_equal_to_update_bn():
    assert "recalibrate_bn" in bnnshift.__all__ and bnnshift.recalibrate_bn is recalibrate_bn
    from bnnshift.train import recalibrate_bn as from_train
    assert from_train is recalibrate_bn  # one implementation
    xs = [torch.randn(16, 1, 8, 8) * 3 + 1 for _ in range(4)]
    a, b = bn_net(), bn_net()
    a(xs[0]), b(xs[0])  # materialise LazyLinear
    b.load_state_dict(a.state_dict())
    a.eval()
    for m in a.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.3
    torch.manual_seed(1)
    assert recalibrate_bn(a, xs) == 2
    torch.manual_seed(1)
    torch.optim.swa_utils.update_bn(xs, b)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not a.training and a[1].momentum == 0.3  # flag and momentum restored


def test_loader_tuples_and_max_batches():
    x = torch.randn(64, 1, 8, 8) + 2
    y = torch.zeros(64, dtype=torch.long)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    a, b = bn_net(), bn_net()
    a(x[:2]), b(x[:2])
    b.load_state_dict(a.state_dict())
    torch.manual_seed(1)
    recalibrate_bn(a, loader, max_batches=2)
    torch.manual_seed(1)
    recalibrate_bn(b, [x[:16], x[16:32]])
    assert torch.equal(a[1].running_mean, b[1].running_mean)
    assert a[1].num_batches_tracked.item() == 2
    assert (a[1].running_mean - 2 * a[0].weight.sum((1, 2, 3)) - a[0].bias).abs().max() < 1.0


def test_no_batches_keeps_old_statistics():
    m = bn_net()
    m(torch.randn(8, 1, 8, 8))
    m[1].running_mean.fill_(0.7)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(m, [])
    assert torch.all(m[1].running_mean == 0.7) and m[1].momentum == 0.1
    with pytest.raises(TypeError):
        recalibrate_bn(m, ["not a tensor"])
    assert torch.all(m[1].running_mean == 0.7)
    assert recalibrate_bn(torch.nn.Linear(2, 2), [torch.randn(2, 2)]) == 0


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """Case 31: trained at t = 0, patched with --shift 1, fine-tuned 60 steps as docs/finetune.md shows."""
    tmp = tmp_path_factory.mktemp("ft")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float sums whatever the machine: the staleness below is a fact, not luck
    try:
        return _finetuned(tmp)
    finally:
        torch.set_num_threads(threads)


def _finetuned(tmp):
    from bnnshift.patch import load_patched, read_recipe, save_patched

    data = fc.make(n_train=2048, n_val=1000)
    torch.manual_seed(0)
    ck = fc.train(fc.build(), 120, 2e-3, 1, data)  # the case: 200 steps, 60 fine-tuning steps (slower, same gap)
    torch.save(ck.state_dict(), tmp / "ck.pt")
    r = CliRunner().invoke(app, ["patch", SPEC, "--checkpoint", str(tmp / "ck.pt"), "--input-shape", "1,16,16",
                                 "--shift", "1", "-o", str(tmp / "P"), "-q"])
    assert r.exit_code == 0, r.output
    model = fc.train(load_patched(tmp / "P"), 40, 5e-4, 2, data)
    save_patched(model, read_recipe(tmp / "P"), tmp / "FT")
    return tmp / "FT", data


def accuracies(model, data):
    """(eval-mode, batch-statistics) held-out accuracy."""
    vx, vy = data[2], data[3]
    st = bn_staleness(model, vx, vy)
    return st.eval_accuracy, st.batch_stat_accuracy


def test_library_recalibration_closes_the_gap(finetuned):
    from bnnshift.patch import load_patched

    ft, data = finetuned
    model = load_patched(ft)
    ev, tr = accuracies(model, data)
    st = bn_staleness(model, data[0][:1000], data[1][:1000])
    assert st.stale and tr - ev > 0.1, (ev, tr)  # the stale model of case 31
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data[0], data[1]), batch_size=256)
    recalibrate_bn(model, loader, max_batches=10)
    ev2, tr2 = accuracies(model, data)
    assert abs(ev2 - tr2) <= 0.02, (ev2, tr2)
    assert ev2 > ev + 0.1
    assert not bn_staleness(model, data[0][:1000], data[1][:1000]).stale


def test_fold_and_export_with_data(finetuned, tmp_path):
    import shutil

    from bnnshift.patch import load_patched

    ft, data = finetuned
    d = tmp_path / "C"
    shutil.copytree(ft, d)
    runner = CliRunner()
    r = runner.invoke(app, ["export", str(d), "--onnx", str(tmp_path / "m.onnx"), "--data", DATA, "--json"])
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    bn = payload["bn_statistics"]
    assert bn["before"]["stale"] and not bn["after"]["stale"] and bn["recalibrated"]
    assert "stale" in r.stderr
    import onnx

    proto = onnx.load(str(tmp_path / "m.onnx"))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["bnnshift_version"] == bnnshift.__version__
    assert json.loads(props["bnnshift_shifts"]) == {"act1": 1.0, "act2": 1.0}
    assert len(props["bnnshift_recipe_sha256"]) == 64
    assert payload["opset"] == next(i.version for i in proto.opset_import if i.domain in ("", "ai.onnx"))
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    vx, vy = data[2], data[3]
    logits = sess.run(None, {sess.get_inputs()[0].name: vx.numpy()})[0]
    onnx_acc = float((np.argmax(logits, 1) == vy.numpy()).mean())
    ev, tr = accuracies(load_patched(d), data)  # the directory itself is unchanged
    assert tr - ev > 0.1
    assert abs(onnx_acc - tr) <= 0.02, (onnx_acc, tr)

    r = runner.invoke(app, ["fold", str(d), "--data", DATA, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["bn_statistics"]["before"]["stale"]
    ev, tr = accuracies(load_patched(d), data)
    assert abs(ev - tr) <= 0.02, (ev, tr)
    # fresh now: no warning the second time
    r = runner.invoke(app, ["fold", str(d), "--data", DATA, "--json"])
    assert r.exit_code == 0 and not json.loads(r.stdout)["bn_statistics"]["before"]["stale"]
    assert "warning" not in r.stderr


def test_fold_without_data_says_bn_is_unchecked(finetuned, tmp_path):
    import shutil

    d = tmp_path / "C"
    shutil.copytree(finetuned[0], d)
    r = CliRunner().invoke(app, ["fold", str(d), "--json"])
    assert r.exit_code == 0, r.output
    assert "re-estimate" in r.stderr and json.loads(r.stdout)["bn_statistics"] is None
