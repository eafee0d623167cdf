"""The search's output directory: the journal opened once for every schedule (fresh, ``--force``'d
or resumed) and the report written at the end."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import prepare_output_dir
from ..errors import UsageError
from ..journal import JOURNAL_NAME, Journal
from .context import SearchContext, _checkpoint_json
from .results import SearchSummary


@dataclass
class JournalSetup:
    """``journal``: ``OUT/journal.jsonl`` (None without ``--out``); ``done``: finished candidates of
    this config hash (``Journal.finished``, on ``--resume``); ``rungs``: successive halving's rung
    records (``Journal.rungs``, on ``--resume`` when asked for); ``out``: the output directory."""

    journal: Journal | None = None
    done: dict = field(default_factory=dict)
    rungs: dict = field(default_factory=dict)
    out: Path | None = None


def open_journal(out_dir: str | Path | None, *, resume: bool, force: bool, config_hash: str,
                 rungs: bool = False) -> JournalSetup:
    """Prepare ``out_dir`` (``prepare_output_dir``: refused when it holds other files unless
    ``force``; kept as it is on ``resume``) and open its journal: read back on ``resume``, emptied
    otherwise. Raises ``UsageError`` (exit 2) for ``resume`` without ``out_dir``."""
    if out_dir is None:
        if resume:
            raise UsageError("--resume needs --out DIR (the journal lives there)")
        return JournalSetup()
    out = Path(out_dir)
    if resume:
        out.mkdir(parents=True, exist_ok=True)
        prepare_output_dir(out, force=True)
    else:
        prepare_output_dir(out, force=force)
    setup = JournalSetup(journal=Journal(out / JOURNAL_NAME), out=out)
    if resume:
        setup.done = setup.journal.finished(config_hash)
        if rungs:
            setup.rungs = setup.journal.rungs(config_hash)
    else:
        setup.journal.reset()
    return setup


def attach_context(summary: SearchSummary, ctx: SearchContext) -> None:
    """What the context says about the run: the checkpoint's load report, the notes, the normalisation."""
    summary.checkpoint, summary.notes = _checkpoint_json(ctx), list(getattr(ctx, "notes", []))
    summary.normalisation = getattr(ctx, "normalisation", None)


def write_outputs(summary: SearchSummary, out_dir: str | Path | None) -> dict[str, Any]:
    """``search.md/.png/.json`` into ``out_dir`` (``report.write_report``); nothing without it."""
    if out_dir is not None:
        from ..report import write_report

        summary.out_dir = str(out_dir)
        summary.files = write_report(summary, out_dir)
    return summary.files
