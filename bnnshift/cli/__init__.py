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
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool):
    if value:
        typer.echo(f"bnnshift {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="Print the version and exit.")):
    pass


def _register_commands() -> None:
    from . import scan, zoo  # noqa: F401
    for name in ("patch", "search", "export", "report"):
        try:
            __import__(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise


_register_commands()


def main() -> None:
    app()
