"""The application layer (issue 23 item 1): ``bnnshift.pipeline``'s entries return results whose
``to_json()`` is the command's documented ``--json`` payload; ``source.open_model`` is the one
"load, choose the input shape, collect the notes"; ``export`` builds the model once."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch

from bnnshift import load as load_mod
from bnnshift.errors import BnnshiftError, UntrustedRecipeError, UsageError, VerificationError
from bnnshift.export import ExportError, _child_error
from bnnshift.patch import ShiftConfig, read_recipe
from bnnshift.pipeline import (BnOptions, ExportOptions, FoldOptions, PatchOptions, ScanOptions, export_dir, fold_dir,
                               patch_spec, scan_spec)
from bnnshift.source import ModelSource, open_model
from models import TINY_BNN, invoke

DOCS = Path(__file__).resolve().parents[1] / "docs"


def schema(name):
    return json.loads((DOCS / f"{name}.schema.json").read_text())


class Lines:
    """A ``log`` that keeps what the pipeline said."""

    def __init__(self):
        self.said = []

    def info(self, line):
        self.said.append(("info", line))

    def warn(self, line):
        self.said.append(("warn", line))


# ------------------------------------------------------------------ open_model: one loader for every command


@pytest.mark.parametrize("spec,args", [("zoo:mlp", ["width=0.25"]), (f"{TINY_BNN}:build", None)])
def test_open_model_says_where_the_shape_came_from_only_when_guessed(spec, args):
    given = open_model(ModelSource(spec, args=args, input_shape="1,28,28"))
    assert given.shape == (1, 28, 28) and not any(n.startswith("input shape") for n in given.notes)
    chosen = open_model(ModelSource(spec, args=args))
    declared = chosen.loaded.input_shape is not None
    assert any(n.startswith("input shape") for n in chosen.notes) == (not declared), chosen.notes
    assert chosen.name == chosen.loaded.spec.canonical() and chosen.model is chosen.loaded.model


def test_open_model_tuple_shape_and_load_report_note(tmp_path):
    from safetensors.torch import save_file

    m = open_model(ModelSource("zoo:mlp", args=["width=0.25"])).model
    ckpt = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(ckpt))
    opened = open_model(ModelSource("zoo:mlp", args=["width=0.25"], checkpoint=str(ckpt), input_shape=(1, 28, 28)))
    assert opened.shape == (1, 28, 28)
    assert [n for n in opened.notes if n.startswith("checkpoint ")], opened.notes  # the load report line
    for k, v in m.state_dict().items():
        assert torch.equal(opened.model.state_dict()[k], v), k


# ------------------------------------------------------------------ the payload is the CLI's --json, byte for byte


def _same_payload(cli_json: dict, lib_json: dict, out_cli: Path, out_lib: Path) -> None:
    text = json.dumps(lib_json, indent=2).replace(str(out_lib), str(out_cli))
    assert json.dumps(cli_json, indent=2) == text


def test_patch_spec_payload_is_the_cli_json(tmp_path):
    cli_out, lib_out = tmp_path / "cli", tmp_path / "lib"
    r = invoke("patch", "zoo:mlp", "--arg", "width=0.25", "--shift", "0.5", "-o", cli_out, "--json")
    assert r.exit_code == 0, r.stderr
    log = Lines()
    result = patch_spec(PatchOptions(ModelSource("zoo:mlp", args=["width=0.25"]), lib_out, ShiftConfig(shift=0.5)),
                        log=log)
    payload = result.to_json()
    jsonschema.validate(payload, schema("patch"))
    _same_payload(json.loads(r.stdout), payload, cli_out, lib_out)
    assert (lib_out / "patch.json").is_file() and read_recipe(lib_out).input_shape == [1, 28, 28]
    assert [s["shift"] for s in payload["sites"]] == [0.5, 0.5]


def test_patch_spec_of_a_model_without_sites_is_refused_and_leaves_nothing(tmp_path):
    from bnnshift.errors import NoSitesError

    (tmp_path / "fp.py").write_text("import torch.nn as nn\n\ndef build():\n"
                                    "    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))\n")
    out = tmp_path / "new" / "p"
    with pytest.raises(NoSitesError):
        patch_spec(PatchOptions(ModelSource(f"{tmp_path / 'fp.py'}:build", input_shape="1,4,4"), out,
                                ShiftConfig(shift=0.5)))
    assert not out.exists()


def test_scan_spec_payload_and_summary():
    res = scan_spec(ScanOptions(ModelSource("zoo:mlp", args=["width=0.25"]), summary=True))
    payload = res.to_json()
    jsonschema.validate(payload, schema("scan"))
    assert payload["layer_summary"] == res.report.layer_summary and payload["num_sites"] == 2
    assert "layer_summary" not in scan_spec(ScanOptions(ModelSource("zoo:mlp", args=["width=0.25"]))).to_json()


# ------------------------------------------------------------------ fold_dir


def test_fold_dir_folds_then_reports_already_folded(patched_mlp):
    log = Lines()
    res = fold_dir(FoldOptions(str(patched_mlp)), log=log)
    jsonschema.validate(res.to_json(), schema("fold"))
    assert set(res.report.folded) == {"bn1:output", "bn2:output"} and not res.report.kept
    assert res.note is None  # straight from patch: the BN statistics fit the weights
    before = {p.name: p.read_bytes() for p in patched_mlp.iterdir()}
    again = fold_dir(FoldOptions(str(patched_mlp)), log=log)
    assert again.report is None and again.already_folded == {"bn1:output": "bn:bn1", "bn2:output": "bn:bn2"}
    assert again.to_json()["folded"] == {} and "normalisation" not in again.to_json()
    assert any("already folded" in line for _, line in log.said)
    assert {p.name: p.read_bytes() for p in patched_mlp.iterdir()} == before  # nothing rewritten


def test_fold_dir_notes_stale_bn_after_fine_tuning(patched_mlp):
    from bnnshift.patch import load_patched, save_patched

    model = load_patched(patched_mlp)
    with torch.no_grad():
        next(p for p in model.parameters() if p.dim() >= 2).add_(0.01)  # "fine-tuned"
    save_patched(model, read_recipe(patched_mlp), patched_mlp, force=True)
    res = fold_dir(FoldOptions(str(patched_mlp)))
    assert res.note and f"bnnshift fold {patched_mlp} --data SPEC" in res.note


# ------------------------------------------------------------------ export_dir builds the model once


@pytest.fixture
def count_builds(monkeypatch):
    calls = []
    real = load_mod.build_model

    def counting(*a, **k):
        calls.append(a[0] if a else k)
        return real(*a, **k)

    monkeypatch.setattr(load_mod, "build_model", counting)
    return calls


def test_export_dir_builds_only_in_the_child(patched_mlp, tmp_path, count_builds):
    res = export_dir(ExportOptions(str(patched_mlp), str(tmp_path / "m.onnx")))
    assert count_builds == []  # the recipe, sha256 and trust rules checked here; built once, in the child
    assert res.report.passed and (tmp_path / "m.onnx").is_file() and res.note is None
    payload = res.to_json()
    jsonschema.validate(payload, schema("export"))
    assert "bn_statistics_stale" not in payload and payload["bn_statistics"] is None


def test_export_dir_checks_here_before_the_child(patched_mlp, tmp_path, count_builds):
    w = patched_mlp / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-8] + b"\0" * 8)  # replaced outside bnnshift
    with pytest.raises(BnnshiftError, match="sha256"):
        export_dir(ExportOptions(str(patched_mlp), str(tmp_path / "m.onnx")))
    assert count_builds == [] and not (tmp_path / "m.onnx").exists()
    with pytest.raises(BnnshiftError, match="not found"):
        export_dir(ExportOptions(str(tmp_path / "missing"), str(tmp_path / "m.onnx")))


def test_export_dir_of_a_file_model_refuses_an_untrusted_recipe_here(tmp_path, own_trust_file, count_builds):
    shutil.copy(TINY_BNN, tmp_path / "tiny_bnn.py")
    out = tmp_path / "OUT"
    patch_spec(PatchOptions(ModelSource(f"{tmp_path / 'tiny_bnn.py'}:build", input_shape="1,16,16"), out,
                            ShiftConfig(shift=0.5)))
    count_builds.clear()
    own_trust_file.unlink()  # as on another machine
    with pytest.raises(UntrustedRecipeError):
        export_dir(ExportOptions(str(out), str(tmp_path / "m.onnx")))
    assert count_builds == []


@pytest.mark.parametrize("data,cls,code", [
    ({"error": "bad spec", "hint": "h", "exit_code": 2, "kind": "UsageError"}, UsageError, 2),
    ({"error": "not trusted", "hint": None, "exit_code": 1, "kind": "UntrustedRecipeError"}, UntrustedRecipeError, 1),
    ({"error": "parity", "hint": None, "exit_code": 4}, VerificationError, 4),
    ({"error": "crash", "hint": None, "exit_code": 1, "kind": "os.system"}, ExportError, 1),
])
def test_a_child_error_comes_back_as_the_class_it_was(data, cls, code):
    exc = _child_error(data)
    assert type(exc) is cls and exc.exit_code == code and exc.message == data["error"] and exc.hint == data["hint"]


def test_export_dir_with_a_new_normalisation_builds_here_and_records_it(patched_mlp, tmp_path, count_builds):
    res = export_dir(ExportOptions(str(patched_mlp), str(tmp_path / "m.onnx"), bn=BnOptions(mean=(0.5,), std=(0.25,))))
    assert len(count_builds) == 1  # changed here (the normalisation record), a copy for the child
    assert res.normalisation["mean"] == [0.5] and res.report.passed
    import onnx

    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(props["bnnshift_normalisation"])["mean"] == [0.5]
