"""``equi guard``: guard a mix's responses, regenerate unsafe answers in rounds, refine EHD answers → a new mix."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from equi.commands._console import console, reported_errors

EXAMPLE = """
Example:

  equi guard mix/ --out mix2/ --rounds 5 --refine-ehd     # then: equi verify mix2/ && equi train --mix mix2/
"""


def guard_command(
    mix: Path = typer.Argument(..., help="Parent mix directory (from equi curate or equi guard); never modified."),
    out: Path = typer.Option(..., "--out", "-o", help="New mix directory to write (appears atomically)."),
    policy: Optional[str] = typer.Option(None, help="Causal LM (path or hub id) that writes candidates "
                                         "\\[default: SmolLM2-135M-Instruct, as equi train]."),
    guard_model: Optional[str] = typer.Option(None, help="Guard model (path or hub id): a sequence-classification "
                                              "checkpoint or a Llama-Guard-style causal LM with its chat template "
                                              "\\[default: equi's refusal detector + harm scorers, no model]."),
    rounds: int = typer.Option(5, help="At most this many guard → regenerate rounds (0: label only)."),
    candidates: int = typer.Option(2, "--candidates", "-k", help="Candidates per prompt and round (one per framing)."),
    refine_ehd: bool = typer.Option(False, "--refine-ehd", help="EHD prompts: answer with retrieved safety knowledge "
                                    "and self-reflection; keep only safe answers that are not bare refusals."),
    knowledge: Optional[Path] = typer.Option(None, help="Knowledge JSONL ({\"text\": ...} a line) for --refine-ehd "
                                             "\\[default: the bundled demo set]."),
    knowledge_k: int = typer.Option(2, help="Knowledge passages retrieved per EHD prompt."),
    max_new_tokens: int = typer.Option(128, help="Longest candidate answer, in tokens."),
    batch_size: int = typer.Option(8, help="Prompts per generation batch."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summary."),
) -> None:
    """Guard every response (severity none/minor/moderate/severe and cost), regenerate unsafe chosen answers with
    the policy round after round, and write a new mix whose manifest records every round and the parent's hash.
    """
    from curation.guard import GuardConfig, guard_mix

    with reported_errors():
        config = GuardConfig(mix=str(mix), out=str(out), policy=policy, guard_model=guard_model, rounds=rounds,
                             candidates=candidates, refine_ehd=refine_ehd,
                             knowledge=str(knowledge) if knowledge else None, knowledge_k=knowledge_k,
                             max_new_tokens=max_new_tokens, batch_size=batch_size, overwrite=overwrite, quiet=quiet)
        result = guard_mix(config)
    if not quiet:
        print_rounds(result.manifest, result.out)


def print_rounds(manifest: dict, out: Path) -> None:
    from rich.table import Table

    g = manifest["guard"]
    table = Table(title=f"equi guard → {out}", show_edge=False)
    for column in ("round", "guarded", "unsafe", "EHD refusals", "regenerated", "fixed", "refined"):
        table.add_column(column, justify="right")
    for r in g["rounds"]:
        table.add_row(*(str(r[k]) for k in ("round", "guarded", "unsafe", "ehd_refusals", "regenerated", "fixed",
                                            "refined")))
    console.print(table)
    console.print(f"{g['changed_rows']} rows changed, {g['still_unsafe']} still unsafe; stopped: {g['stopped']}; "
                  f"parent manifest sha256 {manifest['parent']['manifest_sha256'][:16]}…")


def register(app: typer.Typer) -> None:
    app.command("guard", epilog=EXAMPLE)(guard_command)
