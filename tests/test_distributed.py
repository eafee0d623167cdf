"""Distributed search (issue 6): workers of one Optuna study on a real PostgreSQL server and on
the journal file backend; a killed worker's trial is retried; the table equals the local search.

The PostgreSQL server is started by the test (tests/pg.py: temp dir, loopback, free port,
run as an unprivileged user when we are root, always stopped).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pg import postgres_server  # tests/ is on sys.path (rootdir conftest)

pytestmark = [pytest.mark.slow]

MODEL = "zoo:mlp"
DATA = "synthetic:2048"
STEPS = "40"
COMMON = [MODEL, "--data", DATA, "--steps", STEPS, "--no-compile"]
HEARTBEAT = "1,3"  # interval 1 s, grace 3 s: a killed worker's trial is retried within seconds


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"BNNSHIFT_HEARTBEAT": HEARTBEAT, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
                "PYTHONUNBUFFERED": "1", "COLUMNS": "160"})
    env.pop("BNNSHIFT_DEBUG", None)
    return env


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "bnnshift", *args]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*args), capture_output=True, text=True, timeout=timeout, env=_env())


def _start(log: Path, *args: str) -> subprocess.Popen:
    fh = open(log, "w")
    return subprocess.Popen(_cmd(*args), stdout=fh, stderr=subprocess.STDOUT, text=True, env=_env())


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)


def _load(storage: str, study: str):
    import optuna

    from bnnshift.distributed import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=study, storage=open_storage(storage, heartbeat="1,3"))


def _wait_for_running_trial(storage: str, study: str, proc: subprocess.Popen, log: Path, timeout: float = 90,
                            settle: float = 1.0) -> int:
    """Poll the study until ``proc`` (by pid) owns a RUNNING trial, let it train ``settle`` s,
    check it is still RUNNING; return that trial's number."""
    from optuna.trial import TrialState

    cache: list = []

    def running_of_proc():
        if not cache:
            cache.append(_load(storage, study))
        for t in cache[0].get_trials(deepcopy=False):
            w = t.user_attrs.get("bnnshift_worker") or {}
            if t.state == TrialState.RUNNING and w.get("pid") == proc.pid and w.get("trial") == t.number:
                return t.number
        return None

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"worker exited early:\n{log.read_text()}"
        try:
            number = running_of_proc()
        except Exception:  # noqa: BLE001 - the study may not exist yet
            number = None
        if number is not None:
            # a process's first trial trains for seconds: kill it MID-training, not just after ask()
            time.sleep(settle)
            assert running_of_proc() == number, log.read_text()
            assert f"trial {number}: t=" in log.read_text(), log.read_text()
            return number
        time.sleep(0.1)
    raise AssertionError(f"worker {proc.pid} never ran a trial:\n{log.read_text()}")


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    return lines[0]


