"""The policy a training run starts from (``--model`` or the bundled default): loading lives in :mod:`equi.models`."""

from __future__ import annotations

from pathlib import Path

from equi.models import bf16_supported, load_causal_lm, load_tokenizer, resolve_model
from train.config import TrainConfig


def load_policy(config: TrainConfig, weights: str | Path | None = None):
    """The policy and its tokenizer, from ``--model`` or the bundled default; ``weights``: a folder to take the
    policy's weights from instead (a ``dual`` round's saved policy), the tokenizer still ``--model``'s."""
    import torch

    path = resolve_model(config.model, quiet=config.quiet)
    tokenizer = load_tokenizer(path, trust_remote_code=config.trust_remote_code)
    dtype = torch.bfloat16 if bf16_supported() else torch.float32
    model = load_causal_lm(str(weights or path), dtype=dtype, trust_remote_code=config.trust_remote_code)
    return path, model, tokenizer
