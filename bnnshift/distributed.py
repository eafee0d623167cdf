"""The search across processes and machines: one shared Optuna study, one worker per process.

Each worker of ``bnnshift search ... --storage URL --study NAME`` joins the study (created by
the first one), and runs trials until every grid point ``(shift, seed)`` has a completed
trial. A trial is exactly the local search's single-candidate training
(:func:`bnnshift.search.run_candidate`); its :class:`~bnnshift.search.CandidateResult` is
stored whole in the trial's user attributes, so ``bnnshift report`` rebuilds the same
table / ``search.json`` / ``search.md`` / ``search.png`` as a local search.

Storage (``--storage``):

* ``postgresql://USER[:PASSWORD]@HOST[:PORT]/DB`` (driver: psycopg 3): optuna's
  ``RDBStorage`` with heartbeats; a trial whose worker stops beating for ``grace`` seconds
  is failed by the next worker that looks and re-queued (``RetryHeartbeatStaleTrialCallback``,
  the same grid point as a new WAITING trial).
* ``journal:PATH`` or ``PATH.log``: optuna's ``JournalStorage(JournalFileBackend(PATH))``,
  for one machine without a server. Optuna has no heartbeats for it; instead every trial
  records its worker (host, pid, process start time) and a worker on the same host fails
  and re-queues a RUNNING trial whose process is gone.

Grid bookkeeping: ``GridSampler`` over ``{"shift": [...], "seed": [...]}`` with a fixed
sampler seed (every worker shuffles the grid the same way). A point is *done* when it has a
COMPLETE trial; retries and rare duplicate suggestions are deduplicated by ``(shift, seed)``
keeping the first COMPLETE trial. A worker that finds nothing to start waits while other
workers' trials are RUNNING (they finish, or go stale and come back as WAITING retries), and
exits once every point is done. A worker started after that exits 0: "nothing left to run".

Heartbeat (PostgreSQL): ``heartbeat=INTERVAL[,GRACE]`` seconds (keyword of
:func:`run_worker`, or the ``BNNSHIFT_HEARTBEAT`` environment variable); default
``30,120``. Errors: a bad or unreachable storage is a :class:`~bnnshift.errors.StorageError`
(one line, exit 1) after at most ``connect_timeout`` seconds (default 10,
``BNNSHIFT_CONNECT_TIMEOUT``).
"""
from __future__ import annotations

import contextlib
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import StorageError
from .journal import shift_key
from .vocab import Schedule

if TYPE_CHECKING:  # pragma: no cover
    from .search.config import SearchConfig
    from .search.context import SearchContext
    from .search.results import CandidateResult, SearchSummary

__all__ = ["StorageSpec", "parse_storage", "open_storage", "run_worker", "study_results", "study_summary",
           "parse_heartbeat", "GRID_SAMPLER_SEED", "DEFAULT_HEARTBEAT", "DEFAULT_GRACE"]

GRID_SAMPLER_SEED = 0
DEFAULT_HEARTBEAT = 30
DEFAULT_GRACE = 120
DEFAULT_MAX_RETRY = 3
DEFAULT_CONNECT_TIMEOUT = 10
JOURNAL_POLL = 2.0

# study user attributes (written once, by the first worker)
ATTR_HASH = "bnnshift_config_hash"
ATTR_CONFIG = "bnnshift_config"
ATTR_GRID = "bnnshift_grid"
ATTR_SITES = "bnnshift_sites"
ATTR_METRIC = "bnnshift_metric"
# trial user attributes
ATTR_RESULT = "bnnshift_result"
ATTR_WORKER = "bnnshift_worker"
ATTR_DUPLICATE = "bnnshift_duplicate_of"

INSTALL_HINT = "pip install 'bnnshift[distributed]'"
STORAGE_FORMS = ("postgresql://USER[:PASSWORD]@HOST[:PORT]/DB, sqlite:///PATH.db or journal:PATH "
                 "(the last two: one machine or a shared file system)")


# ------------------------------------------------------------------------------ optuna import


def _optuna():
    """optuna, imported lazily and quietly (its INFO log per trial and experimental warnings off)."""
    try:
        import optuna
    except ModuleNotFoundError as exc:
        raise StorageError(f"--storage needs optuna, which is not installed ({exc.name})", hint=INSTALL_HINT) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"optuna(\.|$)")
    return optuna


