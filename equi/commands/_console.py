"""Shared CLI plumbing: where each kind of output goes, and one way to fail with a one-line message.

- ``out`` (stdout): what a command was asked for: summaries, tables, the ``--json`` object. Nothing else.
- ``console`` (stderr): errors, warnings, progress and notes on the way, so ``equi … > file`` keeps only results.

``--quiet`` silences both except errors and warnings; ``--json`` replaces a command's human summary on stdout
with one JSON object (see :func:`json_output`).
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Iterator, NoReturn

import typer
from rich.console import Console

console = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` and exit with ``code`` (1 failure, 2 usage/bad input, 3 verification)."""
    from rich.markup import escape

    # The message is plain text: "pip install 'equi[ray]'" must not be read as rich markup.
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=code)


def warn(message: str) -> None:
    """Print ``warning: message`` on stderr (also under --quiet and --json: it says what the result lacks)."""
    from rich.markup import escape

    console.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Every :class:`equi.errors.EquiError` raised inside becomes ``error: <message>`` and its exit code: the one
    place a command turns a library error into a CLI error."""
    from equi.errors import EquiError

    try:
        yield
    except EquiError as exc:
        fail(str(exc), code=exc.exit_code)


@contextlib.contextmanager
def json_output(active: bool = True) -> Iterator[None]:
    """While active, whatever Python code prints to stdout (a library's ``print``, a log dict) goes to stderr, so
    stdout holds nothing but the one object :func:`print_json` writes afterwards."""
    if not active:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def print_json(payload: dict[str, Any]) -> None:
    """The ``--json`` object: one line of JSON on stdout (paths and other objects as strings)."""
    sys.stdout.write(json.dumps(payload, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


JSON_HELP = "Print one JSON object on stdout (and nothing else there); errors and warnings stay on stderr."
