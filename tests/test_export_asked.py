"""Export does what was asked (issue 19 item 4; cases 39 and 50): ``--opset N`` writes opset N or
refuses naming it with no file; dict / dataclass / tuple outputs verify like tensors, the
``--output-index`` / ``--output-key`` choice applied. Models are made here."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from bnnshift.export import ExportError, export_onnx
from models import patched_model


def sign_ste(x):
    c = x.clamp(-1, 1)
    return (torch.sign(x) - c).detach() + c


class ConvNet(nn.Module):
    """A small binary conv net (another layout than case 39's MLP), function binarizer."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(6)
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def features(self, x):
        h = sign_ste(self.bn0(self.conv0(x)))
        h = sign_ste(self.bn1(self.conv1(h)))
        return h.mean((2, 3))

    def forward(self, x):
        return self.head(self.features(x))


@dataclass
class Out:
    embedding: torch.Tensor
    logits: torch.Tensor


class DataclassNet(ConvNet):
    def forward(self, x):
        f = self.features(x)
        return Out(embedding=f * 2, logits=self.head(f))


class DictNet(ConvNet):
    """The logits under another key than 'logits', after a float item."""

    def __init__(self):
        super().__init__()
        self.aux = nn.Linear(6, 3)

    def forward(self, x):
        f = self.features(x)
        return {"aux": self.aux(f), "scores": self.head(f), "feat": f}


class TupleNet(ConvNet):
    def forward(self, x):
        f = self.features(x)
        return f, self.head(f)


SHAPE = (1, 8, 8)


def patched(cls, t=0.5):
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
    return patched_model(model, SHAPE, t)


def run_onnx(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})


def file_opset(path):
    return [i.version for i in onnx.load(str(path)).opset_import if i.domain in ("", "ai.onnx")][0]


@pytest.mark.parametrize("opset", [13, 17])
def test_asked_opset_is_the_files_opset_and_the_reports(tmp_path, opset):
    model = patched(ConvNet)
    path = tmp_path / f"m{opset}.onnx"
    rep = export_onnx(model, SHAPE, path, opset, batches=1)
    assert rep.passed and file_opset(path) == opset and rep.opset == opset
    x = torch.randn(5, *SHAPE)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(run_onnx(path, x)[0] - ref).max() <= 1e-4


def test_an_opset_that_cannot_be_written_is_refused_naming_it_and_nothing_written(tmp_path):
    model = patched(ConvNet)
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError) as exc:
        export_onnx(model, SHAPE, path, 3, batches=1)  # no exporter writes opset 3
    assert "--opset 3" in exc.value.message
    assert not path.exists()


def test_dataclass_output_exports_its_logits_field(tmp_path):
    model = patched(DataclassNet)
    path = tmp_path / "dc.onnx"
    rep = export_onnx(model, SHAPE, path, batches=1)
    assert rep.passed and rep.sites_checked == 2
    x = torch.randn(4, *SHAPE)
    got = run_onnx(path, x)
    assert len(got) == 1
    with torch.no_grad():
        ref = model(x).logits.numpy()
    assert np.abs(got[0] - ref).max() <= 1e-4
    assert any("field 'logits'" in w for w in rep.warnings)


def test_dict_output_under_another_key_needs_and_takes_output_key(tmp_path):
    from bnnshift.errors import UsageError

    model = patched(DictNet)
    with pytest.raises(UsageError, match="which item are the logits") as exc:
        export_onnx(model, SHAPE, tmp_path / "no.onnx", batches=1)
    assert "--output-key" in exc.value.hint
    assert not (tmp_path / "no.onnx").exists()
    path = tmp_path / "d.onnx"
    rep = export_onnx(model, SHAPE, path, batches=1, output_key="scores")
    assert rep.passed
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        ref = model(x)["scores"].numpy()
    got = run_onnx(path, x)
    assert len(got) == 1 and got[0].shape == ref.shape and np.abs(got[0] - ref).max() <= 1e-4


@pytest.mark.parametrize("cls,pick", [(TupleNet, {"output_index": 1}), (DictNet, {"output_key": "scores"})])
def test_non_tensor_output_and_an_older_opset_together(tmp_path, cls, pick):
    """opset 13: the TorchScript exporter writes the model's own graph, reduced to the logits."""
    model = patched(cls)
    path = tmp_path / "t.onnx"
    rep = export_onnx(model, SHAPE, path, 13, batches=1, **pick)
    assert rep.passed and file_opset(path) == 13
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        out = model(x)
        ref = (out[1] if cls is TupleNet else out["scores"]).numpy()
    got = run_onnx(path, x)
    assert got[0].shape == (3, 4) and np.abs(got[0] - ref).max() <= 1e-4
