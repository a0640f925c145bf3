"""``equi curate --guard-model MODEL``: a guard gives prompt harm and answer costs; cached; the manifest says so.

Real prompts (AdvBench harmful behaviours, XSTest's safe prompts, HH-RLHF dialogues). The guards are SYNTHETIC: a
scripted one for the pure steps, and a tiny Llama built and fitted here to answer "unsafe" after the AdvBench
prompts and "safe" after the XSTest ones (Llama Guard's verdict format) — what is checked is the wiring: the chat
template, left padding, the verdict tokens, the override of harm and cost, the cache, the accounting.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from curation.categorise import categorise
from curation.guard import CausalGuard, ModelGuard, conversation, split_conversation, verdict_token_ids
from curation.guard_labels import GuardLabeller, guard_costs, guard_harm
from curation.judge import AnswerCache
from equi.cli import app
from tests.realdata import advbench_rows, hh_lines, write_jsonl

runner = CliRunner()


def _xstest_safe(shared_data, n: int) -> list[str]:
    with open(shared_data / "xstest_prompts" / "xstest_prompts.csv", newline="", encoding="utf-8") as fh:
        return [r["prompt"] for r in csv.DictReader(fh) if r["label"] == "safe"][:n]


class ScriptedGuard(ModelGuard):
    """SYNTHETIC guard: P(unsafe) 0.9 when the last turn contains "unsafe-word", else 0.2; counts what it is asked."""

    name = "scripted"

    def __init__(self):
        self.asked: list[list[dict]] = []

    def unsafe_probability(self, conversations):
        self.asked.extend(conversations)
        return np.array([0.9 if "bomb" in c[-1]["content"] else 0.2 for c in conversations], np.float32)


def test_conversations_round_trip_through_hh_transcripts():
    messages = conversation("Human: hi\n\nAssistant: hello\n\nHuman: how do I bake bread?", "Mix flour.")
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    prompt, answer = split_conversation(messages)
    assert answer == "Mix flour." and prompt.startswith("Human: hi") and prompt.endswith("bake bread?")
    assert split_conversation(conversation("How do I bake bread?")) == ("How do I bake bread?", None)


def test_guard_harm_decides_benign_and_costs_are_its_probabilities(tmp_path):
    from curation.categorise import Categoriser

    frame = pl.DataFrame({  # SYNTHETIC rows
        "prompt": ["How do I build a bomb?", "How do I bake bread?", "How do I build a bomb?"],
        "chosen": ["No.", "Mix flour and water.", None],
        "rejected": ["Take a bomb kit...", "No.", None],
        "response": [None, None, "Here is a bomb recipe"],
        "is_safe": [None, None, True],  # a label carried by the input wins over the guard's cost
        "prompt_messages": [None, None, None],
    }, schema_overrides={"is_safe": pl.Boolean, "prompt_messages": pl.List(pl.Struct({"role": pl.String,
                                                                                       "content": pl.String}))})
    guard = ScriptedGuard()
    labeller = GuardLabeller("scripted", guard, "d", AnswerCache(tmp_path, "d"))
    harm = guard_harm(frame, labeller)
    assert harm.tolist() == pytest.approx([0.9, 0.2, 0.9])
    categoriser = Categoriser.load_default()
    embeddings = np.zeros((3, categoriser.embedding_dim), np.float32)
    out = categorise(frame, embeddings, categoriser, harm=harm)
    assert out["harm_score"].to_list() == pytest.approx([0.9, 0.2, 0.9])
    groups = out["group"].to_list()
    assert groups[1] == "BENIGN" and groups[0] != "BENIGN" and groups[2] != "BENIGN"
    assert out["group_confidence"][1] == pytest.approx(0.8)

    costed = guard_costs(out.with_columns(chosen_cost=pl.lit(0.0, pl.Float32), rejected_cost=pl.lit(0.0, pl.Float32),
                                          response_cost=pl.lit(-1.0, pl.Float32)), labeller)
    assert costed["chosen_cost"].to_list() == pytest.approx([-0.6, -0.6, 0.0])  # 2·0.2 − 1; no answer: untouched
    assert costed["rejected_cost"].to_list() == pytest.approx([0.8, -0.6, 0.0])  # "Take a bomb kit": 2·0.9 − 1
    assert costed["response_cost"].to_list() == pytest.approx([-1.0, -1.0, -1.0])  # is_safe=True kept
    asked = len(guard.asked)

    guard.unsafe_probability = lambda conversations: pytest.fail(f"asked again: {conversations}")
    assert guard_harm(frame, labeller).tolist() == pytest.approx(harm.tolist())  # from the cache
    assert guard_costs(out.with_columns(chosen_cost=pl.lit(0.0, pl.Float32), rejected_cost=pl.lit(0.0, pl.Float32),
                                        response_cost=pl.lit(-1.0, pl.Float32)), labeller).equals(costed)
    assert asked == 2 + 4  # two distinct prompts; four answers (the third row's is_safe-labelled one is not asked)


@pytest.fixture(scope="module")
def fitted_guard(tmp_path_factory, shared_data):
    """A tiny Llama fitted to Llama Guard's verdict: "unsafe" after 8 AdvBench prompts, "safe" after 8 XSTest ones."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train_fixtures import build_tiny_model

    harmful = [r["prompt"] for r in advbench_rows(shared_data, 8)]
    benign = _xstest_safe(shared_data, 8)
    path = build_tiny_model(tmp_path_factory.mktemp("guard") / "model", texts=harmful + benign + ["safe", "unsafe"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    safe_ids, unsafe_ids = verdict_token_ids(tokenizer)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in harmful + benign]
    targets = torch.tensor([unsafe_ids[0]] * len(harmful) + [safe_ids[0]] * len(benign))
    torch.manual_seed(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = tokenizer(texts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    for _ in range(40):
        logits = model(**batch, position_ids=positions).logits[:, -1, :]
        loss = torch.nn.functional.cross_entropy(logits, targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.save_pretrained(path)
    return path, harmful, benign


@pytest.mark.slow
def test_a_llama_guard_style_causal_guard_reads_its_verdict_token(fitted_guard):
    from curation.guard import load_guard, load_model_guard

    path, harmful, benign = fitted_guard
    guard = load_model_guard(str(path))
    assert isinstance(guard, CausalGuard) and isinstance(load_guard(str(path)), CausalGuard)
    together = guard.unsafe_probability([conversation(p) for p in harmful + benign])
    assert (together[:8] > 0.5).all() and (together[8:] < 0.5).all(), together
    # Left padding is invisible: each prompt alone gets the probability it got in a padded batch of 16.
    alone = np.concatenate([guard.unsafe_probability([conversation(p)]) for p in harmful[:2] + benign[:2]])
    np.testing.assert_allclose(alone, np.concatenate([together[:2], together[8:10]]), atol=1e-5)
    # Only the last position's logits are computed (logits_to_keep=1): the verdict every position's logits give.
    import torch

    text = guard.tokenizer.apply_chat_template(conversation(harmful[0]), tokenize=False, add_generation_prompt=True)
    ids = guard.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        probs = torch.softmax(guard.model(input_ids=ids).logits[0, -1].float(), -1)
    unsafe, safe = probs[guard.unsafe_ids].sum(), probs[guard.safe_ids].sum()
    np.testing.assert_allclose(together[0], float(unsafe / (unsafe + safe)), atol=1e-5)


@pytest.mark.slow
def test_curate_with_a_guard_model_takes_harm_and_costs_from_it(fitted_guard, shared_data, tmp_path, monkeypatch):
    from curation.guard import load_model_guard

    path, harmful, benign = fitted_guard
    monkeypatch.setenv("EQUI_CACHE", str(tmp_path / "cache"))
    rows = hh_lines(shared_data, 12) + [json.dumps({"prompt": p}) for p in harmful + benign]
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    out = tmp_path / "mix"
    result = runner.invoke(app, ["curate", str(raw), "--out", str(out), "--quiet", "--guard-model", str(path)],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labellers"]["guard"] == str(path) and manifest["labellers"]["harm_and_cost"] == "guard"
    assert manifest["accounting"]["input_lines"] == manifest["accounting"]["pooled"] == 28
    assert f"by the guard `{path}`" in (out / "README.md").read_text()
    assert list((tmp_path / "cache" / "guard").glob("*.sqlite"))

    pool = pl.concat([pl.read_parquet(p) for p in sorted((out / "pool").glob("*.parquet"))])
    guard = load_model_guard(str(path))
    prompts = [list(m) for m in pool["prompt"].to_list()]
    expected = guard.unsafe_probability(prompts)
    # The pool keeps harm's parts (explicit = harm·P(explicit | harm), intent = harm·P(intent | harm)): at most harm.
    parts = np.maximum(pool["explicit_score"].to_numpy(), pool["intent_score"].to_numpy())
    assert (parts <= expected + 1e-5).all() and (parts[expected >= 0.5] > 0).all()
    assert [g == "BENIGN" for g in pool["group"].to_list()] == (expected < 0.5).tolist()
    text = {m[-1]["content"]: g for m, g in zip(prompts, pool["group"].to_list())}
    assert all(text[p] != "BENIGN" for p in harmful) and all(text[p] == "BENIGN" for p in benign)
    pairs = pool.filter(pl.col("chosen").is_not_null())
    chosen = guard.unsafe_probability([list(m) + list(c) for m, c in zip(pairs["prompt"], pairs["chosen"])])
    np.testing.assert_allclose(pairs["chosen_cost"].to_numpy(), 2 * chosen - 1, atol=1e-5)
