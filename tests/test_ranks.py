"""Under torchrun the end-of-candidate probes and --val run on rank 0 only and every rank gets
rank 0's values (no repeated work, identical results); the Optuna pruner feed. The 2-process
end-to-end run is tests/test_stream.py::test_torchrun_two_processes_gloo."""
from __future__ import annotations

import bnnshift.parallel as parallel
import bnnshift.search.candidate as search_mod


def _fake(monkeypatch, rank: int, world: int):
    calls, sent = [], []
    measured = ({"act": 0.25}, 0.75)
    monkeypatch.setattr(search_mod, "_measure_after", lambda ctx, model: calls.append(rank) or measured)
    monkeypatch.setattr(parallel, "dist_info", lambda: parallel.DistInfo(rank=rank, world=world))

    def broadcast(obj):
        sent.append(obj)
        return (*measured, None)  # what rank 0 sent

    monkeypatch.setattr(parallel, "broadcast_object", broadcast)
    return calls, sent


def test_follower_rank_skips_probes_and_val_and_takes_rank_0s_values(monkeypatch):
    calls, sent = _fake(monkeypatch, rank=1, world=2)
    assert search_mod._measure_on_main(None, None) == ({"act": 0.25}, 0.75, None)
    assert calls == [] and sent == [None]  # nothing measured here; joined the broadcast


def test_rank_0_measures_once_and_broadcasts(monkeypatch):
    calls, sent = _fake(monkeypatch, rank=0, world=2)
    assert search_mod._measure_on_main(None, None) == ({"act": 0.25}, 0.75, None)
    assert calls == [0] and sent == [({"act": 0.25}, 0.75, None)]


def test_one_process_measures_without_a_collective(monkeypatch):
    calls, sent = _fake(monkeypatch, rank=0, world=1)
    assert search_mod._measure_on_main(None, None) == ({"act": 0.25}, 0.75, None)
    assert calls == [0] and sent == []


def test_a_probe_error_on_rank_0_reaches_every_rank(monkeypatch):
    monkeypatch.setattr(parallel, "dist_info", lambda: parallel.DistInfo(rank=0, world=2))

    def boom(ctx, model):
        raise RuntimeError("probe failed")

    sent = []
    monkeypatch.setattr(search_mod, "_measure_after", boom)
    monkeypatch.setattr(parallel, "broadcast_object", lambda obj: sent.append(obj) or obj)
    plus, val, err = search_mod._measure_on_main(None, None)
    assert plus == {} and val is None and err == "RuntimeError: probe failed" and sent == [({}, None, err)]


def test_pruner_feed_reports_and_stops_when_pruned():
    from bnnshift.distributed import _pruner_feed

    class Trial:
        def __init__(self, prune_at):
            self.reports, self.prune_at = [], prune_at

        def report(self, value, step):
            self.reports.append((value, step))

        def should_prune(self):
            return self.reports[-1][1] >= self.prune_at

    t = Trial(prune_at=20)
    feed = _pruner_feed(t)
    assert feed(0, 10, 0.5) is False and feed(1, 20, 0.6) is True
    assert t.reports == [(0.5, 10), (0.6, 20)]
