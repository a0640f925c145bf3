"""``equi verify``: re-check a mix against its manifest and the contract."""

from __future__ import annotations

from pathlib import Path

import typer

from equi.commands._console import JSON_HELP, console, fail, print_json
from equi.commands._console import out as stdout

EXAMPLE = """
Example:

  equi verify mix/          # exit 0 when sound, 3 with the first mismatch named

  equi verify mix/ --json   # {"ok": false, "mix": "mix", "problems": [...]} and exit 3 when not
"""


def verify_command(
    mix: Path = typer.Argument(..., help="Mix directory written by `equi curate`."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing when the mix is sound."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP + ' The object: {"ok", "mix", "problems"}; '
                                 "exit 3 with ok=false when the mix has problems."),
) -> None:
    """Check every claim of the manifest against the files: checksums of every file (card and rejects included),
    no unlisted or outside file, each shard's rows, splits and groups, counts and accounting recomputed from them."""
    from equi.manifest import verify_mix
    from equi.schema import MANIFEST

    if not mix.is_dir():
        fail(f"{mix}: no such mix directory", code=2)
    if not (mix / MANIFEST).is_file():  # bad input (exit 2), not a mix that failed its checks (exit 3)
        fail(f"{mix}: no {MANIFEST}, so not a mix written by equi curate or equi guard", code=2)
    problems = verify_mix(mix)
    if as_json:
        print_json({"ok": not problems, "mix": str(mix), "problems": list(problems)})
        if problems:
            first = problems[0]
            fail(first if first.startswith(str(mix)) else f"{mix}: {first}", code=3)
        return
    if problems:
        for problem in problems[1:]:
            console.print(f"  also: {problem}")
        first = problems[0]
        fail(first if first.startswith(str(mix)) else f"{mix}: {first}", code=3)
    if not quiet:
        stdout.print(f"{mix}: ok")


def register(app: typer.Typer) -> None:
    app.command("verify", epilog=EXAMPLE)(verify_command)
