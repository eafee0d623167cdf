"""Issue 20 item 9b: scan and patch hold at most one whole-model copy at a time, probe batches
are sized to the input, ``--verbose`` prints the peak RSS.

Copies are counted by their parameters: every ``copy.deepcopy`` of (nearly) the whole model is
tracked until its largest parameter is freed, wherever a reference to it survives (a graph
module, a recorded op, a hook cycle), so a copy kept alive by any holder counts. The models are
small, so ``copy_model`` is told to collect dropped copies as it does for large ones.
"""
from __future__ import annotations

import copy
import json
import weakref

import pytest
import torch
from typer.testing import CliRunner

from bnnshift import _guard
from bnnshift.cli import app
from bnnshift.detect import PROBE_ELEMENTS, example_input, probe_batch_size
from bnnshift.patch import patch_model
from bnnshift.scan import constant_site_warnings, scan_model
from test_param_writes import Net as WritingNet
from test_site_identity import TwoBlocks
from test_weight_binarizers import Net2d


class CopyCounter:
    """Counts whole-model copies alive at each new copy."""

    def __init__(self, model: torch.nn.Module):
        self.total = sum(p.numel() for p in model.parameters())
        self.live = self.peak = self.made = 0
        self._real = copy.deepcopy

    def deepcopy(self, x, memo=None, _nil=None):
        y = self._real(x) if memo is None else self._real(x, memo)
        if isinstance(x, torch.nn.Module) and sum(p.numel() for p in x.parameters()) >= 0.5 * self.total:
            self.live += 1
            self.made += 1
            self.peak = max(self.peak, self.live)
            weakref.finalize(max(y.parameters(), key=lambda p: p.numel()), self._drop)
        return y

    def _drop(self):
        self.live -= 1


@pytest.mark.parametrize("build,shape", [(Net2d, (3, 8, 8)), (TwoBlocks, (3, 8, 8)), (lambda: WritingNet("data ="), (12,))],
                         ids=["traced", "untraced-leaves", "writes-its-weights"])
def test_scan_and_patch_hold_one_model_copy_at_a_time(build, shape, monkeypatch):
    torch.manual_seed(0)
    model = build()
    counter = CopyCounter(model)
    monkeypatch.setattr(copy, "deepcopy", counter.deepcopy)
    monkeypatch.setattr(_guard, "COLLECT_ABOVE_BYTES", 0)
    report = scan_model(model, shape, batches=[torch.randn(16, *shape)])
    assert counter.made >= 2 and counter.peak == 1, (counter.made, counter.peak)
    counter.peak = counter.live
    patch_model(model, report, 0.25)
    constant_site_warnings(model, report.sites, {s.name: 0.25 for s in report.sites}, [example_input(shape, batch=8)])
    assert counter.peak <= 1


def test_probe_batches_are_sized_to_the_input():
    assert probe_batch_size((1, 28, 28), 64) == 64
    big = probe_batch_size((3, 300, 300), 64)  # an SSD300 input
    assert 2 <= big < 64 and big * 3 * 300 * 300 <= PROBE_ELEMENTS
    assert probe_batch_size((3, 2000, 2000), 64) == 2


def test_verbose_prints_the_peak_rss(tmp_path):
    r = CliRunner().invoke(app, ["patch", "zoo:mlp", "--shift", "0.5", "-o", str(tmp_path / "p"), "--json", "--verbose"])
    assert r.exit_code == 0, r.stderr
    json.loads(r.stdout)  # --json: stdout stays JSON
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("peak memory (RSS)")]
    assert len(line) == 1 and int(line[0].split()[3]) > 0, r.stderr
    r = CliRunner().invoke(app, ["scan", "zoo:mlp", "--json"])
    assert r.exit_code == 0 and "peak memory" not in r.stderr
