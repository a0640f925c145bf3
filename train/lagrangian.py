"""Safety-constraint arithmetic shared by RePO, PPO-Lag and the dual loop: pure functions, no models.

- ``severity_scaled_costs``: the mix's cost times the weight of the row's severity (``--severity-weights``).
- ``repo_rewards``: RePO's rectified penalty R − λ·max(0, C): only responses that violate the constraint pay.
- ``lagrangian_rewards``: PPO-Lag / dual reward R − λ·C.
- ``update_lambda``: dual ascent λ ← clip(λ + η·(E[C] − b), 0, λ_max), guarded the way Safe RLHF users learned
  to: no update before a delayed start, NaN/inf costs leave λ unchanged (and say so), λ is clipped both ways.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def severity_scaled_costs(
    costs: Sequence[float | None], severities: Sequence[str | None], weights: dict[str, float]
) -> list[float]:
    """Scale each cost by its severity's weight; a missing cost is 0 (no evidence of harm), no severity → ×1.

    Only positive (unsafe) costs are scaled: a safe response's negative cost does not become "safer" for
    being about a severe topic.
    """
    scaled = []
    for cost, severity in zip(costs, severities, strict=True):
        value = 0.0 if cost is None or math.isnan(cost) else float(cost)
        weight = weights.get(severity, 1.0) if severity else 1.0
        scaled.append(value * weight if value > 0 else value)
    return scaled


def repo_rewards(rewards: Sequence[float], costs: Sequence[float], lam: float) -> list[float]:
    """RePO: R − λ·max(0, C) per response; prompts that satisfy the constraint are not penalised (nor credited)."""
    return [r - lam * max(0.0, c) for r, c in zip(rewards, costs, strict=True)]


def lagrangian_rewards(rewards: Sequence[float], costs: Sequence[float], lam: float) -> list[float]:
    """PPO-Lag: R − λ·C (safe responses, C ≤ 0, gain reward)."""
    return [r - lam * c for r, c in zip(rewards, costs, strict=True)]


def violation_fraction(costs: Sequence[float]) -> float:
    return sum(c > 0 for c in costs) / len(costs) if costs else 0.0


@dataclass
class LambdaUpdate:
    value: float
    updated: bool
    reason: str


def update_lambda(
    lam: float,
    mean_cost: float,
    threshold: float,
    lr: float,
    lam_max: float,
    step: int = 0,
    warmup_steps: int = 0,
) -> LambdaUpdate:
    """One dual-ascent step on λ for the constraint E[C] ≤ b, with the guards."""
    if step < warmup_steps:
        return LambdaUpdate(lam, False, f"warm-up ({step} < {warmup_steps})")
    if mean_cost is None or not math.isfinite(mean_cost):
        return LambdaUpdate(lam, False, f"non-finite mean cost {mean_cost!r}; λ kept")
    new = lam + lr * (mean_cost - threshold)
    new = min(max(new, 0.0), lam_max)
    return LambdaUpdate(new, True, "updated")