# ------------------------------------------------------------------------------ storage


@dataclass(frozen=True)
class StorageSpec:
    """A parsed ``--storage``: ``kind`` 'postgresql' or 'journal'; ``url`` what optuna gets;
    ``display`` the same without a password (for messages)."""

    kind: str
    url: str
    display: str
    host: str | None = None
    port: int | None = None


def parse_storage(text: str) -> StorageSpec:
    """``postgresql://...`` (also ``postgres://``, ``postgresql+psycopg://``), ``journal:PATH``
    or a path ending in ``.log``. Raises ``StorageError`` (exit 1) for anything else."""
    s = (text or "").strip()
    if not s:
        raise StorageError("empty --storage", hint=f"use {STORAGE_FORMS}")
    if s.startswith("journal:"):
        path = s[len("journal:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise StorageError("bad --storage 'journal:': no file", hint="e.g. journal:/shared/bnnshift.log")
        p = str(Path(path).expanduser())
        return StorageSpec("journal", p, f"journal:{p}")
    if "://" not in s and s.endswith(".log"):
        p = str(Path(s).expanduser())
        return StorageSpec("journal", p, f"journal:{p}")
    scheme = s.split("://", 1)[0].lower() if "://" in s else ""
    if scheme == "sqlite":  # optuna's usual local storage: RDBStorage with heartbeats, like PostgreSQL
        path = s[len("sqlite:///"):] if s.lower().startswith("sqlite:///") else ""
        if not path or path == ":memory:":
            raise StorageError(f"bad --storage {s!r}: need a database file",
                               hint="e.g. sqlite:///runs/study.db (relative) or sqlite:////abs/path/study.db")
        p = str(Path(path).expanduser())
        return StorageSpec("sqlite", f"sqlite:///{p}", f"sqlite:///{p}")
    if scheme in ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg2", "postgresql+psycopg3"):
        try:
            from sqlalchemy.engine import make_url

            url = make_url(s)
        except Exception as exc:  # noqa: BLE001 - sqlalchemy's ArgumentError / ValueError
            raise StorageError(f"bad --storage URL {_mask(s)!r}: {_first_line(exc)}",
                               hint=f"use {STORAGE_FORMS}") from None
        if scheme in ("postgresql", "postgres", "postgresql+psycopg3"):
            url = url.set(drivername="postgresql+psycopg")
        if not url.database:
            raise StorageError(f"bad --storage URL {url.render_as_string(hide_password=True)!r}: no database name",
                               hint="e.g. postgresql://user@dbhost:5432/bnnshift")
        if url.port is not None and not 0 < url.port < 65536:
            raise StorageError(f"bad --storage URL: port {url.port}")
        return StorageSpec("postgresql", url.render_as_string(hide_password=False),
                           url.set(drivername="postgresql").render_as_string(hide_password=True),
                           host=url.host or "localhost", port=url.port or 5432)
    raise StorageError(f"bad --storage {_mask(s)!r}: unsupported scheme {scheme + '://' if scheme else '(none)'}",
                       hint=f"use {STORAGE_FORMS}")


def _mask(s: str) -> str:
    """Hide a password in a URL-ish string for an error message."""
    if "://" in s and "@" in s:
        head, rest = s.split("://", 1)
        cred, _, tail = rest.rpartition("@")
        if ":" in cred:
            cred = cred.split(":", 1)[0] + ":***"
        return f"{head}://{cred}@{tail}"
    return s


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("(Background on this error"):
            return line[:300]
    return type(orig).__name__


def parse_heartbeat(value: Any = None) -> tuple[int, int]:
    """``INTERVAL[,GRACE]`` seconds (str, int or tuple); None -> ``BNNSHIFT_HEARTBEAT`` or the
    defaults (30, 120). GRACE defaults to max(2*INTERVAL+1, ...) and must exceed INTERVAL."""
    if value is None:
        value = os.environ.get("BNNSHIFT_HEARTBEAT") or None
    if value is None:
        return DEFAULT_HEARTBEAT, DEFAULT_GRACE
    try:
        if isinstance(value, str):
            parts = [int(p) for p in value.replace(" ", "").split(",") if p]
        elif isinstance(value, (tuple, list)):
            parts = [int(p) for p in value]
        else:
            parts = [int(value)]
        if not 1 <= len(parts) <= 2:
            raise ValueError
    except (TypeError, ValueError):
        raise StorageError(f"bad heartbeat {value!r}", hint="INTERVAL[,GRACE] in seconds, e.g. 30,120") from None
    interval = parts[0]
    grace = parts[1] if len(parts) == 2 else max(2 * interval + 1, 3)
    if interval < 1 or grace <= interval:
        raise StorageError(f"bad heartbeat {value!r}: need INTERVAL >= 1 and GRACE > INTERVAL",
                           hint="e.g. 30,120")
    return interval, grace


def _connect_timeout(value: int | None) -> int:
    if value is None:
        env = os.environ.get("BNNSHIFT_CONNECT_TIMEOUT")
        value = int(env) if env and env.isdigit() else DEFAULT_CONNECT_TIMEOUT
    return max(2, int(value))  # libpq treats 1 as 2


def open_storage(spec: StorageSpec | str, *, heartbeat: Any = None, max_retry: int | None = DEFAULT_MAX_RETRY,
                 connect_timeout: int | None = None):
    """The optuna storage for ``spec``: RDBStorage (heartbeat + retry of stale trials) or
    JournalStorage. Connection problems -> ``StorageError`` within ``connect_timeout`` s."""
    optuna = _optuna()
    if isinstance(spec, str):
        spec = parse_storage(spec)
    if spec.kind == "journal":
        try:
            from optuna.storages.journal import JournalFileBackend, JournalStorage
        except ImportError:  # optuna < 4.0
            from optuna.storages import JournalFileStorage as JournalFileBackend, JournalStorage

        path = Path(spec.url)
        if path.exists() and not path.is_file():
            raise StorageError(f"journal storage {path} is not a file")
        if not path.parent.is_dir():
            raise StorageError(f"journal storage {path}: directory {path.parent} does not exist",
                               hint="create it, or use another path")
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            raise StorageError(f"cannot open journal storage {path}: {exc.strerror or exc}") from None
    interval, grace = parse_heartbeat(heartbeat)
    timeout = _connect_timeout(connect_timeout)
    if spec.kind == "sqlite":
        path = Path(spec.url[len("sqlite:///"):])
        if not path.parent.is_dir():
            raise StorageError(f"sqlite storage {path}: directory {path.parent} does not exist",
                               hint="create it, or use another path")
        from sqlalchemy.exc import SQLAlchemyError

        try:
            with _init_lock(path):  # N workers started together: the schema is created once
                return _create_once(lambda: optuna.storages.RDBStorage(
                    spec.url, engine_kwargs={"connect_args": {"timeout": max(timeout, 30)}},
                    heartbeat_interval=interval, grace_period=grace,
                    **{_stale_kw(optuna): _retry_class(optuna)(max_retry=max_retry)}))
        except (SQLAlchemyError, OSError) as exc:
            raise StorageError(f"cannot open {spec.display}: {_first_line(exc)}") from None
    try:
        import psycopg  # noqa: F401 - the driver the URL names
    except ModuleNotFoundError:
        if "+psycopg2" not in spec.url:
            raise StorageError("--storage postgresql:// needs psycopg (3), which is not installed",
                               hint=INSTALL_HINT) from None
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return _create_once(lambda: optuna.storages.RDBStorage(  # a schema race between workers: retried
            spec.url,
            engine_kwargs={"connect_args": {"connect_timeout": timeout}, "pool_pre_ping": True},
            heartbeat_interval=interval,
            grace_period=grace,
            **{_stale_kw(optuna): _retry_class(optuna)(max_retry=max_retry)},
        ))
    except (SQLAlchemyError, OSError) as exc:
        raise StorageError(f"cannot reach PostgreSQL at {spec.display}: {_first_line(exc)}",
                           hint="check host, port, database and credentials; is the server running?") from None
    except ImportError as exc:
        raise StorageError(f"cannot use {spec.display}: {_first_line(exc)}", hint=INSTALL_HINT) from None


_SCHEMA_RACE = ("unique constraint", "already exists", "duplicate key", "alembic_version", "database is locked")


@contextlib.contextmanager
def _init_lock(db: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<db>.bnnshift-init.lock`` beside a sqlite database while its
    schema is created (optuna's ``create_all`` + alembic stamp are not safe to run twice at once:
    ``UNIQUE constraint failed: alembic_version``). Not POSIX or not writable: no lock (the
    retry of :func:`_create_once` still applies)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        fd = os.open(str(db) + ".bnnshift-init.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _create_once(make, attempts: int = 6, delay: float = 0.2):
    """``make()`` (an ``RDBStorage``), retried when another worker created the same schema at the
    same moment (unique-constraint / already-exists errors); other errors propagate at once."""
    import random
    import time

    from sqlalchemy.exc import SQLAlchemyError

    for i in range(attempts):
        try:
            return make()
        except SQLAlchemyError as exc:
            if i == attempts - 1 or not any(k in str(exc).lower() for k in _SCHEMA_RACE):
                raise
            time.sleep(delay * (1 + i) * (1 + random.random()))
    raise AssertionError("unreachable")  # pragma: no cover


def _retry_class(optuna):
    """RetryHeartbeatStaleTrialCallback (optuna >= 4.9), RetryFailedTrialCallback before."""
    return getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback


def _stale_kw(optuna) -> str:
    import inspect

    params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    return "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"


@contextlib.contextmanager
def _storage_errors(spec: StorageSpec) -> Iterator[None]:
    """A connection lost mid-run is one line too."""
    from sqlalchemy.exc import OperationalError, InterfaceError

    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        raise StorageError(f"lost the connection to {spec.display}: {_first_line(exc)}",
                           hint="restart the worker: the study resumes where it stopped") from None


# ------------------------------------------------------------------------------ study + grid


def _load_study(optuna, storage, name: str, sampler=None):
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        raise StorageError(f"no study {name!r} in this storage",
                           hint="check --study, or start a worker with `bnnshift search ... --storage ... --study`") \
            from None


def _grid_of(cfg: "SearchConfig") -> dict[str, list]:
    return {"shift": [float(s) for s in cfg.shifts], "seed": [int(s) for s in cfg.seeds]}


def _check_or_claim(study, cfg: "SearchConfig", config_hash: str, sites: list[str]) -> None:
    """First worker: record the config; later ones: refuse a different config or grid."""
    grid = _grid_of(cfg)
    attrs = study.user_attrs
    if ATTR_HASH not in attrs:
        study.set_user_attr(ATTR_CONFIG, cfg.to_json())
        study.set_user_attr(ATTR_GRID, grid)
        study.set_user_attr(ATTR_SITES, list(sites))
        study.set_user_attr(ATTR_METRIC, cfg.metric)
        study.set_user_attr(ATTR_HASH, config_hash)
        attrs = study.user_attrs  # re-read: a concurrent first worker may have written too
    stored = attrs.get(ATTR_HASH)
    if stored != config_hash:
        raise StorageError(f"study {study.study_name!r} was created for another configuration "
                           f"(config hash {stored}, this worker {config_hash})",
                           hint="start every worker with the same command, or use a new --study name")
    sg = attrs.get(ATTR_GRID) or {}
    if [shift_key(v) for v in sg.get("shift", [])] != [shift_key(v) for v in grid["shift"]] or \
            [int(v) for v in sg.get("seed", [])] != grid["seed"]:
        raise StorageError(f"study {study.study_name!r} has another grid (shifts {sg.get('shift')}, seeds "
                           f"{sg.get('seed')}; this worker: shifts {grid['shift']}, seeds {grid['seed']})",
                           hint="use the same --shifts/--seeds on every worker, or a new --study name")


def _point(trial) -> tuple[str, int] | None:
    p = trial.params
    if "shift" not in p or "seed" not in p:
        fixed = trial.system_attrs.get("fixed_params") or {}
        p = {**fixed, **p}
    if "shift" not in p or "seed" not in p:
        return None
    return shift_key(p["shift"]), int(p["seed"])


@dataclass
class GridState:
    """Where every grid point stands. ``done``: point -> the kept COMPLETE trial."""

    points: list[tuple[str, int]]
    done: dict[tuple[str, int], Any] = field(default_factory=dict)
    running: dict[tuple[str, int], list] = field(default_factory=dict)
    waiting: dict[tuple[str, int], list] = field(default_factory=dict)
    failed: dict[tuple[str, int], list] = field(default_factory=dict)
    duplicates: int = 0
    trials: list = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return all(p in self.done for p in self.points)

    @property
    def fresh(self) -> list[tuple[str, int]]:
        """Points with no trial at all (the sampler hands these out)."""
        return [p for p in self.points if p not in self.done and p not in self.running and p not in self.waiting
                and p not in self.failed]

    @property
    def failed_only(self) -> list[tuple[str, int]]:
        return [p for p in self.points if p in self.failed and p not in self.done and p not in self.running
                and p not in self.waiting]

    @property
    def startable(self) -> bool:
        return bool(self.fresh) or any(p not in self.done for p in self.waiting)


def grid_state(trials, grid: dict[str, list]) -> GridState:
    """Classify the study's trials by grid point (COMPLETE ones need a stored result)."""
    from optuna.trial import TrialState

    points = [(shift_key(s), int(seed)) for seed in grid["seed"] for s in grid["shift"]]
    st = GridState(points=points, trials=list(trials))
    wanted = set(points)
    for t in sorted(trials, key=lambda t: t.number):
        p = _point(t)
        if p is None or p not in wanted:
            continue
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and ATTR_RESULT in t.user_attrs:
            # PRUNED with a result: stopped at a successive-halving rung (duplicates have none)
            if p in st.done:
                st.duplicates += 1
            else:
                st.done[p] = t
        elif t.state == TrialState.RUNNING:
            st.running.setdefault(p, []).append(t)
        elif t.state == TrialState.WAITING:
            st.waiting.setdefault(p, []).append(t)
        elif t.state == TrialState.FAIL:
            st.failed.setdefault(p, []).append(t)
    return st


# ------------------------------------------------------------------------------ worker identity (journal liveness)


def _proc_start(pid: int) -> str | None:
    """Process start time in clock ticks since boot (Linux), None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode(errors="replace")
        return data.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().decode(errors="replace").rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _me(trial_number: int) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _proc_start(os.getpid()),
            "trial": int(trial_number), "time": time.time()}


def _alive(worker: dict[str, Any]) -> bool | None:
    """True/False for a worker on this host, None when it cannot be told (another host)."""
    if worker.get("host") != socket.gethostname():
        return None
    pid = int(worker.get("pid", -1))
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if _proc_state(pid) == "Z":
        return False
    start = worker.get("start")
    now = _proc_start(pid)
    if start is not None and now is not None and start != now:
        return False  # pid reused
    return True


def _requeue(optuna, study, trial) -> None:
    """The same grid point as a new WAITING trial (what the heartbeat retry callback does)."""
    _retry_class(optuna)(max_retry=None)(study, trial)


def _fail_dead_local(optuna, study, state: GridState, max_retry: int | None) -> int:
    """Journal storage: fail and re-queue RUNNING trials whose worker process on this host is gone."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    n = 0
    for trials in state.running.values():
        for t in trials:
            w = t.user_attrs.get(ATTR_WORKER) or {}
            if w.get("trial") != t.number or _alive(w) is not False:
                continue
            try:
                ok = study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except UpdateFinishedTrialError:
                ok = False
            if not ok:
                continue
            n += 1
            frozen = study._storage.get_trial(t._trial_id)
            history = frozen.system_attrs.get("retry_history", [])
            if max_retry is None or len(history) < max_retry:
                _requeue(optuna, study, frozen)
    return n


# ------------------------------------------------------------------------------ the worker


def _score_value(r: "CandidateResult") -> float:
    """The trial's objective: the score, -inf for a failed (diverged) candidate, so the trial is
    COMPLETE (the grid point is done; its failure is in the stored result)."""
    if r.ok and r.score is not None and math.isfinite(r.score):
        return float(r.score)
    return float("-inf")


def _info(output, msg: str) -> None:
    if output is not None and hasattr(output, "info"):
        output.info(msg)


def run_worker(config: "SearchConfig", storage: str, study: str, out_dir: Path | None = None, output: Any = None,
               *, heartbeat: Any = None, max_retry: int | None = DEFAULT_MAX_RETRY,
               connect_timeout: int | None = None) -> list["CandidateResult"]:
    """Be one worker of the shared study ``study`` in ``storage``: run grid points until every
    ``(shift, seed)`` of ``config`` has a completed trial, then return the candidates THIS
    worker trained (``[]`` and "nothing left to run" when the grid was already done).

    When the grid is complete the full table is printed and, with ``out_dir``, the local
    search's report files are written there (``search.json``/``.md``/``.png``).
    Raises ``StorageError`` (exit 1) for a bad/unreachable storage or a study created with a
    different configuration or grid.
    """
    optuna = _optuna()
    from .search import SearchContext

    spec = parse_storage(storage)
    if not study or not str(study).strip():
        raise StorageError("empty --study name")
    store = open_storage(spec, heartbeat=heartbeat, max_retry=max_retry, connect_timeout=connect_timeout)
    interval = parse_heartbeat(heartbeat)[0] if spec.kind in ("postgresql", "sqlite") else None
    grid = _grid_of(config)
    sampler = optuna.samplers.GridSampler(grid, seed=GRID_SAMPLER_SEED)
    ctx = SearchContext.open(config)  # data, scan and patched model: once for every trial of this worker
    pruner = _halving_pruner(optuna, config, ctx)
    with _storage_errors(spec):
        st = optuna.create_study(study_name=study, storage=store, sampler=sampler, direction="maximize",
                                 load_if_exists=True, pruner=pruner)
        config_hash = ctx.config_hash
        state = grid_state(st.get_trials(deepcopy=False), grid)
        if st.user_attrs.get(ATTR_HASH) is not None and state.complete:
            _check_or_claim(st, config, config_hash, [])
            _info(output, f"nothing left to run: all {len(state.points)} candidates of study {study!r} are done "
                          f"(bnnshift report --storage ... --study {study})")
            _finish(st, state, config_hash=config_hash, output=output, out_dir=out_dir)
            return []
        sites = ctx.site_names
        _check_or_claim(st, config, config_hash, sites)
        _info(output, f"worker {socket.gethostname()}:{os.getpid()} joined study {study!r} on {spec.display} "
                      f"({len(state.points)} candidates, {len(state.done)} done)")

        # resume: points whose trials all failed (error, Ctrl-C, retries used up) are queued once more
        for p in state.failed_only:
            _requeue(optuna, st, state.failed[p][-1])

        mine: list[CandidateResult] = []
        objective = _objective(optuna, st, config, ctx, pruner, grid, mine, output)
        state = _run_grid(optuna, st, spec, study, grid, objective, interval=interval, max_retry=max_retry,
                          output=output)
        if not mine:
            _info(output, f"nothing left to run: all {len(state.points)} candidates of study {study!r} are done")
        _finish(st, state, config_hash=config_hash, output=output, out_dir=out_dir)
    return mine


def _objective(optuna: Any, st: Any, config: "SearchConfig", ctx: Any, pruner: Any, grid: dict[str, list],
               mine: list["CandidateResult"], output: Any) -> "Callable[[Any], float]":
    """``run_worker``'s Optuna objective: one grid point trained by ``run_candidate`` on the worker's
    context, appended to ``mine`` (a point another trial holds, or a halving stop, is pruned)."""
    from .search import run_candidate

    config_hash = ctx.config_hash

    def objective(trial) -> float:
        shift = trial.suggest_categorical("shift", grid["shift"])
        seed = trial.suggest_categorical("seed", grid["seed"])
        trial.set_user_attr(ATTR_WORKER, _me(trial.number))
        p = (shift_key(shift), int(seed))
        for other in st.get_trials(deepcopy=False):
            if other.number == trial.number or _point(other) != p:
                continue
            if (other.state.name == "COMPLETE" and ATTR_RESULT in other.user_attrs) or \
                    (other.state.name == "RUNNING" and other.number < trial.number):
                trial.set_user_attr(ATTR_DUPLICATE, other.number)
                raise optuna.TrialPruned(f"t={shift:g} seed={seed} is trial {other.number}'s")
        _info(output, f"trial {trial.number}: t={shift:+g} seed={seed} ...")
        r = run_candidate(config, float(shift), int(seed), context=ctx,
                          at_rung=_pruner_feed(trial) if pruner is not None else None)
        trial.set_user_attr(ATTR_RESULT, r.to_json())
        trial.set_user_attr(ATTR_HASH, config_hash)
        mine.append(r)
        stopped = pruner is not None and r.ok and r.rung is not None and r.steps is not None and \
            r.steps < ctx.total_steps
        _info(output, f"trial {trial.number}: t={shift:+g} seed={seed}: "
                      + (f"{r.score * 100:.2f}% ({r.seconds or 0:.1f}s)" if r.ok else f"failed: {r.error}")
                      + (f", stopped at rung {r.rung} ({r.steps} steps)" if stopped else ""))
        if stopped:
            raise optuna.TrialPruned(f"successive halving: stopped at rung {r.rung}")
        return _score_value(r)

    return objective


def _run_grid(optuna: Any, st: Any, spec: Any, study: str, grid: dict[str, list], objective: Any, *,
              interval: Any, max_retry: int | None, output: Any) -> Any:
    """Run trials one at a time until the grid is complete (or only other machines' journal
    trials are left); wait while other workers hold the rest. Returns the last ``GridState``.
    Raises ``StorageError`` when the points left failed and are not retried."""
    waited_note = False
    while True:
        state = grid_state(st.get_trials(deepcopy=False), grid)
        if spec.kind == "journal" and state.running:
            if _fail_dead_local(optuna, st, state, max_retry):
                continue
        else:
            optuna.storages.fail_stale_trials(st)
            state = grid_state(st.get_trials(deepcopy=False), grid)
        if state.complete:
            return state
        if not state.startable:
            if not state.running:
                left = [p for p in state.points if p not in state.done]
                raise StorageError(f"{len(left)} candidates of study {study!r} failed and are not retried "
                                   f"(first: t={left[0][0]} seed={left[0][1]})",
                                   hint="start a worker again to retry them; bnnshift report shows the rest")
            foreign = [t for ts in state.running.values() for t in ts
                       if _alive(t.user_attrs.get(ATTR_WORKER) or {}) is None]
            if spec.kind == "journal" and foreign:
                _info(output, f"{len(foreign)} candidates are running on other machines; journal storage cannot "
                              "tell whether they are alive, so this worker stops here")
                return state
            if not waited_note:
                _info(output, f"waiting for {sum(len(v) for v in state.running.values())} candidates running "
                              "on other workers (a dead worker's candidate is retried here)")
                waited_note = True
            time.sleep(min(float(interval), 5.0) if interval else JOURNAL_POLL)
            continue
        waited_note = False
        st.optimize(objective, n_trials=1, catch=(), gc_after_trial=False)


def _pruner_feed(trial) -> "Callable[[int, int, float], bool]":
    """``run_candidate``'s ``at_rung`` for an Optuna trial: report the score so far at the rung's
    step; True (stop here) when the pruner (``SuccessiveHalvingPruner``) prunes the trial."""
    def at_rung(rung: int, steps: int, score: float) -> bool:
        trial.report(float(score), int(steps))
        return trial.should_prune()

    return at_rung


def _halving_pruner(optuna, config: "SearchConfig", ctx: "SearchContext"):
    """``--schedule halving`` on a study: Optuna's ``SuccessiveHalvingPruner`` (asynchronous
    successive halving, Li et al. 2020) with the local schedule's first rung and eta; every
    worker passes the same pruner. None for ``--schedule full``."""
    if getattr(config, "schedule", Schedule.FULL) != Schedule.HALVING:
        return None
    from .errors import UsageError
    from .search import rung_steps

    if float(config.eta) != int(config.eta):
        raise UsageError(f"--eta {config.eta:g}: the distributed search needs a whole number", hint="e.g. --eta 2")
    first = rung_steps(ctx.total_steps, config.eta, config.min_fraction)[0]
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=int(first), reduction_factor=int(config.eta),
                                                  min_early_stopping_rate=0)


def _finish(st, state: GridState, *, config_hash: str, output: Any, out_dir: Path | None) -> None:
    """Print the study's table (and write the report files) once the grid is complete."""
    if not state.complete:
        return
    summary = _summary_from(st, state)
    if out_dir is not None:
        from .report import write_report

        summary.out_dir = str(out_dir)
        summary.files = write_report(summary, out_dir)
    if output is not None and not getattr(output, "json_mode", False):
        from .report import render_table

        output.table(render_table(summary))
        if summary.winner is not None:
            output.table(f"winner: t = {summary.winner:g}  ({summary.noise_note})")
        if summary.files:
            _info(output, f"report: {summary.files.get('md')}, {summary.files.get('png')}, {summary.files.get('json')}")


# ------------------------------------------------------------------------------ reading a study


def study_results(st, grid: dict[str, list] | None = None) -> tuple[list["CandidateResult"], GridState]:
    """The deduplicated candidates of a study (one per ``(shift, seed)``, the first COMPLETE
    trial), in the local search's order (seed-major, shifts in grid order)."""
    from .search.results import CandidateResult

    grid = grid or st.user_attrs.get(ATTR_GRID)
    if not grid:
        raise StorageError(f"study {st.study_name!r} is not a bnnshift search (no grid recorded)")
    state = grid_state(st.get_trials(deepcopy=False), grid)
    out = [CandidateResult.from_json(state.done[p].user_attrs[ATTR_RESULT]) for p in state.points if p in state.done]
    return out, state


def _summary_from(st, state: GridState | None = None) -> "SearchSummary":
    from .search import summarise

    attrs = st.user_attrs
    grid = attrs.get(ATTR_GRID)
    results, state2 = study_results(st, grid)
    state = state2
    sites = list(attrs.get(ATTR_SITES) or [])
    if not sites:
        for r in results:
            if r.plus_fraction:
                sites = list(r.plus_fraction)
                break
    times = [t for t in state.trials if t.datetime_start is not None]
    seconds = 0.0
    if times:
        end = max((t.datetime_complete or t.datetime_start) for t in times)
        seconds = (end - min(t.datetime_start for t in times)).total_seconds()
    config = dict(attrs.get(ATTR_CONFIG) or {})
    summary = summarise(results, shifts=[float(s) for s in grid["shift"]], seeds=[int(s) for s in grid["seed"]],
                        sites=sites, config=config, config_hash=attrs.get(ATTR_HASH, ""),
                        metric=attrs.get(ATTR_METRIC) or config.get("metric", "train_acc"), seconds=seconds)
    if config.get("schedule") == Schedule.HALVING:
        from .search import rung_steps, rungs_from, step_cost

        total = max((r.steps or 0 for r in results), default=0)  # asynchronous halving: the first trial finishes
        plan = rung_steps(total, config.get("eta", 2), config.get("min_fraction", 0.125)) if total else []
        summary.schedule = {"name": Schedule.HALVING.value, "eta": config.get("eta"), "min_fraction": config.get("min_fraction"),
                            "rung_steps": plan, "pruner": "optuna SuccessiveHalvingPruner (asynchronous)"}
        summary.rungs = rungs_from(results, plan)
        summary.cost = {**step_cost(results, len(grid["shift"]) * len(grid["seed"])),
                        "full_grid_candidate_steps": total * len(grid["shift"]) * len(grid["seed"])}
        cs = summary.cost.get("candidate_steps")
        summary.cost["ratio"] = round(cs / summary.cost["full_grid_candidate_steps"], 4) if cs and total else None
    return summary


def study_summary(storage: str, study: str, *, connect_timeout: int | None = None) -> tuple["SearchSummary", dict]:
    """``(SearchSummary, info)`` of a (possibly unfinished) study, for ``bnnshift report``.

    ``info``: trials, complete, failed (incl. killed workers' trials), retried, duplicates,
    running, waiting, missing (grid points with no completed trial).
    """
    optuna = _optuna()
    spec = parse_storage(storage)
    store = open_storage(spec, heartbeat=None, connect_timeout=connect_timeout)
    with _storage_errors(spec):
        st = _load_study(optuna, store, study)
        if ATTR_GRID not in st.user_attrs:
            raise StorageError(f"study {study!r} is not a bnnshift search (no grid recorded)")
        summary = _summary_from(st)
        _, state = study_results(st)
    retried = sum(1 for t in state.trials if "failed_trial" in t.system_attrs)
    info = {
        "study": study, "storage": spec.display, "trials": len(state.trials),
        "complete": len(state.done), "grid": len(state.points),
        "failed_trials": sum(len(v) for v in state.failed.values()),
        "retried_trials": retried, "duplicates": state.duplicates,
        "running": sum(len(v) for v in state.running.values()),
        "waiting": sum(len(v) for v in state.waiting.values()),
        "missing": [{"shift": float(p[0]), "seed": p[1]} for p in state.points if p not in state.done],
    }
    return summary, info
