"""The ``bnnshift`` command: one module per command, composed here. torch is imported lazily
inside the commands so that ``--help`` stays instant."""
from __future__ import annotations

import typer

from .._version import __version__

app = typer.Typer(
    name="bnnshift",
    help="Find, shift and search the thresholds of binary activations in PyTorch BNNs "
         "(Kim et al., CVPR 2021). Exit codes: 0 ok, 1 error, 2 usage, 3 no binary activation, "
         "4 verification failed.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _flags_without_type() -> None:
    """typer's rich help prints ``<bool>`` after every on/off flag (``--json <bool>``), as if it
    took a value; a flag takes none, so its type column stays empty."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "_bnnshift", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    display_type_rich._bnnshift = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich


_flags_without_type()


def _version_callback(value: bool):
    if value:
        typer.echo(f"bnnshift {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="Print the version and exit.")):
    import logging

    # torch.compile imports cpp_extension, which logs "No CUDA runtime is found, using CUDA_HOME=..."
    # on every CPU-only run: noise for a bnnshift user (the device is reported in search.json)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


# (command, module, function) in the order ``bnnshift -h`` lists them; a command module never
# imports ``app``: it is registered here, behind the one error handler (``_errors.TABLE``)
COMMANDS = (
    ("scan", "scan", "scan_command"),
    ("zoo", "zoo", "zoo_command"),
    ("patch", "patch", "patch_command"),
    ("fold", "patch", "fold_command"),
    ("search", "search", "search_command"),
    ("export", "export", "export_command"),
    ("report", "report", "report_command"),
    ("pack", "pack", "pack_command"),
)


def _register_commands() -> None:
    import importlib

    from ._errors import handle_errors

    for name, module, function in COMMANDS:
        try:
            mod = importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:  # a command left out of a trimmed install
            if exc.name != f"{__name__}.{module}":
                raise
            continue
        app.command(name)(handle_errors(getattr(mod, function)))


_register_commands()


def main() -> None:
    """The console script. A usage error found by the parser (unknown option, bad value) happens
    before any command runs: with --json it still gets the JSON error object on stdout."""
    import sys

    from .. import _signals

    _signals.install()
    try:
        _main(sys)
    except SystemExit as exc:
        # typer turns a Ctrl-C / SIGTERM outside a command (while parsing) into a silent exit 130
        if exc.code == 130 and _signals.pending() is not None:
            sys.exit(_signals.interrupted_exit(None))
        raise
    except KeyboardInterrupt as exc:
        sys.exit(_signals.interrupted_exit(exc))


def _main(sys) -> None:
    if "--json" not in sys.argv[1:]:
        app(prog_name="bnnshift")
        return
    try:  # typer >= 0.20 vendors click as typer._click; older ones use click itself
        from typer._click import exceptions as click_exc
    except ImportError:  # pragma: no cover
        from click import exceptions as click_exc

    try:
        rv = app(prog_name="bnnshift", standalone_mode=False)
    except click_exc.UsageError as exc:
        exc.show()
        import json

        sys.stdout.write(json.dumps({"error": exc.format_message(), "hint": "see bnnshift COMMAND -h",
                                     "exit_code": exc.exit_code}) + "\n")
        sys.exit(exc.exit_code)
    except click_exc.Abort:  # pragma: no cover - older click
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)
