"""A curated mix is a plain Hugging Face preference dataset: TRL trains on it with no equi code.

The mix is curated by ``equi curate`` from real HH-RLHF harmless-base dialogues; the model is the tiny test-built
Llama of ``tests/train_fixtures.py`` (random weights, a tokenizer trained here). The training code below imports
only ``datasets``, ``transformers`` and ``trl``.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from equi.cli import app
from tests.realdata import hh_lines, write_jsonl
from tests.train_fixtures import build_tiny_model


@pytest.fixture(scope="module")
def curated(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("plain-trl")
    raw = write_jsonl(root / "hh.jsonl", hh_lines(shared_data, 160))
    mix = root / "mix"
    result = CliRunner().invoke(app, ["curate", str(raw), "--out", str(mix), "--quiet", "--eval-fraction", "0.1"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root, mix


def test_plain_trl_dpo_trains_a_step_on_load_dataset_of_the_mix(curated):
    # --- the user's code: no equi import -------------------------------------------------------------------
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    root, mix = curated
    model_path = build_tiny_model(root / "model")
    dataset = load_dataset(str(mix))
    assert set(dataset) == {"train", "test"}  # TRL's dataset_train_split / dataset_test_split defaults
    model = AutoModelForCausalLM.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    args = DPOConfig(output_dir=str(root / "out"), max_steps=1, per_device_train_batch_size=2, max_length=128,
                     report_to="none", bf16=False, gradient_checkpointing=False, logging_steps=1,
                     dataloader_pin_memory=False, save_strategy="no")
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset["train"], eval_dataset=dataset["test"],
                         processing_class=tokenizer)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    # ---------------------------------------------------------------------------------------------------------
    assert trainer.state.global_step == 1
    loss = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert loss and loss[0] == pytest.approx(0.6931, abs=0.01)  # a first DPO step starts at log 2
    assert any((a != b).any() for a, b in zip(before, model.parameters()))  # the step changed the weights
    # TRL rendered the conversations with the chat template, every turn a message of its own: a multi-turn
    # prompt is user, assistant, user (+ the generation prompt), never one user turn of "Human:/Assistant:" text
    turns = [tokenizer.decode(ids).count("<|im_start|>") for ids in trainer.train_dataset["prompt_ids"]]
    assert max(turns) >= 4


def test_the_mix_is_not_taken_for_a_vision_dataset(curated):
    from datasets import load_dataset

    _, mix = curated
    train = load_dataset(str(mix), split="train")
    assert "image" not in train.column_names  # TRL treats any `image` column, even all-null, as vision data
    manifest = json.loads((mix / "manifest.json").read_text())
    assert manifest["schema_version"] == 3 and manifest["multimodal"] is False
