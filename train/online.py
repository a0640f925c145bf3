"""The online stage (``ppo``, ``ama-ppo``, ``repo``, ``ppo-lag``) on TRL's ``GRPOTrainer``.

TRL 1.16 ships no PPOTrainer; ``GRPOTrainer`` optimises PPO's clipped surrogate with a group baseline instead of
a critic: each prompt is sampled ``--num-generations`` times and a completion's advantage is its reward minus its
group's mean (scaled by the group's std). So "PPO" here means that surrogate with that baseline, and a
"token value" (AMA's value-sign rule) has to come from somewhere else than a value head — the segment scorer.

- ``ppo``: GRPO with equi's reward (:mod:`train.rewards`: compliance on BENIGN prompts, refusal on safety prompts).
- ``repo``: reward R − λ·max(0, C) per sampled response, λ fixed at ``--lambda-init``; the fraction of violating
  responses is logged every step (``safety/violation_fraction``).
- ``ppo-lag``: reward R − λ·C, λ updated by guarded dual ascent every ``--lambda-update-every`` optimiser steps
  on the mean cost of the responses sampled since the last update (:class:`LambdaCallback`); every update is a line
  in ``metrics.jsonl``, and λ is saved with each checkpoint so ``--resume`` continues with it.
- ``ama-ppo``: ``ppo`` plus AMA: each completion is split into segments scored in [−1, 1] by curation's segment
  scorer, and a token whose segment score has the opposite sign of the completion's advantage gets loss mask 0
  (a good answer's harmful segment is not reinforced; a bad answer's good segment is not punished).

The AMA seam: ``GRPOTrainer._compute_loss`` multiplies ``inputs["tool_mask"]`` into the loss mask (it is how TRL
keeps tool output and ``rollout_func``'s ``env_mask`` out of the loss). :class:`EquiGRPOTrainer` computes the
AMA mask after TRL has generated, scored and computed advantages, and multiplies it into ``tool_mask``; masked
tokens then carry exactly zero loss (policy and KL terms alike) without copying TRL's loss code. TRL counts
``num_items_in_batch`` before that, so with the default ``dapo`` normalisation masked tokens still count in the
denominator: masking removes their gradient without up-weighting the tokens that remain.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from equi.messages import prompt_text
from equi.schema import METRICS_FILE
from train.lagrangian import update_lambda
from train.mixdata import MixError, chat_format, load_split
from train.models import load_policy
from train.rewards import LambdaState, SafetyScorer, make_constrained_reward, make_safety_reward, prompt_harm
from train.rundir import RunResult, append_metrics, fit, read_metrics, resume_checkpoint
from train.scorers import ModelScorer
from train.trl_setup import metrics_callback, peft_config_for, quiet_trainer, trl_common_kwargs

#: (prompt_harm, response) -> [(start, end, score in [-1, 1])], as ``curation.segments.segment_scores``.
SegmentFn = Callable[[float, str], Sequence[tuple[int, int, float]]]

LAMBDA_FILE = "equi_lambda.json"
#: The mix columns the online reward functions and the AMA scorer read.
PROMPT_COLUMNS = ("id", "prompt", "group", "explicit_score", "intent_score", "severity")


def default_segment_fn(harm: float, response: str):
    from curation.segments import segment_scores

    return segment_scores(harm, response)


# ---- AMA for the online stage: pure functions --------------------------------------------------------------------


def completion_token_offsets(tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded completion (special tokens skipped, as TRL decodes it) and each token's character range in it.

    Re-tokenising the text gives offsets directly when it reproduces the ids; otherwise (a merge that differs,
    a byte split across tokens) each token's end is the length of the decoded prefix up to it. Special tokens
    get an empty range and so are never masked.
    """
    ids = [int(i) for i in ids]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    special = set(tokenizer.all_special_ids)
    if not special.intersection(ids):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(encoding["input_ids"]) == ids:
            return text, [tuple(o) for o in encoding["offset_mapping"]]
    offsets, previous = [], 0
    for index in range(len(ids)):
        end = len(tokenizer.decode(ids[: index + 1], skip_special_tokens=True))
        end = min(max(end, previous), len(text))  # a half-decoded byte must not move the cursor backwards
        offsets.append((previous, end))
        previous = end
    return text, offsets


def value_sign_mask(
    offsets: Sequence[tuple[int, int]], segments: Sequence[tuple[int, int, float]], advantage: float
) -> list[int]:
    """AMA's value-sign rule per token: 0 where the token's segment score and the advantage have opposite signs.

    A token takes the score of the segment it overlaps most; tokens in no segment (whitespace between segments,
    special tokens) and a zero advantage keep mask 1.
    """
    mask = []
    for start, end in offsets:
        best, score = 0, 0.0
        for seg_start, seg_end, seg_score in segments:
            overlap = min(end, seg_end) - max(start, seg_start)
            if overlap > best:
                best, score = overlap, seg_score
        mask.append(0 if score * advantage < 0 else 1)
    return mask


