"""Command lines for fuzzing the CLI, built from the real commands' options (click's view of
the typer app), with values that are legal, borderline or garbage. Shared by
tests/test_reliability_fuzz.py (a cheap in-suite run) and benchmarks/fuzz_cli.py (>= 1000 lines).

A run is bad when it ends in a traceback, an undocumented exit code or the catch-all line
("unexpected; ... report it"). Heavy work (building models, loading data, exporting, opening
a study) is replaced by a stub that raises a ``BnnshiftError`` once every option check has
passed: the fuzz measures what happens *before* the expensive work, in milliseconds.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import typer
from hypothesis import strategies as st

from bnnshift.cli import app
from bnnshift.errors import BnnshiftError

DOCUMENTED_EXIT_CODES = {0, 1, 2, 3, 4, 130, 143}
CATCH_ALL = "unexpected; rerun with BNNSHIFT_DEBUG=1"

VALUES = [
    "0", "1", "-1", "2", "3", "0.5", "-0.25", "1e-3", "nan", "inf", "-inf", "1e308", "-1e308", "1e-320",
    "1000000000000", "99999999999999999999999", "", " ", ",", ",,", "0,1", "0,0.5,1", "1,2,", "-1:2:0.25",
    "0:inf:1", "1:0:1", "0:1:0", "0:1:-1", "0:1e300:1e-300", "0:1:1:1", "a", "a:b", ":", "zoo:mlp", "zoo:nope",
    "zoo:", "synthetic", "synthetic:16", "synthetic:0", "synthetic:x", "fashion-mnist", "fashion-mnist:/nonexistent",
    "mnist:", "imagefolder:/proc/self", "cifar10:" + "r" * 300, "x.py:f", "nope.py:f", "os:getcwd", "json:loads",
    "torchvision:nope", "timm:", "/proc/self/x", "/proc/self", "/", ".", "out", "out/sub", "n" * 300,
    "n" * 250 + ".onnx", "é" * 130, "cpu", "cuda", "cuda:7", "meta", "tpu", "auto", "adam", "sgd", "lion",
    "train_acc", "val_acc", "last_acc", "float64", "float16", "channels_last", "1,28,28", "1,1,28,28",
    "100000,100000,100000", "0,0,0", "-1,28,28", "3x32x32", "key=value", "width=0.25", "width=", "=1",
    "layer*=0.5", "re:[=1", "module=0.5", "inline=x", "bogus=1", "x" * 5000, "--help", "-", "journal:/proc/self/j",
    "postgresql://u@127.0.0.1:1/db", "sqlite:///x.db", "30", "30,120", "0,0", "-5,1", "abc",
]


# plausible values per option / argument: half of the draws use them so that runs get past
# click's own type checks and into bnnshift's
GOOD = {
    "model": ["zoo:mlp", "zoo:lenet5", "zoo:mlp"], "out_dir": ["out", "p"], "--data": ["synthetic:16", "fashion-mnist"],
    "--shifts": ["0,0.5", "-1:2:0.25", "0:1:0.5"], "--seeds": ["1", "2"], "--seed-list": ["0,1", "3"],
    "--batch-size": ["16", "2"], "--steps": ["1", "2"], "--epochs": ["1"], "--lr": ["0.001", "0.05"],
    "--out": ["out", "o2"], "-o": ["out"], "--patch-out": ["pout"], "--onnx": ["m.onnx"], "--shift": ["0.5", "-1"],
    "--site": ["*=0.5", "re:.*=1"], "--kind": ["module=0.5", "inline=0"], "--arg": ["width=0.25"],
    "--input-shape": ["1,28,28", "3,32,32"], "--device": ["cpu", "auto"], "--optimizer": ["adam", "sgd"],
    "--metric": ["train_acc", "val_acc"], "--storage": ["journal:j.log"], "--study": ["s"],
    "--checkpoint": ["ck.pt", "ck.safetensors"], "--config": ["c.toml"], "--opset": ["17", "18"],
    "--batches": ["1", "2"], "--data-batches": ["1", "2"], "--heartbeat": ["30,120", "5"],
}


def _values_for(key: str) -> st.SearchStrategy[str]:
    good = GOOD.get(key)
    return st.one_of(st.sampled_from(good), st.sampled_from(VALUES)) if good else st.sampled_from(VALUES)


def _often(n: int) -> st.SearchStrategy[bool]:
    """True with probability (n-1)/n (and True is what hypothesis shrinks to)."""
    return st.integers(0, n - 1).map(lambda i: i < n - 1)


def commands() -> dict[str, Any]:
    group = typer.main.get_command(app)
    return dict(group.commands)  # type: ignore[attr-defined]


def _option_tokens(opt: Any) -> st.SearchStrategy[list[str]]:
    name = st.sampled_from(list(opt.opts) + list(opt.secondary_opts))
    if opt.is_flag or opt.count:
        return name.map(lambda n: [n])
    key = next((o for o in opt.opts if o.startswith("--")), opt.opts[0])
    return st.tuples(name, _values_for(key)).map(lambda t: [t[0], t[1]])


def command_line(cmd_names: list[str] | None = None) -> st.SearchStrategy[list[str]]:
    """One command line: a command, values for its arguments, a few of its options (or junk)."""
    cmds = commands()
    names = sorted(cmd_names or cmds)

    @st.composite
    def build(draw) -> list[str]:
        name = draw(st.sampled_from(names))
        cmd = cmds[name]
        argv = [name]
        # typer may vendor its own click: tell arguments from options by click's own tag
        params_args = [p for p in cmd.params if p.param_type_name == "argument"]
        params_opts = [p for p in cmd.params if p.param_type_name == "option" and "--help" not in p.opts]
        for p in params_args:
            if draw(_often(10)):  # sometimes missing
                argv.append(draw(_values_for(p.name or "")))
        # required options usually present, so the run gets past click to our own checks
        for p in params_opts:
            if p.required and draw(_often(10)):
                argv += draw(_option_tokens(p))
        n = draw(st.integers(0, 6))
        for _ in range(n):
            if params_opts and draw(_often(20)):
                argv += draw(_option_tokens(draw(st.sampled_from(params_opts))))
            else:
                argv += [draw(st.sampled_from(["--nope", "-x", "--json", "--", "extra"]))]
        return argv

    return build()


class StubReached(BnnshiftError):
    """Every option check passed; the expensive part would start here (exit 1, by design)."""


def _stub(*a, **k):
    raise StubReached("stub: expensive work reached")


@contextlib.contextmanager
def stubbed_heavy_work() -> Iterator[None]:
    """Replace model building, exporting, fold's reading and distributed studies by a stub."""
    import bnnshift.distributed as dist
    import bnnshift.export as export
    import bnnshift.load as load
    import bnnshift.patch as patch

    saved = [(load, "load_model", load.load_model), (export, "export_patched_dir", export.export_patched_dir),
             (patch, "read_recipe", patch.read_recipe), (dist, "study_summary", dist.study_summary),
             (dist, "run_worker", dist.run_worker)]
    try:
        for mod, attr, _ in saved:
            setattr(mod, attr, _stub)
        yield
    finally:
        for mod, attr, fn in saved:
            setattr(mod, attr, fn)


def run_line(argv: list[str], cwd: str) -> tuple[int, str, str | None]:
    """Invoke one command line in ``cwd``; returns (exit code, stderr, problem or None)."""
    from typer.testing import CliRunner

    old = os.getcwd()
    os.chdir(cwd)
    try:
        res = CliRunner().invoke(app, argv)
    finally:
        os.chdir(old)
    err = res.stderr
    problem = None
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        problem = f"exception {type(res.exception).__name__}: {res.exception}"
    elif res.exit_code not in DOCUMENTED_EXIT_CODES:
        problem = f"undocumented exit code {res.exit_code}"
    elif CATCH_ALL in err or "Traceback" in err or "Traceback" in res.stdout:
        problem = "catch-all / traceback: " + err.strip().splitlines()[-1][:300]
    return res.exit_code, err, problem
