"""Reward and cost models: trained with TRL's ``RewardTrainer`` on the mix, used by the online stage.

- ``--algo reward-model``: the mix's preferences as they are (chosen ranked above rejected).
- ``--algo cost-model``: each pair re-ordered by the mix's ``*_cost`` (severity-scaled), the costlier — less
  safe — response ranked higher, so the model's score grows with harm. Pairs whose two costs are equal say nothing
  about safety and are left out (counted in the summary). A pairwise ranking loss fixes only differences, so the
  score's zero is arbitrary; TRL's ``center_rewards_coefficient`` pulls the mean score towards 0, which makes
  "cost > 0 violates" usable for RePO / PPO-Lag, but ``--cost-threshold`` should be read on the model's scale.

Both save a sequence-classification checkpoint (one output) in ``final/``; :class:`ModelScorer` loads one and
scores (prompt, completion) pairs, rendered with the model's chat template when it has one — the same way
``RewardTrainer`` rendered the training pairs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from equi.messages import answer_text, prompt_text
from equi.schema import METRICS_FILE
from train.lagrangian import severity_scaled_costs
from train.mixdata import MixError, as_messages, chat_format, load_pairs
from equi.models import bf16_supported, check_is_scorer, load_sequence_classifier, load_tokenizer, resolve_model
from train.rundir import RunResult, fit, resume_checkpoint
from train.trl_setup import metrics_callback, peft_config_for, quiet_trainer, trl_common_kwargs

#: TRL's ``center_rewards_coefficient`` (the value its docs suggest): keeps scores near 0 on average.
CENTER_REWARDS = 0.01


def cost_ordered_pairs(dataset, severity_weights: dict[str, float]):
    """Pairs ordered for the cost model (costlier response as ``chosen``), and how many were left out as ties."""
    chosen_costs = severity_scaled_costs(dataset["chosen_cost"], dataset["severity"], severity_weights)
    rejected_costs = severity_scaled_costs(dataset["rejected_cost"], dataset["severity"], severity_weights)
    swap = [cr > cc for cc, cr in zip(chosen_costs, rejected_costs)]
    keep = [i for i, (cc, cr) in enumerate(zip(chosen_costs, rejected_costs)) if cc != cr]

    def order(row, index):
        if swap[index]:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
        return row

    ordered = dataset.map(order, with_indices=True, desc="Ordering pairs by cost").select(keep)
    return ordered, len(dataset) - len(keep)


def _preference_rows(dataset, tokenizer):
    return chat_format(dataset.select_columns(["prompt", "chosen", "rejected"]), tokenizer)


def run_scorer_training(config, manifest: dict[str, Any], run_dir: Path) -> RunResult:
    """``equi train --algo reward-model|cost-model``: a ``RewardTrainer`` run saving the classifier in ``final/``."""
    import torch
    from trl import RewardConfig, RewardTrainer

    train_split, eval_split = load_pairs(config, manifest)
    pairs, ties = train_split.dataset, 0
    if config.algo == "cost-model":
        pairs, ties = cost_ordered_pairs(pairs, config.severity_weights)
        if len(pairs) == 0:
            raise MixError(f"mix {config.mix} has no pairs whose costs differ: nothing to train a cost model on")
    path = resolve_model(config.model, quiet=config.quiet)
    tokenizer = load_tokenizer(path, trust_remote_code=config.trust_remote_code)
    model = load_sequence_classifier(path, dtype=torch.bfloat16 if bf16_supported() else torch.float32,
                                     trust_remote_code=config.trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id
    args = RewardConfig(
        **trl_common_kwargs(config, run_dir),
        max_length=config.max_length,
        center_rewards_coefficient=CENTER_REWARDS if config.algo == "cost-model" else None,
        eval_strategy="no",
    )
    trainer = RewardTrainer(
        model,
        args=args,
        train_dataset=_preference_rows(pairs, tokenizer),
        processing_class=tokenizer,
        peft_config=peft_config_for(config),
        callbacks=[metrics_callback(run_dir / METRICS_FILE)],
    )
    quiet_trainer(trainer, config.quiet)
    checkpoint = resume_checkpoint(config, run_dir)
    rows = {"train_pairs": len(pairs), "pairs_left_out_equal_cost": ties, "rows_left_out": train_split.dropped}
    result = fit(trainer, tokenizer, run_dir, checkpoint, rows, lambda: {"scorer": config.algo})
    if len(eval_split.dataset):
        eval_pairs = eval_split.dataset
        if config.algo == "cost-model":
            eval_pairs, _ = cost_ordered_pairs(eval_pairs, config.severity_weights)
        if len(eval_pairs):
            scorer = ModelScorer.from_loaded(trainer.accelerator.unwrap_model(trainer.model), tokenizer)
            high = scorer(eval_pairs["prompt"], eval_pairs["chosen"])
            low = scorer(eval_pairs["prompt"], eval_pairs["rejected"])
            result.summary["eval_pairwise_accuracy"] = sum(h > l for h, l in zip(high, low)) / len(high)
    return result


class ModelScorer:
    """A sequence-classification checkpoint as a ``(prompts, completions) -> scores`` function."""

    def __init__(self, path: str, trust_remote_code: bool = False, batch_size: int = 8):
        check_is_scorer(path, trust_remote_code)
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        model = load_sequence_classifier(path, trust_remote_code=trust_remote_code)
        self._init(model, tokenizer, batch_size)

    @classmethod
    def from_loaded(cls, model, tokenizer, batch_size: int = 8) -> "ModelScorer":
        scorer = cls.__new__(cls)
        scorer._init(model, tokenizer, batch_size)
        return scorer

    def _init(self, model, tokenizer, batch_size: int) -> None:
        import torch

        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.device = next(model.parameters()).device
        if not any(p.is_cuda for p in model.parameters()) and torch.cuda.is_available():
            self.model.to("cuda")
            self.device = torch.device("cuda")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = tokenizer.pad_token_id

    def render(self, prompt: str | list[dict], completion: str | list[dict]) -> str:
        """A prompt and completion, as text or as conversational messages (a mix's rows), rendered for the model."""
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                as_messages(prompt, "user") + as_messages(completion, "assistant"), tokenize=False)
        return prompt_text(prompt) + answer_text(completion) + (self.tokenizer.eos_token or "")

    def __call__(self, prompts, completions) -> list[float]:
        import torch

        texts = [self.render(p, c) for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        was_training = self.model.training
        self.model.eval()
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                   truncation=True, max_length=1024, add_special_tokens=False, padding_side="right")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.inference_mode():
                scores.extend(self.model(**batch).logits[:, 0].float().cpu().tolist())
        self.model.train(was_training)
        return scores
