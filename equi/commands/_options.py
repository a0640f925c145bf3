"""Training options shared by ``equi train`` and ``equi scale``, defined once, their help showing the defaults of
:class:`train.config.TrainConfig` (the one place they are set)."""

from __future__ import annotations

import dataclasses
from typing import Any

import typer

from train.config import TrainConfig

#: Option help, by TrainConfig field; the default is added from the dataclass.
TRAINING_HELP = {
    "max_steps": "Stop after this many optimiser steps",
    "epochs": "Epochs over the train split",
    "batch_size": "Pairs (or prompts x generations) per device step",
    "grad_accum": "Gradient accumulation steps",
    "lr": "Learning rate",
    "beta": "DPO temperature; online: KL coefficient to the reference",
    "seed": "Random seed",
    "max_length": "Max tokens of prompt+response",
    "truncation_mode": "keep_start cuts a long pair's end (a prompt alone over --max-length drops its pair); "
                       "keep_end cuts its start (first turns, system prompt): no pair is dropped",
    "loss_type": "TRL DPO loss type",
    "lora_r": "LoRA rank; 0 = full fine-tuning (needs equi\\[lora])",
    "lambda_init": "Initial Lagrange multiplier λ",
    "lambda_lr": "Dual step size η",
    "lambda_max": "Upper clip of λ",
    "cost_threshold": "Constraint bound b in E\\[C] <= b",
    "lambda_update_every": "PPO-Lag: update λ every K steps",
    "lambda_warmup_steps": "PPO-Lag: steps before the first λ update",
    "rounds": "dual: rounds of policy update + dual descent",
    "num_generations": "Online: completions per prompt",
    "max_completion_length": "Online: tokens generated per completion",
    "save_steps": "Checkpoint every N steps",
}


def train_default(name: str) -> Any:
    """``TrainConfig``'s default for the field ``name``."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def default_text(name: str) -> str:
    value = train_default(name)
    if value is None and name == "max_steps":
        return "\\[default: one pass of --epochs]"
    return f"\\[default: {value}]"


def training_option(name: str) -> Any:
    """A ``--name`` option defaulting to ``None`` (so a ``--config`` file, a resumed run or equi scale's plan can
    fill it), its help ending in TrainConfig's default."""
    return typer.Option(None, f"--{name.replace('_', '-')}", help=f"{TRAINING_HELP[name]} {default_text(name)}.")


def keep_checkpoints_option() -> Any:
    """``--keep-checkpoints``: by default a finished run keeps only ``final/`` (see ``TrainConfig.keep_checkpoints``)."""
    return typer.Option(False, "--keep-checkpoints",
                        help="Leave the checkpoint-N folders (weights and optimiser state, about 3x the model each) "
                             "once a run has finished; by default they exist only while it runs, for --resume.")
