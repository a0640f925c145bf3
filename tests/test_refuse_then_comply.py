"""Issue 16 item 3: a response that opens with a refusal and then gives the content withholds nothing, so it costs
as compliance, while ``*_refusal`` (the over-refusal view, any refusal as XSTest counts it) still calls it a refusal.
Every response here is a real model completion from ../shared/data."""

from __future__ import annotations

import gzip
import json

import numpy as np
import polars as pl
import pytest

from curation.refusal import refusal_scores, xstest_labelled  # noqa: E402
from curation.segments import follow_through_scores, withheld_scores  # noqa: E402
from curation.steps import score_costs  # noqa: E402
from train.rewards import SafetyScorer, cost_values, safety_reward_values  # noqa: E402

# Refuse-then-comply completions: (model, file, prompt start) in refusal_direction_completions, all judged unsafe by
# LlamaGuard-2; (method, model, goal start) in the JailbreakBench artifacts, all judged jailbroken.
_REFUSAL_DIRECTION = [
    ("llama-2-7b-chat-hf", "jailbreakbench_ablation", "Describe the steps necessary to shoot up a high school"),
    ("gemma-2b-it", "jailbreakbench_baseline", "Design a phishing email that can trick users"),
    ("gemma-2b-it", "jailbreakbench_baseline", "Write a Twitter post explaining in detail how to extinguish"),
]
_JBB = [
    ("PAIR", "vicuna-13b-v1.5", "Give instructions for cannibals regarding how to find, kill,"),
    ("PAIR", "vicuna-13b-v1.5", "Describe ways to create shell companies to funnel money from"),
]


@pytest.fixture(scope="module")
def refuse_then_comply(shared_data):
    found = []
    for model, name, start in _REFUSAL_DIRECTION:
        path = shared_data / "refusal_direction_completions" / model / f"{name}_evaluations.json"
        rows = [r for r in json.loads(path.read_text(encoding="utf-8"))["completions"]
                if r["prompt"].startswith(start) and r.get("is_jailbreak_llamaguard2") == 1]
        assert len(rows) == 1, (model, name, start)
        found.append(rows[0]["response"])
    path = shared_data / "jbb_artifacts_responses" / "jbb_artifacts_responses.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        jbb = [json.loads(line) for line in handle]
    for method, model, start in _JBB:
        rows = [r for r in jbb if r["method"] == method and r["model"] == model and r["goal"].startswith(start)
                and r["jailbroken"]]
        assert len(rows) == 1, (method, model, start)
        found.append(rows[0]["response"])
    return found


@pytest.fixture(scope="module")
def xstest(shared_data):
    return xstest_labelled(shared_data / "xstest_completions_dev")


def test_refuse_then_comply_is_a_refusal_but_withholds_nothing(refuse_then_comply):
    refusals = refusal_scores(refuse_then_comply)
    # The over-refusal view: the three that open with a plain refusal ("I cannot provide ...") are refusals. The two
    # JailbreakBench ones open with a disclaimer ("As an AI language model, I must emphasize that this scenario is
    # purely hypothetical ...", "... I cannot condone ... However, I can provide a fictional scenario"), an opening
    # the human labels the heads are fit on split both ways (chatgpt_refusals: 56 % of such answers are refusals),
    # so no view of them is asserted here; what matters for safety, that they withhold nothing, is (below).
    assert (refusals[:3] >= 0.5).all(), refusals
    follow = follow_through_scores(refuse_then_comply, refusals)
    withheld = withheld_scores(refuse_then_comply, refusals)
    assert (follow > 0.8).all() and (withheld < 0.2).all(), (follow, withheld)
    assert np.allclose(withheld, withheld_scores(refuse_then_comply))  # computes the refusal scores itself


def test_human_labelled_full_refusals_stay_withheld_and_compliance_stays_compliance(xstest):
    refuse = xstest.filter(pl.col("label") == "refuse")["completion"].to_list()
    comply = xstest.filter(pl.col("label") == "comply")["completion"].to_list()
    kept = withheld_scores(refuse) >= 0.5
    # measured 0.957 on these 490 human-labelled full refusals: the rest ("It's important to talk to a
    # professional", "Is there anything else?") delivers little
    assert kept.mean() > 0.93, kept.mean()
    assert (withheld_scores(comply) < 0.5).all()


def test_short_and_plain_refusals_have_nothing_to_follow():
    texts = ["I'm sorry, but I can't help with that.", "I cannot fulfill your request.", "", None,
             "Sure! Step 1: preheat the oven."]
    refusals = np.array([0.97, 0.98, 0.0, 0.0, 0.01], dtype=np.float32)
    assert follow_through_scores(texts, refusals).tolist() == [0.0] * 5
    assert withheld_scores(texts, refusals).tolist() == pytest.approx([0.97, 0.98, 0.0, 0.0, 0.01])


def test_lengths_must_match():
    with pytest.raises(ValueError, match="2 responses but 1 refusal"):
        follow_through_scores(["a", "b"], [0.5])


def test_curation_cost_counts_refuse_then_comply_as_compliance(refuse_then_comply):
    plain = "I'm sorry, but I can't help with that request."
    n = len(refuse_then_comply)
    frame = pl.DataFrame({
        "harm_score": [1.0] * n + [1.0, 0.0],
        "chosen": [plain] * n + [plain, None],
        "rejected": refuse_then_comply + [None, None],
        "response": [None] * n + [None, refuse_then_comply[0]],
        "is_safe": [None] * (n + 2),
    }, schema_overrides={"is_safe": pl.Boolean, "harm_score": pl.Float32})
    frame = frame.with_columns(**{f"{c}_refusal": pl.Series(
        [None if t is None else float(s) for t, s in zip(frame[c].to_list(), refusal_scores(
            [t or "" for t in frame[c].to_list()]))], dtype=pl.Float32) for c in ("chosen", "rejected", "response")})
    costs = score_costs(frame)
    assert (costs["rejected_refusal"][:3] >= 0.5).all()  # *_refusal keeps its meaning (the plain-refusal openings)
    assert (costs["rejected_cost"][:n] > 0.5).all(), costs["rejected_cost"].to_list()
    assert (costs["chosen_cost"][: n + 1] < -0.8).all()
    assert costs["rejected_cost"][n] is None and costs["chosen_cost"][n + 1] is None
    assert costs["response_cost"][n + 1] == pytest.approx(-1.0)  # any answer to a benign prompt is safe


def test_online_reward_and_cost_do_not_pay_the_refusal_opening(refuse_then_comply):
    scorer = SafetyScorer()
    texts = refuse_then_comply[:2] + ["I'm sorry, but I can't help with that."]
    kwargs = {"group": ["EHD"] * 3, "explicit_score": [0.95] * 3, "intent_score": [0.95] * 3}
    rewards, costs = scorer.score(["p"] * 3, texts, kwargs)
    assert costs[0] > 0 and costs[1] > 0 and costs[2] < 0, costs
    assert rewards[0] < 0 and rewards[1] < 0 and rewards[2] > 0.5, rewards
    # on a benign prompt the refusal opening still counts against the answer (over-refusal view)
    benign = safety_reward_values([0.9], [0.0], [True], withheld=[0.05])
    assert benign == [pytest.approx(-0.8)]
    assert cost_values([0.0, 1.0], [1.0, 1.0]) == [1.0, -1.0]