def _local_scores(tmp: Path, shifts: str, seeds: str) -> dict[tuple[float, int], float | None]:
    """The local search (no storage) for the same config, in a subprocess with the same env."""
    r = _run("search", *COMMON, "--shifts", shifts, "--seeds", seeds, "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    return {(c["shift"], c["seed"]): c["score"] for c in json.loads(r.stdout)["candidates"]}


@pytest.fixture(scope="module")
def pg():
    with postgres_server() as server:
        yield server


# ------------------------------------------------------------------------------ PostgreSQL


def test_two_workers_kill_one_retry_and_match_local_search(pg, tmp_path):
    from optuna.trial import TrialState

    url = pg.createdb("killretry")
    study = "mlp-grid"
    shifts, seeds = "-0.5,0,0.5", "2"
    args = ("search", *COMMON, "--shifts", shifts, "--seeds", seeds, "--storage", url, "--study", study)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    t0 = time.time()
    a = _start(log_a, *args)
    b = _start(log_b, *args, "--out", str(tmp_path / "out_b"))
    try:
        killed = _wait_for_running_trial(url, study, a, log_a)
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=30)
        # meanwhile: the local search of the same config (same env, so the same threads)
        local = _local_scores(tmp_path, shifts, seeds)
        assert b.wait(timeout=240) == 0, log_b.read_text()
    finally:
        _stop(a, b)
    elapsed = time.time() - t0
    out_b = log_b.read_text()
    assert a.returncode == -signal.SIGKILL

    # the study: the killed trial failed (heartbeat went stale) and its grid point was retried and completed
    st = _load(url, study)
    trials = st.get_trials(deepcopy=False)
    by_num = {t.number: t for t in trials}
    assert by_num[killed].state == TrialState.FAIL, [(t.number, t.state) for t in trials]
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert retries, "the killed worker's trial was not retried"
    assert any(t.state == TrialState.COMPLETE and t.params == by_num[killed].params for t in retries)
    # every grid point completed exactly once
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    points = sorted((t.params["shift"], t.params["seed"]) for t in complete)
    assert points == sorted((s, k) for s in (-0.5, 0.0, 0.5) for k in (0, 1)), points

    # the report: same table as the local search, each candidate once, scores equal
    r = _run("report", "--storage", url, "--study", study, "--json", "--out", str(tmp_path / "report"))
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    got = {(c["shift"], c["seed"]): c["score"] for c in rep["candidates"]}
    assert len(rep["candidates"]) == 6 and len(got) == 6
    assert got == local, (got, local)
    assert rep["distributed"]["retried_trials"] >= 1 and rep["distributed"]["failed_trials"] >= 1
    assert rep["distributed"]["missing"] == []
    best = max(got.values())
    assert rep["winner"] in {s for (s, _), v in got.items()}
    assert all(0.0 <= v <= 1.0 for v in got.values()) and best > 0
    for name in ("search.json", "search.md", "search.png"):
        assert (tmp_path / "report" / name).is_file()
        assert (tmp_path / "out_b" / name).is_file(), out_b  # the last worker wrote the report too
    assert json.loads((tmp_path / "out_b" / "search.json").read_text())["candidates"] == rep["candidates"]
    h = _run("report", "--storage", url, "--study", study)
    assert h.returncode == 0 and "6/6 candidates done" in h.stderr and "score" in h.stdout, h.stdout + h.stderr

    # a worker started after the grid is done: exit 0, nothing left to run
    late = _run(*args)
    assert late.returncode == 0, late.stderr
    assert "nothing left to run" in late.stderr
    print(f"\ntwo workers + kill + retry: {elapsed:.1f}s")


def test_worker_with_another_config_is_refused(pg):
    url = pg.createdb("mismatch")
    base = ("search", MODEL, "--data", "synthetic:256", "--steps", "2", "--no-compile", "--shifts", "0",
            "--storage", url, "--study", "s")
    first = _run(*base)
    assert first.returncode == 0, first.stderr
    other = _run(*base, "--lr", "0.01")
    assert other.returncode == 1
    assert "another configuration" in _one_error_line(other.stderr)


def test_bad_storage_url_is_one_line_exit_1():
    from bnnshift.distributed import parse_storage
    from bnnshift.errors import EXIT_ERROR, StorageError

    for bad in ("postgresql://user@localhost:5432", "postgresql://user@host:99999/db", "journal:", "", "x.db",
                "sqlite://", "sqlite:///:memory:", "postgresql://us er@:x/db"):
        with pytest.raises(StorageError) as e:
            parse_storage(bad)
        assert e.value.exit_code == EXIT_ERROR and "\n" not in e.value.one_line(), bad
    assert parse_storage("postgres://u:pw@h/db").url.startswith("postgresql+psycopg://u:pw@h")
    assert "pw" not in parse_storage("postgres://u:pw@h/db").display
    assert parse_storage("journal:/tmp/x.log").kind == parse_storage("/tmp/x.log").kind == "journal"
    # through the CLI: exit 1, one line, before any model is built
    r = _run("search", MODEL, "--data", "synthetic:64", "--storage", "foo://x/y", "--study", "s", timeout=60)
    assert r.returncode == 1, r.stderr
    assert "unsupported scheme" in _one_error_line(r.stderr)
    r = _run("report", "--storage", "postgresql://user@localhost", "--study", "s")
    assert r.returncode == 1 and "no database name" in _one_error_line(r.stderr)


def test_unreachable_server_is_one_line_exit_1_quickly():
    from pg import _free_port

    url = f"postgresql://bnnshift@127.0.0.1:{_free_port()}/nodb"
    t0 = time.time()
    r = _run("search", MODEL, "--data", "synthetic:64", "--storage", url, "--study", "s", timeout=60)
    took = time.time() - t0
    assert r.returncode == 1, r.stderr
    line = _one_error_line(r.stderr)
    assert "cannot reach PostgreSQL at postgresql://bnnshift@127.0.0.1" in line, line
    t1 = time.time()
    r2 = _run("report", "--storage", url, "--study", "s", "--connect-timeout", "2")
    assert r2.returncode == 1 and "cannot reach PostgreSQL" in _one_error_line(r2.stderr)
    assert took < 30 and time.time() - t1 < 30, took


