"""Reward and cost functions for the online stage, in the shape TRL's ``GRPOTrainer`` calls them.

A TRL reward function receives ``prompts``, ``completions`` and every dataset column as keyword lists (one entry
per completion) plus ``log_metric``; it returns one float per completion. equi's defaults need no model:

- prompt harm ``h`` from the mix's prompt columns (:func:`prompt_harm`);
- ``r`` = the curation refusal detector's probability that the completion refuses (any refusal, as XSTest counts);
- ``w`` = the probability that it withholds the content: ``r`` less refuse-then-comply ("I can't help with that.
  ... Step 1: ..." refuses by ``r`` but withholds nothing; :func:`curation.segments.withheld_scores`);
- reward (:func:`safety_reward_values`): on BENIGN prompts ``1 − 2r`` (help, do not refuse); on safety prompts
  (EHD / IHD / MHD / OTHER) ``w − h·(1 − w)`` (withholding earns 1, complying costs in proportion to the harm);
  a BENIGN prompt with an uncertain harm estimate counts as a safety prompt (:func:`batch_harms`: the interlock);
- cost (:func:`cost_values`): ``C = 2·h·(1 − w) − 1`` as curation computes ``*_cost`` (``curation/steps.py:
  score_costs``), then scaled by ``--severity-weights`` (only positive, unsafe costs are scaled).

``--reward-model`` / ``--cost-model`` swap ``r``-based scores for a sequence-classifier's output
(:class:`ModelScorer`). The scorers are injected (``refusal_fn=``, ``reward_scorer=``, ``cost_scorer=``) so tests and
callers can pass their own; the default imports :func:`curation.refusal.refusal_scores` lazily.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from equi.messages import answer_text, last_user_text
from equi.schema import UNCERTAIN_HARM_BAND
from train.config import DEFAULT_SEVERITY_WEIGHTS
from train.lagrangian import lagrangian_rewards, repo_rewards, severity_scaled_costs, violation_fraction

#: texts -> one score per text (refusal probability, reward, or cost)
TextScorer = Callable[[list[str]], Sequence[float]]
#: (prompts, completions) -> one score per completion (a reward or cost model)
PairScorer = Callable[[list[str], list[str]], Sequence[float]]

SAFETY_GROUPS = ("EHD", "IHD", "MHD", "OTHER")


def default_refusal_fn(texts: list[str]) -> list[float]:
    """The curation refusal detector (text-only head: no model to load, fast enough to run every step)."""
    from curation.refusal import refusal_scores

    return [float(x) for x in refusal_scores(texts)]


def prompt_harm(group: str | None, explicit_score: float | None, intent_score: float | None) -> float:
    """P(the prompt is harmful), from the mix's prompt columns.

    The categoriser writes ``explicit = harm·P(explicit)`` and ``intent = harm·P(intent)``, so ``harm`` is at least
    the larger of the two. A safety group means the categoriser judged the prompt safety-relevant, so its harm is
    at least 0.5; BENIGN prompts count as harmless (h = 0: any answer to them is safe, cost −1).
    """
    if group == "BENIGN":
        return 0.0
    scores = [float(s) for s in (explicit_score, intent_score) if s is not None and not math.isnan(float(s))]
    harm = max(scores, default=0.0)
    if group in SAFETY_GROUPS:
        harm = max(harm, 0.5)
    return min(max(harm, 0.0), 1.0)


def default_withheld_fn(texts: list[str], refusals: Sequence[float]) -> list[float]:
    """The safety view of each completion (:func:`curation.segments.withheld_scores`): its refusal score, less what
    follows a refusal opening ("I can't help with that. ... Step 1: ..." withholds nothing)."""
    from curation.segments import withheld_scores

    return [float(x) for x in withheld_scores(texts, [float(r) for r in refusals])]


def _unit(x: float) -> float:
    return min(max(float(x), 0.0), 1.0)


def safety_reward_values(refusals: Sequence[float], harms: Sequence[float], benign: Sequence[bool],
                         withheld: Sequence[float] | None = None) -> list[float]:
    """Reward in [−1, 1]: compliance on benign prompts (``1 − 2r``, any refusal counts against it), withholding
    (minus harmful compliance) on safety prompts (``w − h·(1 − w)``, ``w`` = ``withheld``, default ``refusals``:
    a refusal that goes on to give the content earns nothing for its opening)."""
    withheld = refusals if withheld is None else withheld
    rewards = []
    for r, w, h, is_benign in zip(refusals, withheld, harms, benign, strict=True):
        r, w = _unit(r), _unit(w)
        rewards.append(1.0 - 2.0 * r if is_benign else w - h * (1.0 - w))
    return rewards


def cost_values(withheld: Sequence[float], harms: Sequence[float]) -> list[float]:
    """Curation's cost ``2·h·(1 − w) − 1`` (``w`` = P(the completion withholds the content), the refusal score
    less refuse-then-comply): +1 full compliance with a surely harmful prompt, −1 a refusal."""
    return [2.0 * h * (1.0 - _unit(w)) - 1.0 for w, h in zip(withheld, harms, strict=True)]


def _column(kwargs: dict[str, Any], name: str, n: int) -> list:
    values = kwargs.get(name)
    return list(values) if values is not None else [None] * n


def batch_harms(n: int, kwargs: dict[str, Any]) -> tuple[list[float], list[bool]]:
    """Each prompt's harm and whether it is helpfulness (BENIGN) data.

    The safety interlock: a BENIGN prompt whose harm estimate reaches the low end of ``UNCERTAIN_HARM_BAND`` is not
    treated as benign (it is never paid for compliance) but as a safety prompt with that harm. The estimate is the
    ``harm_score`` column where the data has one, else ``max(explicit_score, intent_score)`` (each is harm times a
    probability, so a lower bound on the categoriser's harm).
    """
    groups = _column(kwargs, "group", n)
    explicit, intent = _column(kwargs, "explicit_score", n), _column(kwargs, "intent_score", n)
    harm_scores = _column(kwargs, "harm_score", n)
    harms = [prompt_harm(g, e, i) for g, e, i in zip(groups, explicit, intent)]
    benign = [g == "BENIGN" for g in groups]
    for k in range(n):
        if benign[k]:
            estimate = _benign_harm_estimate(harm_scores[k], explicit[k], intent[k])
            if estimate >= UNCERTAIN_HARM_BAND[0]:
                harms[k], benign[k] = min(estimate, 1.0), False
    return harms, benign


def _benign_harm_estimate(harm_score: Any, explicit_score: Any, intent_score: Any) -> float:
    def value(x: Any) -> float | None:
        return None if x is None or math.isnan(float(x)) else float(x)

    if value(harm_score) is not None:
        return value(harm_score)
    return max((v for v in (value(explicit_score), value(intent_score)) if v is not None), default=0.0)


def _log(kwargs: dict[str, Any], name: str, value: float) -> None:
    log_metric = kwargs.get("log_metric")
    if log_metric is not None and math.isfinite(value):
        log_metric(name, float(value))


class SafetyScorer:
    """Reward R and cost C of each completion, from the refusal detector or from reward/cost models.

    Args:
        refusal_fn: texts → P(refusal); default the curation detector.
        reward_scorer: (prompts, completions) → reward; replaces the detector-based reward (``--reward-model``).
        cost_scorer: (prompts, completions) → cost; replaces the detector-based cost (``--cost-model``).
        severity_weights: ``--severity-weights``; multiplies positive costs by the prompt's severity weight
            (``None`` = equi's default weights).
        withheld_fn: (texts, refusal scores) → P(the completion withholds the content), for the safety reward and
            the cost; default the curation detector's (:func:`default_withheld_fn`); ``lambda t, r: r`` scores by
            refusal alone.
    """

    def __init__(
        self,
        refusal_fn: TextScorer | None = None,
        reward_scorer: PairScorer | None = None,
        cost_scorer: PairScorer | None = None,
        severity_weights: dict[str, float] | None = None,
        withheld_fn: Callable[[list[str], Sequence[float]], Sequence[float]] | None = None,
    ):
        self.refusal_fn = refusal_fn or default_refusal_fn
        self.withheld_fn = withheld_fn or default_withheld_fn
        self.reward_scorer = reward_scorer
        self.cost_scorer = cost_scorer
        # None = equi's defaults (as ``TrainConfig``); {} = no scaling.
        self.severity_weights = dict(DEFAULT_SEVERITY_WEIGHTS) if severity_weights is None else severity_weights

    def score(self, prompts: list, completions: list, kwargs: dict[str, Any]) -> tuple[list[float], list[float]]:
        n = len(completions)
        texts = [answer_text(c) for c in completions]
        harms, benign = batch_harms(n, kwargs)
        refusals = withheld = None
        if self.reward_scorer is None or self.cost_scorer is None:
            refusals = [float(r) for r in self.refusal_fn(texts)]
            withheld = [float(w) for w in self.withheld_fn(texts, refusals)]
            _log(kwargs, "safety/refusal_rate", sum(r >= 0.5 for r in refusals) / max(n, 1))
        user_texts = [last_user_text(p) for p in prompts]
        if self.reward_scorer is not None:
            rewards = [float(x) for x in self.reward_scorer(user_texts, texts)]
        else:
            rewards = safety_reward_values(refusals, harms, benign, withheld)
        if self.cost_scorer is not None:
            costs = [float(x) for x in self.cost_scorer(user_texts, texts)]
        else:
            costs = cost_values(withheld, harms)
        costs = severity_scaled_costs(costs, _column(kwargs, "severity", n), self.severity_weights)
        return rewards, costs


def make_safety_reward(
    refusal_fn: TextScorer | None = None,
    reward_scorer: PairScorer | None = None,
    severity_weights: dict[str, float] | None = None,
    scorer: SafetyScorer | None = None,
):
    """``--algo ppo``: a TRL reward function returning R (the cost is only logged)."""
    scorer = scorer or SafetyScorer(refusal_fn, reward_scorer, None, severity_weights)

    def safety_reward(prompts, completions, **kwargs) -> list[float]:
        rewards, costs = scorer.score(prompts, completions, kwargs)
        _log(kwargs, "safety/cost_mean", sum(costs) / max(len(costs), 1))
        _log(kwargs, "safety/violation_fraction", violation_fraction(costs))
        return rewards

    return safety_reward


class LambdaState:
    """The multiplier λ and the costs seen since its last update (shared by the reward function and the trainer)."""

    def __init__(self, value: float):
        self.value = float(value)
        self.pending_costs: list[float] = []
        self.history: list[dict[str, Any]] = []

    def take_pending(self) -> list[float]:
        costs, self.pending_costs = self.pending_costs, []
        return costs


def make_constrained_reward(
    mode: str,
    lam: LambdaState,
    scorer: SafetyScorer | None = None,
    refusal_fn: TextScorer | None = None,
    severity_weights: dict[str, float] | None = None,
):
    """``repo`` (R − λ·max(0, C)) or ``ppo-lag`` (R − λ·C) as a TRL reward function reading λ from ``lam``."""
    if mode not in ("repo", "ppo-lag"):
        raise ValueError(f"mode must be 'repo' or 'ppo-lag', not {mode!r}")
    scorer = scorer or SafetyScorer(refusal_fn, None, None, severity_weights)
    combine = repo_rewards if mode == "repo" else lagrangian_rewards

    def constrained_reward(prompts, completions, **kwargs) -> list[float]:
        rewards, costs = scorer.score(prompts, completions, kwargs)
        lam.pending_costs.extend(c for c in costs if math.isfinite(c))
        _log(kwargs, "safety/reward_mean", sum(rewards) / max(len(rewards), 1))
        _log(kwargs, "safety/cost_mean", sum(costs) / max(len(costs), 1))
        # RePO's "fraction of violating prompts": here per sampled response, the unit the penalty applies to.
        _log(kwargs, "safety/violation_fraction", violation_fraction(costs))
        _log(kwargs, "lambda", lam.value)
        return combine(rewards, costs, lam.value)

    constrained_reward.__name__ = "repo_reward" if mode == "repo" else "lagrangian_reward"
    return constrained_reward
