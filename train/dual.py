"""``--algo dual``: iterative dual alignment on the offline pairs.

Each round:
1. policy update maximising R − λ·C: the pairs are re-ranked by score = r − λ·c, with r the mix's preference
   (chosen 1, rejected 0) and c the severity-scaled cost; a pair whose rejected response scores higher is
   swapped, then a DPO pass runs on the re-ranked pairs (reference = the policy at the start of the round);
2. dual descent λ ← clip(λ + η·(E[C] − b), 0, λ_max) with E[C] measured on the eval pairs.

E[C] is the policy's expected cost between each eval pair's two responses: with p = σ(log π(y_costly) −
log π(y_safe)) the probability the policy prefers the costlier one, E[C] = p·c_costly + (1 − p)·c_safe. That needs
no generation and no cost model, so it is cheap enough to run every round; with ``--cost-model`` and sampling it
would be the online estimate instead (not implemented here). λ, E[C] and b are logged every round.

``--resume`` continues at the round the run was in: the finished rounds' records give λ, the last finished
round's saved policy (``round-N/end-model``, kept until the next round ends) is the next round's start and
reference, and an interrupted round continues from its own last checkpoint.
"""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path
from typing import Any

from equi.schema import FINAL_DIR, METRICS_FILE
from train.config import TrainConfig
from train.dpo import build_dpo_trainer, precompute_pays
from train.lagrangian import severity_scaled_costs, update_lambda
from train.mixdata import group_sizes, load_pairs
from equi.models import ModelError, save_model_atomic
from train.models import load_policy
from train.rundir import (
    RunResult,
    append_metrics,
    checkpoint_step,
    keep_metrics,
    last_checkpoint,
    read_metrics,
    save_final,
    train_from,
    trained_dtype,
)
from train.trl_setup import metrics_callback


def rerank_pairs(dataset, lam: float, severity_weights: dict[str, float]):
    """Swap chosen/rejected (and their spans, costs, refusals) where r − λ·c prefers the rejected response."""
    chosen_costs = severity_scaled_costs(dataset["chosen_cost"], dataset["severity"], severity_weights)
    rejected_costs = severity_scaled_costs(dataset["rejected_cost"], dataset["severity"], severity_weights)
    swap = [(0.0 - lam * cl) > (1.0 - lam * cw) for cw, cl in zip(chosen_costs, rejected_costs)]

    def maybe_swap(row, index):
        if not swap[index]:
            return row
        for a, b in (("chosen", "rejected"), ("chosen_spans", "rejected_spans"), ("chosen_cost", "rejected_cost"),
                     ("chosen_refusal", "rejected_refusal")):
            row[a], row[b] = row[b], row[a]
        return row

    return dataset.map(maybe_swap, with_indices=True, desc=f"Re-ranking pairs (λ={lam:.3f})"), sum(swap)


def expected_cost(trainer, dataset, severity_weights: dict[str, float], batch_size: int) -> float:
    """E[C] of the policy between each pair's two responses (see the module docstring)."""
    import torch

    prepared = trainer._prepare_dataset(dataset, trainer.processing_class, trainer.args, "dual-eval")
    keep = [c for c in ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_ama_mask", "rejected_ama_mask")
            if c in prepared.column_names]
    rows = prepared.select_columns(keep)
    chosen_costs = severity_scaled_costs(prepared["chosen_cost"], prepared["severity"], severity_weights)
    rejected_costs = severity_scaled_costs(prepared["rejected_cost"], prepared["severity"], severity_weights)
    model = trainer.model
    model.eval()
    expectations = []
    for start in range(0, len(rows), batch_size):
        batch = trainer.data_collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        batch = {k: v.to(trainer.accelerator.device) if hasattr(v, "to") else v for k, v in batch.items()}
        chosen_logps, rejected_logps = trainer.compute_ref_log_probs(model, batch)
        for offset, (lc, lr) in enumerate(zip(chosen_logps.tolist(), rejected_logps.tolist())):
            cw, cl = chosen_costs[start + offset], rejected_costs[start + offset]
            p_rejected = 1.0 / (1.0 + math.exp(max(-60.0, min(60.0, lc - lr))))
            expectations.append(p_rejected * cl + (1.0 - p_rejected) * cw)
    model.train()
    del torch
    return sum(expectations) / len(expectations) if expectations else float("nan")


