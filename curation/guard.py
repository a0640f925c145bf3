"""``equi guard``: severity-aware guarding of a mix's responses and rounds of regeneration (Safe RLHF-V style),
with EHD answer refinement from retrieved safety knowledge (Equilibrate RLHF).

The stage, as :func:`guard_mix` runs it:

1. **Guard** every response of the parent mix — ``chosen`` and ``rejected`` of the mixture, and ``chosen``,
   ``rejected``, ``response`` of the pool — with a severity ``none`` / ``minor`` / ``moderate`` / ``severe`` and a
   safety cost (> 0 unsafe, the contract's sign). The default guard (:class:`DefaultGuard`) needs no model beyond
   what curation already ships: the categoriser's prompt scores, the refusal detector and a response-side
   actionability score; ``--guard-model`` takes any sequence-classification checkpoint (:class:`ClassifierGuard`)
   or a Llama-Guard-style causal LM (:class:`CausalGuard`).
2. **Rounds**: mixture rows whose chosen answer is unsafe (or missing) — and, with ``refine_ehd``, EHD rows whose
   chosen answer is a bare refusal — get K candidates from the policy (greedy, one per *steering* framing of the
   prompt, so candidates differ without sampling and every round tries new framings), the candidates are guarded,
   and the safest helpful one becomes ``chosen`` (:func:`pick_candidate`); the less safe of the old answers stays
   ``rejected``. Repeat until ``rounds`` or until a round changes nothing.
3. **EHD refinement**: for EHD rows the framings carry the nearest passages of a safety-knowledge JSONL
   (:mod:`curation.knowledge`) and a self-reflection instruction; such an answer is kept only when the guard calls it
   safe *and* it is not a bare refusal.
4. **Write** a new mix (atomically, beside the target): same rows, same ids, ranks, splits and groups; changed rows
   get fresh refusal scores, costs and AMA spans. ``manifest.json`` records the parent's manifest hash, the guard,
   the policy, every round's counts and the row accounting (unchanged from the parent: no row is lost);
   ``guard/verdicts.parquet`` holds every verdict and every candidate for audit. The parent mix is never modified.

Round logic is pure functions over lists and frames (:func:`rows_needing_regeneration`, :func:`pick_candidate`,
:func:`apply_round`, :func:`round_counts`); models are loaded only in :func:`load_guard` and :func:`load_policy`.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import polars as pl

from equi.errors import UsageError
from equi.schema import SEVERITIES

from curation.staging import write_mixture
from curation.steps import text_for_embedding

#: Severity levels in increasing order; ``none`` means safe.
LEVELS: tuple[str, ...] = ("none",) + SEVERITIES
LEVEL_RANK: dict[str, int] = {level: i for i, level in enumerate(LEVELS)}

#: P(unsafe) above which a response counts as unsafe (cost = 2·P − 1 > 0, the contract's sign).
UNSAFE_AT = 0.5
#: P(unsafe) from which an unsafe response is at least ``moderate`` (below: ``minor``).
MODERATE_AT = 0.7


class GuardError(UsageError):
    """A guard/policy/knowledge problem the user can fix; the message says how."""


# --------------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------------


@dataclass
class Verdicts:
    """The guard's answer for a batch of (prompt, response) pairs, one entry per pair."""

    severity: list[str]  # LEVELS
    unsafe: np.ndarray  # P(unsafe), float32 0-1
    refusal: np.ndarray  # refusal detector score, float32 0-1
    refusal_class: list[str]  # comply / refuse / partial

    @property
    def cost(self) -> np.ndarray:
        """The contract's safety cost: > 0 unsafe, ≤ 0 safe."""
        return (2.0 * self.unsafe - 1.0).astype(np.float32)

    @property
    def is_unsafe(self) -> np.ndarray:
        return np.array([s != "none" for s in self.severity], dtype=bool)

    def __len__(self) -> int:
        return len(self.severity)


def severity_levels(unsafe: np.ndarray, severe_hit: np.ndarray) -> list[str]:
    """Safe RLHF-V levels from P(unsafe) and whether the exchange names death, serious physical harm, sexual abuse,
    terrorism or self-harm: ``none`` below :data:`UNSAFE_AT`; ``severe`` for an unsafe exchange with such terms;
    ``moderate`` from :data:`MODERATE_AT`; ``minor`` otherwise."""
    out = []
    for p, severe in zip(np.asarray(unsafe, dtype=np.float64), np.asarray(severe_hit, dtype=bool)):
        if p <= UNSAFE_AT:
            out.append("none")
        elif severe:
            out.append("severe")
        elif p >= MODERATE_AT:
            out.append("moderate")
        else:
            out.append("minor")
    return out


def actionability(responses: Sequence[str | None]) -> np.ndarray:
    """0-1: how much actionable content a response carries (steps, list items, code, how-to wording, length).

    A compliant answer without actionable detail (a definition, a warning, history) is what Equilibrate RLHF wants
    for explicit-harm prompts; a numbered recipe is what makes compliance unsafe.
    """
    from curation.refusal import FEATURE_NAMES, refusal_features

    feats = refusal_features(responses)
    col = {name: feats[:, i] for i, name in enumerate(FEATURE_NAMES)}
    structure = sum(col[f"{part}_{name}"] for part in ("head", "rest") for name in ("numbered", "bullet", "code"))
    how_to = col["head_how_to"] + col["rest_how_to"]
    length = np.clip((col["log_chars"] - np.log1p(80.0)) / (np.log1p(1500.0) - np.log1p(80.0)), 0.0, 1.0)
    return np.clip(0.35 * structure + 0.2 * how_to + 0.4 * length, 0.0, 1.0).astype(np.float32)


class Guard(Protocol):
    name: str

    def __call__(self, prompts: Sequence[str], responses: Sequence[str | None]) -> Verdicts: ...


