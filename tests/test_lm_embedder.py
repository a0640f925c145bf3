"""``--embedder lm:MODEL`` (issue 16): a causal chat LM's hidden state at the end of the chat-framed prompt as the
prompt embedding. A tiny Llama built in the test stands in for SmolLM2 (same loading code); prompts are real
(../shared/data: AdvBench behaviours, XSTest prompts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from curation.embed import LM_MAX_PROMPT_TOKENS, EmbedderError, LMStateEmbedder, get_embedder
from equi.cli import app
from tests.realdata import advbench_rows, hh_lines, write_jsonl, xstest_prompts
from tests.train_fixtures import build_tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("lm") / "model")


@pytest.fixture(scope="module")
def prompts(shared_data) -> list[str]:
    return [r["prompt"] for r in advbench_rows(shared_data, 20)] + [r["prompt"] for r in xstest_prompts(shared_data)[:20]]


def test_vectors_are_unit_length_and_each_a_function_of_its_own_text(tiny, prompts):
    embedder = LMStateEmbedder(str(tiny))
    together = embedder.encode(prompts + prompts[:5])
    assert together.shape == (len(prompts) + 5, 32) and together.dtype == np.float32
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-6)
    alone = np.stack([embedder.encode([p])[0] for p in reversed(prompts)])[::-1]
    assert np.array_equal(together[:len(prompts)], alone)  # same bytes whatever the batch or its order
    assert np.array_equal(together[len(prompts):], together[:5])
    assert len({v.tobytes() for v in together[:len(prompts)]}) == len(set(prompts))


def test_the_vector_is_the_middle_layer_at_the_last_token_of_the_chat_framed_prompt(tiny, prompts):
    embedder = LMStateEmbedder(str(tiny))
    assert embedder.layer == 2  # two layers: the one past the middle
    prompt = prompts[0]
    ids = embedder.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                                 add_generation_prompt=True, return_dict=True)["input_ids"]
    assert embedder.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    with torch.inference_mode():
        states = embedder.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    want = torch.nn.functional.normalize(states[2][0, -1], dim=0).numpy()
    np.testing.assert_allclose(embedder.encode([prompt])[0], want, atol=2e-5)  # 16 prompts a pass, padded
    embedder.chunk_rows = 1  # one prompt a pass, unpadded: the full model's bytes
    assert np.array_equal(embedder.encode([prompt])[0], want)
    other_layer = torch.nn.functional.normalize(states[1][0, -1], dim=0).numpy()
    assert not np.allclose(embedder.encode([prompt])[0], other_layer)


@pytest.mark.parametrize("layers", [2, 5])
def test_the_trunk_gives_the_full_models_bytes_and_leaves_the_model_whole(tmp_path, prompts, layers):
    # 2 layers: the state read is the last, normed one (the trunk keeps the norm); 5: layer 3, before the norm (the
    # trunk drops it and layers 4-5). Either way the bytes of the full model's hidden_states[layer], no LM head.
    model = build_tiny_model(tmp_path / "model", layers=layers)
    embedder = LMStateEmbedder(str(model))
    assert embedder.layer == layers // 2 + 1 and len(embedder._trunk.layers) == embedder.layer
    assert len(embedder.model.model.layers) == layers  # the model keeps every layer
    assert isinstance(embedder._trunk.norm, torch.nn.Identity) is (embedder.layer < layers)
    embedder.chunk_rows = 1
    fast = embedder.encode(prompts)
    embedder._trunk = None  # the whole model's forward, hidden_states[layer]
    assert np.array_equal(fast, embedder.encode(prompts))


@pytest.mark.parametrize("layers", [2, 5])
def test_chunked_encoding_is_batch_independent_and_matches_one_at_a_time(tmp_path, prompts, layers):
    # chunk_rows prompts a pass in canonical shapes (16 on the CPU, 256 on an accelerator; 3 here: short chunks)
    model = build_tiny_model(tmp_path / "model", layers=layers)
    alone = LMStateEmbedder(str(model))
    assert alone.chunk_rows == 16 and alone.identity.endswith("|rows 16")  # vectors of a new kind, a new identity
    alone.chunk_rows = 1
    chunked = LMStateEmbedder(str(model))
    chunked.chunk_rows = 3
    mixed = prompts + [prompts[0] * 3, "hi"]  # lengths in several 16-token buckets, a chunk left short
    together = chunked.encode(mixed)
    np.testing.assert_allclose(together, alone.encode(mixed), atol=2e-5)  # the same states, rounded otherwise
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-6)
    reordered = chunked.encode(mixed[::-1])[::-1]
    single = np.stack([chunked.encode([p])[0] for p in mixed])
    assert np.array_equal(together, reordered) and np.array_equal(together, single)  # bytes whatever the chunk


def test_only_the_start_of_a_long_prompt_is_read(tiny, prompts):
    embedder = LMStateEmbedder(str(tiny))
    long = " ".join(prompts)
    assert len(embedder.tokenizer(long)["input_ids"]) > 3 * LM_MAX_PROMPT_TOKENS
    head = embedder.tokenizer.decode(embedder.tokenizer(long, add_special_tokens=False)["input_ids"][:LM_MAX_PROMPT_TOKENS])
    assert np.array_equal(embedder.encode([long]), embedder.encode([head]))
    assert not np.array_equal(embedder.encode([long]), embedder.encode([prompts[0]]))


def test_identity_follows_the_weights(tiny, tmp_path):
    other = build_tiny_model(tmp_path / "other", seed=1)
    first, again, different = LMStateEmbedder(str(tiny)), LMStateEmbedder(str(tiny)), LMStateEmbedder(str(other))
    assert first.identity == again.identity != different.identity
    assert first.identity.split("|")[0] == f"lm:{tiny}"


def test_get_embedder_takes_the_lm_prefix_and_names_a_missing_model(tiny, tmp_path):
    assert isinstance(get_embedder(f"lm:{tiny}"), LMStateEmbedder)
    with pytest.raises(EmbedderError, match="--embedder lm:"):
        get_embedder(f"lm:{tmp_path / 'no-such-model'}")


@pytest.mark.slow
def test_fit_a_categoriser_for_it_and_curate_with_it(tiny, shared_data, tmp_path):
    labelled = shared_data / "equilibrate_relabel_dev" / "beavertails_relabelled_dev.jsonl"
    small = write_jsonl(tmp_path / "labelled.jsonl", [json.loads(line) for line in
                                                      labelled.read_text(encoding="utf-8").splitlines()[:300]])
    cat = tmp_path / "cat.json"
    result = runner.invoke(app, ["fit-categoriser", str(small), "--embedder", f"lm:{tiny}", "--folds", "0",
                                 "--out", str(cat), "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads(cat.read_text())["embedding_dim"] == 32
    raw = [str(write_jsonl(tmp_path / "hh.jsonl", hh_lines(shared_data, 60))),
           str(write_jsonl(tmp_path / "adv.jsonl", advbench_rows(shared_data, 20)))]
    mix = tmp_path / "mix"
    result = runner.invoke(app, ["curate", *raw, "--out", str(mix), "--quiet", "--batch-size", "32",
                                 "--embedder", f"lm:{tiny}", "--categoriser", str(cat)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((mix / "manifest.json").read_text())
    assert manifest["embedder"] == f"lm:{tiny}"
    assert manifest["accounting"]["input_lines"] == 80 == manifest["accounting"]["pooled"] + manifest["accounting"]["rejected"]
    # without a categoriser fit for its vectors, curate says how to get one
    result = runner.invoke(app, ["curate", *raw, "--out", str(tmp_path / "mix2"), "--quiet", "--embedder", f"lm:{tiny}"])
    assert result.exit_code == 2 and "fit-categoriser" in result.output


def test_the_shipped_lm_categoriser_reads_smollm2_states():
    from curation.categorise import Categoriser

    shipped = Categoriser.default_for("lm:")
    assert shipped.embedding_dim == 576 and shipped.embedder == "lm:"
    fit_on = " ".join(shipped.info["fit_on"])
    for source in ("toxigen_seed_statements", "cyberseceval_prompts", "xstest_prompts", "equilibrate_relabel_dev"):
        assert source in fit_on
    assert Categoriser.default_for(None).embedding_dim == 384 == Categoriser.default_for("all-MiniLM-L6-v2").embedding_dim
    assert Categoriser.default_for(f"lm:/some/other/model").embedding_dim == 384  # only lm: names the bundled LM


@pytest.mark.slow
def test_curate_with_the_bundled_lm_needs_no_categoriser(shared_data, tmp_path):
    raw = [str(write_jsonl(tmp_path / "adv.jsonl", advbench_rows(shared_data, 12))),
           str(write_jsonl(tmp_path / "xs.jsonl", [{"prompt": r["prompt"]} for r in xstest_prompts(shared_data)[:12]]))]
    mix = tmp_path / "mix"
    result = runner.invoke(app, ["curate", *raw, "--out", str(mix), "--quiet", "--no-cache", "--embedder", "lm:"])
    assert result.exit_code == 0, result.output
    import polars as pl

    pool = pl.read_parquet(mix / "pool" / "*.parquet")
    assert pool.height == 24
    adv = pool.filter(pl.col("source") == "advbench")  # the rows name their source
    assert adv.height == 12
    flagged = adv["group"].ne("BENIGN").mean()
    assert flagged >= 0.75, pool.select("prompt", "group", "harm_score")  # AdvBench behaviours are harmful
