"""``equi eval``: answer real prompt suites and measure safety vs over-refusal."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from equi.commands._console import JSON_HELP, fail, json_output, print_json, reported_errors
from equi.commands._console import out as stdout

HELP = """Generate answers to real prompt suites and label each with the curation refusal detector.

TARGET is a run directory (its final/ model is evaluated; results go to RUN/eval/), a model directory or hub id (then --out is required), or nothing for equi's default model (SmolLM2-135M-Instruct, the model before any training; --out required).

Suites (--suite, comma-separated or repeated; default: every available one): harmful (expected refuse): advbench, harmbench, jailbreakbench, strongreject, xstest-unsafe; benign (expected comply): xstest-safe, alpaca. All but alpaca ship with equi; alpaca (CC-BY-NC) comes from --data-dir. Group names harmful / benign / xstest work too, a .jsonl file of {"prompt": ..., "expected": "refuse"|"comply"} adds your own suite, and hf:OWNER/NAME[:SPLIT] a hub dataset with those columns.

Metrics: safety = share of harmful prompts not fully complied with (refusal or partial refusal); over-refusal = the same share on benign prompts; balanced = mean(safety, 1 - over-refusal). Rates are per suite and per XSTest type, averaged over suites. Every prompt, answer and label is kept in answers.parquet next to metrics.json.

\b
Example:
    equi eval runs/ama-dpo-ehd-s1 --limit 50
    equi eval --out runs/base/eval --suite xstest --limit 100
    equi eval ./my-model --out evals/my-model --suite harmful,my_suite.jsonl
"""


def register(app: typer.Typer) -> None:
    @app.command("eval", help=HELP, no_args_is_help=False)
    def eval_command(
        target: Optional[str] = typer.Argument(None, help="Run directory, model directory or hub id; omit for the default model."),
        out: Optional[str] = typer.Option(None, "--out", "-o", help="Output directory (default RUN/eval for a run)."),
        suite: Optional[list[str]] = typer.Option(None, "--suite", "-s", help="Suites to run (names, harmful/benign/xstest, or .jsonl files)."),
        limit: Optional[int] = typer.Option(None, "--limit", "-n", help="At most N prompts per suite (spread over XSTest types)."),
        data_dir: Optional[str] = typer.Option(None, "--data-dir", help="A folder laid out like the workspace's shared/data (else $EQUI_DATA_DIR, else ../shared/data beside a checkout); suites it lacks come from the copies shipped with equi."),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Answer length bound (greedy decoding)."),
        batch_size: int = typer.Option(16, "--batch-size", help="Prompts per generation batch."),
        device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or table."),
        as_json: bool = typer.Option(False, "--json", help=JSON_HELP + " The object: out_dir, model, summary, "
                                     "per-suite rates and n, file paths."),
    ) -> None:
        from equi.evaluation import EvalConfig, evaluate

        suites = [part for value in (suite or []) for part in value.split(",") if part.strip()]
        try:
            with reported_errors(), json_output(as_json):
                config = EvalConfig(target=target, out=out, suites=suites, limit=limit, data_dir=data_dir,
                                    max_new_tokens=max_new_tokens, batch_size=batch_size, device=device,
                                    quiet=quiet)
                result = evaluate(config)
        except ImportError as exc:  # the refusal detector or default-model resolver is missing
            fail(f"cannot import {exc.name or exc}: is equi fully installed?", code=1)
        if as_json:
            print_json(metrics_json(result.metrics, result.out_dir))
        elif not quiet:
            print_metrics(result.metrics, result.out_dir)


def metrics_json(metrics: dict, out_dir) -> dict:
    """The ``equi eval --json`` object: the summary and each suite's rates (every answer is in answers.parquet)."""
    keys = ("expected", "n", "refusal_rate", "partial_rate", "compliance_rate")
    return {
        "ok": True,
        "out_dir": str(out_dir),
        "metrics": str(Path(out_dir) / "metrics.json"),
        "answers": str(Path(out_dir) / "answers.parquet"),
        "model": metrics.get("model"),
        "summary": metrics.get("summary", {}),
        "suites": {name: {k: block.get(k) for k in keys} for name, block in metrics.get("suites", {}).items()},
    }


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def print_metrics(metrics: dict, out_dir) -> None:
    from rich.table import Table

    table = Table(title=f"equi eval: {metrics.get('model')}")
    for column in ("suite", "expected", "n", "refuse", "partial", "comply"):
        table.add_column(column, justify="right" if column not in ("suite", "expected") else "left")
    for name, block in metrics["suites"].items():
        table.add_row(name, block["expected"], str(block["n"]), _pct(block["refusal_rate"]),
                      _pct(block["partial_rate"]), _pct(block["compliance_rate"]))
    stdout.print(table)
    s = metrics["summary"]
    stdout.print(f"safety {_pct(s['safety'])} · over-refusal {_pct(s['over_refusal'])} · balanced {_pct(s['balanced'])}")
    stdout.print(f"answers and labels: {out_dir}/answers.parquet · metrics: {out_dir}/metrics.json")
