"""Model loading and batched greedy generation. The only place eval touches torch/transformers."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from equi.errors import UsageError


class ModelLoadError(UsageError):
    """The model or tokenizer could not be loaded; the message says what was tried."""


@dataclass
class Generation:
    answer: str
    new_tokens: int
    truncated: bool  # stopped at max_new_tokens rather than at an end-of-sequence token


def local_only(path_or_id: str) -> bool:
    """Whether to load ``path_or_id`` from local files only (``local_files_only``): the hub is off
    (``HF_HUB_OFFLINE``), or it is a local path, which must never turn into a hub download."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or Path(path_or_id).exists()


def adapter_base_model(adapter_dir: str) -> str | None:
    """The base model a LoRA adapter folder names (``adapter_config.json``), which PEFT loads under it."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return str(base) if base else None


def load_model(path_or_id: str, device: str | None = None, trust_remote_code: bool = False, quiet: bool = False):
    """``(model, tokenizer)`` from a local directory or hub id, in eval mode, tokenizer left-padded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if quiet:
        hf_logging.disable_progress_bar()

    offline = local_only(path_or_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code,
                                                  local_files_only=offline)
        if (Path(path_or_id) / "adapter_config.json").is_file():  # a LoRA run saves only its adapter
            try:
                from peft import AutoPeftModelForCausalLM
            except ImportError:
                raise ModelLoadError(f"{path_or_id} holds a LoRA adapter; install peft: pip install 'equi[lora]'") from None
            # PEFT passes these on to the base model's from_pretrained: the same offline rule and remote-code
            # consent as a plain model, applied to the base the adapter names.
            base = adapter_base_model(path_or_id)
            model = AutoPeftModelForCausalLM.from_pretrained(
                path_or_id, dtype=torch.float32, trust_remote_code=trust_remote_code,
                local_files_only=local_only(base) if base else offline).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(path_or_id, trust_remote_code=trust_remote_code,
                                                         local_files_only=offline, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {path_or_id!r}: {first_line}") from None
    tokenizer.padding_side = "left"  # decoder-only: pad on the left so generation continues the prompt
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelLoadError(f"tokenizer of {path_or_id!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    return model, tokenizer


def format_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the model was trained to see it: its chat template if it has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    max_prompt_tokens: int = 512,
    quiet: bool = False,
) -> list[Generation]:
    """Greedy answers to ``prompts`` (same order), batched by similar length to waste little padding."""
    import torch
    from tqdm.auto import tqdm

    texts = [format_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    results: list[Generation | None] = [None] * len(texts)
    eos_ids = tokenizer.eos_token_id
    eos_set = set(eos_ids if isinstance(eos_ids, list) else [eos_ids]) - {None}
    device = next(model.parameters()).device
    progress = tqdm(total=len(texts), desc="generating", unit="prompt", file=sys.stderr,
                    disable=quiet or not texts)
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        encoded = tokenizer(
            [texts[i] for i in indices],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_prompt_tokens,
            add_special_tokens=not getattr(tokenizer, "chat_template", None),
        ).to(device)
        with torch.inference_mode():
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=list(eos_set) or None,
            )
        new_tokens = output[:, encoded["input_ids"].shape[1]:]
        for row, index in enumerate(indices):
            ids = new_tokens[row].tolist()
            ended = next((k for k, t in enumerate(ids) if t in eos_set), None)
            kept = ids if ended is None else ids[:ended]
            results[index] = Generation(
                answer=tokenizer.decode(kept, skip_special_tokens=True).strip(),
                new_tokens=len(kept),
                truncated=ended is None and len(ids) >= max_new_tokens,
            )
        progress.update(len(indices))
    progress.close()
    return results  # type: ignore[return-value]
