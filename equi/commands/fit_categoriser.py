"""``equi fit-categoriser``: refit the prompt categoriser on your own group labels."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import List, Optional

import typer

from equi.commands._console import console, fail, reported_errors

EXAMPLE = """
Example:

  equi fit-categoriser labelled.jsonl --out categoriser.json
  equi curate raw.jsonl --out mix/ --categoriser categoriser.json

Each line of labelled.jsonl: {"prompt": "...", "category": "EHD"} with category one of
EHD, IHD, MHD, OTHER, BENIGN (or "No risk"); rows may carry "is_harmful": true/false instead
(or as well), which trains only the harmful-vs-benign head.
"""


def fit_categoriser_command(
    labelled: List[Path] = typer.Argument(..., help="Labelled JSONL file(s): `prompt` + `category` and/or `is_harmful`."),
    out: Path = typer.Option(Path("categoriser.json"), "--out", "-o", help="Where to write the fitted parameters (JSON)."),
    embedder: Optional[str] = typer.Option(
        None, help="sentence-transformers model name or path, `static`, or `lm:MODEL` (a chat LM's state at the end "
        "of the prompt); default the bundled all-MiniLM-L6-v2. Use the same one with `equi curate --embedder`."),
    device: str = typer.Option("auto", help="Where the encoder runs: auto (a CUDA GPU when torch sees one, else the "
                               "CPU), cpu, cuda, cuda:N or mps."),
    folds: int = typer.Option(5, min=0, help="Cross-validation folds for the printed macro-F1 (0 = skip CV)."),
    seed: int = typer.Option(0, help="Seed for fold shuffling."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors."),
) -> None:
    """Fit the categoriser's explicit, intent, harm and group heads on labelled prompts, print held-out
    macro-F1 and write the parameters for `equi curate --categoriser`."""
    from curation.categorise import FitConfig, LabelledPrompts, cross_validate, fit_arrays, read_labelled_jsonl
    from curation.embed import get_embedder

    if out.exists() and not overwrite:
        fail(f"{out} exists; pass --overwrite to replace it", code=2)
    if folds == 1:
        fail("--folds must be 0 (no cross-validation) or at least 2", code=2)
    with reported_errors():
        texts, groups, harmful = read_labelled_jsonl(labelled)
    n_grouped = sum(g is not None for g in groups)
    if n_grouped == 0:
        fail("no labelled rows: need rows with 'category' in EHD, IHD, MHD, OTHER, BENIGN or 'No risk'", code=2)
    with reported_errors():
        model_embedder = get_embedder(embedder, device)

    config = FitConfig(seed=seed)
    with console.status("embedding prompts", spinner="dots") if not quiet else nullcontext():
        data = LabelledPrompts(texts, model_embedder.encode(texts), groups, harmful)
    with reported_errors():
        if folds >= 2:
            if n_grouped < folds:
                fail(f"{n_grouped} group-labelled rows are too few for {folds}-fold cross-validation "
                     "(pass --folds 0 to skip it)", code=2)
            with console.status(f"{folds}-fold cross-validation", spinner="dots") if not quiet else nullcontext():
                cv = cross_validate(data, folds=folds, config=config, embedder_name=model_embedder.name)
            if not quiet:
                console.print(
                    f"{folds}-fold CV on {cv['rows']} labelled prompts: macro-F1 EHD/IHD/MHD "
                    f"{cv['macro_f1_ehd_ihd_mhd']:.3f}, 5 groups {cv['macro_f1_5class']:.3f}, "
                    f"accuracy {cv['accuracy']:.3f}"
                )
        with console.status("fitting on all rows", spinner="dots") if not quiet else nullcontext():
            model = fit_arrays(data, config, embedder_name=model_embedder.name)
    if folds >= 2:
        model.info["cv"] = {k: cv[k] for k in ("folds", "rows", "macro_f1_ehd_ihd_mhd", "macro_f1_5class", "accuracy")}
    model.info["fit_on"] = [str(p) for p in labelled]
    model.save(out)
    if not quiet:
        counts = ", ".join(f"{g} {c}" for g, c in model.info["group_counts"].items())
        console.print(f"wrote {out} (fit on {len(texts)} prompts: {counts})")


def register(app: typer.Typer) -> None:
    app.command("fit-categoriser", epilog=EXAMPLE)(fit_categoriser_command)
