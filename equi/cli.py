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
        "\n\nResults (summaries, --json objects) go to stdout; progress, warnings and errors to stderr."
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
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print equi's version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", envvar="EQUI_VERBOSE",
                                 help="Also show the progress bars of the libraries equi drives (downloads, model "
                                 "loading, dataset maps); by default only equi's own bars show, on a terminal."),
) -> None:
    """equi: balanced safety-data mixtures and AMA/RePO/dual training."""
    from equi.progress import library_bars

    # Held for the command that follows and undone after it (click closes the context when the command returns).
    ctx.with_resource(library_bars(show=verbose))

for _module in COMMAND_MODULES:
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
