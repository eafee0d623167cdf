"""One output object for every command: human (rich, on stderr), json (stdout only), quiet."""
from __future__ import annotations

import json
import sys
from typing import Any
from .._io import jsonable


class Output:
    """``json``: only JSON on stdout; everything else goes to stderr.

    Progress bars are on only for a human at a terminal (not with --json, not in CI logs).
    """

    def __init__(self, json_mode: bool = False, quiet: bool = False):
        from rich.console import Console

        self.json_mode = json_mode
        self.quiet = quiet
        import os

        # not a terminal (pipes, CI logs): wide enough that tables are not folded to nothing
        width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
        self.err = Console(stderr=True, highlight=False, soft_wrap=False, width=width)
        self.out = Console(highlight=False, soft_wrap=True, width=width)
        # --json promises only JSON on stdout: whatever the user's code prints while its model
        # is built and run (banners, shape traces) goes to stderr until the result is written
        self._stdout = sys.stdout
        if json_mode:
            sys.stdout = sys.stderr

    @property
    def progress_enabled(self) -> bool:
        return not (self.json_mode or self.quiet) and sys.stderr.isatty()

    def info(self, msg: str) -> None:
        if not self.quiet:
            self.err.print(msg)

    def warn(self, msg: str) -> None:
        self.err.print(f"[yellow]warning:[/yellow] {msg}")

    def table(self, table) -> None:
        """Human tables go to stdout when not in json mode."""
        if not (self.json_mode or self.quiet):
            self.out.print(table)

    def text(self, msg: str) -> None:
        """A human paragraph on stdout (not in json mode), wrapped at word boundaries."""
        if not (self.json_mode or self.quiet):
            self.out.print(msg, soft_wrap=False, overflow="fold")

    def result(self, payload: dict[str, Any], human: str | None = None) -> None:
        if self.json_mode:
            sys.stdout = self._stdout
            self._stdout.write(json.dumps(payload, indent=2, default=jsonable) + "\n")
            self._stdout.flush()
        elif human and not self.quiet:
            self.out.print(human)

