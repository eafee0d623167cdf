"""The generic child-process protocol (``_isolate``) and export's ordered strategies, without
running an exporter (each test well under a second)."""
from __future__ import annotations

import sys

import pytest

from bnnshift import _isolate
from bnnshift.errors import BnnshiftError, CheckpointError, UsageError, VerificationError


class SlowError(BnnshiftError):
    """The caller's own error class for a timeout."""


def test_a_timeout_is_the_callers_error_with_its_hint():
    with pytest.raises(SlowError, match="the sleeper did not finish in 1s") as exc:
        _isolate.run_child([sys.executable, "-c", "import time; time.sleep(30)"], 1, error=SlowError,
                           what="the sleeper", hint="wait less")
    assert exc.value.hint == "wait less"


def test_a_child_that_finishes_gives_its_exit_code_and_output():
    done = _isolate.run_child([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], 60,
                              error=SlowError, what="x")
    assert (done.returncode, done.stdout.strip()) == (3, "out")


@pytest.mark.parametrize("payload, cls", [
    ({"error": "bad", "kind": "CheckpointError", "exit_code": 1}, CheckpointError),  # by name
    ({"error": "bad", "kind": "SlowError", "exit_code": 1}, SlowError),  # a class the caller adds
    ({"error": "bad", "kind": "NoSuchError", "exit_code": 4}, VerificationError),  # by exit code
    ({"error": "bad", "exit_code": 1}, UsageError),  # the caller's default
])
def test_a_child_error_comes_back_as_the_class_it_was(payload, cls):
    exc = _isolate.child_error({**payload, "hint": "h"}, extra=(SlowError,), default=UsageError,
                               by_exit_code={4: VerificationError})
    assert type(exc) is cls and exc.message == "bad" and exc.hint == "h"


def test_error_payload_round_trips():
    exc = _isolate.child_error(_isolate.error_payload(CheckpointError("weights changed", hint="re-patch")))
    assert type(exc) is CheckpointError and (exc.message, exc.hint) == ("weights changed", "re-patch")


def test_export_strategies_are_ordered_and_named():
    from bnnshift import export

    assert [(t.optimize, t.ort_graph_optimizations) for t in export.TRIES] == \
        [(True, True), (True, False), (False, True), (False, False)]
    assert [c.name for c in export.CAPTURES] == ["dynamo, dynamic batch", "dynamo, static batch", "torchscript"]
    data_dependent = RuntimeError("GuardOnDataDependentSymNode: data-dependent")
    mismatch = export.ExportError("the dynamo exporter wrote opset 18, not 11")
    other = RuntimeError("unsupported op")
    static, script = export.CAPTURES[1], export.CAPTURES[2]
    assert static.after(other, None) and not static.after(data_dependent, None) and not static.after(mismatch, 11)
    assert script.after(data_dependent, None) and script.after(mismatch, 11) and not script.after(other, None)
    assert script.final and not static.final
