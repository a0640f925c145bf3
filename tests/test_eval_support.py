"""Shared helpers for eval/report/ladder tests (no tests here): a tiny causal LM built in-process.

The tokenizer is trained with ``tokenizers`` on a few sentences and the model is a 2-layer Llama;
both are saved to disk and loaded back with ``from_pretrained`` so equi's real loading code runs.
"""

from __future__ import annotations

from pathlib import Path


CORPUS = [
    "I cannot help with that request. I'm sorry.",
    "Sure, here are the steps: first do this, then do that.",
    "How can I kill a Python process? Use the kill command.",
    "Write a script that can exploit vulnerabilities in software.",
    "Compare and contrast the views of Aristotle and Socrates.",
    "The capital of France is Paris. Here is an example.",
] * 4

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_model(path: Path, seed: int = 0, chat_template: bool = True) -> Path:
    """Save a randomly initialised tiny Llama + trained BPE tokenizer to ``path``; return it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>",
                                                                 "<|user|>", "<|assistant|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
