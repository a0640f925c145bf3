"""``equi curate``: raw JSONL → categorised pool + FDC mixture (a mix directory)."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path
from typing import List, Optional

import typer

from equi.commands._console import JSON_HELP, fail, json_output, print_json, reported_errors, warn
from equi.commands._console import out as stdout

EXAMPLE = """
Example:

  equi curate hh.jsonl.gz xstest.jsonl --out mix/ --size 2000 --ratios EHD=10,IHD=3,MHD=1

  RAY_ADDRESS=auto equi curate big/*.jsonl.gz --out mix/ --engine ray
"""


def curate_command(
    inputs: List[str] = typer.Argument(..., help="Raw JSONL files (.jsonl or .jsonl.gz), or - for stdin.",
                                       show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Mix directory to write (appears atomically)."),
    size: Optional[int] = typer.Option(None, help="Target number of safety pairs; default: all the ratios allow."),
    ratios: str = typer.Option("EHD=10,IHD=3,MHD=1", help="Safety-group ratios of the mixture."),
    benign_share: float = typer.Option(0.2, help="Share of BENIGN (helpfulness) pairs in the mixture, 0-1."),
    eval_fraction: float = typer.Option(0.05, "--eval-fraction", "--test-fraction",
                                        help="Share of the mixture held out as the `test` split, about: each "
                                        "pair goes to test by a hash of its id (stable across runs and scales), not "
                                        "per group, so a small group may get no test rows."),
    embedder: Optional[str] = typer.Option(None, help="sentence-transformers model name or path, `static` (fast, "
                                           "distilled), or `lm:MODEL` (a chat LM's state at the end of the prompt; "
                                           "`lm:` = bundled SmolLM2; needs a categoriser fit for it) "
                                           "\\[default: bundled all-MiniLM-L6-v2]."),
    device: str = typer.Option("auto", help="Where the encoder, --judge and --guard-model run: auto (a CUDA GPU when "
                               "torch sees one, else the CPU), cpu, cuda, cuda:N or mps. Vectors differ in their last "
                               "digits between devices; the caches and --resume keep them apart. --embedder static "
                               "runs on the CPU."),
    categoriser: Optional[Path] = typer.Option(None, help="Categoriser params from `equi fit-categoriser` "
                                               "\\[default: bundled]."),
    judge: Optional[str] = typer.Option(None, help="A causal LM (hub id or path) that decides EHD/IHD/MHD for the "
                                        "prompts the built-in heads call harmful, with the Equilibrate authors' "
                                        "judge prompt; answers cached by text; an unparseable answer keeps the heads' "
                                        "group (counted in manifest.json `labellers`) \\[default: the heads only]."),
    guard_model: Optional[str] = typer.Option(None, "--guard-model", help="A safety guard (hub id or path): a "
                                              "Llama-Guard-style causal LM with its chat template, or a "
                                              "sequence-classification model. It gives each prompt's harm (BENIGN "
                                              "below 0.5; the heads pick the safety group above) and each answer's "
                                              "cost 2*P(unsafe)-1; refusal stays equi's detector; cached by text "
                                              "\\[default: the heads]."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse cached prompt embeddings "
                               "($EQUI_CACHE, default ~/.cache/equi); a re-run embeds only new texts."),
    clusters: Optional[int] = typer.Option(None, help="Number of embedding clusters \\[default: ~sqrt(rows/2)]."),
    dup_threshold: float = typer.Option(0.95, help="Cosine similarity above which prompts are near-duplicates."),
    input_format: str = typer.Option("auto", "--format", help="Force one input shape: auto, pair, conversation, "
                                     "hh, single, prompt."),
    seed: int = typer.Option(0, help="Seed for every random choice."),
    order: str = typer.Option("fdc", metavar="[fdc|input]",
                              help="fdc: the group-balanced mixture; input: every de-duplicated pair of any group "
                                   "in input order, --size capping the pairs (no ratios, no BENIGN share: the naive "
                                   "baseline to compare FDC with)."),
    batch_size: int = typer.Option(4096, help="Input lines per processing batch: bounds memory, and is the unit "
                                   "an interrupted run resumes from. The encoder sorts each batch by length, so "
                                   "larger batches pad less."),
    workers: int = typer.Option(1, help="Processes that each parse, embed and score whole batches with their own "
                                "encoder (1 = all in this one); same output for any number. Each worker holds its own "
                                "encoder: on 2 cores 2 pays with --embedder static, not with MiniLM; on more cores "
                                "use one per core."),
    shard_rows: int = typer.Option(50_000, help="Rows per Parquet shard."),
    license: str = typer.Option("other", help="Licence id for the data card (the sources' licences apply)."),
    strict: bool = typer.Option(False, help="Stop at the first bad line (file:line: reason) instead of rejecting it."),
    max_line_bytes: int = typer.Option(1 << 20, help="A longer input line (in bytes) is rejected without being "
                                       "parsed, its first 1,000 characters kept in rejects.jsonl."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Pick up an interrupted run of the same "
                                "command (kept in .OUT.partial beside --out); the result is byte-identical to "
                                "an uninterrupted run. --no-resume starts afresh."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summary; warnings and errors "
                               "still print."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP + " The object: out, counts, accounting, "
                                 "warnings, timings_s, resumed_batches."),
    engine: str = typer.Option("local", metavar="[local|ray]",
                               help="Where to score the rows: local (this process) or ray (a Ray "
                               "actor pool, GPU actors when the cluster has GPUs; pip install 'equi\\[ray]'). "
                               "Same mix either way."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join with --engine ray "
                                              "\\[default: $RAY_ADDRESS, else a local Ray instance]."),
) -> None:
    """Categorise raw safety data (EHD/IHD/MHD/OTHER/BENIGN) and build a balanced FDC mixture.

    Every input line ends up in the mixture, the pool or rejects.jsonl, counted in manifest.json.
    """
    from curation.readers import missing_input_reason
    from equi.config import CurateConfig, parse_ratios

    with reported_errors():
        config = CurateConfig(
            inputs=inputs, out=str(out), input_format=input_format, strict=strict, max_line_bytes=max_line_bytes,
            embedder=embedder, device=device,
            categoriser=str(categoriser) if categoriser else None, judge=judge, guard_model=guard_model, embedding_cache=cache,
            clusters=clusters,
            dup_threshold=dup_threshold, batch_size=batch_size, workers=workers, size=size,
            ratios=parse_ratios(ratios),
            benign_share=benign_share, eval_fraction=eval_fraction, seed=seed, order=order, overwrite=overwrite, resume=resume,
            shard_rows=shard_rows, license=license, quiet=quiet, engine=engine, ray_address=ray_address,
        )
    for path in config.inputs:
        if path != "-" and not Path(path).is_file():
            fail(f"{path}: is a directory; pass the JSONL files in it" if Path(path).is_dir() else
                 f"{path}: not a regular file (a pipe or <(…)?): pass it on standard input as -, or save it to a "
                 "file first (equi reads each input file twice: to curate it and to record its checksum)"
                 if Path(path).exists() else f"{path}: {missing_input_reason(path)}", code=2)

    from curation.pipeline import curate
    from equi.manifest import Interrupted

    try:
        # WorkKept (disk full, an I/O error: the machine's fault) exits 1 with the scored batches kept
        with reported_errors(), _sigterm_as_interrupt(), json_output(as_json):
            result = curate(config)
    except Interrupted as exc:
        if config.engine == "ray":  # its actors' work is not kept: the next run scores everything again
            fail("interrupted: a --engine ray run is not resumed; the same command starts afresh", code=130)
        kept = "; run the same command again to resume" if config.resume and "-" not in config.inputs else ""
        fail(f"interrupted: the work so far is in {exc.work}{kept}", code=130)
    if as_json:
        print_warnings(result.manifest)
        print_json(summary_json(result))
        return
    if not quiet:
        print_summary(result.manifest, result.out)
        if result.resumed_batches:
            stdout.print(f"resumed: {result.resumed_batches} batches came from the interrupted run")
    print_warnings(result.manifest)


def summary_json(result) -> dict:
    """The ``equi curate --json`` object: what the summary table says, as data (the full story is manifest.json)."""
    manifest = result.manifest
    return {
        "ok": True,
        "out": str(result.out),
        "manifest": str(Path(result.out) / "manifest.json"),
        "counts": manifest["counts"],
        "accounting": manifest["accounting"],
        "warnings": list(manifest.get("warnings", [])),
        "timings_s": manifest.get("timings_s", {}),
        "resumed_batches": result.resumed_batches,
    }


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """``kill`` (SIGTERM) stops a run like Ctrl-C does, so its finished batches are kept for a resume."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def print_summary(manifest: dict, out: Path) -> None:
    """The summary table and accounting, on stdout (it is the command's result; progress went to stderr)."""
    from rich.table import Table

    from equi.schema import GROUPS

    acc = manifest["accounting"]
    table = Table(title=f"equi curate → {out}", show_edge=False)
    for column in ("group", "pool", "mixture train", "mixture test"):
        table.add_column(column, justify="left" if column == "group" else "right")
    for g in GROUPS:
        mix = manifest["counts"]["mixture"].get(g, {})
        table.add_row(g, str(manifest["counts"]["pool"].get(g, 0)), str(mix.get("train", 0)), str(mix.get("test", 0)))
    stdout.print(table)
    stdout.print(f"lines {acc['input_lines']} = pooled {acc['pooled']} + rejected {acc['rejected']}"
                  + (f" (see {out}/rejects.jsonl)" if acc["rejected"] else ""))
    reasons = ", ".join(f"{k} {v}" for k, v in acc["not_selected"].items()) or "none"
    stdout.print(f"pooled {acc['pooled']} = mixed {acc['mixed']} + not selected ({reasons})")
    if timings := manifest.get("timings_s"):
        phases = ", ".join(f"{name.replace('_', ' ')} {seconds:.1f}" for name, seconds in timings.items())
        stdout.print(f"took {sum(timings.values()):.1f} s ({phases})")
    if "embedder" in manifest:
        stdout.print(f"embedder {manifest['embedder']} on {manifest.get('embedder_device', 'cpu')}", markup=False)


def print_warnings(manifest: dict) -> None:
    """The mix's warnings (also in manifest.json), on stderr even with --quiet: they say what the mix lacks."""
    for warning in manifest.get("warnings", []):
        warn(warning)


def register(app: typer.Typer) -> None:
    app.command("curate", epilog=EXAMPLE)(curate_command)
