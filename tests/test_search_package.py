"""bnnshift.search as a package (issue 23, item 2): journal hashes pinned across the move (a
journal written before keeps resuming), the pure schedule functions without training, the
caller-owned context."""
from __future__ import annotations

import pytest

from bnnshift.search import SearchConfig, search_with

MLP = dict(model="zoo:mlp", data="fashion-mnist", model_args={"width": 0.25}, train_limit=1024, batch_size=128)
SYN = dict(model="zoo:mlp", data="synthetic", model_args={"width": 0.25}, train_limit=256, batch_size=64)

# config_hash values of bnnshift 0.x before search.py became a package (commit bdb7400): a journal
# keys its candidates by them, so a change here makes every earlier --resume start over
PINNED = [
    (dict(steps=6, **MLP), "4e8d3977567c8ed8"),
    (dict(steps=6, schedule="halving", eta=3.0, output_index=0, lr=0.01, **MLP), "de7294db4edc3485"),
    (dict(steps=4, **SYN), "feeec81f728d932b"),
]


def _open(cfg):
    from bnnshift.search import SearchContext

    return SearchContext.open(cfg)


@pytest.mark.parametrize("kw,expected", PINNED, ids=["mlp", "halving-output-index", "synthetic"])
def test_config_hash_is_pinned(kw, expected):
    assert _open(SearchConfig(**kw)).config_hash == expected


def _library_factory():
    from bnnshift_zoo.models_paper import mlp

    return mlp(width=0.25)


def _library_trainer(model, *, seed, shift):
    return 0.5 + 0.01 * seed - 0.001 * abs(shift)


def test_library_search_hash_is_pinned():
    s = search_with(_library_factory, _library_trainer, "0,0.5", (0,), input_shape=(1, 28, 28),
                    config={"lr": 0.001})
    assert s.config_hash == "68ad678613d0b3f8"
