"""One ``equi train`` run: verify the mix, build the TRL trainer for ``--algo``, write the run directory.

A run directory::

    runs/NAME/
      config.json      TrainConfig, its hash, the mix path and its manifest hash, library versions
      metrics.jsonl    one JSON object per logging step (loss, rewards/margins, ama/masked_fraction, λ ...)
      checkpoint-N/    Trainer checkpoints (``--resume`` continues from the last one)
      final/           the trained model and tokenizer (safetensors, ``from_pretrained``-loadable)
      summary.json     what the run did, in numbers
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from equi.cache import cache_dir
from equi.config import ConfigError
from equi.progress import no_library_deprecations, quiet_transformers
from equi.schema import RUN_CONFIG, RUN_SUMMARY, TRAIN_CONFIG_KEY
from train.config import OFFLINE_ALGOS, ONLINE_ALGOS, SCORER_ALGOS, TrainConfig, normalised_settings
from train.mixdata import MixError, group_sizes, load_split, manifest_hash, verify_mix_or_raise
from train.models import bf16_supported, load_causal_lm, load_tokenizer, lora_config, resolve_model

logger = logging.getLogger(__name__)

CONFIG_FILE = RUN_CONFIG
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = RUN_SUMMARY
FINAL_DIR = "final"


@dataclass
class RunResult:
    run_dir: Path
    final_dir: Path
    steps: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def metrics_callback(path: Path, extra: dict[str, Any] | None = None):
    """A ``TrainerCallback`` that appends every log record to ``metrics.jsonl`` (``extra`` is merged in, e.g. λ)."""
    from transformers import TrainerCallback

    class MetricsToJsonl(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            record = {"step": state.global_step, "epoch": state.epoch, **logs, **(extra or {})}
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, default=float) + "\n")

    return MetricsToJsonl()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_checkpoint(run_dir: Path) -> Path | None:
    """The latest *complete* ``checkpoint-N`` of a run: one a kill interrupted mid-save (no trainer state or no
    weights yet) is skipped, with a warning, for the one before it."""
    def number(path: Path) -> str:
        return path.name.removeprefix("checkpoint-")

    found = sorted((p for p in Path(run_dir).glob("checkpoint-*") if p.is_dir() and number(p).isdigit()),
                   key=lambda p: int(number(p)), reverse=True)
    for checkpoint in found:
        if (checkpoint / "trainer_state.json").is_file() and any(checkpoint.glob("*.safetensors")):
            return checkpoint
        logger.warning("%s was not saved completely (a kill during the save?); resuming from an earlier one", checkpoint)
    return None


def resume_checkpoint(config: TrainConfig, run_dir: Path) -> Path | None:
    """With ``--resume``, the checkpoint to continue from; ``metrics.jsonl`` loses what was logged after it.

    The steps after the checkpoint run again, and their records would otherwise appear twice.
    """
    if not config.resume:
        return None
    checkpoint = last_checkpoint(run_dir)
    step = checkpoint_step(checkpoint)
    keep_metrics(run_dir, lambda record: record.get("step", 0) <= step)
    return checkpoint


def train_from(trainer, checkpoint: Path | None, run_dir: Path) -> float | None:
    """``trainer.train``, resuming from ``checkpoint``; returns the mean training loss of the whole run.

    A checkpoint saved at the run's last step (killed before ``final/``) is restored, not trained from:
    transformers would run one step past ``max_steps`` when resuming from it. The loss is then, as after any
    resume, the mean of the per-step losses in ``metrics.jsonl`` (the trainer's own covers only this session).
    """
    if checkpoint is not None:
        from transformers import TrainerState

        state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
        if 0 < state.max_steps <= state.global_step:
            trainer._load_from_checkpoint(str(checkpoint))
            trainer.state = state
        else:
            trainer.train(resume_from_checkpoint=str(checkpoint))
        losses = [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
        return sum(losses) / len(losses) if losses else None
    return trainer.train().training_loss


def checkpoint_step(checkpoint: Path | None) -> int:
    """The optimiser step a checkpoint was saved at (0 for none)."""
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] if checkpoint else 0


def keep_metrics(run_dir: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite ``metrics.jsonl`` with only the records ``keep`` accepts (atomically)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and keep(json.loads(line))]
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(partial, path)


def run_differences(record: dict, config: TrainConfig, mix_hash: str) -> list[str]:
    """What ``config`` would train that differs from the run whose ``config.json`` is ``record`` ([] = the same):
    each setting as ``--max-steps 20 (run: 10)``, and the mix by its manifest hash.

    Both sides go through :meth:`TrainConfig.training_settings`'s selection and normalisation; a setting the run
    predates counts at its default, and JSON round trips make tuples and lists, or 1 and 1.0, compare as saved.
    """
    now = json.loads(json.dumps(config.training_settings(), default=str))
    saved = {**TrainConfig.defaults(), **(record.get(TRAIN_CONFIG_KEY) or {})}
    before = normalised_settings(json.loads(json.dumps(saved, default=str)))
    parts = [f"--{key.replace('_', '-')} {now[key]!r} (run: {before.get(key)!r})"
             for key in sorted(now) if before.get(key) != now[key]]  # a setting no longer known is not compared
    if record.get("mix_manifest_hash") != mix_hash:
        parts.append("the mix (its manifest hash is not the run's: another mix, or this one changed)")
    return parts


def prepare_run_dir(config: TrainConfig, mix_hash: str) -> Path:
    """Create (or, with ``resume``, re-open) the run directory and write ``config.json``."""
    run_dir = Path(config.out)
    config_path = run_dir / CONFIG_FILE
    if config.resume:
        if not config_path.is_file():
            raise ConfigError(f"--resume: {run_dir} is not a run directory (no {CONFIG_FILE})")
        saved = json.loads(config_path.read_text())
        if saved.get("config_hash") != config.hash() or saved.get("mix_manifest_hash") != mix_hash:
            what = ", ".join(run_differences(saved, config, mix_hash)) or "the settings"
            raise ConfigError(f"--resume: {what} differ from the run in {run_dir}; "
                              "resume with the run's settings, or use a new --out")
        if (run_dir / SUMMARY_FILE).is_file() and (run_dir / FINAL_DIR).is_dir():
            raise ConfigError(f"--resume: the run in {run_dir} already finished ({FINAL_DIR}/ and {SUMMARY_FILE} are "
                              "there); nothing was changed. Train again with a new --out")
        return run_dir
    if config_path.is_file() or (run_dir.is_dir() and any(run_dir.iterdir())):
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    import torch
    import transformers
    import trl

    record = {
        TRAIN_CONFIG_KEY: config.to_dict(),
        "config_hash": config.hash(),
        "mix": str(Path(config.mix).resolve()),
        "mix_manifest_hash": mix_hash,
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    config_path.write_text(json.dumps(record, indent=2, default=str))
    return run_dir


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


def load_policy(config: TrainConfig, weights: str | Path | None = None):
    """The policy and its tokenizer, from ``--model`` or the bundled default; ``weights``: a folder to take the
    policy's weights from instead (a ``dual`` round's saved policy), the tokenizer still ``--model``'s."""
    import torch

    path = resolve_model(config.model, quiet=config.quiet)
    tokenizer = load_tokenizer(path, trust_remote_code=config.trust_remote_code)
    dtype = torch.bfloat16 if bf16_supported() else torch.float32
    model = load_causal_lm(str(weights or path), dtype=dtype, trust_remote_code=config.trust_remote_code)
    return path, model, tokenizer


