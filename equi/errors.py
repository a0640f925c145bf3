"""One base for every error equi reports to a person as one line, carrying the exit code the CLI uses.

Exit codes: 1 the run failed (the machine's or a model's fault), 2 usage or bad input (the user must change
something), 3 a mix failed verification. Library code raises these; each command catches :class:`EquiError`
once (:func:`equi.commands._console.reported_errors`) and prints ``error: <message>``.
"""

from __future__ import annotations


class EquiError(Exception):
    """An error with a message written for the user; ``exit_code`` is what ``equi`` exits with."""

    exit_code = 1


class UsageError(EquiError, ValueError):
    """Bad input or settings: a missing file, a malformed line under ``--strict``, an unknown option value."""

    exit_code = 2


class VerificationError(EquiError):
    """A mix does not match its manifest (tampered, incomplete, malformed); ``problems`` lists every mismatch."""

    exit_code = 3

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


class OutputExistsError(UsageError, FileExistsError):
    """``--out`` exists, is not equi's, holds an input or is being written by another run."""


class OutputNotWritable(UsageError, PermissionError):
    """``--out`` cannot be created where it was asked for."""