def test_report_unknown_study(pg):
    r = _run("report", "--storage", pg.url(), "--study", "nope")
    assert r.returncode == 1 and "no study 'nope'" in _one_error_line(r.stderr)


# ------------------------------------------------------------------------------ journal file, no server


def test_journal_backend_dead_worker_is_retried(tmp_path):
    """One machine, no server: a killed worker's trial is failed and re-queued by the next
    worker (its process is gone), and the grid completes with the local search's scores."""
    from optuna.trial import TrialState

    storage = f"journal:{tmp_path / 'study.log'}"
    study = "j"
    shifts = "0,0.5"
    args = ("search", *COMMON, "--shifts", shifts, "--storage", storage, "--study", study)
    log_a = tmp_path / "a.log"
    a = _start(log_a, *args)
    # the local search of the same config, meanwhile (2 cores: one for it, one for the worker)
    local = subprocess.Popen(_cmd("search", *COMMON, "--shifts", shifts, "--json"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_env())
    try:
        killed = _wait_for_running_trial(storage, study, a, log_a)
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=30)
        b = _run(*args, timeout=240)
        local_out, local_err = local.communicate(timeout=300)
    finally:
        _stop(a, local)
    assert local.returncode == 0, local_err
    assert b.returncode == 0, b.stderr
    st = _load(storage, study)
    trials = st.get_trials(deepcopy=False)
    by_num = {t.number: t for t in trials}
    assert by_num[killed].state == TrialState.FAIL
    assert any(t.system_attrs.get("failed_trial") == killed and t.state == TrialState.COMPLETE for t in trials)
    r = _run("report", "--storage", storage, "--study", study, "--json")
    assert r.returncode == 0, r.stderr
    got = {(c["shift"], c["seed"]): c["score"] for c in json.loads(r.stdout)["candidates"]}
    assert got == {(c["shift"], c["seed"]): c["score"] for c in json.loads(local_out)["candidates"]}
    late = _run(*args)
    assert late.returncode == 0 and "nothing left to run" in late.stderr, late.stderr


def test_without_optuna_local_search_imports_and_storage_is_one_line():
    """The local search needs none of the extra; --storage without optuna is one clear line."""
    code = ("import sys; sys.modules['optuna'] = None\n"
            "import bnnshift.cli, bnnshift.search, bnnshift.distributed\n"
            "from bnnshift.errors import StorageError\n"
            "try:\n    bnnshift.distributed.run_worker(None, 'journal:/tmp/x.log', 's')\n"
            "except StorageError as e:\n    print(e.exit_code, e.one_line())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("1 ") and "bnnshift[distributed]" in r.stdout, r.stdout


def test_bad_heartbeat_option_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from bnnshift.cli import app

    r = CliRunner().invoke(app, ["search", "zoo:mlp", "--arg", "width=0.25", "--data", "synthetic:64",
                                 "--shifts", "0", "--steps", "1", "--batch-size", "16", "--no-compile",
                                 "--storage", f"journal:{tmp_path / 'j.log'}", "--study", "hb", "--heartbeat", "soon"])
    assert r.exit_code == 1, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "heartbeat" in lines[0]


def test_sqlite_storage_runs_the_grid(tmp_path):
    """Optuna's usual local storage, sqlite:///PATH (issue 12): a worker runs the grid, report reads it."""
    from bnnshift.distributed import parse_storage

    assert parse_storage(f"sqlite:///{tmp_path}/s.db").kind == "sqlite"
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    r = _run("search", *COMMON, "--shifts", "0,0.5", "--storage", storage, "--study", "sq", timeout=240)
    assert r.returncode == 0, r.stderr
    r = _run("report", "--storage", storage, "--study", "sq", "--json")
    assert r.returncode == 0, r.stderr
    cands = json.loads(r.stdout)["candidates"]
    assert sorted(c["shift"] for c in cands) == [0.0, 0.5] and all(c["status"] == "ok" for c in cands)
    r = _run("report", "--storage", f"sqlite:///{tmp_path / 'nodir' / 'x.db'}", "--study", "sq")
    assert r.returncode == 1 and "does not exist" in _one_error_line(r.stderr)