def peft_config_for(config: TrainConfig):
    return lora_config(config.lora_r) if config.lora_r else None


def save_final(trainer, tokenizer, run_dir: Path) -> Path:
    """Save ``final/`` as a plain model: LoRA adapters are merged so ``from_pretrained`` needs no PEFT."""
    final_dir = run_dir / FINAL_DIR
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if trainer.accelerator.is_main_process:
        model.save_pretrained(final_dir, safe_serialization=True)
        tokenizer.save_pretrained(final_dir)
    return final_dir


def load_pairs(config: TrainConfig, manifest: dict[str, Any]):
    """The train and eval pairs of the mix after ``--scale`` / ``--groups``; a one-line error when none are left."""
    train = load_split(config.mix, "train", config.scale, config.groups, need_pairs=True, manifest=manifest,
                       skip_images=config.skip_images)
    if len(train.dataset) == 0:
        why = ", ".join(f"{n} {reason}" for reason, n in train.dropped.items()) or "the split is empty"
        raise MixError(f"mix {config.mix} has no preference pairs to train {config.algo} on ({why})")
    evaluation = load_split(config.mix, "eval", None, config.groups, need_pairs=True, manifest=manifest,
                            skip_images=config.skip_images)
    return train, evaluation


def _checkpointing_arg() -> str:
    """transformers 5 renamed ``gradient_checkpointing`` to ``activation_checkpointing`` (the old name warns)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def quiet_trainer(trainer, quiet: bool):
    """Under ``--quiet`` drop the callback transformers adds to print every log dict when tqdm is off."""
    if quiet:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def train(config: TrainConfig) -> RunResult:
    """Run ``equi train`` for ``config``; returns where the model went and the logged metrics."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if config.quiet:
        import datasets

        datasets.disable_progress_bars()
    if config.resume and config.algo == "dual" and config.lora_r:
        raise ConfigError("--resume does not continue --algo dual runs with --lora-r yet (their rounds would start "
                          "again); train again with a new --out")
    manifest = verify_mix_or_raise(config.mix)
    mix_hash = manifest_hash(config.mix)
    existed = Path(config.out).exists()
    run_dir = prepare_run_dir(config, mix_hash)
    try:
        with quiet_transformers(config.quiet), no_library_deprecations(config.quiet):
            result = _run_algo(config, manifest, run_dir)
    except Exception:
        if not config.resume:
            _remove_unstarted_run(run_dir, existed)
        raise
    (run_dir / SUMMARY_FILE).write_text(json.dumps(result.summary, indent=2, default=float))
    result.metrics = read_metrics(run_dir)
    return result


