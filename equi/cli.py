"""The ``equi`` command line: a thin layer over the library.

Each command lives in ``equi/commands/<name>.py`` and exposes ``register(app)``; this module only
assembles them. Exit codes: 0 ok, 1 failure, 2 usage / bad input, 3 verification failed.
"""

from __future__ import annotations

import os

import typer

# Offline by default: equi never downloads at run time unless the user asks for it explicitly.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from equi.commands import COMMAND_MODULES  # noqa: E402

app = typer.Typer(
    name="equi",
    help=(
        "equi: balanced safety-data mixtures and AMA/RePO/dual training.\n\n"
        "The loop: equi curate raw.jsonl --out mix/  →  equi train --mix mix/  →  equi eval runs/NAME  →  equi report"
    ),
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from equi.manifest import equi_version

        typer.echo(f"equi {equi_version()}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print equi's version and exit."),
) -> None:
    """equi: balanced safety-data mixtures and AMA/RePO/dual training."""

for _module in COMMAND_MODULES:
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
