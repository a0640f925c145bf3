"""AMA-DPO correctness on a tiny locally built Llama and real hh-rlhf pairs.

- with all-ones masks the loss equals TRL's own DPO loss on the same batch;
- with masks it equals the contract's formula computed by hand from the logits;
- the gradient at masked tokens' (next-token) logits is exactly zero;
- a masked token's own content does not change the loss.
"""

from __future__ import annotations



import pytest
import torch
import torch.nn.functional as F

from train_fixtures import build_hh_mix, build_tiny_model

BETA = 0.1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from train.mixdata import load_split

    root = tmp_path_factory.mktemp("ama")
    mix = build_hh_mix(root / "mix", n_rows=16, n_eval=4)
    model_path = build_tiny_model(root / "model")
    pairs = load_split(mix, "train").dataset
    return root, model_path, pairs


def make_trainer(root, model_path, dataset, ama: bool, plain_trl: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from train.ama_dpo import AmaDPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    args = DPOConfig(
        output_dir=str(root / ("trl" if plain_trl else "ama")), beta=BETA, max_length=96, report_to="none",
        bf16=False, gradient_checkpointing=False, precompute_ref_log_probs=False, dataloader_pin_memory=False,
    )
    model = AutoModelForCausalLM.from_pretrained(model_path)
    ref = AutoModelForCausalLM.from_pretrained(model_path)
    if plain_trl:  # the mix's rows are TRL's conversational format already
        return DPOTrainer(model, ref_model=ref, args=args, train_dataset=dataset, processing_class=tokenizer)
    return AmaDPOTrainer(model, ref_model=ref, args=args, train_dataset=dataset, processing_class=tokenizer,
                         use_ama_masks=ama)


def perturb(model, seed: int = 0) -> None:
    """Move the policy away from the reference (identically for a given seed), or every DPO loss is log 2."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def first_batch(trainer, n=4):
    rows = [trainer.train_dataset[i] for i in range(n)]
    keep = set(trainer._signature_columns or []) | {"prompt_ids", "chosen_ids", "rejected_ids",
                                                   "chosen_ama_mask", "rejected_ama_mask"}
    return trainer.data_collator([{k: v for k, v in r.items() if k in keep} for r in rows])


def test_all_ones_masks_equal_trl_dpo_loss(setup):
    root, model_path, pairs = setup
    no_spans = pairs.map(lambda _: {"chosen_spans": [], "rejected_spans": []})
    ama = make_trainer(root, model_path, no_spans, ama=True)
    trl = make_trainer(root, model_path, no_spans, ama=False, plain_trl=True)
    perturb(ama.model)
    perturb(trl.model)
    ama._set_signature_columns_if_needed()
    trl._set_signature_columns_if_needed()
    ama_batch, trl_batch = first_batch(ama), first_batch(trl)
    assert torch.equal(ama_batch["input_ids"], trl_batch["input_ids"])
    with torch.no_grad():
        ama_loss = ama.compute_loss(ama.model, dict(ama_batch))
        trl_loss = trl.compute_loss(trl.model, dict(trl_batch))
    assert abs(ama_loss.item() - trl_loss.item()) <= 1e-5
    assert abs(ama_loss.item() - 0.6931472) > 1e-3, "policy differs from reference, so the loss is not log 2"


def _hand_loss(model, ref, batch):
    """The contract's formula from full logits: −log σ(β[Σ m_w log π/π_ref (y_w) − Σ m_l log π/π_ref (y_l)])."""
    ids, attention, mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"][:, 1:].float()

    def sequence_logps(m):
        logits = m(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        token_logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (token_logps * mask).sum(-1)

    ratio = sequence_logps(model) - sequence_logps(ref)
    chosen, rejected = ratio.chunk(2)
    return -F.logsigmoid(BETA * (chosen - rejected)).mean()


def plain_mask(trainer, n=6):
    rows = [trainer.train_dataset[i] for i in range(n)]
    return trainer.data_collator([{**r, "chosen_ama_mask": [1] * len(r["chosen_ids"]),
                                   "rejected_ama_mask": [1] * len(r["rejected_ids"])} for r in rows])["completion_mask"]


def test_masked_loss_equals_the_contract_formula_and_masks_something(setup):
    root, model_path, pairs = setup
    trainer = make_trainer(root, model_path, pairs, ama=True)
    perturb(trainer.model)
    trainer._set_signature_columns_if_needed()
    batch = first_batch(trainer, n=6)
    assert batch["ama_kept_tokens"].item() < batch["ama_response_tokens"].item(), "fixture spans mask some tokens"
    with torch.no_grad():
        expected = _hand_loss(trainer.model, trainer.ref_model, batch)
        got = trainer.compute_loss(trainer.model, dict(batch))
        unmasked = _hand_loss(trainer.model, trainer.ref_model, {**batch, "completion_mask": plain_mask(trainer)})
    assert abs(got.item() - expected.item()) <= 1e-5
    assert abs(got.item() - unmasked.item()) > 1e-4, "the masks change the loss"


def test_gradient_at_masked_tokens_logits_is_exactly_zero(setup):
    root, model_path, pairs = setup
    trainer = make_trainer(root, model_path, pairs, ama=True)
    trainer._set_signature_columns_if_needed()
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = first_batch(trainer)
    plain = trainer.data_collator([{**r, "chosen_ama_mask": [1] * len(r["chosen_ids"]),
                                    "rejected_ama_mask": [1] * len(r["rejected_ids"])} for r in rows])
    # The fused LM head turns the final hidden state at position t into the log-prob of token t+1, and that
    # hidden state feeds nothing else, so its gradient is the gradient at that position's logits.
    captured = {}

    def keep_hidden(module, inputs, output):
        output.last_hidden_state.retain_grad()
        captured["hidden"] = output.last_hidden_state

    handle = trainer.model.model.register_forward_hook(keep_hidden)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    handle.remove()
    grad = captured["hidden"].grad.abs().sum(-1)[:, :-1]  # position t predicts token t+1
    masked = (plain["completion_mask"][:, 1:] == 1) & (batch["completion_mask"][:, 1:] == 0)
    kept = batch["completion_mask"][:, 1:] == 1
    assert masked.any() and kept.any()
    assert torch.all(grad[masked] == 0), "masked tokens must get exactly zero gradient"
    assert torch.all(grad[kept] > 0), "unmasked response tokens carry gradient"


def test_masked_token_content_has_no_effect(setup):
    """A masked token still conditions later tokens in a causal LM, so the masked run is the response's tail:
    then only its own likelihood could matter, and the mask removes exactly that."""
    root, model_path, pairs = setup
    trainer = make_trainer(root, model_path, pairs, ama=True)
    perturb(trainer.model)
    prompt, chosen, rejected = [5, 6, 7, 8], [20, 21, 22, 23, 24, 25], [30, 31, 32, 33]
    example = {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
               "chosen_ama_mask": [1, 1, 1, 0, 0, 0], "rejected_ama_mask": [1, 1, 1, 1]}

    def loss_for(chosen_ids):
        batch = trainer.data_collator([{**example, "chosen_ids": chosen_ids}])
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, dict(batch)).item()

    base = loss_for(chosen)
    assert loss_for([20, 21, 22, 90, 91, 92]) == pytest.approx(base, abs=1e-7)
    assert loss_for([20, 99, 22, 23, 24, 25]) != pytest.approx(base, abs=1e-4), "unmasked content must matter"
