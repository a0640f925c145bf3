"""The run directory of ``equi train``, and the one sequence every runner ends with (:func:`fit`).

A run directory (file names in :mod:`equi.schema`)::

    runs/NAME/
      config.json      TrainConfig, its hash, the mix path and its manifest hash, library versions
      metrics.jsonl    one JSON object per logging step (loss, rewards/margins, ama/masked_fraction, λ ...)
      checkpoint-N/    Trainer checkpoints (``--resume`` continues from the last one); removed once the run has
                       finished (:func:`remove_checkpoints`) unless ``--keep-checkpoints``
      final/           the trained model and tokenizer (safetensors, ``from_pretrained``-loadable), in the dtype
                       it was trained in (recorded in its config.json and in summary.json)
      summary.json     what the run did, in numbers
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from equi.config import ConfigError
from equi.models import save_model_atomic
from equi.schema import FINAL_DIR, METRICS_FILE, RUN_CONFIG, RUN_SUMMARY, TRAIN_CONFIG_KEY
from train.config import TrainConfig, normalised_settings

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    final_dir: Path
    steps: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


# ---- config.json -------------------------------------------------------------------------------------------------


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
    config_path = run_dir / RUN_CONFIG
    if config.resume:
        if not config_path.is_file():
            raise ConfigError(f"--resume: {run_dir} is not a run directory (no {RUN_CONFIG})")
        saved = json.loads(config_path.read_text())
        if saved.get("config_hash") != config.hash() or saved.get("mix_manifest_hash") != mix_hash:
            what = ", ".join(run_differences(saved, config, mix_hash)) or "the settings"
            raise ConfigError(f"--resume: {what} differ from the run in {run_dir}; "
                              "resume with the run's settings, or use a new --out")
        if (run_dir / RUN_SUMMARY).is_file() and (run_dir / FINAL_DIR).is_dir():
            raise ConfigError(f"--resume: the run in {run_dir} already finished ({FINAL_DIR}/ and {RUN_SUMMARY} are "
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


def remove_unstarted_run(run_dir: Path, existed: bool) -> None:
    """A new run that failed before saving any checkpoint (a model that will not load, a bad setting found while
    preparing the data) leaves nothing behind, so the same command can be run again once the cause is fixed."""
    if any(run_dir.rglob("checkpoint-*")) or (run_dir / FINAL_DIR).exists() or read_metrics(run_dir):
        return  # it trained: what it logged and saved stays, for a look or a --resume
    if existed:
        for child in run_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    else:
        shutil.rmtree(run_dir, ignore_errors=True)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    (run_dir / RUN_SUMMARY).write_text(json.dumps(summary, indent=2, default=float))


# ---- metrics.jsonl -----------------------------------------------------------------------------------------------


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append one record to a run's ``metrics.jsonl`` (``path``: that file)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=float) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def keep_metrics(run_dir: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite ``metrics.jsonl`` with only the records ``keep`` accepts (atomically)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and keep(json.loads(line))]
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(partial, path)


# ---- checkpoints -------------------------------------------------------------------------------------------------


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


def remove_checkpoints(run_dir: Path) -> int:
    """Delete a finished run's ``checkpoint-N`` folders (a ``dual`` run's are in its ``round-K/``, which go too once
    empty); returns the bytes freed.

    A checkpoint holds the weights and the optimiser state (Adam: two more copies of the weights), so three times
    ``final/``; it is only needed to ``--resume`` an unfinished run. Called once ``final/`` and ``summary.json``
    are written: a run killed before then still has them.
    """
    run_dir = Path(run_dir)
    freed = 0
    for checkpoint in sorted([*run_dir.glob("checkpoint-*"), *run_dir.glob("round-*/checkpoint-*")]):
        if not checkpoint.is_dir() or checkpoint.is_symlink():
            continue
        freed += sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(checkpoint)
    for round_dir in run_dir.glob("round-*"):
        if round_dir.is_dir() and not any(round_dir.iterdir()):
            round_dir.rmdir()
    return freed


def checkpoint_step(checkpoint: Path | None) -> int:
    """The optimiser step a checkpoint was saved at (0 for none)."""
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] if checkpoint else 0


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


# ---- training and final/ -----------------------------------------------------------------------------------------


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


def save_final(trainer, tokenizer, run_dir: Path) -> Path:
    """Save ``final/`` as a plain model: LoRA adapters are merged so ``from_pretrained`` needs no PEFT.

    The weights keep the dtype they were trained in (fp32 on a CPU, bf16 where the GPU supports it), which
    ``config.json`` records; written beside and renamed (:func:`equi.models.save_model_atomic`), so a kill during
    the save never leaves a ``final/`` that looks finished.
    """
    final_dir = run_dir / FINAL_DIR
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if trainer.accelerator.is_main_process:
        save_model_atomic(model, tokenizer, final_dir)
        from train.card import write_model_card

        write_model_card(run_dir)  # written again once summary.json is there (train.run), and by equi eval
    return final_dir


def trained_dtype(model) -> str:
    """The dtype a model's weights were trained in (``"float32"``, ``"bfloat16"``): the one ``final/`` holds."""
    return str(model.dtype).removeprefix("torch.")


def fit(trainer, tokenizer, run_dir: Path, checkpoint: Path | None, rows: dict[str, Any],
        details: Callable[[], dict[str, Any]] = dict) -> RunResult:
    """Train (resuming from ``checkpoint``, see :func:`resume_checkpoint`), save ``final/``, describe the run.

    The summary: ``rows`` (what was trained on), the steps, the checkpoint resumed from, the mean training loss,
    then ``details()``: called after training and before ``final/`` is saved (saving merges LoRA adapters into
    the model, so an evaluation belongs there). A runner may add more to ``summary`` once ``final/`` is saved.
    """
    train_loss = train_from(trainer, checkpoint, run_dir)
    extra = details()
    final_dir = save_final(trainer, tokenizer, run_dir)
    summary = {
        **rows,
        "steps": trainer.state.global_step,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "train_loss": train_loss,
        "dtype": trained_dtype(trainer.model),
        **extra,
    }
    return RunResult(run_dir, final_dir, trainer.state.global_step, summary=summary)
