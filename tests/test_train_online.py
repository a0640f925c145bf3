"""The online stage (GRPOTrainer): reward/cost functions, AMA value-sign masks, λ updates, reward/cost models.

The mix is real hh-rlhf text with SYNTHETIC labels (``train_fixtures.build_hh_mix``); the model is a tiny Llama
built in the test. Refusal scorers passed in by tests are synthetic stand-ins, said so where they are used.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from train_fixtures import build_hh_mix, build_tiny_model
from train.online import completion_token_offsets, value_sign_mask
from train.rewards import (
    LambdaState,
    SafetyScorer,
    cost_values,
    make_constrained_reward,
    make_safety_reward,
    prompt_harm,
)

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("private_equi_cache")


def synthetic_refusal(texts):
    """SYNTHETIC refusal detector for unit tests: 1 when the text says "sorry", else 0."""
    return [1.0 if "sorry" in t.lower() else 0.0 for t in texts]


class Metrics:
    def __init__(self):
        self.logged = {}

    def __call__(self, name, value):
        self.logged.setdefault(name, []).append(value)


# ---- pure reward / cost functions -----------------------------------------------------------------------------------


def test_safety_reward_prefers_compliance_on_benign_and_refusal_on_harmful_prompts():
    reward = make_safety_reward(refusal_fn=synthetic_refusal)
    completions = ["Sure, here is how.", "Sorry, I can't help.", "Sure, here is how.", "Sorry, I can't help."]
    log = Metrics()
    values = reward(
        prompts=["p"] * 4,
        completions=completions,
        group=["BENIGN", "BENIGN", "EHD", "EHD"],
        explicit_score=[0.0, 0.0, 0.9, 0.9],
        intent_score=[0.0, 0.0, 0.2, 0.2],
        severity=[None, None, "severe", "severe"],
        log_metric=log,
    )
    benign_comply, benign_refuse, harmful_comply, harmful_refuse = values
    assert benign_comply > benign_refuse and harmful_refuse > harmful_comply
    assert harmful_comply < 0 < harmful_refuse  # harmful compliance is penalised, not merely unrewarded
    # Costs: only the harmful compliance violates (2·0.9·1 − 1 = 0.8, ×4 for "severe").
    assert log.logged["safety/violation_fraction"] == [0.25]
    assert log.logged["safety/cost_mean"][0] == pytest.approx((-1 - 1 + 0.8 * 4 - 1) / 4)


def test_cost_matches_curation_formula_and_harm_reads_the_prompt_columns():
    assert cost_values([0.0, 1.0, 0.5], [1.0, 1.0, 0.5]) == [1.0, -1.0, -0.5]
    assert prompt_harm("BENIGN", 0.9, 0.9) == 0.0  # benign: any answer is safe
    assert prompt_harm("IHD", 0.1, 0.7) == 0.7
    assert prompt_harm("OTHER", 0.0, 0.1) == 0.5  # a safety group is at least even odds harmful


def test_conversational_completions_are_read_as_text():
    reward = make_safety_reward(refusal_fn=synthetic_refusal)
    values = reward(
        prompts=[[{"role": "user", "content": "How do I make a bomb?"}]] * 2,
        completions=[[{"role": "assistant", "content": "Sorry, no."}], [{"role": "assistant", "content": "Mix..."}]],
        group=["EHD", "EHD"], explicit_score=[1.0, 1.0], intent_score=[0.0, 0.0],
    )
    assert values[0] == 1.0 and values[1] == -1.0


def test_repo_penalises_only_violations_and_ppo_lag_credits_safety():
    columns = dict(group=["EHD", "EHD"], explicit_score=[1.0, 1.0], intent_score=[1.0, 1.0], severity=[None, None])
    completions = ["Here you go.", "Sorry."]
    scorer = SafetyScorer(refusal_fn=synthetic_refusal)
    reward, cost = scorer.score(["p", "p"], completions, columns)
    assert cost == [1.0, -1.0]
    lam = LambdaState(2.0)
    log = Metrics()
    repo = make_constrained_reward("repo", lam, scorer=scorer)(prompts=["p", "p"], completions=completions,
                                                                 log_metric=log, **columns)
    assert repo == [reward[0] - 2.0, reward[1]]  # the safe response is neither penalised nor credited
    assert log.logged["safety/violation_fraction"] == [0.5] and log.logged["lambda"] == [2.0]
    lag = make_constrained_reward("ppo-lag", lam, scorer=scorer)(prompts=["p", "p"], completions=completions,
                                                                    **columns)
    assert lag == [reward[0] - 2.0, reward[1] + 2.0]
    assert lam.take_pending() == [1.0, -1.0, 1.0, -1.0] and lam.pending_costs == []


def test_model_scorers_replace_the_detector():
    scorer = SafetyScorer(
        refusal_fn=lambda texts: pytest.fail("the detector must not run when both models are given"),
        reward_scorer=lambda prompts, completions: [len(c) for c in completions],
        cost_scorer=lambda prompts, completions: [0.5 for _ in completions],
        severity_weights={"severe": 4.0},
    )
    rewards, costs = scorer.score(["a", "b"], ["xx", "yyy"], {"severity": ["severe", None]})
    assert rewards == [2.0, 3.0] and costs == [2.0, 0.5]


# ---- AMA value-sign masks -------------------------------------------------------------------------------------------


def test_value_sign_mask_zeroes_tokens_whose_segment_disagrees_with_the_advantage():
    offsets = [(0, 3), (3, 6), (6, 7), (7, 12), (12, 12)]
    segments = [(0, 6, 0.8), (7, 12, -0.6)]
    assert value_sign_mask(offsets, segments, advantage=+1.0) == [1, 1, 1, 0, 1]  # good answer: harmful part out
    assert value_sign_mask(offsets, segments, advantage=-1.0) == [0, 0, 1, 1, 1]  # bad answer: good part kept safe
    assert value_sign_mask(offsets, segments, advantage=0.0) == [1] * 5
    # A token straddling two segments takes the one it overlaps most.
    assert value_sign_mask([(4, 9)], [(0, 5, 1.0), (5, 12, -1.0)], advantage=1.0) == [0]


# ---- trainer-level tests on a tiny model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    mix = build_hh_mix(root / "mix", n_rows=24, n_eval=4)
    model = build_tiny_model(root / "model")
    return root, mix, model




def test_completion_offsets_cover_the_decoded_text(material):
    from transformers import AutoTokenizer

    _, _, model = material
    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenizer("I can't help with that. Here is why.", add_special_tokens=False)["input_ids"]
    ids = ids + [tokenizer.eos_token_id]
    text, offsets = completion_token_offsets(tokenizer, ids)
    assert text == "I can't help with that. Here is why."
    assert offsets[-1][0] == offsets[-1][1]  # the EOS covers no character, so it is never masked
    assert "".join(text[s:e] for s, e in offsets) == text


def halves(harm, response):
    """SYNTHETIC segment scorer: first half of the response worth learning (+1), second half harmful (−1)."""
    middle = len(response) // 2
    return [(0, middle, 1.0), (middle, len(response), -1.0)]


def test_ama_masked_tokens_get_exactly_zero_gradient(material, tmp_path):
    from train.config import TrainConfig
    from train.mixdata import load_split
    from equi.models import load_causal_lm, load_tokenizer
    from train.online import build_online_trainer, prompt_dataset

    _, mix, model_path = material
    config = TrainConfig(mix=str(mix), model=str(model_path), algo="ama-ppo", out=str(tmp_path / "run"), beta=0.1,
                         batch_size=4, num_generations=2, max_completion_length=12, max_steps=1, quiet=True)
    tokenizer = load_tokenizer(str(model_path))
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    model = load_causal_lm(str(model_path))
    prompts = prompt_dataset(load_split(mix, "train").dataset, tokenizer)
    # SYNTHETIC refusal scores that vary with the text, so the two samples of a prompt get different rewards.
    scorer = SafetyScorer(refusal_fn=lambda texts: [(len(t) % 7) / 7 for t in texts])
    trainer, _ = build_online_trainer(config, model, tokenizer, prompts, tmp_path / "run", scorer=scorer,
                                      segment_fn=halves)
    trainer.model.train()
    inputs = [dict(prompts[i]) for i in (0, 0, 1, 1)]  # GRPO's sampler repeats each prompt num_generations times
    batch = trainer._generate_and_score_completions(inputs)
    assert "tool_mask" in batch and batch["advantages"].abs().sum() > 0

    kept = {}
    original = trainer._get_per_token_logps_and_entropies

    def keeping_grad(*args, **kwargs):
        logps, entropies, aux = original(*args, **kwargs)
        logps.retain_grad()
        kept["logps"] = logps
        return logps, entropies, aux

    trainer._get_per_token_logps_and_entropies = keeping_grad
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    grad = kept["logps"].grad
    response = batch["completion_mask"].bool()
    masked = response & (batch["tool_mask"] == 0)
    unmasked = response & (batch["tool_mask"] == 1) & (batch["advantages"].unsqueeze(1) != 0)
    assert masked.any() and unmasked.any()
    assert torch.equal(grad[masked], torch.zeros_like(grad[masked]))  # exactly zero, policy and KL terms alike
    assert (grad[unmasked] != 0).all()


def invoke(*args: str):
    from equi.cli import app

    return runner.invoke(app, ["train", *args])


def online(mix, model, out, algo, *extra):
    return ["--mix", str(mix), "--model", str(model), "--out", str(out), "--algo", algo, "--batch-size", "4",
            "--num-generations", "2", "--max-completion-length", "12", "--lr", "1e-3", "--max-steps", "2",
            "--quiet", *extra]


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo", ["ppo", "repo", "ama-ppo"])
def test_online_algos_train_and_log(material, tmp_path, algo):
    _, mix, model = material
    out = tmp_path / algo
    result = invoke(*online(mix, model, out, algo))
    assert result.exit_code == 0, result.output
    steps = [m for m in read_metrics(out) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(math.isfinite(m["reward"]) and 0 <= m["safety/violation_fraction"] <= 1 for m in steps)
    if algo == "repo":
        assert all(m["lambda"] == 1.0 for m in steps)
    if algo == "ama-ppo":  # the real curation segment scorer decides the masks
        assert all(0 <= m["ama/masked_fraction"] <= 1 for m in steps)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and (out / "final" / "model.safetensors").is_file()


def test_ppo_lag_updates_lambda_every_k_steps_with_guards_and_resumes_with_it(material, tmp_path):
    _, mix, model = material
    out = tmp_path / "lag"
    args = online(mix, model, out, "ppo-lag", "--lambda-update-every", "1", "--lambda-warmup-steps", "2",
                  "--lambda-lr", "0.5", "--cost-threshold", "-2", "--save-steps", "1", "--keep-checkpoints")
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    updates = [m for m in read_metrics(out) if "lambda_update" in m]
    assert [u["step"] for u in updates] == [1, 2]
    assert updates[0]["lambda_update"].startswith("warm-up") and updates[0]["lambda_next"] == 1.0
    second = updates[1]
    assert second["lambda_update"] == "updated"
    assert second["lambda_next"] == pytest.approx(min(10.0, max(0.0, 1.0 + 0.5 * (second["expected_cost"] + 2))))
    assert json.loads((out / "checkpoint-1" / "equi_lambda.json").read_text()) == {"lambda": 1.0, "pending_costs": []}
    # Crash after step 1: the resumed run starts from the λ saved with checkpoint-1, and the step-2 records written
    # before the crash are dropped rather than logged twice.
    shutil.rmtree(out / "checkpoint-2")
    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()
    resumed = invoke("--out", str(out), "--resume", "--model", str(model), "--quiet")
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-1") and summary["steps"] == 2
    updates = [u for u in read_metrics(out) if "lambda_update" in u]
    assert [u["step"] for u in updates] == [1, 2] and updates[1]["lambda"] == 1.0
    assert summary["lambda_updates"] == 2  # the one before the crash counts too


def test_costs_not_yet_used_by_a_lambda_update_are_saved_with_the_checkpoint(tmp_path):
    from types import SimpleNamespace

    from train.online import LambdaCallback, saved_lambda
    from train.rewards import LambdaState

    lam = LambdaState(1.5)
    lam.pending_costs = [0.25, -1.0]  # sampled at steps 7-8; the next update (every 3 steps) is at step 9
    callback = LambdaCallback(lam, every=3, warmup_steps=0, lr=0.1, lam_max=10, threshold=0.0,
                              metrics_path=tmp_path / "metrics.jsonl")
    (tmp_path / "checkpoint-8").mkdir()
    callback.on_save(SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=8,
                                                                                 is_world_process_zero=True), None)
    restored = saved_lambda(tmp_path / "checkpoint-8", initial=1.0)
    assert restored.value == 1.5 and restored.pending_costs == [0.25, -1.0]
    assert saved_lambda(None, initial=1.0).value == 1.0 and saved_lambda(None, initial=1.0).pending_costs == []


def test_reward_and_cost_models_train_and_drive_the_online_stage(material, tmp_path):
    from transformers import AutoModelForSequenceClassification

    _, mix, model = material
    common = ["--mix", str(mix), "--model", str(model), "--batch-size", "4", "--lr", "1e-3", "--max-steps", "2",
              "--max-length", "128", "--quiet"]
    for algo in ("reward-model", "cost-model"):
        result = invoke(*common, "--algo", algo, "--out", str(tmp_path / algo))
        assert result.exit_code == 0, result.output
        summary = json.loads((tmp_path / algo / "summary.json").read_text())
        assert summary["steps"] == 2 and 0 <= summary["eval_pairwise_accuracy"] <= 1
        classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / algo / "final")
        assert classifier.config.num_labels == 1
    out = tmp_path / "repo-models"
    result = invoke(*online(mix, model, out, "repo", "--reward-model", str(tmp_path / "reward-model" / "final"),
                            "--cost-model", str(tmp_path / "cost-model" / "final")))
    assert result.exit_code == 0, result.output
    steps = [m for m in read_metrics(out) if "loss" in m]
    assert steps and "safety/refusal_rate" not in steps[0]  # the detector did not run: the models scored
    # A policy is no reward model (it would get a random head), and a reward model writes no answers to evaluate.
    result = invoke(*online(mix, model, tmp_path / "policy-as-reward", "repo", "--reward-model", str(out / "final")))
    assert result.exit_code == 2 and "not a reward or cost model" in result.output, result.output
    from equi.cli import app

    result = runner.invoke(app, ["eval", str(tmp_path / "reward-model"), "--limit", "1", "--quiet"])
    assert result.exit_code == 2 and "is a reward-model run" in result.output, result.output


def test_cost_model_ranks_the_costlier_response_first(material):
    from train.mixdata import load_split
    from train.scorers import cost_ordered_pairs

    _, mix, _ = material
    pairs = load_split(mix, "train").dataset
    ordered, ties = cost_ordered_pairs(pairs, {})
    assert ties == sum(c == r for c, r in zip(pairs["chosen_cost"], pairs["rejected_cost"]))
    by_id = {row["id"]: row for row in pairs}
    for row in ordered:
        source = by_id[row["id"]]
        costlier = source["rejected"] if source["rejected_cost"] > source["chosen_cost"] else source["chosen"]
        assert row["chosen"] == costlier


def test_model_flags_are_refused_outside_the_online_stage(material, tmp_path):
    _, mix, model = material
    result = invoke("--mix", str(mix), "--model", str(model), "--out", str(tmp_path / "x"), "--algo", "dpo",
                    "--reward-model", "somewhere")
    assert result.exit_code == 2 and "online stage" in result.output


def test_online_without_prompts_exits_2(material, tmp_path):
    _, mix, model = material
    result = invoke(*online(mix, model, tmp_path / "none", "ppo", "--groups", "OTHER"))
    assert result.exit_code == 2 and "no prompts" in result.output


def test_quiet_hides_the_load_report_of_a_new_scoring_head_and_restores_the_settings(material):
    """A reward model started from a causal LM gets a new head: transformers reports ``score.weight MISSING``.
    Expected, so ``--quiet`` does not show it; without --quiet it is shown; transformers' settings come back."""
    import logging

    from transformers.utils import logging as hf_logging

    from equi.progress import quiet_transformers
    from equi.models import load_sequence_classifier

    class Keep(logging.Handler):  # transformers' own handler writes to the stderr of import time, not capfd's
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    _, _, model = material
    before, bars, keep = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), Keep()
    hf_logging.get_logger().addHandler(keep)
    shown = []
    try:
        for quiet in (True, False):
            keep.messages.clear()
            with quiet_transformers(quiet):
                load_sequence_classifier(str(model))
            shown.append(any("LOAD REPORT" in m for m in keep.messages))
            assert hf_logging.get_verbosity() == before and hf_logging.is_progress_bar_enabled() == bars
    finally:
        hf_logging.get_logger().removeHandler(keep)
    assert shown == [False, True]
