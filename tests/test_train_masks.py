"""AMA span → token-mask conversion: the pure rule, the alignment with TRL's tokenisation, truncation."""

from __future__ import annotations



import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from train.masks import response_token_mask, token_mask, truncate_like_collator
from train_fixtures import build_tiny_model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    path = build_tiny_model(tmp_path_factory.mktemp("tiny"))
    return AutoTokenizer.from_pretrained(path)


# ---- the pure rule, against a brute-force character-set definition ---------------------------------------------

offsets_strategy = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 8)), max_size=25).map(
    lambda pairs: [(a, a + n) for a, n in pairs]
)
ranges_strategy = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 10)), max_size=4).map(
    lambda pairs: [(a, a + n) for a, n in pairs]
)


@given(offsets=offsets_strategy, ranges=ranges_strategy, shift=st.integers(0, 10))
def test_token_mask_zero_exactly_where_a_token_shares_a_character_with_a_span(offsets, ranges, shift):
    mask = token_mask(offsets, ranges, shift=shift)
    masked_chars = {c + shift for start, end in ranges for c in range(start, end)}
    expected = [0 if set(range(a, b)) & masked_chars else 1 for a, b in offsets]
    assert mask == expected


def test_span_straddling_a_token_boundary_masks_both_tokens():
    offsets = [(0, 4), (4, 8), (8, 12)]
    assert token_mask(offsets, [(3, 5)]) == [0, 0, 1]
    assert token_mask(offsets, [(4, 8)]) == [1, 0, 1]  # touching is not overlapping


def test_sides_mask_opposite_signs():
    offsets = [(0, 5), (5, 10)]
    spans = [{"start": 0, "end": 5, "sign": -1}, {"start": 5, "end": 10, "sign": 1}]
    assert response_token_mask(offsets, spans, "chosen", 0) == [0, 1]
    assert response_token_mask(offsets, spans, "rejected", 0) == [1, 0]


def test_truncation_follows_the_collator():
    assert truncate_like_collator([1, 2, 3, 4], 2, "keep_start") == [1, 2]
    assert truncate_like_collator([1, 2, 3, 4], 2, "keep_end") == [3, 4]
    assert truncate_like_collator([1, 2, 3], None, "keep_start") == [1, 2, 3]


# ---- alignment with TRL's own tokenisation (chat template), random texts and spans --------------------------------

text_strategy = st.text(
    alphabet=st.sampled_from(list("abcdefghij klmnop.,!?'\n") + ["é", "ß", "中", "🙂"]), min_size=1, max_size=60
)


def _trl_tokenised(tokenizer, prompt: str, chosen: str, rejected: str, chosen_spans, rejected_spans) -> dict:
    """One mix row (conversational, as the contract stores it) as TRL's own tokenize_fn prepares it."""
    example = {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
               "rejected": [{"role": "assistant", "content": rejected}]}
    prompt_ids = tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    chosen_full = tokenizer.apply_chat_template(example["prompt"] + example["chosen"], tokenize=True,
                                                return_dict=True)["input_ids"]
    rejected_full = tokenizer.apply_chat_template(example["prompt"] + example["rejected"], tokenize=True,
                                                  return_dict=True)["input_ids"]
    n = len(prompt_ids)
    assert chosen_full[:n] == prompt_ids and rejected_full[:n] == prompt_ids
    example.update(prompt_ids=prompt_ids, chosen_ids=chosen_full[n:], rejected_ids=rejected_full[n:],
                   chosen_spans=chosen_spans, rejected_spans=rejected_spans)
    return example


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=text_strategy, chosen=text_strategy, data=st.data())
def test_masked_tokens_are_exactly_the_tokens_that_decode_to_the_span(tokenizer, prompt, chosen, data):
    from train.ama_dpo import ama_masks_for_example

    start = data.draw(st.integers(0, len(chosen) - 1))
    end = data.draw(st.integers(start + 1, len(chosen)))
    example = _trl_tokenised(tokenizer, prompt, chosen, "no.", [{"start": start, "end": end, "sign": -1}],
                             [{"start": 0, "end": 3, "sign": -1}])  # wrong sign for rejected: must not mask
    masks = ama_masks_for_example(example, tokenizer)
    assert not masks["ama_unaligned"]
    chosen_mask = masks["chosen_ama_mask"]
    assert len(chosen_mask) == len(example["chosen_ids"])
    assert masks["rejected_ama_mask"] == [1] * len(example["rejected_ids"])
    zeros = [i for i, m in enumerate(chosen_mask) if m == 0]
    assert zeros, "a non-empty span masks at least one token"
    assert zeros == list(range(zeros[0], zeros[-1] + 1)), "one span masks one contiguous run of tokens"
    # Independent of offsets: the masked run decodes to text containing the span, and the template's
    # end-of-turn tokens after the response stay unmasked.
    run = example["chosen_ids"][zeros[0] : zeros[-1] + 1]
    decoded = tokenizer.decode(run).encode("utf-8", "replace").decode("utf-8")
    span_text = chosen[start:end]
    if "\ufffd" not in decoded:  # a multi-byte character split across the run's edge decodes as U+FFFD
        assert span_text in decoded
    assert chosen_mask[-2:] == [1, 1]  # "<|im_end|>" "\n" from the chat template


def test_masks_follow_collator_truncation(tokenizer):
    from train.ama_dpo import AmaPreferenceCollator

    examples = [
        {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 10, 11], "rejected_ids": [12, 13],
         "chosen_ama_mask": [1, 0, 0, 1], "rejected_ama_mask": [0, 1]},
        {"prompt_ids": [5], "chosen_ids": [8, 9], "rejected_ids": [12, 13, 14, 15, 16, 17],
         "chosen_ama_mask": [0, 1], "rejected_ama_mask": [1, 1, 1, 1, 1, 0]},
    ]
    batch = AmaPreferenceCollator(pad_token_id=0, max_length=5)(examples)
    assert batch["completion_mask"].tolist() == [
        [0, 0, 0, 1, 0],  # chosen 1: tokens 9,10 masked; truncated after 5 positions
        [0, 0, 1, 0, 0],  # chosen 2: token 8 masked, then padding
        [0, 0, 0, 0, 1],  # rejected 1: token 12 masked
        [0, 1, 1, 1, 1],  # rejected 2: its masked last token was cut by truncation
    ]
    assert batch["ama_response_tokens"].item() == 2 + 2 + 2 + 4
    assert batch["ama_kept_tokens"].item() == batch["completion_mask"].sum().item()
