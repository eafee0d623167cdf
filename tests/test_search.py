"""The search engine: grids, one candidate, compiled vs eager, the library entry point, journal."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from bnnshift.errors import UsageError
from bnnshift.journal import Journal
from bnnshift.search import SearchConfig, SearchContext, parse_seeds, parse_shifts, run_candidate, search_with

ROOT = Path(__file__).resolve().parents[1]
MLP = dict(model="zoo:mlp", data="fashion-mnist", model_args={"width": 0.25}, train_limit=1024, batch_size=128)


# ------------------------------------------------------------------------------ grids


def test_shift_grid_includes_stop_on_the_grid():
    g = parse_shifts("-1:2:0.25")
    assert len(g) == 13 and g[0] == -1.0 and g[-1] == 2.0
    g = parse_shifts("0:1:0.1")  # float steps: counted, not accumulated
    assert len(g) == 11 and g[-1] == 1.0 and g[3] == 0.3
    assert parse_shifts("0:1:0.3") == [0.0, 0.3, 0.6, 0.9]
    assert parse_shifts("0,0.5,1,0.5") == [0.0, 0.5, 1.0]
    assert parse_shifts("-0.0,1") == [0.0, 1.0]


@pytest.mark.parametrize("bad", ["", "1:0:0.5", "0:1:0", "0:1:-1", "a,b", "0:1", "0:1:x", "nan", ","])
def test_bad_shift_grids_are_usage_errors(bad):
    with pytest.raises(UsageError):
        parse_shifts(bad)


def test_seeds():
    assert parse_seeds(3) == [0, 1, 2]
    assert parse_seeds(1, "4,2,4") == [4, 2]
    with pytest.raises(UsageError):
        parse_seeds(0)
    with pytest.raises(UsageError):
        parse_seeds(1, "x")


# ------------------------------------------------------------------------------ candidates


def test_candidates_share_init_and_batches_and_repeat_exactly():
    cfg = SearchConfig(steps=6, compile="off", **MLP)
    ctx = SearchContext.open(cfg)  # one patched model for every candidate
    a = run_candidate(cfg, 0.0, 0, context=ctx)
    b = run_candidate(cfg, 1.0, 0, context=ctx)
    a2 = run_candidate(cfg, 0.0, 0, context=ctx)  # after another candidate trained the same model object
    assert a.ok and b.ok
    assert a.init_hash == b.init_hash == a2.init_hash
    assert a.batch_order_hash == b.batch_order_hash
    assert a.first_losses[0] != b.first_losses[0]  # t changes the forward
    assert a2.score == a.score and a2.first_losses == a.first_losses and a2.loss == a.loss
    assert 0.0 <= a.score <= 1.0 and a.steps == 6
    assert set(a.plus_fraction) == {"bn1:output", "bn2:output"}
    # a larger t means fewer +1 outputs (sign(x - t))
    assert b.plus_fraction_mean < a.plus_fraction_mean
    other_seed = run_candidate(cfg, 0.0, 1, context=ctx)
    assert other_seed.init_hash != a.init_hash and other_seed.batch_order_hash != a.batch_order_hash


def test_config_hash_covers_scores_not_grid():
    def config_hash(**kw):
        return SearchContext.open(SearchConfig(**kw)).config_hash

    h = config_hash(steps=6, **MLP)
    assert config_hash(steps=6, shifts=[0.0, 2.0], seeds=[0, 5], compile="off", **MLP) == h
    assert config_hash(steps=6, lr=0.01, **MLP) != h
    assert config_hash(steps=7, **MLP) != h
    assert config_hash(steps=6, **{**MLP, "train_limit": 512}) != h  # data fingerprint


def test_compiled_matches_eager_float64():
    kw = dict(MLP, steps=5, dtype="float64")
    eager = SearchConfig(compile="off", **kw)
    comp = SearchConfig(compile="auto", **kw)
    ctx_e, ctx_c = SearchContext.open(eager), SearchContext.open(comp)  # compiled once for both shifts
    for t in (0.0, 0.75):
        e = run_candidate(eager, t, 0, context=ctx_e)
        c = run_candidate(comp, t, 0, context=ctx_c)
        assert c.compiled is True, c.compile_error
        assert e.compiled is False
        assert len(e.first_losses) == 3
        for le, lc in zip(e.first_losses, c.first_losses):
            assert math.isclose(le, lc, rel_tol=1e-12, abs_tol=0), (le, lc)
        assert e.score == c.score and e.last_acc == c.last_acc
        assert math.isclose(e.loss, c.loss, rel_tol=1e-10)


def test_val_recalibrates_bn_and_records_val_accuracy():
    from bnnshift.train import recalibrate_bn

    cfg = SearchConfig(steps=6, compile="off", val=True, val_limit=256, metric="val_acc", **MLP)
    r = run_candidate(cfg, 0.5, 0)
    assert r.ok and r.val_acc is not None and r.score == r.val_acc
    bn = torch.nn.BatchNorm1d(3)
    bn.running_mean.fill_(100.0)
    xs = [torch.randn(16, 3) + 2, torch.randn(16, 3) - 1]
    recalibrate_bn(torch.nn.Sequential(bn), xs)
    assert torch.allclose(bn.running_mean, torch.cat(xs).mean(0), atol=1e-6)
    assert bn.momentum == 0.1


# ------------------------------------------------------------------------------ library entry point


def _toy_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 28, 28, generator=g)
    return x, (x.mean(dim=(1, 2, 3)) > 0).long()


def test_search_with_custom_train_one_epoch(tmp_path):
    from bnnshift._io import sha256_state_dict
    from bnnshift.shift import THRESHOLD_PREFIX, get_thresholds
    from bnnshift_zoo.models_paper import mlp

    x, y = _toy_data()
    seen = []

    def train_one_epoch(model, *, seed, shift):
        th = get_thresholds(model)
        assert th and all(float(t) == shift for t in th.values())
        seen.append((shift, seed, sha256_state_dict({k: v for k, v in model.state_dict().items()
                                                     if THRESHOLD_PREFIX not in k})))
        if shift == 1.0:
            return {"failed_step": 3, "error": "loss is nan at step 3"}
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        model.train()
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        loss.backward()
        opt.step()
        return {"train_acc": float((out.argmax(1) == y).float().mean()), "loss": loss.item(), "note": "mine"}

    s = search_with(lambda: mlp(width=0.25), train_one_epoch, "0:1:0.5", [0], input_shape=(1, 28, 28),
                    metric="train_acc", probe_batches=x[:64], out_dir=tmp_path / "o")
    assert [c.shift for c in s.candidates] == [0.0, 0.5, 1.0]
    assert [c.status for c in s.candidates] == ["ok", "ok", "failed"]
    assert s.candidates[2].failed_step == 3
    assert len({h for _, _, h in seen}) == 1  # same initial weights for every candidate
    assert s.winner in (0.0, 0.5) and s.candidates[0].extra == {"note": "mine"}
    assert s.candidates[0].plus_fraction_mean is not None
    data = json.loads((tmp_path / "o" / "search.json").read_text())
    assert data["winner"] == s.winner and len(data["candidates"]) == 3
    assert len(list(Journal(tmp_path / "o" / "journal.jsonl").records())) == 3
    # resume: nothing is retrained
    seen.clear()
    s2 = search_with(lambda: mlp(width=0.25), train_one_epoch, "0:1:0.5", [0], input_shape=(1, 28, 28),
                     metric="train_acc", probe_batches=x[:64], out_dir=tmp_path / "o", resume=True)
    assert seen == [] and s2.resumed == 3 and s2.winner == s.winner


def test_seed_noise_verdict():
    from bnnshift_zoo.models_paper import mlp

    table = {(0.0, 0): 0.80, (0.0, 1): 0.84, (0.0, 2): 0.82, (0.5, 0): 0.83, (0.5, 1): 0.82, (0.5, 2): 0.825,
             (1.0, 0): 0.90, (1.0, 1): 0.91, (1.0, 2): 0.905}

    def fake(model, *, seed, shift):
        return table[(shift, seed)]

    s = search_with(lambda: mlp(width=0.25), fake, [0.0, 0.5], [0, 1, 2], input_shape=(1, 28, 28))
    assert s.winner == 0.5 and s.ahead_of_baseline is False and "NOT ahead" in s.noise_note
    s = search_with(lambda: mlp(width=0.25), fake, [0.0, 1.0], [0, 1, 2], input_shape=(1, 28, 28))
    assert s.winner == 1.0 and s.ahead_of_baseline is True
    st = {x.shift: x for x in s.stats}
    assert math.isclose(st[0.0].mean, 0.82) and math.isclose(st[0.0].std, math.sqrt(0.0004), rel_tol=1e-9)
    s = search_with(lambda: mlp(width=0.25), fake, [0.0, 1.0], [0, 1], input_shape=(1, 28, 28))
    assert s.winner == 1.0 and s.ahead_of_baseline is None and "not resolved" in s.noise_note  # 2 seeds


def test_docs_example_runs(tmp_path):
    text = (ROOT / "docs" / "search.md").read_text()
    m = re.search(r"<!-- example: search_with -->\s*```python\n(.*?)```", text, re.S)
    assert m, "the search_with example is missing from docs/search.md"
    ns = {"OUT_DIR": str(tmp_path / "docs-run")}
    exec(compile(m.group(1), "docs/search.md", "exec"), ns)
    s = ns["summary"]
    assert len(s.candidates) == 6 and all(c.ok for c in s.candidates)
    assert (tmp_path / "docs-run" / "search.png").stat().st_size > 1000


# ------------------------------------------------------------------------------ journal


def test_journal_ignores_torn_and_foreign_lines(tmp_path):
    j = Journal(tmp_path / "journal.jsonl")
    j.append(0.5, 0, "abc", {"shift": 0.5, "seed": 0, "status": "ok", "score": 0.7})
    with open(j.path, "ab") as fh:
        fh.write(b'{"shift": 1.0, "seed": 0, "config_hash": "abc", "res')  # killed mid-write
    assert list(j.finished("abc")) == [("0.5", 0, "abc")]
    j.append(1.0, 0, "abc", {"shift": 1.0, "seed": 0, "status": "ok", "score": 0.6})
    j.append(1.0, 0, "other", {"shift": 1.0, "seed": 0, "status": "ok", "score": 0.1})
    done = j.finished("abc")
    assert set(done) == {("0.5", 0, "abc"), ("1.0", 0, "abc")} and done[("1.0", 0, "abc")]["score"] == 0.6


def test_compile_error_falls_back_to_eager_exactly(monkeypatch):
    import bnnshift.train as train_mod

    def fake_compile(fn, **kw):
        def broken(xb, yb):
            fn(xb, yb)  # runs the forward (BN running stats move), then "compile" fails
            raise RuntimeError("boom in the compiler")
        return broken

    kw = dict(MLP, steps=4, bn_recalib_batches=0)  # no re-estimation: the BN stats must be restored
    eager = run_candidate(SearchConfig(compile="off", **kw), 0.5, 0)
    monkeypatch.setattr(train_mod.torch, "compile", fake_compile)
    r = run_candidate(SearchConfig(compile="on", **kw), 0.5, 0)
    assert r.compiled is False and r.compile_error == "RuntimeError: boom in the compiler"
    assert r.first_losses == eager.first_losses and r.score == eager.score and r.loss == eager.loss
    assert r.plus_fraction == eager.plus_fraction


def test_hardtanh_grid_shifts_a_full_precision_model():
    from bnnshift.shift import get_thresholds

    def fp_model():
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.BatchNorm1d(32),
                                   torch.nn.Hardtanh(), torch.nn.Linear(32, 10))

    x, y = _toy_data()
    got = {}

    def train(model, *, seed, shift):
        got[shift] = {k: float(v) for k, v in get_thresholds(model).items()}
        model.eval()
        outs = []
        handle = model[3].register_forward_hook(lambda m, a, o: outs.append(o))
        with torch.no_grad():
            model(x[:8])  # a root forward: bnnshift addresses calls per root forward
        handle.remove()
        h = outs[0]
        got[(shift, "max")] = float(h.max())
        got[(shift, "mean")] = float(h.mean())
        return 0.5

    s = search_with(fp_model, train, [0.0, 1.0], [0], input_shape=(1, 28, 28), hardtanh=True)
    assert len(s.sites) == 1 and got[1.0] and all(v == 1.0 for v in got[1.0].values())
    assert got[(0.0, "max")] <= 1.0 and got[(1.0, "max")] <= 1.0
    assert got[(1.0, "mean")] < got[(0.0, "mean")] - 0.3  # hardtanh(x - 1): the window moved right


def test_with_several_epochs_the_score_is_still_the_first_epoch():
    """Claim 5 trains on after the first epoch; the ranked signal stays the first epoch's."""
    args = dict(MLP, train_limit=128, batch_size=32)
    r = run_candidate(SearchConfig(epochs=2, compile="off", **args), 0.0, 0)
    per_epoch = r.extra["epoch_train_acc"]
    assert len(per_epoch) == 2
    assert r.train_acc == per_epoch[0] != per_epoch[1]
    one = run_candidate(SearchConfig(epochs=1, compile="off", **args), 0.0, 0)
    assert one.train_acc == r.train_acc  # same init, same first-epoch batches
