"""Exceptions that the CLI maps to one-line messages and documented exit codes.

Exit codes (README.md, docs/cli.md):
  0 ok, 1 error, 2 usage (bad arguments, bad spec strings), 3 no binary activation found,
  4 verification failed (ONNX export parity), 130 interrupted (SIGINT, Ctrl-C),
  143 terminated (SIGTERM: CI runners, ``timeout``, Slurm, Kubernetes).
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NO_SITES = 3
EXIT_VERIFY = 4
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by ``bnnshift._signals`` so that it unwinds like Ctrl-C
    (temporary directories removed, child processes ended, the journal kept) and exits 143."""

    def __init__(self, signum: int = 15):
        super().__init__(f"terminated (signal {signum})")
        self.signum = signum


class BnnshiftError(Exception):
    """Base class: ``message`` says what went wrong, ``hint`` what to do about it."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return f"{self.message}" + (f" ({self.hint})" if self.hint else "")


class UsageError(BnnshiftError):
    """Bad argument or spec string (exit 2)."""

    exit_code = EXIT_USAGE


class SpecError(UsageError):
    """A model or data spec string that cannot be parsed or resolved."""


class ModelLoadError(BnnshiftError):
    """The model could not be built or its checkpoint not loaded (exit 1)."""


class CheckpointError(ModelLoadError):
    """Missing, corrupt, unsafe or mismatching checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint needs unpickling of code; refused unless explicitly allowed."""


class UntrustedRecipeError(BnnshiftError):
    """A patch directory's recipe names code to import (``file.py:fn`` / ``pkg.mod:fn``) and
    neither the user named the model nor did bnnshift write the recipe for this user (exit 1)."""


class TraceError(BnnshiftError):
    """The model could not be analysed."""


class NoSitesError(BnnshiftError):
    """No binary activation was found (exit 3)."""

    exit_code = EXIT_NO_SITES


class PatchError(BnnshiftError):
    """A shift could not be applied (unknown site, bad value...)."""


class UnknownSiteError(UsageError, PatchError):
    """A ``--site`` / ``--exclude`` / config name or pattern that matches no site (exit 2: a usage
    mistake, the message lists the existing sites); still a ``PatchError`` for library callers."""


class OutputError(BnnshiftError):
    """An output path is not writable or would be overwritten without --force."""


class DataError(BnnshiftError):
    """A data set could not be loaded or does not fit the model."""


class TrainingError(BnnshiftError):
    """Training diverged or failed."""


class VerificationError(BnnshiftError):
    """An exported model does not match the torch model (exit 4)."""

    exit_code = EXIT_VERIFY


class ResourceError(BnnshiftError):
    """The machine cannot do it: not enough memory for the requested input (exit 1)."""


class LockedError(OutputError):
    """Another process owns the output (its PID is in the message; exit 1)."""


class StorageError(BnnshiftError):
    """A distributed-search storage URL is bad or unreachable."""