def run_dual(config: TrainConfig, manifest: dict[str, Any], run_dir: Path) -> RunResult:
    train_split, eval_split = load_pairs(config, manifest)
    measure_on = eval_split.dataset if len(eval_split.dataset) else train_split.dataset
    lam = config.lambda_init
    history, first_round, checkpoint, start = [], 0, None, None
    if config.resume:
        history, checkpoint = _resume_rounds(run_dir)
        if history:
            first_round, lam = history[-1]["round"] + 1, history[-1]["lambda_next"]
            start = _round_model(run_dir / f"round-{history[-1]['round']}")
    # Killed after a round's training but before its λ update: its policy is saved, only E[C] is missing.
    trained_before = config.resume and (run_dir / f"round-{first_round}" / ROUND_MODEL).is_dir()
    if trained_before:
        start = _round_model(run_dir / f"round-{first_round}")
    _, model, tokenizer = load_policy(config, weights=start)
    trainer = None
    for round_index in range(first_round, config.rounds):
        pairs, swapped = rerank_pairs(train_split.dataset, lam, config.severity_weights)
        round_dir = run_dir / f"round-{round_index}"
        trained_before = trained_before and round_index == first_round
        # The reference is the policy at the start of the round. Precomputed log-probs read it from the policy;
        # live ones need a copy: TRL would load the model's config path, the base model, from round 1 on.
        live_reference = (round_index > 0 or first_round > 0) and not (trained_before or config.lora_r
                                                                        or precompute_pays(config, len(pairs)))
        trainer = build_dpo_trainer(
            config, model, tokenizer, pairs, None, round_dir,
            callbacks=[metrics_callback(run_dir / METRICS_FILE, {"round": round_index, "lambda": lam})],
            ref_model=copy.deepcopy(model) if live_reference else None,
        )
        if not trained_before:
            train_from(trainer, checkpoint if round_index == first_round else None, run_dir)
            model = trainer.accelerator.unwrap_model(trainer.model)
            if not config.lora_r:  # a resume point (dual with LoRA is not resumed)
                _save_round_model(trainer, model, tokenizer, round_dir)
        steps = checkpoint_step(last_checkpoint(round_dir)) if trained_before else trainer.state.global_step
        mean_cost = expected_cost(trainer, measure_on, config.severity_weights, config.batch_size)
        update = update_lambda(lam, mean_cost, config.cost_threshold, config.lambda_lr, config.lambda_max)
        record = {
            "round": round_index,
            "lambda": lam,
            "lambda_next": update.value,
            "lambda_update": update.reason,
            "expected_cost": mean_cost,
            "cost_threshold": config.cost_threshold,
            "swapped_pairs": swapped,
            "steps": steps,
        }
        history.append(record)
        append_metrics(run_dir / METRICS_FILE, {"dual": True, **record})
        if round_index:  # the round before is done for good: its model is no longer a resume point
            shutil.rmtree(run_dir / f"round-{round_index - 1}" / ROUND_MODEL, ignore_errors=True)
        lam = update.value
    if trainer is None:  # every round had finished before the resume: only final/ was missing
        final_dir = save_model_atomic(model, tokenizer, run_dir / FINAL_DIR)
    else:
        final_dir = save_final(trainer, tokenizer, run_dir)
    shutil.rmtree(run_dir / f"round-{history[-1]['round']}" / ROUND_MODEL, ignore_errors=True)  # final/ has it
    summary = {
        "train_rows": len(train_split.dataset),
        # the pairs trained on, as for dpo (the last round's trainer; every round trains on the same pairs)
        **(group_sizes(trainer.train_dataset) if trainer is not None else train_split.group_sizes()),
        "rows_dropped_prompt_too_long": trainer.rows_dropped_too_long if trainer is not None else None,
        "rows_left_out": train_split.dropped,
        "cost_measured_on": "test" if len(eval_split.dataset) else "train (no test split)",
        "rounds": history,
        "final_lambda": lam,
        "steps": sum(r["steps"] for r in history),
        "dtype": trained_dtype(model if trainer is None else trainer.model),
    }
    return RunResult(run_dir, final_dir, summary["steps"], summary=summary)


#: Where a finished round keeps its policy until the next round finishes: the start (and reference) of the next.
ROUND_MODEL = "end-model"


def _save_round_model(trainer, model, tokenizer, round_dir: Path) -> None:
    if trainer.accelerator.is_main_process:
        save_model_atomic(model, tokenizer, round_dir / ROUND_MODEL)


def _round_model(round_dir: Path) -> Path:
    """A finished round's saved policy, to continue from."""
    if not (round_dir / ROUND_MODEL).is_dir():
        raise ModelError(f"--resume: {round_dir} finished but its {ROUND_MODEL}/ is missing; train again with a new --out")
    return round_dir / ROUND_MODEL


def _resume_rounds(run_dir: Path) -> tuple[list[dict[str, Any]], Path | None]:
    """The rounds an interrupted dual run finished (their records), and the checkpoint of the round it was in.

    ``metrics.jsonl`` keeps the finished rounds' records and the interrupted round's up to its checkpoint.
    """
    history = [{k: v for k, v in m.items() if k != "dual"} for m in read_metrics(run_dir) if m.get("dual")]
    current = history[-1]["round"] + 1 if history else 0
    checkpoint = last_checkpoint(run_dir / f"round-{current}")
    step = checkpoint_step(checkpoint)
    keep_metrics(run_dir, lambda m: m.get("round", 0) < current or (m.get("round") == current and not m.get("dual")
                                                                    and m.get("step", 0) <= step))
    return history, checkpoint
