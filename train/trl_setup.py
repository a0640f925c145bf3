"""What every TRL trainer of a run is set up with: its training arguments, LoRA, quiet output, metrics logging.

transformers and torch are imported inside the functions, so that importing a runner stays cheap until it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from train.config import TrainConfig
from equi.models import bf16_supported, lora_config
from train.rundir import append_metrics


def trl_common_kwargs(config: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """TrainingArguments shared by every TRL config, with values that are sane on a CPU as on a GPU.

    TRL defaults to bf16, gradient checkpointing and ``logging_steps=10``; on a small CPU run those are slow,
    unsupported or silent, so equi sets them from the device and the user's flags.
    """
    import torch

    use_bf16 = bf16_supported()
    return {
        "output_dir": str(run_dir),
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "learning_rate": config.lr,
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps if config.max_steps is not None else -1,
        "seed": config.seed,
        "data_seed": config.seed,
        "logging_steps": config.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": config.save_steps,
        "save_total_limit": 2,
        "report_to": "none",
        "bf16": use_bf16,
        "fp16": False,
        _checkpointing_arg(): False,  # TRL's configs turn it on; a 135M model on a CPU only pays its extra time
        "disable_tqdm": config.quiet,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": torch.cuda.is_available(),
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": 0,
    }


def _checkpointing_arg() -> str:
    """transformers 5 renamed ``gradient_checkpointing`` to ``activation_checkpointing`` (the old name warns)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def peft_config_for(config: TrainConfig):
    return lora_config(config.lora_r) if config.lora_r else None


def quiet_trainer(trainer, quiet: bool):
    """Under ``--quiet`` drop the callback transformers adds to print every log dict when tqdm is off."""
    if quiet:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def metrics_callback(path: Path, extra: dict[str, Any] | None = None):
    """A ``TrainerCallback`` that appends every log record to ``metrics.jsonl`` (``extra`` is merged in, e.g. λ)."""
    from transformers import TrainerCallback

    class MetricsToJsonl(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            append_metrics(path, {"step": state.global_step, "epoch": state.epoch, **logs, **(extra or {})})

    return MetricsToJsonl()
