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
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from train.config import TrainConfig
from train.lagrangian import severity_scaled_costs, update_lambda
from train.mixdata import group_sizes


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


def run_dual(config: TrainConfig, manifest: dict[str, Any], run_dir: Path):
    from train.run import (
        METRICS_FILE,
        RunResult,
        build_dpo_trainer,
        load_pairs,
        load_policy,
        metrics_callback,
        save_final,
    )

    train_split, eval_split = load_pairs(config, manifest)
    measure_on = eval_split.dataset if len(eval_split.dataset) else train_split.dataset
    _, model, tokenizer = load_policy(config)
    lam = config.lambda_init
    history = []
    trainer = None
    for round_index in range(config.rounds):
        pairs, swapped = rerank_pairs(train_split.dataset, lam, config.severity_weights)
        round_dir = run_dir / f"round-{round_index}"
        trainer = build_dpo_trainer(
            config, model, tokenizer, pairs, None, round_dir,
            callbacks=[metrics_callback(run_dir / METRICS_FILE, {"round": round_index, "lambda": lam})],
        )
        trainer.train()
        model = trainer.accelerator.unwrap_model(trainer.model)
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
            "steps": trainer.state.global_step,
        }
        history.append(record)
        with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"dual": True, **record}, default=float) + "\n")
        lam = update.value
    final_dir = save_final(trainer, tokenizer, run_dir)
    summary = {
        "train_rows": len(train_split.dataset),
        **group_sizes(trainer.train_dataset),  # the pairs trained on, as for dpo
        "rows_dropped_prompt_too_long": trainer.rows_dropped_too_long,
        "rows_left_out": train_split.dropped,
        "cost_measured_on": "eval" if len(eval_split.dataset) else "train (no eval split)",
        "rounds": history,
        "final_lambda": lam,
        "steps": sum(r["steps"] for r in history),
    }
    return RunResult(run_dir, final_dir, summary["steps"], summary=summary)
