"""RePO / PPO-Lag / dual arithmetic: rectified penalty, severity scaling, guarded λ updates."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from train.lagrangian import (
    lagrangian_rewards,
    repo_rewards,
    severity_scaled_costs,
    update_lambda,
    violation_fraction,
)


def test_repo_penalises_only_violating_responses():
    rewards, costs = [1.0, 1.0, 0.5], [-2.0, 0.0, 3.0]
    assert repo_rewards(rewards, costs, lam=2.0) == [1.0, 1.0, 0.5 - 6.0]
    # The Lagrangian, by contrast, credits the safe response: the "safety compensation" RePO removes.
    assert lagrangian_rewards(rewards, costs, lam=2.0) == [5.0, 1.0, 0.5 - 6.0]
    assert violation_fraction(costs) == 1 / 3


def test_severity_scales_only_unsafe_costs():
    weights = {"minor": 1.0, "moderate": 2.0, "severe": 4.0}
    assert severity_scaled_costs([1.0, 1.0, -1.0, None, 0.5], ["severe", None, "severe", "minor", "moderate"],
                                 weights) == [4.0, 1.0, -1.0, 0.0, 1.0]


@given(lam=st.floats(0, 10), cost=st.floats(-100, 100), threshold=st.floats(-5, 5), lr=st.floats(0, 2))
def test_lambda_stays_clipped_and_moves_towards_the_constraint(lam, cost, threshold, lr):
    update = update_lambda(lam, cost, threshold, lr, lam_max=10.0)
    assert update.updated and 0.0 <= update.value <= 10.0
    if cost > threshold:
        assert update.value >= min(lam, 10.0) - 1e-12  # violated: λ does not decrease
    elif cost < threshold:
        assert update.value <= lam + 1e-12  # satisfied: λ does not increase


def test_lambda_guards_warmup_and_nan():
    assert update_lambda(1.0, 5.0, 0.0, 0.1, 10.0, step=2, warmup_steps=5) .value == 1.0
    nan = update_lambda(1.0, math.nan, 0.0, 0.1, 10.0)
    assert nan.value == 1.0 and not nan.updated and "non-finite" in nan.reason
    assert update_lambda(1.0, math.inf, 0.0, 0.1, 10.0).value == 1.0