def _remove_unstarted_run(run_dir: Path, existed: bool) -> None:
    """A new run that failed before saving any checkpoint (a model that will not load, a bad setting found while
    preparing the data) leaves nothing behind, so the same command can be run again once the cause is fixed."""
    import shutil

    if any(run_dir.rglob("checkpoint-*")) or (run_dir / FINAL_DIR).exists() or read_metrics(run_dir):
        return  # it trained: what it logged and saved stays, for a look or a --resume
    if existed:
        for child in run_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    else:
        shutil.rmtree(run_dir, ignore_errors=True)


def _run_algo(config: TrainConfig, manifest: dict[str, Any], run_dir: Path) -> RunResult:
    started = time.time()
    if config.algo in OFFLINE_ALGOS and config.algo != "dual":
        result = run_dpo(config, manifest, run_dir)
    elif config.algo == "dual":
        from train.dual import run_dual

        result = run_dual(config, manifest, run_dir)
    elif config.algo in ONLINE_ALGOS:
        from train.online import run_online

        result = run_online(config, manifest, run_dir)
    elif config.algo in SCORER_ALGOS:
        from train.scorers import run_scorer_training

        result = run_scorer_training(config, manifest, run_dir)
    else:  # pragma: no cover - TrainConfig validates algo
        raise ConfigError(f"unknown algo {config.algo}")
    result.summary.update({"algo": config.algo, "seconds": round(time.time() - started, 1), "run_dir": str(run_dir)})
    return result


def build_dpo_trainer(
    config: TrainConfig,
    model,
    tokenizer,
    train_dataset,
    eval_dataset,
    run_dir: Path,
    callbacks: list | None = None,
    ref_model=None,
):
    """An ``AmaDPOTrainer`` (masks on for ``ama-dpo``, off for ``dpo`` and the dual loop's plain rounds)."""
    from trl import DPOConfig

    from train.ama_dpo import AmaDPOTrainer

    precompute = precompute_pays(config, len(train_dataset))
    args = DPOConfig(
        **trl_common_kwargs(config, run_dir),
        beta=config.beta,
        loss_type=[config.loss_type],
        max_length=config.max_length,
        precompute_ref_log_probs=precompute,
        eval_strategy="no",
    )
    return quiet_trainer(AmaDPOTrainer(
        model,
        ref_model=ref_model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if eval_dataset is not None and len(eval_dataset) else None,
        processing_class=tokenizer,
        peft_config=peft_config_for(config),
        callbacks=callbacks,
        use_ama_masks=config.algo == "ama-dpo",
        group_weights=config.group_weights,
        ref_cache_dir=cache_dir() / "ref_logps" if precompute else None,
    ), config.quiet)


def precompute_pays(config: TrainConfig, train_rows: int) -> bool:
    """Whether to precompute reference log-probs (and use the cross-run cache) rather than compute them live.

    Precomputing costs one reference pass over every train row before the first step; a ``--max-steps`` run
    that sees fewer rows than the split holds (a quick try on a large mix) pays less computing them live for
    the rows it sees.
    """
    if not config.precompute_ref or config.max_steps is None:
        return config.precompute_ref
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return config.max_steps * config.batch_size * config.grad_accum * world >= train_rows


def run_dpo(config: TrainConfig, manifest: dict[str, Any], run_dir: Path) -> RunResult:
    train_split, eval_split = load_pairs(config, manifest)
    _, model, tokenizer = load_policy(config)
    trainer = build_dpo_trainer(
        config,
        model,
        tokenizer,
        train_split.dataset,
        eval_split.dataset,
        run_dir,
        callbacks=[metrics_callback(run_dir / METRICS_FILE)],
    )
    checkpoint = resume_checkpoint(config, run_dir)
    train_loss = train_from(trainer, checkpoint, run_dir)
    # evaluate() logs through the metrics callback, so its numbers land in metrics.jsonl too.
    eval_metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
    final_dir = save_final(trainer, tokenizer, run_dir)
    summary = {
        "train_rows": len(train_split.dataset),
        # The pairs trained on (after TRL dropped those whose prompt alone exceeds --max-length): the report's x.
        **group_sizes(trainer.train_dataset),
        "mix_rows": train_split.total_rows,
        "rows_left_out": train_split.dropped,
        "eval_rows": len(eval_split.dataset),
        "steps": trainer.state.global_step,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "train_loss": train_loss,
        "ama_unaligned_rows": trainer.ama_unaligned_rows,
        "rows_dropped_prompt_too_long": trainer.rows_dropped_too_long,
        "ref_log_probs": ("precomputed" if trainer.args.precompute_ref_log_probs
                          else "live (--max-steps sees fewer rows)" if config.precompute_ref
                          else "live (precompute_ref off)"),
        "ref_cache_hits": trainer.ref_cache_hits.get("train", 0),
        **{k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))},
    }
    return RunResult(run_dir, final_dir, trainer.state.global_step, summary=summary)
