"""Patch directories that move and cannot attack (issue 10, cases 32 and 34): patch.json keeps
the model file and checkpoint relative to the directory plus their sha256; a recipe's
file.py:fn / pkg.mod:fn spec is imported only when the user names the model, passes
--trust-recipe, or bnnshift wrote the recipe for this user (the local trust record)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bnnshift._trust import is_trusted, trust_file
from bnnshift.errors import CheckpointError, UntrustedRecipeError
from bnnshift.patch import load_patched, read_recipe
from models import TINY_BNN as MODELS, invoke

pytestmark = pytest.mark.usefixtures("own_trust_file")  # conftest: a trust record per test


def x16(n=4):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def patch_file_model(where: Path, attr="build", shift="0.5") -> Path:
    where.mkdir(parents=True, exist_ok=True)
    shutil.copy(MODELS, where / "tiny_bnn.py")
    out = where / "OUT"
    r = invoke("patch", f"{where / 'tiny_bnn.py'}:{attr}", "--input-shape", "1,16,16", "--shift", shift, "-o", out,
               "-q")
    assert r.exit_code == 0, r.output
    return out


def craft(d: Path, how: str, marker: Path) -> None:
    """As /work/shared/cases/34_recipe_runs_named_callable/craft.py."""
    p = d / "patch.json"
    rec = json.loads(p.read_text())
    if how == "subprocess":
        rec["model"] = {"kind": "module", "target": "subprocess", "attr": "getoutput",
                        "args": {"cmd": f"touch {marker}"}}
    else:
        rec["model"] = {"kind": "module", "target": "os", "attr": "system", "args": {"command": f"touch {marker}"}}
    p.write_text(json.dumps(rec, indent=2))


def test_recipe_paths_are_relative_with_sha256(tmp_path):
    out = patch_file_model(tmp_path / "a")
    raw = json.loads((out / "patch.json").read_text())
    assert raw["model"]["target"] == "../tiny_bnn.py"
    from bnnshift._io import sha256_file

    assert raw["model"]["sha256"] == sha256_file(MODELS)
    assert raw["checkpoint"] is None
    # in memory the path is absolute again, resolved against the directory
    assert read_recipe(out).model["target"] == str((tmp_path / "a" / "tiny_bnn.py").resolve())


@pytest.mark.parametrize("how", ["subprocess", "os"])
def test_crafted_recipe_never_runs_the_callable(tmp_path, how):
    src = patch_file_model(tmp_path / "a")
    # export runs in a subprocess (a few seconds each): once is enough, fold for both
    for cmd in (("export", "fold") if how == "subprocess" else ("fold",)):
        d = tmp_path / f"evil_{cmd}"
        shutil.copytree(src, d)
        marker = tmp_path / f"PWNED_{cmd}"
        craft(d, how, marker)
        args = ["export", d, "--onnx", d / "m.onnx"] if cmd == "export" else ["fold", d]
        r = invoke(*args)
        assert not marker.exists(), f"{cmd} ran the callable patch.json names"
        assert r.exit_code == 1
        assert "getoutput" in r.stderr or "system" in r.stderr
        assert "--model" in r.stderr and "--trust-recipe" in r.stderr
        with pytest.raises(UntrustedRecipeError):
            load_patched(d)
        assert not marker.exists()


def test_untouched_recipe_exports_without_flag_edited_one_does_not(tmp_path):
    out = patch_file_model(tmp_path / "a")
    assert is_trusted(read_recipe(out).sha256) and trust_file().is_file()
    r = invoke("export", out, "--onnx", tmp_path / "m.onnx", "-q")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "m.onnx").is_file()
    # one edited byte of patch.json (here: the factory name) and it is no longer trusted
    rec = json.loads((out / "patch.json").read_text())
    rec["model"]["attr"] = "build_dp"
    (out / "patch.json").write_text(json.dumps(rec, indent=2))
    with pytest.raises(UntrustedRecipeError, match="build_dp"):
        load_patched(out)
    m = load_patched(out, trust=True)  # the user vouches: DataParallel factory unwrapped, same weights
    assert not isinstance(m, torch.nn.DataParallel)


def test_recipe_from_another_machine_needs_model_or_flag(tmp_path, own_trust_file):
    out = patch_file_model(tmp_path / "a")
    with torch.no_grad():
        ref = load_patched(out)(x16())
    own_trust_file.unlink()  # as on another machine / for another user
    with pytest.raises(UntrustedRecipeError, match="tiny_bnn.py:build"):
        load_patched(out)
    r = invoke("fold", out)
    assert r.exit_code == 1 and "--trust-recipe" in r.stderr
    with torch.no_grad():
        assert torch.equal(load_patched(out, trust=True)(x16()), ref)
        assert torch.equal(load_patched(out, model=f"{tmp_path / 'a' / 'tiny_bnn.py'}:build")(x16()), ref)


def test_changed_model_file_is_refused_unless_named(tmp_path):
    out = patch_file_model(tmp_path / "a")
    f = tmp_path / "a" / "tiny_bnn.py"
    f.write_text(f.read_text() + "\nimport os  # edited after patching\n")
    with pytest.raises(CheckpointError, match="changed since it was patched"):
        load_patched(out)
    assert load_patched(out, model=f"{f}:build") is not None


def test_moved_directory_loads_and_exports(tmp_path):
    """Case 32: patch in A, move OUT/ and the model file to B, delete A."""
    a, b = tmp_path / "A", tmp_path / "B"
    out = patch_file_model(a)
    with torch.no_grad():
        ref = load_patched(out)(x16())
    b.mkdir()
    shutil.copytree(out, b / "OUT")
    shutil.copy(a / "tiny_bnn.py", b / "tiny_bnn.py")
    shutil.rmtree(a)
    with torch.no_grad():
        assert torch.equal(load_patched(b / "OUT")(x16()), ref)  # same bytes: still trusted, found relatively
    r = invoke("fold", b / "OUT", "-q")  # export rebuilds the same way (load_patched); fold needs no ONNX
    assert r.exit_code == 0, r.stderr


def test_moved_directory_without_model_file_takes_model(tmp_path):
    """The model file moved somewhere else: --model / model= (a spec or an instance)."""
    out = patch_file_model(tmp_path / "a")
    with torch.no_grad():
        ref = load_patched(out)(x16())
    elsewhere = tmp_path / "lib" / "nets.py"
    elsewhere.parent.mkdir()
    shutil.move(tmp_path / "a" / "tiny_bnn.py", elsewhere)
    with pytest.raises(CheckpointError, match="not found"):
        load_patched(out)
    import importlib.util

    spec = importlib.util.spec_from_file_location("nets_moved", elsewhere)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with torch.no_grad():
        assert torch.equal(load_patched(out, model=f"{elsewhere}:build")(x16()), ref)
        assert torch.equal(load_patched(out, model=mod.build())(x16()), ref)
    r = invoke("fold", out, "--model", f"{elsewhere}:build", "--json")
    assert r.exit_code == 0, r.stderr
    # fold rewrote the recipe naming the user's model; --model trusts that run only (issue 21):
    # the new recipe is not recorded, the next load names the model (or vouches) again
    assert read_recipe(out).model["target"] == str(elsewhere.resolve())
    assert json.loads(r.stdout)["checkpoint"] is None
    with pytest.raises(UntrustedRecipeError, match="nets.py"):
        load_patched(out)
    with torch.no_grad():
        assert torch.allclose(load_patched(out, trust=True)(x16()), ref, atol=1e-5)


def test_zoo_recipe_needs_no_trust(tmp_path, own_trust_file):
    r = invoke("patch", "zoo:mlp", "--arg", "width=0.25", "--shift", "0.5", "-o", tmp_path / "p", "-q")
    assert r.exit_code == 0, r.stderr
    assert not own_trust_file.exists()  # nothing to trust: a zoo name is data
    assert load_patched(tmp_path / "p") is not None


def test_export_passes_the_users_model_to_the_subprocess(tmp_path, monkeypatch):
    """``export DIR --model SPEC --arg k=v --trust-recipe`` reaches load_patched in the export process."""
    import subprocess

    from bnnshift import export as export_mod

    seen = {}

    def fake_run(cmd, timeout):
        seen["cmd"] = cmd
        raise subprocess.TimeoutExpired(cmd, 1)

    monkeypatch.setattr(export_mod, "_run_child", fake_run)
    with pytest.raises(Exception):
        export_mod.export_patched_dir(tmp_path, tmp_path / "m.onnx", model="m.py:build", model_args=["classes=3"],
                                      trust=True)
    cmd = seen["cmd"]
    assert cmd[cmd.index("--model") + 1] == "m.py:build" and cmd[cmd.index("--arg") + 1] == "classes=3"
    assert "--trust-recipe" in cmd
