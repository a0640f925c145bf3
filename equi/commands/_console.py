"""Shared CLI plumbing: one console on stderr and one way to fail with a one-line message."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

console = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` and exit with ``code`` (1 failure, 2 usage/bad input, 3 verification)."""
    from rich.markup import escape

    # The message is plain text: "pip install 'equi[ray]'" must not be read as rich markup.
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=code)
