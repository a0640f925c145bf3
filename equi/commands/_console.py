"""Shared CLI plumbing: one console on stderr and one way to fail with a one-line message."""

from __future__ import annotations

import contextlib
from typing import Iterator, NoReturn

import typer
from rich.console import Console

console = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` and exit with ``code`` (1 failure, 2 usage/bad input, 3 verification)."""
    from rich.markup import escape

    # The message is plain text: "pip install 'equi[ray]'" must not be read as rich markup.
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=code)


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Every :class:`equi.errors.EquiError` raised inside becomes ``error: <message>`` and its exit code: the one
    place a command turns a library error into a CLI error."""
    from equi.errors import EquiError

    try:
        yield
    except EquiError as exc:
        fail(str(exc), code=exc.exit_code)