# ---- the trainer ---------------------------------------------------------------------------------------------------


class EquiGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with AMA token masks (``ama-ppo``) and a dual-ascent λ (``ppo-lag``).

    Args (beyond ``GRPOTrainer``'s):
        segment_fn: ``None`` = no AMA (``ppo``, ``repo``, ``ppo-lag``); otherwise the segment scorer whose signs
            decide the token masks (default for ``ama-ppo``: ``curation.segments.segment_scores``).
    """

    _tag_names = ["trl", "grpo", "equi"]

    def __init__(self, *args, segment_fn: SegmentFn | None = None, **kwargs):
        self.segment_fn = segment_fn
        super().__init__(*args, **kwargs)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.segment_fn is None:
            return output
        completion_mask = output["completion_mask"]
        ama = torch.ones_like(completion_mask)
        advantages = output["advantages"].reshape(len(inputs), -1)[:, 0].tolist()
        for row, (example, advantage) in enumerate(zip(inputs, advantages, strict=True)):
            length = int(completion_mask[row].sum().item())
            ids = output["completion_ids"][row, :length].tolist()
            text, offsets = completion_token_offsets(self.processing_class, ids)
            harm = prompt_harm(example.get("group"), example.get("explicit_score"), example.get("intent_score"))
            segments = self.segment_fn(harm, text) if text.strip() else []
            ama[row, :length] = torch.tensor(value_sign_mask(offsets, segments, advantage), dtype=ama.dtype)
        kept = (completion_mask * ama).sum().item()
        total = completion_mask.sum().item()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["ama/masked_fraction"].append(1.0 - kept / total if total else 0.0)
        tool_mask = output.get("tool_mask")
        output["tool_mask"] = ama if tool_mask is None else tool_mask * ama
        return output


class LambdaCallback(TrainerCallback):
    """PPO-Lag's dual ascent: every K optimiser steps λ ← clip(λ + η·(E[C] − b), 0, λ_max), guarded.

    E[C] is the mean (severity-scaled) cost of every response sampled since the last update, summed over
    processes so all ranks agree on λ. Each update (applied or refused by a guard) is appended to ``metrics.jsonl``.
    """

    def __init__(self, lam: LambdaState, *, every: int, warmup_steps: int, lr: float, lam_max: float,
                 threshold: float, metrics_path: Path, accelerator=None):
        self.lam, self.every, self.warmup_steps = lam, every, warmup_steps
        self.lr, self.lam_max, self.threshold = lr, lam_max, threshold
        self.metrics_path, self.accelerator = Path(metrics_path), accelerator

    def _mean_cost(self, costs: list[float]) -> float:
        local = torch.tensor([sum(costs), float(len(costs))], dtype=torch.float64)
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            local = self.accelerator.gather(local.to(self.accelerator.device)).view(-1, 2).sum(dim=0).cpu()
        total, count = local.tolist()
        return total / count if count else float("nan")

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every:
            return
        mean_cost = self._mean_cost(self.lam.take_pending())
        update = update_lambda(self.lam.value, mean_cost, self.threshold, self.lr, self.lam_max,
                               step=state.global_step, warmup_steps=self.warmup_steps)
        record = {"step": state.global_step, "lambda_update": update.reason, "lambda": self.lam.value,
                  "lambda_next": update.value, "expected_cost": mean_cost, "cost_threshold": self.threshold}
        self.lam.history.append(record)
        self.lam.value = update.value
        if state.is_world_process_zero:
            append_metrics(self.metrics_path, record)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():  # λ and the costs sampled since its last update (this process's)
                (checkpoint / LAMBDA_FILE).write_text(json.dumps({"lambda": self.lam.value,
                                                                  "pending_costs": self.lam.pending_costs}))


def saved_lambda(checkpoint: Path | None, initial: float) -> LambdaState:
    """The λ state saved with ``checkpoint`` (its value and the costs not yet used by an update), else a fresh one."""
    path = checkpoint / LAMBDA_FILE if checkpoint is not None else None
    if path is None or not path.is_file():
        return LambdaState(initial)
    saved = json.loads(path.read_text())
    lam = LambdaState(float(saved["lambda"]))
    lam.pending_costs = [float(c) for c in saved.get("pending_costs", [])]
    return lam


# ---- data and run --------------------------------------------------------------------------------------------------


def prompt_dataset(dataset, tokenizer):
    """The mix rows as GRPO prompts: one row per distinct prompt, chat-formatted when the tokenizer has a template."""
    keep = [c for c in PROMPT_COLUMNS if c in dataset.column_names]
    dataset = dataset.select_columns(keep).filter(lambda row: has_prompt(row["prompt"]))
    seen: set[str] = set()
    texts = [prompt_text(p) for p in dataset["prompt"]]
    first = [i for i, p in enumerate(texts) if not (p in seen or seen.add(p))]
    return chat_format(dataset.select(first), tokenizer, ("prompt",))


def has_prompt(prompt) -> bool:
    """A prompt with some text: a non-blank string, or messages of which one has content."""
    if isinstance(prompt, list):
        return any(isinstance(m, dict) and (m.get("content") or "").strip() for m in prompt)
    return bool(prompt and prompt.strip())


def build_scorer(config):
    """The reward/cost scorers the online reward functions use: equi's detector, or the models passed."""
    reward = ModelScorer(config.reward_model, trust_remote_code=config.trust_remote_code) if config.reward_model else None
    cost = ModelScorer(config.cost_model, trust_remote_code=config.trust_remote_code) if config.cost_model else None
    return SafetyScorer(reward_scorer=reward, cost_scorer=cost, severity_weights=config.severity_weights)


def build_online_trainer(config, model, tokenizer, train_dataset, run_dir: Path, callbacks=None, scorer=None,
                         segment_fn: SegmentFn | None = None, lam: LambdaState | None = None):
    """An :class:`EquiGRPOTrainer` for ``config.algo`` and the λ state it shares with its reward function."""
    scorer = scorer or build_scorer(config)
    lam = lam or LambdaState(config.lambda_init)
    if config.algo in ("repo", "ppo-lag"):
        reward_funcs = [make_constrained_reward(config.algo, lam, scorer=scorer)]
    else:
        reward_funcs = [make_safety_reward(scorer=scorer)]
    if config.algo == "ama-ppo" and segment_fn is None:
        segment_fn = default_segment_fn
    args = GRPOConfig(
        **trl_common_kwargs(config, run_dir),
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        beta=config.beta,  # KL to the reference policy (0 = no reference model)
        eval_strategy="no",
        log_completions=False,
    )
    callbacks = list(callbacks or [])
    trainer = EquiGRPOTrainer(
        model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config_for(config),
        callbacks=callbacks,
        segment_fn=segment_fn if config.algo == "ama-ppo" else None,
    )
    quiet_trainer(trainer, config.quiet)
    if config.algo == "ppo-lag":
        trainer.add_callback(LambdaCallback(
            lam, every=config.lambda_update_every, warmup_steps=config.lambda_warmup_steps, lr=config.lambda_lr,
            lam_max=config.lambda_max, threshold=config.cost_threshold, metrics_path=run_dir / METRICS_FILE,
            accelerator=trainer.accelerator,
        ))
    return trainer, lam


def run_online(config, manifest: dict[str, Any], run_dir: Path) -> RunResult:
    split = load_split(config.mix, "train", config.scale, config.groups, need_pairs=False, manifest=manifest,
                       skip_images=config.skip_images)
    if not any(has_prompt(p) for p in split.dataset["prompt"]):  # before the model is loaded
        why = ", ".join(f"{n} {reason}" for reason, n in split.dropped.items()) or "the split is empty"
        raise MixError(f"mix {config.mix} has no prompts to train {config.algo} on ({why})")
    _, model, tokenizer = load_policy(config)
    prompts = prompt_dataset(split.dataset, tokenizer)
    if tokenizer.padding_side != "left":  # generation appends to the right, so prompts pad on the left
        tokenizer.padding_side = "left"
    checkpoint = resume_checkpoint(config, run_dir)
    lam = saved_lambda(checkpoint, config.lambda_init)  # ppo-lag continues with the λ (and costs) it had reached
    trainer, lam = build_online_trainer(
        config, model, tokenizer, prompts, run_dir, callbacks=[metrics_callback(run_dir / METRICS_FILE)], lam=lam
    )
    rows = {
        "train_prompts": len(prompts),
        **split.group_sizes(),
        "mix_rows": split.total_rows,
        "rows_left_out": split.dropped,
    }
    result = fit(trainer, tokenizer, run_dir, checkpoint, rows,
                 lambda: {"reward_model": config.reward_model, "cost_model": config.cost_model})
    if config.algo in ("repo", "ppo-lag"):
        result.summary["final_lambda"] = lam.value
        # Counted in metrics.jsonl, so the updates made before a --resume count too.
        result.summary["lambda_updates"] = sum(1 for m in read_metrics(run_dir) if "lambda_update" in m)
    return result
