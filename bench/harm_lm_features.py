"""Issue 16 experiment: a small instruct LM's hidden states as the harm head's features, leave-one-source-out.

The harm head reads a sentence embedding (MiniLM by default). Chat models represent "this request is harmful"
linearly in their residual stream (the refusal-direction work), so this measures whether SmolLM2-135M-Instruct's
hidden states, read at the prompt's last token (the chat template's assistant turn) or mean-pooled over it, make a
harm head that holds up better on sources it was not fit on. Same rows, folds, fitting code and scoring as
``bench/quality_loso.py`` (``evaluate_harm``); only the embedding changes. Each block is centred over every prompt
(no labels used) and scaled to unit length, as MiniLM's vectors are.

    python bench/harm_lm_features.py [--model PATH_OR_ID] [--variants last16,cat,mean16]

Features are cached in ``$EQUI_CACHE/bench`` (SmolLM2 on 2 CPU cores: ~8 min for the ~9,500 prompts, then ~1 min
a variant). Not used by ``equi curate``: it measures a direction, see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

#: Layers read at the last prompt token (SmolLM2-135M has 30), then layer 16 mean-pooled.
LAYERS = (10, 16, 22, 28)
POOLED_LAYER = 16
#: Prompt tokens kept (the start); the chat template is added around them.
MAX_PROMPT_TOKENS = 80


def lm_features(texts: list[str], model_path: str, batch: int = 32) -> np.ndarray:
    """``(len(texts), (len(LAYERS) + 1) * hidden)``: last-token states of ``LAYERS``, then ``POOLED_LAYER`` averaged."""
    import torch

    from equi.models import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(model_path), load_causal_lm(model_path).eval()
    tok.padding_side, tok.truncation_side = "left", "right"  # a long prompt keeps its start
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def framed(text: str) -> str:
        ids = tok(text, add_special_tokens=False, truncation=True, max_length=MAX_PROMPT_TOKENS)["input_ids"]
        return tok.apply_chat_template([{"role": "user", "content": tok.decode(ids)}], tokenize=False,
                                       add_generation_prompt=True)

    hidden = model.config.hidden_size
    out = np.zeros((len(texts), (len(LAYERS) + 1) * hidden), np.float32)
    order = np.argsort([len(t) for t in texts])  # similar lengths together: less padding
    with torch.inference_mode():
        for first in range(0, len(texts), batch):
            index = order[first:first + batch]
            enc = tok([framed(texts[i]) for i in index], return_tensors="pt", padding=True, add_special_tokens=False)
            states = model(**enc, output_hidden_states=True).hidden_states
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (states[POOLED_LAYER] * mask).sum(1) / mask.sum(1)
            out[index] = torch.cat([states[layer][:, -1, :] for layer in LAYERS] + [pooled], dim=1).numpy()
    return out


def unit(block: np.ndarray) -> np.ndarray:
    centred = block - block.mean(axis=0)
    return centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)


class _Lookup:
    """An embedder over precomputed vectors (texts it has none for, the unscored restricted-advice rows, get 0)."""

    def __init__(self, texts: list[str], vectors: np.ndarray, name: str):
        self.index = {t: i for i, t in enumerate(texts)}
        self.vectors, self.name, self.dim = vectors.astype(np.float32), name, vectors.shape[1]

    def encode(self, texts):
        zero = np.zeros(self.dim, np.float32)
        return np.stack([self.vectors[self.index[t]] if t in self.index else zero for t in texts])


def main() -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="causal LM (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--variants", default="last16,cat,mean16")
    args = parser.parse_args()
    import torch

    import quality_loso as loso
    from equi.cache import cache_dir
    from equi.models import resolve_model

    torch.set_num_threads(2)
    model_path = resolve_model(args.model, quiet=True)
    texts = list(dict.fromkeys(r["text"] for r in loso.harm_rows()))
    key = hashlib.sha256(("\n".join(texts) + model_path + repr(LAYERS) + str(MAX_PROMPT_TOKENS)).encode()).hexdigest()[:16]
    cached = cache_dir() / "bench" / f"harm-lm-features-{key}.npy"
    if cached.is_file():
        features = np.load(cached)
    else:
        started = time.perf_counter()
        features = lm_features(texts, model_path)
        print(f"features of {len(texts):,} prompts in {time.perf_counter() - started:.0f} s")
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.save(cached, features)
    hidden = features.shape[1] // (len(LAYERS) + 1)
    blocks = [features[:, k * hidden:(k + 1) * hidden] for k in range(len(LAYERS) + 1)]
    variants = {
        "last16": lambda: unit(blocks[LAYERS.index(16)]),
        "cat": lambda: np.hstack([unit(b) for b in blocks[:len(LAYERS)]]) / np.sqrt(len(LAYERS)),
        "mean16": lambda: unit(blocks[-1]),
    }
    print("| features | LOSO balanced accuracy | harmful caught | benign-but-risky pass | in-dist CV | worst source |")
    print("|---|---:|---:|---:|---:|---|")
    for name in args.variants.split(","):
        with contextlib.redirect_stdout(io.StringIO()):  # evaluate_harm prints its own long tables
            pooled = loso.evaluate_harm(_Lookup(texts, variants[name](), name), name)["pooled"]
        worst_score, worst = pooled["worst_source_loso"]
        print(f"| {name} | {pooled['balanced_accuracy_loso']:.3f} | {pooled['harmful_caught_loso']:.3f} | "
              f"{pooled['benign_but_risky_pass_loso']:.3f} | {pooled['balanced_accuracy_cv']:.3f} | "
              f"{worst} {worst_score:.3f} |")


if __name__ == "__main__":
    main()