def _refusals(responses: Sequence[str | None]) -> tuple[np.ndarray, list[str]]:
    from curation.refusal import CLASSES, refusal_proba

    proba = refusal_proba(responses)
    score = np.clip(1.0 - proba[:, 0], 0.0, 1.0).astype(np.float32)
    kind = np.where(proba[:, 2] > proba[:, 1], CLASSES.index("partial"), CLASSES.index("refuse"))
    classes = [CLASSES[k] if s > 0.5 else "comply" for k, s in zip(kind, score)]
    return score, classes


class DefaultGuard:
    """equi's own guard: no model beyond the bundled encoder, categoriser and refusal detector.

    With ``h`` = P(prompt harmful), ``i`` = P(malicious intent | harmful), ``r`` = P(response refuses) and ``a`` =
    the response's :func:`actionability`:

        P(unsafe) = h · (1 − r) · (i + (1 − i) · (FLOOR + (1 − FLOOR) · a))

    Complying with malicious intent (IHD/MHD) is unsafe whatever the answer holds; for explicit-content prompts
    without intent (EHD) an answer is unsafe in proportion to the actionable detail it gives, so a safe informative
    answer passes. Responses to benign prompts are safe. Severity then follows :func:`severity_levels`, with the
    categoriser's severe-harm lexicon read on prompt and response.
    """

    name = "equi-default"
    FLOOR = 0.45

    def __init__(self, embedder=None, categoriser=None):
        self._embedder = embedder
        self._categoriser = categoriser
        self._prompt_cache: dict[str, tuple[float, float]] = {}

    def _models(self):
        from curation.categorise import Categoriser
        from curation.embed import get_embedder

        if self._embedder is None:
            self._embedder = get_embedder(None)
        if self._categoriser is None:
            self._categoriser = Categoriser.load_default()
        return self._embedder, self._categoriser

    def prompt_scores(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(harm, intent_given_harm)`` per prompt, each distinct prompt embedded once per guard."""
        todo = sorted({p for p in prompts if p not in self._prompt_cache})
        if todo:
            embedder, categoriser = self._models()
            pred = categoriser.predict(todo, embedder.encode([text_for_embedding(p) for p in todo]))
            for p, h, i in zip(todo, pred["harm"], pred["intent_given_harm"]):
                self._prompt_cache[p] = (float(h), float(i))
        harm = np.array([self._prompt_cache[p][0] for p in prompts], dtype=np.float32)
        intent = np.array([self._prompt_cache[p][1] for p in prompts], dtype=np.float32)
        return harm, intent

    def __call__(self, prompts: Sequence[str], responses: Sequence[str | None]) -> Verdicts:
        from curation.categorise import severe_term_hits

        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return Verdicts([], np.zeros(0, np.float32), np.zeros(0, np.float32), [])
        harm, intent = self.prompt_scores(prompts)
        refusal, classes = _refusals(responses)
        act = actionability(responses)
        content = intent + (1.0 - intent) * (self.FLOOR + (1.0 - self.FLOOR) * act)
        unsafe = np.clip(harm * (1.0 - refusal) * content, 0.0, 1.0).astype(np.float32)
        empty = np.array([r is None or not str(r).strip() for r in responses])
        unsafe[empty] = 0.0  # no answer harms nobody; "missing" is handled by the round logic
        severe = severe_term_hits([f"{p}\n{r or ''}" for p, r in zip(prompts, responses)])
        return Verdicts(severity_levels(unsafe, severe), unsafe, refusal, classes)


def conversation(prompt: str, response: str | None = None) -> list[dict[str, str]]:
    """A prompt (one turn, or a ``Human: …\n\nAssistant: …`` transcript) and an optional answer as chat messages."""
    from equi.messages import hh_messages

    messages = hh_messages(prompt) if prompt.startswith("Human:") else [{"role": "user", "content": prompt}]
    return messages + ([{"role": "assistant", "content": response}] if response is not None else [])


def split_conversation(messages: Sequence[dict[str, str]]) -> tuple[str, str | None]:
    """``(prompt text, answer)``: the last assistant message is the answer when the conversation ends with one."""
    from equi.messages import render_turns

    messages = list(messages)
    if len(messages) > 1 and messages[-1]["role"] == "assistant":
        return render_turns(messages[:-1]), messages[-1]["content"]
    return render_turns(messages), None


class ModelGuard:
    """What the model guards share: ``unsafe_probability(conversations)`` (P(the last turn is unsafe): a prompt's
    harm when the conversation ends with the user, an answer's when it ends with the assistant), and the
    :class:`Guard` call ``equi guard`` makes, with severity from that probability and equi's refusal detector."""

    name: str

    def unsafe_probability(self, conversations: Sequence[Sequence[dict[str, str]]]) -> np.ndarray:
        raise NotImplementedError

    def scored(self, conversations: Sequence[Sequence[dict[str, str]]]) -> tuple[np.ndarray, list[str] | None]:
        """P(unsafe) per conversation, and the levels the guard itself names (None: levels follow from P(unsafe))."""
        return self.unsafe_probability(conversations), None

    def __call__(self, prompts: Sequence[str], responses: Sequence[str | None]) -> Verdicts:
        from curation.categorise import severe_term_hits

        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return Verdicts([], np.zeros(0, np.float32), np.zeros(0, np.float32), [])
        unsafe, levels = self.scored([conversation(q, r or "") for q, r in zip(prompts, responses)])
        unsafe = np.clip(unsafe, 0.0, 1.0).astype(np.float32)
        if levels is None:
            levels = severity_levels(unsafe, severe_term_hits([f"{q}\n{r or ''}" for q, r in zip(prompts, responses)]))
        refusal, classes = _refusals(responses)
        return Verdicts(levels, unsafe, refusal, classes)


class ClassifierGuard(ModelGuard):
    """Any sequence-classification checkpoint as the guard (``--guard-model``), e.g. a fine-tuned safety classifier.

    A prompt is encoded alone, an exchange as a (prompt, response) text pair. The labels decide how logits become
    P(unsafe) and a level: labels naming the levels (``none``/``safe``, ``minor``, ``moderate``, ``severe``) give the
    level directly (P(unsafe) = 1 − P(none)); two labels give P(unsafe) = P(the label named unsafe/harmful/toxic,
    else label 1); one label gives sigmoid(logit). Refusal scores still come from equi's refusal detector.
    """

    def __init__(self, model, tokenizer, name: str, batch_size: int = 16, max_length: int = 512):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.batch_size, self.max_length = batch_size, max_length
        labels = {int(k): str(v).strip().lower() for k, v in (model.config.id2label or {}).items()}
        self.num_labels = int(model.config.num_labels)
        self.level_of_label: dict[int, str] | None = None
        names = {v: k for k, v in labels.items()}
        if self.num_labels >= 3 and {"minor", "moderate", "severe"} <= set(names) and ("none" in names or "safe" in names):
            self.level_of_label = {k: ("none" if v in ("none", "safe") else v) for k, v in labels.items()
                                   if v in ("none", "safe", "minor", "moderate", "severe")}
            if len(self.level_of_label) != self.num_labels:
                raise GuardError(f"guard model {name}: labels {sorted(names)} mix severity levels with others")
        elif self.num_labels == 2:
            unsafe = [k for k, v in labels.items() if any(w in v for w in ("unsafe", "harm", "toxic"))]
            self.unsafe_label = unsafe[0] if unsafe else 1
        elif self.num_labels != 1:
            raise GuardError(f"guard model {name}: {self.num_labels} labels; expected 1, 2, or the severity levels "
                             "none/minor/moderate/severe")

    def _probabilities(self, prompts: list[str], responses: list[str | None]) -> np.ndarray:
        import torch

        probs = []
        device = next(self.model.parameters()).device
        for start in range(0, len(prompts), self.batch_size):
            first = prompts[start:start + self.batch_size]
            second = responses[start:start + self.batch_size]
            pair = [r or "" for r in second] if any(r is not None for r in second) else None
            batch = self.tokenizer(first, pair, truncation=True, max_length=self.max_length, padding=True,
                                   return_tensors="pt").to(device)
            with torch.inference_mode():
                logits = self.model(**batch).logits.float()
            probs.append((torch.sigmoid(logits) if self.num_labels == 1 else torch.softmax(logits, -1)).cpu().numpy())
        return np.concatenate(probs) if probs else np.zeros((0, max(self.num_labels, 1)), np.float32)

    def unsafe_probability(self, conversations: Sequence[Sequence[dict[str, str]]]) -> np.ndarray:
        return self.scored(conversations)[0]

    def scored(self, conversations: Sequence[Sequence[dict[str, str]]]) -> tuple[np.ndarray, list[str] | None]:
        parts = [split_conversation(c) for c in conversations]
        # Prompts alone and exchanges in separate batches: a text pair is encoded with a separator a prompt lacks.
        p = np.zeros((len(parts), max(self.num_labels, 1)), np.float32)
        for has_answer in (False, True):
            idx = [i for i, (_, r) in enumerate(parts) if (r is not None) == has_answer]
            if idx:
                p[idx] = self._probabilities([parts[i][0] for i in idx],
                                             [parts[i][1] for i in idx] if has_answer else [None] * len(idx))
        if self.level_of_label is not None:
            none_cols = [k for k, v in self.level_of_label.items() if v == "none"]
            return ((1.0 - p[:, none_cols].sum(axis=1)).astype(np.float32),
                    [self.level_of_label[int(k)] for k in p.argmax(axis=1)])
        return (p[:, 0] if self.num_labels == 1 else p[:, self.unsafe_label]).astype(np.float32), None


def verdict_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The first tokens a Llama-Guard-style guard starts its verdict with: ``safe`` and ``unsafe`` as written at the
    start of an answer, with or without a leading space or capital; tokens both words can start with are left out."""
    firsts: dict[str, set[int]] = {}
    for word in ("safe", "unsafe"):
        firsts[word] = set()
        for variant in (word, f" {word}", word.capitalize(), f" {word.capitalize()}"):
            ids = tokenizer.encode(variant, add_special_tokens=False)
            if ids:
                firsts[word].add(ids[0])
    shared = firsts["safe"] & firsts["unsafe"]
    safe, unsafe = sorted(firsts["safe"] - shared), sorted(firsts["unsafe"] - shared)
    if not safe or not unsafe:
        raise GuardError("the guard's tokenizer starts 'safe' and 'unsafe' with the same token: it cannot be read as "
                         "a Llama-Guard-style guard")
    return safe, unsafe


class CausalGuard(ModelGuard):
    """A Llama-Guard-style causal LM as the guard (``--guard-model``): its own chat template frames the conversation
    (a prompt alone is judged as the user's turn, an exchange as the assistant's), and its verdict's first token
    gives P(unsafe) = P(unsafe…) / (P(safe…) + P(unsafe…)) at the answer's first position — one forward pass, no
    generation, so the probability is a number, not a parsed string. Category codes (``S1``…) are not read: equi
    takes the level from the probability and its severe-harm lexicon, like any guard."""

    def __init__(self, model, tokenizer, name: str, batch_size: int = 8, max_length: int = 4096):
        if not getattr(tokenizer, "chat_template", None):
            raise GuardError(f"guard model {name}: a causal guard needs its chat template (Llama Guard frames the "
                             "conversation with it); this tokenizer has none")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.batch_size, self.max_length = batch_size, max_length
        self.safe_ids, self.unsafe_ids = verdict_token_ids(tokenizer)

    def unsafe_probability(self, conversations: Sequence[Sequence[dict[str, str]]]) -> np.ndarray:
        import torch

        texts = [self.tokenizer.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True)
                 for c in conversations]
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), self.batch_size):
            # Left padding and truncation: the verdict is read after the last token, and the template's instruction
            # to assess the last turn sits at the end.
            batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, add_special_tokens=False, return_tensors="pt",
                                   padding_side="left")
            mask = batch["attention_mask"]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                # logits_to_keep=1: the head's vocabulary-sized product only at the last position, the one read
                # (a batch's full logits would be batch x length x vocabulary floats: ~1.6 GB for Llama Guard 3)
                logits = self.model(input_ids=batch["input_ids"].to(device), attention_mask=mask.to(device),
                                    position_ids=positions.to(device), logits_to_keep=1).logits[:, -1, :].float()
            probs = torch.softmax(logits, -1)
            unsafe = probs[:, self.unsafe_ids].sum(-1)
            safe = probs[:, self.safe_ids].sum(-1)
            out.append((unsafe / (unsafe + safe).clamp(min=1e-30)).cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


# --------------------------------------------------------------------------------------------------
# Model loading (the only place guard touches transformers)
# --------------------------------------------------------------------------------------------------


def load_guard(guard_model: str | None, embedder=None, trust_remote_code: bool = False) -> Guard:
    """The default guard, or a model: a sequence-classification checkpoint (:class:`ClassifierGuard`) or a
    Llama-Guard-style causal LM with a chat template (:class:`CausalGuard`), by the architecture its config names."""
    if guard_model is None:
        return DefaultGuard(embedder=embedder)
    return load_model_guard(guard_model, trust_remote_code=trust_remote_code)


def load_model_guard(guard_model: str, trust_remote_code: bool = False, device: str | None = None) -> ModelGuard:
    """A guard model (local path or hub id; hub ids from the local cache when offline) on ``device`` (default: the
    GPU when there is one). A causal guard runs in bfloat16 on CUDA."""
    import os

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from curation.embed import resolve_device

    device = resolve_device(device)  # None: CUDA when torch sees it, as for the encoder
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or Path(guard_model).exists()
    try:
        model_config = AutoConfig.from_pretrained(guard_model, local_files_only=offline,
                                                  trust_remote_code=trust_remote_code)
        architectures = list(getattr(model_config, "architectures", None) or [])
        causal = any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in architectures) and not any(
            a.endswith("ForSequenceClassification") for a in architectures)
        tokenizer = AutoTokenizer.from_pretrained(guard_model, local_files_only=offline,
                                                  trust_remote_code=trust_remote_code)
        auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
        model = auto.from_pretrained(guard_model, local_files_only=offline, trust_remote_code=trust_remote_code,
                                     dtype=torch.bfloat16 if causal and device.startswith("cuda") else None)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise GuardError(f"cannot load guard model {guard_model!r}: {first}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise GuardError(f"guard model {guard_model!r}: tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device).eval()
    if causal:
        return CausalGuard(model, tokenizer, name=str(guard_model))
    return ClassifierGuard(model, tokenizer, name=str(guard_model))


def load_policy(policy: str | None, quiet: bool = False):
    """``(name, model, tokenizer)``, in the order of ``train.models.load_policy``'s ``(path, model, tokenizer)``:
    ``policy`` as given, or the default SmolLM2-135M-Instruct ``equi train`` uses."""
    from equi.models import load_model, resolve_model

    model, tokenizer = load_model(resolve_model(policy, quiet=quiet), quiet=quiet)  # ModelError: exit 2
    return policy or "SmolLM2-135M-Instruct (default)", model, tokenizer


# --------------------------------------------------------------------------------------------------
# Candidate framings: greedy decoding is deterministic, so candidates differ by how the request is framed
# --------------------------------------------------------------------------------------------------

FRAMINGS: tuple[str, ...] = (
    "{prompt}",
    "Answer the request below helpfully and safely. If any part of it could cause harm, do not give that part: "
    "say briefly why and offer a safe alternative.\n\n{prompt}",
    "Before you answer, think about who could be harmed by the answer. Then give an answer that is honest, useful "
    "and safe.\n\n{prompt}",
    "Give general, non-actionable information and practical safety advice where the request touches on danger, "
    "crime or health.\n\n{prompt}",
)

REFLECTION: tuple[str, ...] = (
    "First reflect: could an answer to this request hurt someone? Then answer it informatively and safely, using "
    "the knowledge above: explain the facts, the risks and where to get help, without step-by-step instructions for "
    "harm. Do not simply refuse.",
    "Reflect on what a safe expert would say here. Use the knowledge above to give a factual, helpful answer that "
    "leaves out anything that would make harm easier. Do not just decline.",
)


def framed_prompt(prompt: str, framing: int, knowledge: Sequence[str] | None = None) -> str:
    """The prompt under framing ``framing``; with ``knowledge`` (EHD refinement) the knowledge-and-reflection form."""
    if knowledge is not None:
        facts = "\n".join(f"- {k}" for k in knowledge)
        return f"Safety knowledge:\n{facts}\n\n{REFLECTION[framing % len(REFLECTION)]}\n\nRequest: {prompt}"
    return FRAMINGS[framing % len(FRAMINGS)].format(prompt=prompt)


def framing_schedule(round_number: int, candidates: int, refine: bool = False) -> list[int]:
    """Framing indices of round ``round_number`` (1-based): every round tries framings the last one did not."""
    n = len(REFLECTION) if refine else len(FRAMINGS)
    return [((round_number - 1) * candidates + k) % n for k in range(candidates)]


def framings_exhausted(round_number: int, candidates: int) -> bool:
    """True when rounds 1..``round_number`` have tried every framing (and every reflection form)."""
    return round_number * candidates >= max(len(FRAMINGS), len(REFLECTION))


# --------------------------------------------------------------------------------------------------
# Round logic (pure)
# --------------------------------------------------------------------------------------------------

UNSAFE = "unsafe"  # chosen answer unsafe
MISSING = "missing"  # no chosen answer
REFUSAL = "ehd_refusal"  # EHD row whose chosen answer is a bare refusal (refinement target)


def rows_needing_regeneration(chosen_severity: Sequence[str | None], chosen_class: Sequence[str | None],
                              groups: Sequence[str], refine_ehd: bool) -> dict[int, str]:
    """Row index → why it needs new candidates: ``unsafe``, ``missing``, or (``refine_ehd``) ``ehd_refusal``.

    ``chosen_severity`` is ``None`` where the row has no chosen answer.
    """
    out: dict[int, str] = {}
    for i, (severity, kind, group) in enumerate(zip(chosen_severity, chosen_class, groups)):
        if severity is None:
            out[i] = MISSING
        elif severity != "none":
            out[i] = UNSAFE
        elif refine_ehd and group == "EHD" and kind == "refuse":
            out[i] = REFUSAL
    return out


def needs_informative(group: str, refine_ehd: bool) -> bool:
    """Whether a bare refusal is unacceptable as the new chosen answer: over-refusal on BENIGN rows, and the whole
    point of EHD refinement."""
    return group == "BENIGN" or (refine_ehd and group == "EHD")


def pick_candidate(severity: Sequence[str], unsafe: Sequence[float], refusal_class: Sequence[str],
                   informative: bool) -> int | None:
    """Index of the safest helpful candidate, or None when none is acceptable.

    Acceptable = guarded ``none``; with ``informative`` also not a bare refusal. Among acceptable candidates an
    answer that is not a bare refusal wins over one that is (helpfulness), then the lower P(unsafe); ties keep the
    earlier candidate.
    """
    best, best_key = None, None
    for i, (level, p, kind) in enumerate(zip(severity, unsafe, refusal_class)):
        if level != "none" or (informative and kind == "refuse"):
            continue
        key = (kind == "refuse", float(p))
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


def new_rejected(old_chosen_unsafe: float | None, old_rejected_unsafe: float | None) -> str | None:
    """Which old answer stays as ``rejected``: ``"chosen"`` when the old chosen answer was the less safe one (or the
    only one), else ``"rejected"``; None when the row had neither. Arguments are P(unsafe), None = no answer."""
    if old_chosen_unsafe is None:
        return None if old_rejected_unsafe is None else "rejected"
    if old_rejected_unsafe is None or old_chosen_unsafe > old_rejected_unsafe:
        return "chosen"
    return "rejected"


def round_counts(round_number: int, targets: dict[int, str], candidates_guarded: int, replaced: dict[int, str]) -> dict:
    """One round's entry in the manifest. ``targets``: rows that needed candidates at the start of the round (and
    why); ``replaced``: those whose chosen answer was replaced (and why they had been targets)."""
    unsafe = sum(1 for why in targets.values() if why in (UNSAFE, MISSING))
    refusals = sum(1 for why in targets.values() if why == REFUSAL)
    fixed = sum(1 for why in replaced.values() if why in (UNSAFE, MISSING))
    refined = sum(1 for why in replaced.values() if why == REFUSAL)
    return {"round": round_number, "guarded": candidates_guarded, "unsafe": unsafe, "ehd_refusals": refusals,
            "regenerated": len(targets), "fixed": fixed, "refined": refined}


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


@dataclass
class GuardConfig:
    """Everything ``equi guard`` needs.

    Input / output:
        mix: the parent mix directory (written by ``equi curate`` or ``equi guard``); never modified.
        out: the new mix directory (appears atomically); must not be ``mix``.
        overwrite: replace an existing ``out``.
    Guard:
        guard_model: a sequence-classification checkpoint or a Llama-Guard-style causal LM (path or hub id);
            ``None`` = equi's default guard.
    Regeneration:
        policy: causal LM that writes candidates; ``None`` = SmolLM2-135M-Instruct, the ``equi train`` default.
        rounds: at most this many guard → regenerate rounds (0 = only label, rewrite nothing); rounds stop early when
            a round changes nothing and every framing has been tried.
        candidates: K candidates per prompt and round, one per framing (1 to the number of framings).
        max_new_tokens, batch_size: greedy generation limits.
    EHD refinement:
        refine_ehd: EHD rows get knowledge + self-reflection framings, and EHD rows whose chosen answer is a bare
            refusal are regenerated too; a refined answer must be safe and not a bare refusal.
        knowledge: knowledge JSONL (``{"text": ...}`` a line); ``None`` = the bundled demo set.
        knowledge_k: passages retrieved per prompt.
    """

    mix: str
    out: str
    policy: str | None = None
    guard_model: str | None = None
    rounds: int = 5
    candidates: int = 2
    refine_ehd: bool = False
    knowledge: str | None = None
    knowledge_k: int = 2
    max_new_tokens: int = 128
    batch_size: int = 8
    overwrite: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        from equi.config import ConfigError
        from equi.schema import MANIFEST

        self.mix, self.out = str(self.mix), str(self.out)
        if not Path(self.mix).is_dir():
            raise ConfigError(f"{self.mix}: no such mix directory")
        if not (Path(self.mix) / MANIFEST).is_file():
            raise ConfigError(f"{self.mix}: no {MANIFEST} (not a mix written by equi curate)")
        mix, out = Path(self.mix).resolve(), Path(self.out).resolve()
        if out == mix or mix in out.parents:
            raise ConfigError("--out must be a new directory outside the input mix (the input is never modified)")
        if Path(self.out).exists() and not self.overwrite:
            raise ConfigError(f"{self.out} exists; pass --overwrite to replace it")
        if self.rounds < 0:
            raise ConfigError("--rounds must be 0 or more")
        if not 1 <= self.candidates <= len(FRAMINGS):
            raise ConfigError(f"--candidates must be between 1 and {len(FRAMINGS)} (one per framing)")
        if self.knowledge is not None:
            if not self.refine_ehd:
                raise ConfigError("--knowledge is used only with --refine-ehd")
            if not Path(self.knowledge).is_file():
                raise ConfigError(f"{self.knowledge}: no such knowledge file")
        if self.knowledge_k < 1:
            raise ConfigError("--knowledge-k must be at least 1")
        if self.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be at least 1")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class GuardResult:
    out: Path
    manifest: dict
    rounds: list[dict] = field(default_factory=list)


def _level_counts(levels: Sequence[str | None]) -> dict[str, int]:
    return {level: sum(1 for s in levels if s == level) for level in LEVELS}


def read_mixture(mix_dir: Path, manifest: dict) -> pl.DataFrame:
    """The parent's mixture rows, as text (:func:`equi.messages.to_text`; written back as messages)."""
    from equi.messages import to_text
    from equi.schema import mix_schema

    paths = [mix_dir / s["path"] for s in manifest["shards"] if s["split"] != "pool"]
    if not paths:
        return to_text(pl.from_arrow(mix_schema(manifest.get("multimodal", False)).empty_table()))
    return to_text(pl.concat([pl.read_parquet(p) for p in paths], how="vertical_relaxed"))


def guard_responses(guard: Guard, frame: pl.DataFrame, columns: Sequence[str]) -> dict[str, tuple[np.ndarray, Verdicts]]:
    """Guard every non-null response in ``columns``: column → (row indices, verdicts)."""
    out = {}
    prompts = frame["prompt"].to_list()
    for column in columns:
        texts = frame[column].to_list()
        idx = np.array([i for i, t in enumerate(texts) if t is not None], dtype=np.int64)
        out[column] = (idx, guard([prompts[i] for i in idx], [texts[i] for i in idx]))
    return out


def _audit_rows(part: str, ids: list[str], column: str, idx: np.ndarray, v: Verdicts, round_number: int = 0) -> list[dict]:
    return [{"round": round_number, "row_id": ids[i], "part": part, "field": column, "framing": None, "refine": False,
             "severity": v.severity[k], "unsafe": float(v.unsafe[k]), "refusal": float(v.refusal[k]),
             "refusal_class": v.refusal_class[k], "accepted": None, "text": None} for k, i in enumerate(idx)]


def guard_mix(config: GuardConfig, guard: Guard | None = None, policy=None, embedder=None) -> GuardResult:
    """Guard the parent mix, run the regeneration rounds and write the new mix; see the module docstring.

    ``guard``/``policy`` (``(name, model, tokenizer)``)/``embedder`` may be passed in (tests, notebooks); otherwise
    they are loaded from the config, the policy only when some row needs candidates.
    """
    from equi.manifest import MixVerificationError, load_manifest, verify_mix
    from equi.messages import to_text
    from equi.models import generate_answers

    parent = Path(config.mix)
    problems = verify_mix(parent)
    if problems:
        raise MixVerificationError([f"input mix {parent}: {p}" for p in problems])
    parent_manifest = load_manifest(parent)
    mixture = read_mixture(parent, parent_manifest)
    guard = guard or load_guard(config.guard_model, embedder=embedder)
    harm_guard = guard if isinstance(guard, DefaultGuard) else DefaultGuard(embedder=embedder)
    say = (lambda msg: None) if config.quiet else (lambda msg: print(f"equi guard: {msg}", file=sys.stderr))

    # Round 0: guard everything in the parent (mixture and pool).
    ids = mixture["id"].to_list()
    verdicts = guard_responses(guard, mixture, ("chosen", "rejected"))
    audit: list[dict] = []
    n = mixture.height
    chosen_sev: list[str | None] = [None] * n
    chosen_class: list[str | None] = [None] * n
    chosen_unsafe = np.zeros(n, dtype=np.float32)
    rejected_unsafe = np.zeros(n, dtype=np.float32)
    for column, (idx, v) in verdicts.items():
        audit += _audit_rows("mixture", ids, column, idx, v)
        for k, i in enumerate(idx):
            if column == "chosen":
                chosen_sev[i], chosen_class[i], chosen_unsafe[i] = v.severity[k], v.refusal_class[k], v.unsafe[k]
            else:
                rejected_unsafe[i] = v.unsafe[k]
    guarded = sum(len(v) for _, v in verdicts.values())
    pool_levels: dict[str, dict[str, int]] = {}
    pool_paths = [parent / s["path"] for s in parent_manifest["shards"] if s["split"] == "pool"]
    for path in pool_paths:
        pool = to_text(pl.read_parquet(path, columns=["id", "prompt", "chosen", "rejected", "response"]))
        for column, (idx, v) in guard_responses(guard, pool, ("chosen", "rejected", "response")).items():
            audit += _audit_rows("pool", pool["id"].to_list(), column, idx, v)
            guarded += len(v)
            counts = pool_levels.setdefault(column, _level_counts([]))
            for level, c in _level_counts(v.severity).items():
                counts[level] += c
    initial = {"chosen": _level_counts(chosen_sev), "rejected": _level_counts(verdicts["rejected"][1].severity)}
    groups = mixture["group"].to_list()
    first_targets = rows_needing_regeneration(chosen_sev, chosen_class, groups, config.refine_ehd)
    rounds = [{**round_counts(0, first_targets, 0, {}), "guarded": guarded, "regenerated": 0}]
    say(f"guarded {guarded} responses; {rounds[0]['unsafe']} mixture rows unsafe or missing"
        + (f", {rounds[0]['ehd_refusals']} EHD refusals" if config.refine_ehd else ""))

    # Rounds 1..R: regenerate, guard, pick.
    texts = {c: mixture[c].to_list() for c in ("chosen", "rejected")}
    prompts = mixture["prompt"].to_list()
    changed: dict[int, str] = {}
    knowledge_index = None
    stopped = "max_rounds" if config.rounds else "rounds=0"
    for round_number in range(1, config.rounds + 1):
        targets = rows_needing_regeneration(chosen_sev, chosen_class, groups, config.refine_ehd)
        if not targets:
            stopped = "nothing_left_to_fix"
            break
        if policy is None:
            policy = load_policy(config.policy, quiet=config.quiet)
        _, model, tokenizer = policy
        rows = sorted(targets)
        refine_rows = [i for i in rows if config.refine_ehd and groups[i] == "EHD"]
        passages: dict[int, list[str]] = {}
        if refine_rows:
            if knowledge_index is None:
                from curation.embed import get_embedder
                from curation.knowledge import KnowledgeIndex, read_knowledge

                knowledge_index = KnowledgeIndex(read_knowledge(config.knowledge), embedder or get_embedder(None))
            found = knowledge_index.nearest([text_for_embedding(prompts[i]) for i in refine_rows], config.knowledge_k)
            passages = {i: [p.text for p in ps] for i, ps in zip(refine_rows, found)}
        jobs: list[tuple[int, int, bool]] = []  # (row, framing, refine)
        for i in rows:
            refine = i in passages
            jobs += [(i, f, refine) for f in framing_schedule(round_number, config.candidates, refine)]
        framed = [framed_prompt(prompts[i], f, passages.get(i) if refine else None) for i, f, refine in jobs]
        answers = [g.answer for g in generate_answers(model, tokenizer, framed, max_new_tokens=config.max_new_tokens,
                                                      batch_size=config.batch_size, quiet=config.quiet)]
        v = guard([prompts[i] for i, _, _ in jobs], answers)
        replaced: dict[int, str] = {}
        by_row: dict[int, list[int]] = {}
        for j, (i, _, _) in enumerate(jobs):
            by_row.setdefault(i, []).append(j)
        accepted: set[int] = set()
        for i, js in by_row.items():
            pick = pick_candidate([v.severity[j] for j in js], [v.unsafe[j] for j in js],
                                  [v.refusal_class[j] for j in js], needs_informative(groups[i], config.refine_ehd))
            if pick is None:
                continue
            j = js[pick]
            accepted.add(j)
            keep = new_rejected(None if texts["chosen"][i] is None else float(chosen_unsafe[i]),
                                None if texts["rejected"][i] is None else float(rejected_unsafe[i]))
            if keep == "chosen":
                texts["rejected"][i], rejected_unsafe[i] = texts["chosen"][i], chosen_unsafe[i]
            texts["chosen"][i] = answers[j]
            chosen_sev[i], chosen_class[i], chosen_unsafe[i] = v.severity[j], v.refusal_class[j], v.unsafe[j]
            replaced[i] = targets[i]
            changed.setdefault(i, targets[i])
        for j, ((i, f, refine), answer) in enumerate(zip(jobs, answers)):
            audit.append({"round": round_number, "row_id": ids[i], "part": "mixture", "field": "candidate",
                          "framing": f, "refine": refine, "severity": v.severity[j], "unsafe": float(v.unsafe[j]),
                          "refusal": float(v.refusal[j]), "refusal_class": v.refusal_class[j],
                          "accepted": j in accepted, "text": answer})
        rounds.append(round_counts(round_number, targets, len(jobs), replaced))
        say(f"round {round_number}: {len(targets)} rows regenerated ({len(jobs)} candidates), "
            f"{rounds[-1]['fixed']} fixed, {rounds[-1]['refined']} refined")
        if not replaced and framings_exhausted(round_number, config.candidates):
            stopped = "no_change"
            break

    mixture = rescore_changed_rows(mixture, sorted(changed), texts, guard, harm_guard)
    final_targets = rows_needing_regeneration(chosen_sev, chosen_class, groups, config.refine_ehd)
    summary = {
        "initial": initial,
        "final": {"chosen": _level_counts(chosen_sev)},
        "pool": pool_levels,
        "changed_rows": len(changed),
        "still_unsafe": sum(1 for why in final_targets.values() if why in (UNSAFE, MISSING)),
    }
    policy_name = policy[0] if policy is not None else None
    manifest = write_guarded_mix(config, parent, parent_manifest, pool_paths, mixture, audit,
                                 guard_name=guard.name, policy_name=policy_name, rounds=rounds, stopped=stopped,
                                 summary=summary)
    return GuardResult(out=Path(config.out), manifest=manifest, rounds=rounds)


def rescore_changed_rows(mixture: pl.DataFrame, rows: list[int], texts: dict[str, list], guard: Guard,
                         harm_guard: DefaultGuard) -> pl.DataFrame:
    """New chosen/rejected texts for ``rows``, with refusal scores, guard costs and AMA spans recomputed for both."""
    from curation.segments import spans_for_rows

    if not rows:
        return mixture
    prompts = [mixture["prompt"][i] for i in rows]
    harm, _ = harm_guard.prompt_scores(prompts)
    columns = {c: mixture[c].to_list() for c in ("chosen", "rejected", "chosen_refusal", "rejected_refusal",
                                                  "chosen_cost", "rejected_cost", "chosen_spans", "rejected_spans")}
    for part in ("chosen", "rejected"):
        new = [texts[part][i] for i in rows]
        present = [k for k, t in enumerate(new) if t is not None]
        v = guard([prompts[k] for k in present], [new[k] for k in present])
        spans = spans_for_rows([float(harm[k]) for k in present], [new[k] for k in present])
        for pos, k in enumerate(present):
            i = rows[k]
            columns[part][i] = new[k]
            columns[f"{part}_refusal"][i] = float(v.refusal[pos])
            columns[f"{part}_cost"][i] = float(v.cost[pos])
            columns[f"{part}_spans"][i] = spans[pos]
        for k, t in enumerate(new):
            if t is None:
                i = rows[k]
                columns[part][i] = None
                columns[f"{part}_refusal"][i] = columns[f"{part}_cost"][i] = columns[f"{part}_spans"][i] = None
    return mixture.with_columns(*[pl.Series(name, values, dtype=mixture.schema[name]) for name, values in columns.items()])


def write_guarded_mix(config: GuardConfig, parent: Path, parent_manifest: dict, pool_paths: list[Path],
                      mixture: pl.DataFrame, audit: list[dict], *, guard_name: str, policy_name: str | None,
                      rounds: list[dict], stopped: str, summary: dict) -> dict:
    """The new mix: re-written mixture shards, the parent's pool shards and rejects copied byte for byte, the audit
    Parquet, a manifest that names the parent, and the data card. Atomic."""
    from curation.card import render_card
    from equi.config import config_hash
    from equi.manifest import atomic_directory, equi_version, sha256_file, utc_now, write_json_atomic
    from equi.schema import CARD, DATA_DIR, MANIFEST, POOL_DIR, REJECTS, SCHEMA_VERSION

    shard_rows = int(parent_manifest.get("config", {}).get("shard_rows", 50_000))
    with atomic_directory(config.out, overwrite=config.overwrite) as work:
        (work / POOL_DIR).mkdir()
        for path in pool_paths:
            shutil.copyfile(path, work / POOL_DIR / path.name)
        if (parent / REJECTS).is_file():
            shutil.copyfile(parent / REJECTS, work / REJECTS)
        else:
            (work / REJECTS).write_text("", encoding="utf-8")
        data_files = write_mixture(work / DATA_DIR, mixture, shard_rows, parent_manifest.get("multimodal", False))
        (work / "guard").mkdir()
        audit_path = work / "guard" / "verdicts.parquet"
        pl.DataFrame(audit, schema=_AUDIT_SCHEMA).write_parquet(audit_path, compression="zstd")
        from equi.manifest import shard_entry

        pool_entries = [s for s in parent_manifest["shards"] if s["split"] == "pool"]
        manifest = dict(parent_manifest)
        manifest.pop("timings_s", None)  # the parent's curate run; this mix was not timed that way
        counts = dict(parent_manifest.get("counts", {}))
        counts["mixture"] = _count_by_split(mixture)
        guard_config = config.to_dict()
        manifest.update({
            "schema_version": SCHEMA_VERSION,
            "equi_version": equi_version(),
            "created_at": utc_now(),
            "shards": pool_entries + [shard_entry(work, p, n, split, group) for p, n, (split, group) in data_files],
            "counts": counts,
            "parent": {
                "path": str(parent.resolve()),
                "manifest_sha256": sha256_file(parent / MANIFEST),
                "config_hash": parent_manifest.get("config_hash"),
                "created_at": parent_manifest.get("created_at"),
            },
            "guard": {
                "config": guard_config,
                "config_hash": config_hash({k: v for k, v in guard_config.items()
                                            if k not in ("mix", "out", "overwrite", "quiet")}),
                "guard": guard_name,
                "policy": policy_name,
                "rounds": rounds,
                "rounds_run": len(rounds) - 1,
                "stopped": stopped,
                **summary,
                "audit": {"path": "guard/verdicts.parquet", "sha256": sha256_file(audit_path), "rows": len(audit)},
            },
        })
        from equi.manifest import file_checksums

        # Card first, then the manifest with the sha256 of every non-shard file (equi verify lists them all).
        card = render_card(manifest, work).rstrip("\n") + "\n\n" + guard_card_section(manifest) + "\n"
        (work / CARD).write_text(card, encoding="utf-8")
        manifest["files"] = file_checksums(work, [CARD, REJECTS, "guard/verdicts.parquet"])
        write_json_atomic(work / MANIFEST, manifest)
    return manifest


def _count_by_split(mixture: pl.DataFrame) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for group, split, n in (mixture.group_by(["group", "split"]).len().iter_rows() if mixture.height else []):
        counts.setdefault(group, {})[split] = n
    return counts


def guard_card_section(manifest: dict) -> str:
    """What ``equi guard`` changed, for the data card."""
    g = manifest["guard"]
    lines = ["## Guard rounds (equi guard)", "",
             f"Made from the mix with manifest sha256 `{manifest['parent']['manifest_sha256']}` "
             f"(`{manifest['parent']['path']}`). Guard: `{g['guard']}`; policy: `{g['policy'] or 'not loaded'}`; "
             f"{g['rounds_run']} round(s) run, stopped: {g['stopped']}; EHD refinement "
             f"{'on' if g['config']['refine_ehd'] else 'off'}.", "",
             "| round | guarded | unsafe | EHD refusals | regenerated | fixed | refined |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in g["rounds"]:
        lines.append(f"| {r['round']} | {r['guarded']} | {r['unsafe']} | {r['ehd_refusals']} | {r['regenerated']} | "
                     f"{r['fixed']} | {r['refined']} |")
    lines += ["", f"{g['changed_rows']} mixture row(s) got a new `chosen` answer from the policy (the less safe of the "
              f"old answers stayed `rejected`); their refusal scores, costs and AMA spans were recomputed with the "
              f"guard. {g['still_unsafe']} row(s) still have an unsafe or missing chosen answer. Every other row, "
              "the pool and `rejects.jsonl` are unchanged; ids, ranks, splits and groups are the parent's. Every "
              "verdict and candidate is in `guard/verdicts.parquet`."]
    return "\n".join(lines)


_AUDIT_SCHEMA = {"round": pl.Int32, "row_id": pl.String, "part": pl.String, "field": pl.String, "framing": pl.Int32,
                 "refine": pl.Boolean, "severity": pl.String, "unsafe": pl.Float32, "refusal": pl.Float32,
                 "refusal_class": pl.String, "accepted": pl.Boolean, "text": pl.String}
