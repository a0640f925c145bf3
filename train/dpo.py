"""``--algo dpo`` and ``--algo ama-dpo``: one DPO run on the mix's pairs with :class:`train.ama_dpo.AmaDPOTrainer`
(the dual loop's rounds use the same trainer, :func:`build_dpo_trainer`).

Imported only when a run needs it (:data:`train.run.RUNNERS`), so TRL is imported at the top.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trl import DPOConfig

from equi.cache import cache_dir
from equi.schema import METRICS_FILE
from train.ama_dpo import AmaDPOTrainer
from train.config import TrainConfig
from train.mixdata import group_sizes, load_pairs
from train.models import load_policy
from train.rundir import RunResult, fit, resume_checkpoint
from train.trl_setup import metrics_callback, peft_config_for, quiet_trainer, trl_common_kwargs


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
    precompute = precompute_pays(config, len(train_dataset))
    args = DPOConfig(
        **trl_common_kwargs(config, run_dir),
        beta=config.beta,
        loss_type=[config.loss_type],
        max_length=config.max_length,
        truncation_mode=config.truncation_mode,
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

    def details() -> dict[str, Any]:
        # evaluate() logs through the metrics callback, so its numbers land in metrics.jsonl too.
        eval_metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
        return {
            "ama_unaligned_rows": trainer.ama_unaligned_rows,
            "rows_dropped_prompt_too_long": trainer.rows_dropped_too_long,
            "ref_log_probs": ("precomputed" if trainer.args.precompute_ref_log_probs
                              else "live (--max-steps sees fewer rows)" if config.precompute_ref
                              else "live (precompute_ref off)"),
            "ref_cache_hits": trainer.ref_cache_hits.get("train", 0),
            **{k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))},
        }

    rows = {
        "train_rows": len(train_split.dataset),
        # The pairs trained on (after TRL dropped those whose prompt alone exceeds --max-length): the report's x.
        **group_sizes(trainer.train_dataset),
        "mix_rows": train_split.total_rows,
        "rows_left_out": train_split.dropped,
        "eval_rows": len(eval_split.dataset),
    }
    return fit(trainer, tokenizer, run_dir, checkpoint, rows, details)
