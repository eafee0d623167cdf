"""``bnnshift report``: the table / JSON / plot of a distributed search, read from its study."""
from __future__ import annotations

from typing import Optional

import typer

from ._common import JSON, QUIET
from ._output import Output


def report_command(
    storage: str = typer.Option(..., "--storage", help="The study's storage: postgresql://USER@HOST:PORT/DB or "
                                                       "journal:PATH."),
    study: str = typer.Option(..., "--study", help="The study name the workers were started with."),
    out_dir: Optional[str] = typer.Option(None, "--out", help="Write search.json/search.md/search.png here."
                                                              " Missing parent directories are created (mkdir -p)."),
    connect_timeout: Optional[int] = typer.Option(None, "--connect-timeout",
                                                  help="Seconds to wait for the database (default 10)."),
    json_: bool = JSON,
    quiet: bool = QUIET,
):
    """Print the same table / JSON / plot as a local search, from a distributed study (also while it runs).

    Exit codes: 0 ok, 1 bad or unreachable storage, unknown study.
    """
    from ..distributed import study_summary

    out = Output(json_mode=json_, quiet=quiet)
    summary, info = study_summary(storage, study, connect_timeout=connect_timeout)
    if out_dir is not None:
        from .._io import prepare_output_dir
        from ..report import write_report

        prepare_output_dir(out_dir, force=True)
        summary.out_dir = str(out_dir)
        summary.files = write_report(summary, out_dir)
    from ..report import render_table, verdict

    v = verdict(summary)
    if out.json_mode:
        payload = {**summary.to_json(), "verdict": v}
        payload["distributed"] = info
        out.result(payload)
        return
    out.table(render_table(summary))
    out.table(f"verdict: {v['text']}")
    for n in v["notes"]:
        out.table(f"note: {n}")
    line = (f"study {study!r}: {info['complete']}/{info['grid']} candidates done, {info['trials']} trials "
            f"({info['failed_trials']} failed, {info['retried_trials']} retries, {info['duplicates']} duplicates, "
            f"{info['running']} running, {info['waiting']} waiting)")
    out.info(line)
    if info["missing"]:
        out.warn(f"{len(info['missing'])} candidates not done yet: "
                 + ", ".join(f"t={m['shift']:g} seed={m['seed']}" for m in info["missing"][:8])
                 + (" ..." if len(info["missing"]) > 8 else ""))
    if summary.files:
        out.info(f"report: {summary.files.get('md')}, {summary.files.get('png')}, {summary.files.get('json')}")
