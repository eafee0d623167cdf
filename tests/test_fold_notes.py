"""What `fold` says: a directory folded before (where its thresholds went, nothing rewritten,
exit 0), and the BatchNorm-statistics note only when it is actionable (the weights changed
since the statistics were measured), with the command that re-estimates them."""
from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from bnnshift.cli import app
from bnnshift.patch import bn_statistics_current, load_patched, read_recipe, save_patched

MLP = ["zoo:mlp", "--arg", "width=0.25"]
NOTE = "BatchNorm running statistics"


def _run(args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_fold_of_a_folded_directory_says_where_the_thresholds_went(patched_mlp_source, tmp_path):
    d = _copy(patched_mlp_source, tmp_path / "d")
    res = _run(["fold", d])
    assert res.exit_code == 0, res.stderr
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    res = _run(["fold", d, "--json"])
    assert res.exit_code == 0, res.stderr  # nothing to do is not an error (like mkdir -p)
    err = " ".join(res.stderr.split())  # rich folds long lines off a terminal
    assert err.count("already folded") == 1, err
    assert "bn1:output -> bn:bn1" in err and "bn2:output -> bn:bn2" in err, err
    assert f"bnnshift fold {d} --data SPEC" in err
    assert "no bnnshift threshold" not in res.stderr and "error" not in res.stderr
    data = json.loads(res.stdout)
    assert data["already_folded"] == {s["name"]: s["folded_into"] for s in read_recipe(d).sites}
    assert set(data["already_folded"].values()) == {"bn:bn1", "bn:bn2"} and data["folded"] == {}
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # nothing rewritten


def test_bn_note_only_after_the_weights_changed(patched_mlp_source, tmp_path):
    # straight from patch: the statistics are the checkpoint's own, nothing to act on yet
    fresh = _copy(patched_mlp_source, tmp_path / "fresh")
    res = _run(["fold", fresh])
    assert res.exit_code == 0 and NOTE not in res.stderr, res.stderr
    # "fine-tuned": a weight changed, saved as a user's script does (save_patched + the recipe)
    model = load_patched(patched_mlp_source)
    with torch.no_grad():
        model.bfc2.weight.mul_(-1.0)
    tuned = tmp_path / "tuned"
    save_patched(model, read_recipe(patched_mlp_source), tuned)
    res = _run(["fold", tuned])
    assert res.exit_code == 0, res.stderr
    err = " ".join(res.stderr.split())
    assert err.count(NOTE) == 1 and f"bnnshift fold {tuned} --data SPEC" in err, err
    assert not bn_statistics_current(load_patched(tuned), read_recipe(tuned))
    # fold --data re-estimates them: the directory now records that they fit its weights
    again = _copy(patched_mlp_source, tmp_path / "again")
    m2 = load_patched(again)
    with torch.no_grad():
        m2.bfc2.weight.mul_(-1.0)
    save_patched(m2, read_recipe(again), again, force=True)
    res = _run(["fold", again, "--data", "synthetic:512", "--bn-recalib-batches", "1"])
    assert res.exit_code == 0, res.stderr
    assert bn_statistics_current(load_patched(again), read_recipe(again))
