"""``equi scale``: a data-scaling ladder (train + eval per group and scale) for ``equi report``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from equi.commands._console import console, fail, reported_errors
from equi.commands._options import default_text, keep_checkpoints_option, training_option

HELP = """Train one run per (group, scale) on nested subsets of a mix, evaluate each, and the untrained baseline.

Scales are fractions of the mix's ranked rows (0.1 = the 10% with the lowest rank, which keep the mixture's group ratios) or whole numbers of ranked rows. With --groups, each group gets its own ladder trained on that group's safety pairs plus the BENIGN share; without it every rung trains on all groups. Run directories go under --out as ALGO-GROUP-sSCALE/ with config.json (equi train), ladder.json (mix, scale, group, number of safety pairs) and eval/ (equi eval), and the untrained model is evaluated once into --out/baseline/. Finished rungs are kept, so re-running continues; a re-run whose settings, mix or model differ from the rungs (or baseline) already in --out stops before training and names what differs: use a new --out.

\b
Example:
    equi scale --mix mix/ --scales 0.1,0.3,1.0 --groups EHD,IHD,MHD --out runs/ --eval-limit 50
    equi report --runs runs/ --mix mix/ --out report/
"""


def _split(values: Optional[list[str]]) -> list[str]:
    return [part.strip() for value in (values or []) for part in value.split(",") if part.strip()]


def register(app: typer.Typer) -> None:
    @app.command("scale", help=HELP)
    def scale_command(
        mix: Path = typer.Option(..., "--mix", "-m", help="Mix directory written by `equi curate`."),
        scales: str = typer.Option("0.1,0.3,1.0", "--scales", help="Fractions in (0,1] or whole numbers of ranked rows."),
        groups: Optional[str] = typer.Option(None, "--groups", help="One ladder per group, e.g. EHD,IHD,MHD \\[default: all together]."),
        out: Path = typer.Option(Path("runs"), "--out", "-o", help="Directory receiving one run directory per rung."),
        algo: Optional[str] = typer.Option(None, "--algo", help=f"Training algorithm (see equi train --help) "
                                                              f"{default_text('algo')}."),
        model: Optional[str] = typer.Option(None, "--model", help="Hub id or path \\[default: SmolLM2-135M-Instruct]."),
        max_steps: Optional[int] = training_option("max_steps"),
        epochs: Optional[float] = training_option("epochs"),
        batch_size: Optional[int] = training_option("batch_size"),
        lr: Optional[float] = training_option("lr"),
        beta: Optional[float] = training_option("beta"),
        seed: Optional[int] = training_option("seed"),
        lora_r: Optional[int] = training_option("lora_r"),
        max_length: Optional[int] = training_option("max_length"),
        truncation_mode: Optional[str] = training_option("truncation_mode"),
        save_steps: Optional[int] = training_option("save_steps"),
        keep_checkpoints: bool = keep_checkpoints_option(),
        train_config: Optional[Path] = typer.Option(
            None, "--train-config",
            help="YAML of any other equi train options for every rung (severity_weights, group_weights, lambda_lr, "
                 "num_generations, ...; snake_case keys, as equi train --config)."),
        no_eval: bool = typer.Option(False, "--no-eval", help="Train only; evaluate later with equi eval."),
        no_baseline: bool = typer.Option(False, "--no-baseline", help="Do not evaluate the untrained model."),
        suite: Optional[list[str]] = typer.Option(None, "--suite", help="Eval suites (see equi eval --help) \\[default: all]."),
        eval_limit: Optional[int] = typer.Option(50, "--eval-limit", help="Prompts per suite in each eval."),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Answer length bound in eval."),
        data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Shared data directory for the eval suites."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    ) -> None:
        from equi.ladder import ScaleConfig, parse_scales, run_ladder

        options = _train_options(train_config, max_length=max_length, truncation_mode=truncation_mode, save_steps=save_steps,
                                 keep_checkpoints=keep_checkpoints or None)
        with reported_errors():
            training = {"algo": algo, "max_steps": max_steps, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                        "beta": beta, "seed": seed, "lora_r": lora_r}  # None: TrainConfig's default
            config = ScaleConfig(mix=str(mix), scales=parse_scales(scales), groups=_split([groups]) if groups else None,
                                 out=str(out), model=model, **{k: v for k, v in training.items() if v is not None},
                                 evaluate=not no_eval, baseline=not no_baseline, suites=_split(suite),
                                 eval_limit=eval_limit, max_new_tokens=max_new_tokens, data_dir=data_dir, quiet=quiet,
                                 train_options=options)
            result = run_ladder(config)
        if not quiet:
            for note in result.notes:
                console.print(f"note: {note}")
            console.print(f"{len(result.rungs)} rungs in {result.out_dir}; next: "
                          f"equi report --runs {result.out_dir} --mix {mix} --out report/")


#: Options every rung gets from equi scale itself (its own flags, or the ladder's plan), not from --train-config.
_SET_BY_SCALE = ("mix", "out", "scale", "groups", "resume", "quiet", "algo", "model", "max_steps", "epochs",
                 "batch_size", "lr", "beta", "seed", "lora_r")


def _train_options(path: Optional[Path], **flags: Any) -> dict[str, Any]:
    """``--train-config`` YAML plus the training flags given; flags win."""
    from equi.commands.train import _load_config_file

    options = _load_config_file(path) if path is not None else {}
    clash = sorted(set(options) & set(_SET_BY_SCALE))
    if clash:
        fail(f"--train-config {path}: set {', '.join(clash)} with equi scale's own flags (or its ladder plan)", code=2)
    return {**options, **{k: v for k, v in flags.items() if v is not None}}
