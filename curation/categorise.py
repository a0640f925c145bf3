"""The prompt categoriser: harm, explicit and intent scores → EHD / IHD / MHD / OTHER / BENIGN, and severity.

Why it looks like this
----------------------
Equilibrate RLHF's judge (``shared/data/equilibrate_relabel_dev/data_classification_prompt.txt``) defines the
groups by two questions: does the prompt *contain explicit risk content* ("Factual Risk" = EHD) and does it
*carry a malicious intent* ("Intentional Risk" = IHD); both = MHD. The categoriser asks the same two questions
with two logistic heads, plus a third head for "is this safety-relevant at all":

* features = the prompt's sentence embedding (MiniLM by default) ++ a small, readable lexicon vector
  (counts of explicit risk terms per harm area, and intent cues such as "get away with", insults, targeting a
  person, opinion bait), see :data:`EXPLICIT_TERMS` and :data:`INTENT_CUES`;
* ``harm_score``     = P(safety-relevant)                    (harm head: harmful/OTHER vs benign prompts);
* ``explicit_score`` = harm_score · P(explicit | features)   (explicit head: EHD ∪ MHD vs the rest);
* ``intent_score``   = harm_score · P(intent | features)     (intent head: IHD ∪ MHD vs the rest);
* P(BENIGN) = 1 − harm_score; P(g) = harm_score · P(g | harmful) for the four other groups, where
  P(g | harmful) is the geometric mean of two distributions — the one the scores imply (EHD = explicit ∧
  ¬intent, IHD = intent ∧ ¬explicit, MHD = both, OTHER = neither) and a direct group head — shifted by
  per-group log-offsets tuned on held-out folds of the training data for macro-F1 on EHD/IHD/MHD (the
  classes are very unbalanced). The group is the most probable one; ``group_confidence`` its probability.

Labels the input carries win over estimates: a ``category`` naming a group is used as is (confidence 1);
a BeaverTails-style harm category (``"violence,incitement"``) goes to ``harm_category`` and rules out BENIGN,
as does ``is_safe = False``; an input ``severity`` is kept.

Inference is numpy only (a few matrix products and regexes); fitting uses scikit-learn, imported lazily.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import polars as pl

from curation.patterns import case_folded, distinct_texts
from equi.errors import UsageError
from equi.jsonl import iter_json_lines
from equi.schema import GROUPS, SAFETY_GROUPS, SEVERITIES

FORMAT_VERSION = 1
DEFAULT_RESOURCE = "categoriser.json"
#: The categoriser shipped for ``--embedder lm:`` (the bundled SmolLM2's states; ``data_cards/categoriser.md``).
LM_RESOURCE = "categoriser-lm.json"

# --------------------------------------------------------------------------------------------------
# The lexicon: explainable features. Written from general harm taxonomies (BeaverTails / HarmBench areas),
# not selected from the labels, so cross-validated scores are not inflated by it.
# --------------------------------------------------------------------------------------------------

EXPLICIT_TERMS: dict[str, str] = {
    "violence": r"kill\w*|murder\w*|shoot\w*|stab\w*|bomb\w*|explosi\w+|gun|guns|weapon\w*|torture\w*|strangl\w*"
    r"|behead\w*|assault\w*|beat\w* (?:up|to death)|massacre\w*|terroris\w+|knife|knives|poison\w*|choke|smother\w*"
    r"|arson|burn\w* down|blow\w* up|hurt\w*|harm\w*|violen\w+|attack\w*|kidnap\w*|abduct\w*|hostage",
    "sexual": r"sex\w*|porn\w*|nude\w*|naked|fuck\w*|penis|vagina|dick|cock|pussy|boob\w*|tits|blow-?jobs?|orgasm\w*"
    r"|masturbat\w*|jack off|prostitut\w*|hooker\w*|escort\w*|rape\w*|raping|rapist\w*|molest\w*|pedophil\w*|incest"
    r"|erotic|horny|slut\w*|whore\w*|genital\w*|butt|ass",
    "drugs": r"drugs?|cocaine|coke|heroin|meth\w*|marijuana|weed|cannabis|lsd|mdma|ecstasy|opioid\w*|fentanyl|crack"
    r"|overdos\w+|narcotic\w*|pills|get (?:high|drunk)|drunk|alcohol\w*",
    "hate": r"racis\w+|nigg\w+|negro\w*|fag\w*|retard\w*|kike\w*|spic\w*|chink\w*|tranny|nazi\w*|hitler|kkk"
    r"|white (?:power|supremac\w+)|supremacist\w*|slur\w*|bigot\w*|inferior|subhuman|savage\w*|barbaric",
    "identity": r"black (?:people|men|women|person|guys)|blacks|white (?:people|men|women|person|guys)|whites|asians?"
    r"|chinese|mexicans?|jews?|jewish|muslims?|islam\w*|arabs?|christians?|gays?|lesbians?|homosexual\w*"
    r"|trans(?:gender)?|immigrants?|latinos?|hispanics?|indians?|africans?|women|females?|race|ethnic\w*|religio\w+"
    r"|disabled|fat people|old people",
    "crime": r"steal\w*|stole|theft|rob\w*|burglar\w*|shoplift\w*|counterfeit\w*|launder\w*|fraud\w*|scam\w*"
    r"|embezzl\w*|blackmail\w*|extort\w*|brib\w+|smuggl\w*|traffick\w*|hack\w*|illegal\w*|crime\w*|criminal\w*"
    r"|forg\w+|pirat\w+|vandal\w*|poach\w*|ssn|social security number|credit card",
    "selfharm": r"suicid\w*|self-?harm\w*|cut(?:ting)? myself|kill myself|end my life|overdose|anorexi\w*|starv\w+",
    "profanity": r"shit\w*|damn|bitch\w*|bastard\w*|crap\w*|piss\w*|asshole\w*|cunt\w*|motherf\w+|wtf",
}

INTENT_CUES: dict[str, str] = {
    "evasion": r"get away with|without (?:getting caught|being caught|anyone (?:knowing|noticing)|them knowing)"
    r"|not get caught|avoid (?:getting caught|detection|the police)|make it look like|cover (?:it )?up"
    r"|hide (?:the|a|my|it)|untraceable|secretly|sneak\w*",
    "how_to_act": r"^(?:how (?:can|do|would|should) (?:i|we|you|one)|what(?:'s| is) the (?:best|easiest|quickest) way to"
    r"|help me|teach me|tell me how|show me how|give me|i want to|i need to|i'm going to|i am going to|i wanna"
    r"|i'd like to|can you help me|should i)\b",
    "first_person_plan": r"\b(?:i want to|i'm going to|i am going to|i wanna|i plan to|i will|i'd like to|i need to)\b",
    "target_other": r"\b(?:my (?:wife|husband|boss|neighbou?r|sister|brother|ex|girlfriend|boyfriend|roommate|teacher"
    r"|coworker|mom|dad|kid|child|son|daughter|friend)|someone|somebody|people|him|her|them)\b",
    "insult": r"\b(?:stupid|dumb|idiot\w*|moron\w*|ugly|lazy|disgusting|worthless|pathetic|loser\w*|trash|scum"
    r"|filthy|terrible|awful|hate|hates|annoying|crazy|insane|freak\w*)\b",
    "generalisation": r"\b(?:all|why (?:are|do|is)|always|every)\b",
    "revenge_prank": r"reveng\w*|get back at|prank\w*|teach (?:him|her|them) a lesson|pay back|humiliat\w*"
    r"|embarrass\w*|ruin\w*|destroy\w*",
    "you_targeting": r"\byou(?:'re| are)? (?:are )?(?:stupid|dumb|useless|an idiot|a bitch|worthless|ugly)"
    r"|\bshut up\b|\bfuck you\b",
    "opinion_bait": r"\b(?:don't you think|do you agree|isn't it|right\?|am i wrong|what do you think|do you think)\b",
}

STYLE_FEATURES = ("question", "exclamation", "upper_ratio", "length")
LEXICON_FEATURES: tuple[str, ...] = tuple(EXPLICIT_TERMS) + tuple(INTENT_CUES) + STYLE_FEATURES

# Safe RLHF-V severity: "severe" = death/serious physical harm, sexual abuse, terrorism, self-harm.
SEVERE_TERMS = (
    r"\b(?:kill\w*|murder\w*|bomb\w*|explosi\w+|terroris\w+|shoot\w*|stab\w*|poison\w*|kidnap\w*|abduct\w*|rape\w*"
    r"|raping|rapist\w*|molest\w*|pedophil\w*|child porn\w*|suicid\w*|kill myself|torture\w*|behead\w*|massacre\w*"
    r"|strangl\w*|smother\w*|bioweapon\w*|nerve agent|anthrax|sarin|ricin|mass shooting|human trafficking"
    r"|traffick\w*|beat\w* to death)\b"
)


@functools.lru_cache(maxsize=1)
def _compiled() -> tuple[list[re.Pattern], list[re.Pattern], re.Pattern]:
    explicit = [re.compile(r"\b(?:" + p + r")\b", re.I) for p in EXPLICIT_TERMS.values()]
    intent = [re.compile(p, re.I) for p in INTENT_CUES.values()]
    return explicit, intent, re.compile(SEVERE_TERMS, re.I)


# The lexicon runs as polars (Rust regex) expressions over the whole batch, in parallel. The patterns are written
# for Python's ``re`` (the reference, kept below for the rows Rust could read differently): they use no
# look-around or backreference, and on most characters the two engines agree on ``\w``/``\b``, ``\d``, case
# folding, whitespace (``strip``/``split``) and ``isupper``. A text holding a character on which they disagree
# (combining marks, superscript digits, ``\x1c``-``\x1f``, the Kelvin sign, lone surrogates, ...) goes through
# ``re``. (:mod:`curation.segments` uses the same check for its concreteness pattern.)
_RUST_AGREES: dict[str, bool] = {}
_PY_WORD = re.compile(r"\w")
_PY_DIGIT = re.compile(r"\d")
_ASCII_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _learn_chars(chars: Iterable[str]) -> None:
    """Record, for each new character, whether Rust's regex and Python treat it alike for the lexicon."""
    new = [c for c in chars if c not in _RUST_AGREES]
    surrogates = [c for c in new if 0xD800 <= ord(c) <= 0xDFFF]  # polars cannot hold them
    for c in surrogates:
        _RUST_AGREES[c] = False
    new = [c for c in new if not 0xD800 <= ord(c) <= 0xDFFF]
    if not new:
        return
    c = pl.col("c")
    rust = pl.DataFrame({"c": new}, schema={"c": pl.String}).select(
        c.str.contains(r"^\w$"), c.str.contains(r"^\s$").alias("s"), c.str.contains(r"^\p{Uppercase}$").alias("u"),
        (c.str.strip_chars().str.len_chars() == 0).alias("strip"), c.str.contains(r"^\d$").alias("d"),
        c.str.contains(r"(?i)^[a-z]$").alias("fold"),
    ).rows()
    for char, (word, space, upper, stripped, digit, fold) in zip(new, rust):
        py_fold = any(re.fullmatch(letter, char, re.I) for letter in _ASCII_LETTERS)
        same = (word, space, upper, stripped, digit) == (bool(_PY_WORD.match(char)), char.isspace(), char.isupper(),
                                                          char.isspace(), bool(_PY_DIGIT.match(char)))
        # A non-ASCII character either engine folds onto an ASCII letter (K, ſ, İ) is left to ``re``.
        _RUST_AGREES[char] = same and (char.isascii() or not (fold or py_fold))


def _char_class(chars: Iterable[str]) -> str:
    return "[" + "".join(f"\\x{{{ord(c):X}}}" for c in sorted(chars)) + "]"


def _rust_readable(strings: list[str]) -> tuple[pl.Series, np.ndarray]:
    """The strings as a polars Series, and a boolean per string: every character is one on which Rust's regex
    and Python agree (see above). Strings polars cannot hold (lone surrogates) are blanked and marked False."""
    if not _RUST_AGREES:
        _learn_chars(chr(i) for i in range(128))
    try:
        series = pl.Series("t", strings, dtype=pl.String)
        ok = np.ones(len(strings), dtype=bool)
    except UnicodeEncodeError:
        ok = np.array([not any(0xD800 <= ord(c) <= 0xDFFF for c in s) for s in strings], dtype=bool)
        series = pl.Series("t", [s if k else "" for s, k in zip(strings, ok)], dtype=pl.String)
    present = set(series.str.replace_all(r"[\x00-\x7F]+", "").str.join("").item())
    present |= set(map(chr, range(128)))
    _learn_chars(present)
    bad = [c for c in present if not _RUST_AGREES[c]]
    if bad:
        ok &= ~series.str.contains(_char_class(bad)).fill_null(False).to_numpy()
    return series, ok


def _lexicon_row(text: str | None) -> list[float]:
    """The reference: one text through Python's ``re`` and ``str`` methods."""
    explicit, intent, _ = _compiled()
    t = (text or "").strip()
    row = [len(r.findall(t)) for r in explicit] + [len(r.findall(t)) for r in intent]
    row += [t.endswith("?"), "!" in t, sum(c.isupper() for c in t) / max(1, len(t)), min(len(t.split()), 60) / 60]
    return row


def _ascii_stand_in(text: pl.Expr) -> pl.Expr:
    r"""Each non-ASCII character → ``_`` if a word character, else ``\x01``.

    The patterns' literals are ASCII letters, digits, spaces and punctuation other than ``_``, and (for readable
    texts) no non-ASCII character folds onto an ASCII letter, so this changes no match; it keeps Rust's fast
    DFA, which gives up on Unicode word boundaries over non-ASCII input (about 40× slower).
    """
    return text.str.replace_all(r"[\w&&[^\x00-\x7F]]", "_").str.replace_all(r"[^\x00-\x7F]", "\x01")


@functools.lru_cache(maxsize=1)
def _lexicon_exprs() -> list[pl.Expr]:
    """Over columns ``t`` (the text), ``a`` (its ASCII stand-in) and ``l`` (the stand-in lowercased)."""
    t, lowered = pl.col("t"), pl.col("l")
    # Over ASCII stand-ins, ASCII-only \b, \w and case folding ((?-u)) mean the same and compile smaller; over the
    # lowercased stand-in, the case-folded patterns find the same matches faster (curation.patterns.case_folded).
    patterns = [r"(?i-u)\b(?:" + p + r")\b" for p in EXPLICIT_TERMS.values()]
    patterns += ["(?i-u)" + p for p in INTENT_CUES.values()]
    exprs = [lowered.str.count_matches(case_folded(p)).cast(pl.Float64).alias(f"x{k}") for k, p in enumerate(patterns)]
    exprs += [
        t.str.ends_with("?").cast(pl.Float64).alias("question"),
        t.str.contains("!", literal=True).cast(pl.Float64).alias("exclamation"),
        # Python: sum(c.isupper()) / max(1, len(t)) and min(len(t.split()), 60) / 60, in double precision
        (t.str.count_matches(r"\p{Uppercase}").cast(pl.Float64) / pl.max_horizontal(t.str.len_chars(), 1))
        .alias("upper"),
        (pl.min_horizontal(t.str.count_matches(r"\S+"), 60).cast(pl.Float64) / 60).alias("length"),
    ]
    return exprs


def lexicon_features(texts: Sequence[str | None]) -> np.ndarray:
    """Raw lexicon counts, one row per text, columns :data:`LEXICON_FEATURES` (float32); each distinct text is
    read once (a batch repeats prompts: several answers to one prompt)."""
    distinct, inverse = distinct_texts([text or "" for text in texts])
    return _distinct_lexicon_features(distinct)[inverse]


def _distinct_lexicon_features(strings: list[str]) -> np.ndarray:
    out = np.zeros((len(strings), len(LEXICON_FEATURES)), dtype=np.float32)
    if not strings:
        return out
    series, fast = _rust_readable(strings)
    index = np.flatnonzero(fast)
    if len(index):
        frame = series.to_frame() if len(index) == len(strings) else series.filter(pl.Series(fast)).to_frame()
        frame = frame.select(pl.col("t").str.strip_chars()).with_columns(_ascii_stand_in(pl.col("t")).alias("a"))
        out[index] = frame.with_columns(pl.col("a").str.to_lowercase().alias("l")).select(_lexicon_exprs()).to_numpy()
    for i in np.flatnonzero(~fast):
        out[i] = _lexicon_row(strings[i])
    return out


def severe_term_hits(texts: Sequence[str | None]) -> np.ndarray:
    """Boolean per text: mentions death, serious physical harm, sexual abuse, terrorism or self-harm (each distinct
    text read once)."""
    distinct, inverse = distinct_texts([text or "" for text in texts])
    return _distinct_severe_term_hits(distinct)[inverse]


def _distinct_severe_term_hits(strings: list[str]) -> np.ndarray:
    out = np.zeros(len(strings), dtype=bool)
    if not strings:
        return out
    series, fast = _rust_readable(strings)
    if fast.any():
        hits = series.to_frame().select(_ascii_stand_in(pl.col("t")).str.contains("(?i-u)" + SEVERE_TERMS))
        out[fast] = hits.to_series().to_numpy()[fast]
    _, _, severe = _compiled()
    for i in np.flatnonzero(~fast):
        out[i] = bool(severe.search(strings[i]))
    return out


# --------------------------------------------------------------------------------------------------
# Label vocabulary of the input
# --------------------------------------------------------------------------------------------------

_GROUP_ALIASES = {g.lower(): g for g in GROUPS} | {
    "no risk": "BENIGN", "no_risk": "BENIGN", "norisk": "BENIGN", "benign": "BENIGN", "safe": "BENIGN",
    "factual risk": "EHD", "intentional risk": "IHD", "mixed risk": "MHD",
}


def group_from_label(label: str | None) -> str | None:
    """The group a ``category`` label names (``"No risk"`` → BENIGN), or ``None`` if it names none."""
    if label is None:
        return None
    return _GROUP_ALIASES.get(str(label).strip().lower())


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class CategoriserError(UsageError):
    """A categoriser file or training set that cannot be used; the message says why."""


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


@dataclass
class Categoriser:
    """Fitted parameters of the three binary heads and the five-class head (linear, over the same features).

    ``explicit``/``intent``/``harm``: ``(coef[d], intercept)``; ``group_coef``: ``[5, d]`` in :data:`GROUPS` order.
    ``offsets``: per-group log-offsets added before the argmax. ``blend``: weight of the score-implied
    distribution vs the five-class head in the geometric mean. ``confidence_map``: Platt ``(a, b)`` that turns the
    predicted group's probability ``c`` into ``group_confidence`` = σ(a·logit c + b), fit on held-out predictions
    (the raw probability is over-confident: of prompts given 0.9+, about a third had that group in 5-fold CV);
    ``None`` = the raw probability. ``info``: what it was fit on and its CV scores.
    """

    embedder: str | None
    embedding_dim: int
    explicit_coef: np.ndarray
    explicit_intercept: float
    intent_coef: np.ndarray
    intent_intercept: float
    harm_coef: np.ndarray
    harm_intercept: float
    group_coef: np.ndarray
    group_intercept: np.ndarray
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(len(GROUPS), dtype=np.float32))
    lexicon_weight: float = 0.5
    blend: float = 0.5
    info: dict[str, Any] = field(default_factory=dict)
    confidence_map: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        d = self.embedding_dim + len(LEXICON_FEATURES)
        self.explicit_coef = np.asarray(self.explicit_coef, dtype=np.float32).reshape(-1)
        self.intent_coef = np.asarray(self.intent_coef, dtype=np.float32).reshape(-1)
        self.harm_coef = np.asarray(self.harm_coef, dtype=np.float32).reshape(-1)
        self.group_coef = np.asarray(self.group_coef, dtype=np.float32).reshape(len(GROUPS), -1)
        self.group_intercept = np.asarray(self.group_intercept, dtype=np.float32).reshape(len(GROUPS))
        self.offsets = np.asarray(self.offsets, dtype=np.float32).reshape(len(GROUPS))
        for name in ("explicit_coef", "intent_coef", "harm_coef"):
            if getattr(self, name).shape != (d,):
                raise CategoriserError(f"{name} has {getattr(self, name).shape[0]} weights, expected {d}")
        if self.group_coef.shape[1] != d:
            raise CategoriserError(f"group_coef has {self.group_coef.shape[1]} columns, expected {d}")
        if not 0.0 <= self.blend <= 1.0:
            raise CategoriserError("blend must be in [0, 1]")

    # ---- features and scores ---------------------------------------------------------------------

    def features(self, texts: Sequence[str | None], embeddings: np.ndarray) -> np.ndarray:
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
            raise ValueError(f"expected embeddings of shape ({len(texts)}, dim), got {embeddings.shape}")
        if embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"embeddings have dimension {embeddings.shape[1]} but this categoriser was fit on "
                f"{self.embedding_dim}-dimensional ones (embedder {self.embedder!r}); refit it with "
                "`equi fit-categoriser --embedder ...`"
            )
        lexical = np.log1p(lexicon_features(texts)) * self.lexicon_weight
        return np.hstack([embeddings, lexical])

    def predict(self, texts: Sequence[str | None], embeddings: np.ndarray) -> dict[str, np.ndarray]:
        """Scores for unlabelled prompts: ``harm``, ``explicit``, ``intent`` (0–1) and ``log_probs`` [n, 5]."""
        x = self.features(texts, embeddings)
        harm = _sigmoid(x @ self.harm_coef + self.harm_intercept)
        explicit = _sigmoid(x @ self.explicit_coef + self.explicit_intercept)
        intent = _sigmoid(x @ self.intent_coef + self.intent_intercept)
        return {"harm": harm, "explicit_given_harm": explicit, "intent_given_harm": intent,
                "log_probs": self._group_log_probs(x, harm, explicit, intent)}

    def _group_log_probs(self, x: np.ndarray, harm: np.ndarray, explicit: np.ndarray, intent: np.ndarray) -> np.ndarray:
        # P(BENIGN) is the harm head's alone: it is fit on thousands of benign prompts, the group heads on few.
        # Among the four safety-relevant groups, blend what the two scores imply with the direct head.
        eps = 1e-6
        implied = np.stack([explicit * (1 - intent), (1 - explicit) * intent, explicit * intent,
                            (1 - explicit) * (1 - intent)], axis=1)
        direct = _log_softmax((x @ self.group_coef.T + self.group_intercept)[:, :4])
        given_harm = _log_softmax(self.blend * np.log(implied + eps) + (1 - self.blend) * direct + self.offsets[:4])
        return np.hstack([np.log(harm + eps)[:, None] + given_harm, np.log(1 - harm + eps)[:, None]])

    def calibrated_confidence(self, probability: np.ndarray) -> np.ndarray:
        """``group_confidence`` for the predicted group's probability: through ``confidence_map`` when fit."""
        probability = np.asarray(probability, dtype=np.float64)
        return probability if self.confidence_map is None else apply_platt(probability, self.confidence_map)

    # ---- persistence -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "embedder": self.embedder,
            "embedding_dim": self.embedding_dim,
            "lexicon_features": list(LEXICON_FEATURES),
            "groups": list(GROUPS),
            "lexicon_weight": self.lexicon_weight,
            "blend": self.blend,
            "offsets": [round(float(v), 6) for v in self.offsets],
            "heads": {
                "explicit": {"coef": _floats(self.explicit_coef), "intercept": float(self.explicit_intercept)},
                "intent": {"coef": _floats(self.intent_coef), "intercept": float(self.intent_intercept)},
                "harm": {"coef": _floats(self.harm_coef), "intercept": float(self.harm_intercept)},
                "group": {"coef": [_floats(r) for r in self.group_coef], "intercept": _floats(self.group_intercept)},
            },
            **({"confidence_map": {"a": float(self.confidence_map[0]), "b": float(self.confidence_map[1])}}
               if self.confidence_map is not None else {}),
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Categoriser":
        if data.get("format_version") != FORMAT_VERSION:
            raise CategoriserError(f"unsupported categoriser format_version {data.get('format_version')!r}")
        if list(data.get("lexicon_features", [])) != list(LEXICON_FEATURES):
            raise CategoriserError("categoriser was fit with a different lexicon; refit it with `equi fit-categoriser`")
        if list(data.get("groups", [])) != list(GROUPS):
            raise CategoriserError("categoriser groups do not match this equi version")
        try:
            h = data["heads"]
            return cls(
                embedder=data.get("embedder"), embedding_dim=int(data["embedding_dim"]),
                explicit_coef=h["explicit"]["coef"], explicit_intercept=float(h["explicit"]["intercept"]),
                intent_coef=h["intent"]["coef"], intent_intercept=float(h["intent"]["intercept"]),
                harm_coef=h["harm"]["coef"], harm_intercept=float(h["harm"]["intercept"]),
                group_coef=h["group"]["coef"], group_intercept=h["group"]["intercept"],
                offsets=data.get("offsets", [0.0] * len(GROUPS)),
                lexicon_weight=float(data.get("lexicon_weight", 0.5)), blend=float(data.get("blend", 0.5)),
                info=dict(data.get("info", {})),
                confidence_map=((float(data["confidence_map"]["a"]), float(data["confidence_map"]["b"]))
                                if data.get("confidence_map") else None),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CategoriserError):
                raise
            raise CategoriserError(f"malformed categoriser file: {type(exc).__name__}: {exc}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), separators=(",", ":")) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Categoriser":
        path = Path(path)
        if not path.is_file():
            raise CategoriserError(f"categoriser file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CategoriserError(f"{path} is not a categoriser JSON file ({exc})") from None
        if not isinstance(data, dict):
            raise CategoriserError(f"{path} is not a categoriser JSON file (it holds a {type(data).__name__}, "
                                   "not an object)")
        return cls.from_dict(data)

    @classmethod
    def load_default(cls) -> "Categoriser":
        """The categoriser shipped with equi (fit on MiniLM embeddings; see ``data_cards/categoriser.md``)."""
        return _load_default()

    @classmethod
    def default_for(cls, embedder: str | None) -> "Categoriser":
        """The shipped categoriser for ``--embedder``: the one fit on the bundled SmolLM2's states for ``lm:``,
        else the MiniLM one (which curate refuses, saying how to fit one, when the embedder's size differs)."""
        from curation.embed import LM_PREFIX

        return _load_default(LM_RESOURCE) if embedder == LM_PREFIX else _load_default()


@functools.lru_cache(maxsize=2)
def _load_default(resource_name: str = DEFAULT_RESOURCE) -> Categoriser:
    from importlib.resources import files

    resource = files("curation").joinpath("resources", resource_name)
    return Categoriser.from_dict(json.loads(resource.read_text()))


def _floats(values: Iterable[float]) -> list[float]:
    return [round(float(v), 6) for v in values]


# --------------------------------------------------------------------------------------------------
# The step function
# --------------------------------------------------------------------------------------------------

_OUTPUT_COLUMNS = ("harm_score", "explicit_score", "intent_score", "group", "group_confidence", "severity", "harm_category")
_GROUP_INDEX = {g: i for i, g in enumerate(GROUPS)}


def categorise(frame: pl.DataFrame, prompt_embeddings: np.ndarray, model: Categoriser | None = None,
               harm: np.ndarray | None = None) -> pl.DataFrame:
    """Add ``harm_score``, ``explicit_score``, ``intent_score``, ``group``, ``group_confidence``, ``severity``
    and ``harm_category`` to a frame with a ``prompt`` column (optional ``category``, ``severity``, ``is_safe``).

    ``prompt_embeddings[i]`` is row ``i``'s prompt embedding from the embedder the model was fit with. ``harm``
    (a guard's P(harmful) per row, ``equi curate --guard-model``) replaces the harm head: harm ≥ 0.5 makes the row
    the heads' best safety group, below it BENIGN (confidence 1 − harm). Labels carried by the input win either way.
    """
    model = model or Categoriser.load_default()
    n = frame.height
    prompts = frame["prompt"].to_list()
    pred = model.predict(prompts, prompt_embeddings) if n else {
        "harm": np.zeros(0), "explicit_given_harm": np.zeros(0), "intent_given_harm": np.zeros(0),
        "log_probs": np.zeros((0, len(GROUPS)))}

    categories = _column(frame, "category", n)
    is_safe = _column(frame, "is_safe", n)
    label_groups = [group_from_label(c) for c in categories]
    harm_categories = [
        None if (c is None or lg is not None or not str(c).strip()) else str(c).strip()
        for c, lg in zip(categories, label_groups)
    ]
    # Known harmful: a harm category, or an unsafe response (an unsafe answer means the prompt asked for harm).
    known_harmful = np.array([hc is not None or s is False for hc, s in zip(harm_categories, is_safe)], dtype=bool)

    guarded = harm is not None
    harm = np.asarray(harm if guarded else pred["harm"], dtype=np.float64)
    harm = np.where(known_harmful, 1.0, harm)
    log_probs = pred["log_probs"].copy()
    harmful = known_harmful | (harm >= 0.5) if guarded else known_harmful
    log_probs[harmful, _GROUP_INDEX["BENIGN"]] = -np.inf
    probs = np.exp(log_probs - log_probs.max(axis=1, keepdims=True)) if n else log_probs
    probs = probs / probs.sum(axis=1, keepdims=True) if n else probs
    best = probs.argmax(axis=1) if n else np.zeros(0, dtype=int)
    if guarded:  # the guard decides harmful or not; the heads, which safety group
        best = np.where(harmful, best, _GROUP_INDEX["BENIGN"])
    groups = [GROUPS[i] for i in best]
    confidence = model.calibrated_confidence(probs[np.arange(n), best]) if n else np.zeros(0)
    if guarded and n:
        confidence = np.where(harmful, harm * confidence, 1.0 - harm)

    for i, lg in enumerate(label_groups):
        if lg is not None:
            groups[i] = lg
            confidence[i] = 1.0
            harm[i] = 0.0 if lg == "BENIGN" else 1.0

    explicit = harm * pred["explicit_given_harm"]
    intent = harm * pred["intent_given_harm"]
    severity = estimate_severity(prompts, groups, harm, explicit, intent, _column(frame, "severity", n))

    return frame.drop([c for c in _OUTPUT_COLUMNS if c in frame.columns]).with_columns(
        pl.Series("harm_score", harm, dtype=pl.Float32),
        pl.Series("explicit_score", explicit, dtype=pl.Float32),
        pl.Series("intent_score", intent, dtype=pl.Float32),
        pl.Series("group", groups, dtype=pl.String),
        pl.Series("group_confidence", confidence, dtype=pl.Float32),
        pl.Series("severity", severity, dtype=pl.String),
        pl.Series("harm_category", harm_categories, dtype=pl.String),
    )


def _column(frame: pl.DataFrame, name: str, n: int) -> list:
    return frame[name].to_list() if name in frame.columns else [None] * n


def estimate_severity(
    prompts: Sequence[str | None],
    groups: Sequence[str],
    harm: np.ndarray,
    explicit: np.ndarray,
    intent: np.ndarray,
    labels: Sequence[str | None] | None = None,
) -> list[str | None]:
    """Severity per row: the input label where it is a known level, else a rule over the scores.

    BENIGN → None. Rule (Safe RLHF-V levels): *severe* when the prompt names death, serious physical harm, sexual
    abuse, terrorism or self-harm and is confidently harmful with explicit content or intent (both ≥ 0.5);
    *minor* for OTHER prompts and for weakly harmful ones (harm < 0.5); *moderate* otherwise.
    """
    labels = labels if labels is not None else [None] * len(groups)
    severe = severe_term_hits(prompts)
    out: list[str | None] = []
    for i, group in enumerate(groups):
        label = str(labels[i]).strip().lower() if labels[i] is not None else None
        if group == "BENIGN":
            out.append(None)
        elif label in SEVERITIES:
            out.append(label)
        elif severe[i] and harm[i] >= 0.5 and max(explicit[i], intent[i]) >= 0.5 and group in SAFETY_GROUPS:
            out.append("severe")
        elif group == "OTHER" or harm[i] < 0.5:
            out.append("minor")
        else:
            out.append("moderate")
    return out


# --------------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------------


@dataclass
class FitConfig:
    """How :func:`fit_categoriser` fits the heads.

    C: inverse L2 strength of every logistic head. lexicon_weight: scale of the log-count lexicon features
    next to the unit-norm embedding. blend: weight of the score-implied group distribution vs the five-class
    head. tune_offsets: tune per-group log-offsets for macro-F1 on EHD/IHD/MHD on ``inner_folds`` held-out
    folds of the training data (skipped when a group has fewer than ``inner_folds`` rows). seed: fold shuffling.
    """

    C: float = 1.0
    lexicon_weight: float = 0.5
    blend: float = 0.5
    tune_offsets: bool = True
    inner_folds: int = 4
    offset_grid: tuple[float, ...] = tuple(np.round(np.linspace(-1.0, 1.0, 9), 3))
    seed: int = 0

    def __post_init__(self) -> None:
        if self.C <= 0:
            raise ValueError("C must be positive")
        if self.lexicon_weight < 0:
            raise ValueError("lexicon_weight must be non-negative")
        if not 0.0 <= self.blend <= 1.0:
            raise ValueError("blend must be in [0, 1]")
        if self.inner_folds < 2:
            raise ValueError("inner_folds must be at least 2")


@dataclass
class LabelledPrompts:
    """Training data: prompts with embeddings, a group label (or None) and a harmful/benign label (or None)."""

    texts: list[str]
    embeddings: np.ndarray
    groups: list[str | None]
    harmful: list[bool | None]

    def __post_init__(self) -> None:
        self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
        if not (len(self.texts) == len(self.groups) == len(self.harmful) == self.embeddings.shape[0]):
            raise ValueError("texts, embeddings, groups and harmful must have the same length")
        # A group label implies the harm label (BENIGN = not harmful; OTHER is safety-relevant).
        self.harmful = [(g != "BENIGN") if g is not None else h for g, h in zip(self.groups, self.harmful)]

    def subset(self, index: np.ndarray) -> "LabelledPrompts":
        return LabelledPrompts([self.texts[i] for i in index], self.embeddings[index],
                               [self.groups[i] for i in index], [self.harmful[i] for i in index])

    def __len__(self) -> int:
        return len(self.texts)


def read_labelled_jsonl(paths: Sequence[str | Path]) -> tuple[list[str], list[str | None], list[bool | None]]:
    """Rows with ``prompt`` and a group ``category`` (or ``"No risk"``) and/or ``is_harmful``.

    Rows with neither label are skipped; an unknown category is an error naming file and line.
    """
    texts: list[str] = []
    groups: list[str | None] = []
    harmful: list[bool | None] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise CategoriserError(f"labelled file not found: {path}")
        for line_no, row in iter_json_lines(path, CategoriserError):
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():
                raise CategoriserError(f"{path}:{line_no}: needs a non-empty string 'prompt'")
            category = row.get("category")
            group = group_from_label(category) if category is not None else None
            if category is not None and group is None:
                raise CategoriserError(
                    f"{path}:{line_no}: unknown category {category!r}; use one of {', '.join(GROUPS)} or 'No risk'"
                )
            is_harmful = row.get("is_harmful")
            if is_harmful is not None and not isinstance(is_harmful, bool):
                raise CategoriserError(f"{path}:{line_no}: 'is_harmful' must be true or false")
            if group is None and is_harmful is None:
                continue
            texts.append(prompt)
            groups.append(group)
            harmful.append(is_harmful)
    return texts, groups, harmful


def fit_categoriser(
    labelled_jsonl_paths: Sequence[str | Path] | str | Path,
    embedder=None,
    config: FitConfig | None = None,
    fallback: Categoriser | None = None,
) -> Categoriser:
    """Fit a categoriser on labelled JSONL (see :func:`read_labelled_jsonl`).

    ``embedder``: an object with ``.encode(texts)`` and ``.name`` (e.g. ``curation.embed.Embedder``), a model
    name/path, or ``None`` for the bundled MiniLM. ``fallback``: where the data has no benign (or no harmful)
    examples, the harm head is taken from it (default: the bundled categoriser, if the embedder matches).
    """
    if isinstance(labelled_jsonl_paths, (str, Path)):
        labelled_jsonl_paths = [labelled_jsonl_paths]
    texts, groups, harmful = read_labelled_jsonl(labelled_jsonl_paths)
    if not any(g is not None for g in groups):
        raise CategoriserError("no rows with a group 'category' (EHD, IHD, MHD, OTHER, BENIGN or 'No risk') to fit on")
    if embedder is None or isinstance(embedder, str):
        from curation.embed import get_embedder

        embedder = get_embedder(embedder)
    data = LabelledPrompts(texts, embedder.encode(texts), groups, harmful)
    return fit_arrays(data, config, embedder_name=getattr(embedder, "name", None), fallback=fallback)


def fit_arrays(
    data: LabelledPrompts,
    config: FitConfig | None = None,
    embedder_name: str | None = None,
    fallback: Categoriser | None = None,
) -> Categoriser:
    """Fit all heads on precomputed embeddings (the library core of :func:`fit_categoriser`)."""
    config = config or FitConfig()
    has_group = np.array([g is not None for g in data.groups])
    if not has_group.any():
        raise CategoriserError("no rows with a group label to fit on")
    # The harm head is fit once on all training rows and shared by the inner folds that tune the offsets: it
    # only moves BENIGN, which the offsets leave alone, and refitting it per inner fold quadruples fit time.
    harm = fit_harm_head(data, config, embedder_name, fallback)
    offsets = np.zeros(len(GROUPS), dtype=np.float32)
    confidence_map = None
    if config.tune_offsets and _can_tune(data, config):
        offsets, held_log_probs, held_y = _tune_offsets(data, config, embedder_name, harm)
        confidence_map = fit_confidence_map(held_log_probs + offsets, held_y)
    model = _fit_heads(data, config, embedder_name, harm)
    model.offsets = offsets
    model.confidence_map = confidence_map
    group_counts = {g: int(sum(1 for x in data.groups if x == g)) for g in GROUPS}
    model.info = {
        "fit_rows": len(data),
        "group_counts": group_counts,
        "harm_counts": {"harmful": int(sum(1 for h in data.harmful if h is True)),
                        "benign": int(sum(1 for h in data.harmful if h is False))},
        "config": {k: v for k, v in config.__dict__.items() if k != "offset_grid"},
    }
    return model


def _can_tune(data: LabelledPrompts, config: FitConfig) -> bool:
    counts = [sum(1 for x in data.groups if x == g) for g in SAFETY_GROUPS]
    return min(counts) >= config.inner_folds


def _feature_matrix(data: LabelledPrompts, config: FitConfig) -> np.ndarray:
    dim = data.embeddings.shape[1]
    probe = Categoriser(None, dim, *_zero_heads(dim), lexicon_weight=config.lexicon_weight, blend=config.blend)
    return probe.features(data.texts, data.embeddings)


def _binary_head(target: np.ndarray, features: np.ndarray, config: FitConfig) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    if target.all() or not target.any():  # one class only: a constant head says so without guessing
        return np.zeros(features.shape[1], dtype=np.float32), (6.0 if target.all() else -6.0)
    head = LogisticRegression(C=config.C, max_iter=3000, class_weight="balanced").fit(features, target)
    return head.coef_[0], float(head.intercept_[0])


def fit_harm_head(data: LabelledPrompts, config: FitConfig | None = None, embedder_name: str | None = None,
                  fallback: Categoriser | None = None) -> tuple[np.ndarray, float]:
    """The harm head alone: safety-relevant (EHD/IHD/MHD/OTHER or is_harmful) vs benign, ``(coef, intercept)``."""
    config = config or FitConfig()
    known = np.array([h is not None for h in data.harmful])
    y = np.array([bool(h) for h in data.harmful if h is not None])
    if y.all() or not y.any():
        dim = data.embeddings.shape[1]
        fallback = fallback or _matching_default(embedder_name, dim)
        if fallback is None or fallback.embedding_dim != dim:
            raise CategoriserError(
                "the labelled data needs both benign ('No risk'/BENIGN or is_harmful=false) and harmful prompts "
                "to fit the harm head (or a fallback categoriser fit with the same embedder)"
            )
        return fallback.harm_coef, fallback.harm_intercept
    return _binary_head(y, _feature_matrix(data, config)[known], config)


def _fit_heads(data: LabelledPrompts, config: FitConfig, embedder_name: str | None,
               harm: tuple[np.ndarray, float]) -> Categoriser:
    from sklearn.linear_model import LogisticRegression

    dim = data.embeddings.shape[1]
    labelled = np.array([g is not None for g in data.groups])
    x = _feature_matrix(data, config)[labelled]
    y = np.array([g for g in data.groups if g is not None])
    explicit = _binary_head(np.isin(y, ["EHD", "MHD"]), x, config)
    intent = _binary_head(np.isin(y, ["IHD", "MHD"]), x, config)

    present = sorted(set(y), key=GROUPS.index)
    group_coef = np.zeros((len(GROUPS), x.shape[1]), dtype=np.float32)
    group_intercept = np.full(len(GROUPS), -30.0, dtype=np.float32)  # groups never seen get ~zero probability
    if len(present) == 1:
        group_intercept[GROUPS.index(present[0])] = 0.0
    else:
        head = LogisticRegression(C=config.C, max_iter=3000, class_weight="balanced").fit(x, y)
        for row, cls in enumerate(head.classes_):
            k = GROUPS.index(cls)
            if len(head.classes_) == 2:  # sklearn stores one row for two classes: split it symmetrically
                sign = 1.0 if row == 1 else -1.0
                group_coef[k] = sign * head.coef_[0] / 2
                group_intercept[k] = sign * head.intercept_[0] / 2
            else:
                group_coef[k] = head.coef_[row]
                group_intercept[k] = head.intercept_[row]

    return Categoriser(
        embedder=embedder_name, embedding_dim=dim,
        explicit_coef=explicit[0], explicit_intercept=explicit[1],
        intent_coef=intent[0], intent_intercept=intent[1],
        harm_coef=harm[0], harm_intercept=harm[1],
        group_coef=group_coef, group_intercept=group_intercept,
        lexicon_weight=config.lexicon_weight, blend=config.blend,
    )


def _zero_heads(dim: int) -> tuple:
    d = dim + len(LEXICON_FEATURES)
    z = np.zeros(d, dtype=np.float32)
    return z, 0.0, z, 0.0, z, 0.0, np.zeros((len(GROUPS), d), dtype=np.float32), np.zeros(len(GROUPS))


def _matching_default(embedder_name: str | None, dim: int) -> Categoriser | None:
    try:
        default = Categoriser.load_default()
    except Exception:  # no bundled params (e.g. while building them): nothing to fall back on
        return None
    from curation.embed import DEFAULT_EMBEDDER

    same = (embedder_name or DEFAULT_EMBEDDER) == (default.embedder or DEFAULT_EMBEDDER)
    return default if same and default.embedding_dim == dim else None


def _stratified_folds(labels: Sequence[str | None], k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k folds stratified by label (None = its own stratum); every row is held out exactly once."""
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), dtype=int)
    strata: dict[Any, list[int]] = {}
    for i, label in enumerate(labels):
        strata.setdefault(label, []).append(i)
    start = 0
    for key in sorted(strata, key=lambda s: (s is None, str(s))):
        members = np.array(strata[key])
        rng.shuffle(members)
        fold_of[members] = (np.arange(len(members)) + start) % k
        start += len(members)
    index = np.arange(len(labels))
    return [(index[fold_of != f], index[fold_of == f]) for f in range(k)]


def _tune_offsets(data: LabelledPrompts, config: FitConfig, embedder_name: str | None,
                  harm: tuple[np.ndarray, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group log-offsets maximising EHD/IHD/MHD macro-F1 on inner held-out folds (never on test rows); also
    returns those held-out log-probabilities and labels of the group-labelled rows (the confidence map's data)."""
    log_probs = np.zeros((len(data), len(GROUPS)))
    inner = FitConfig(**{**config.__dict__, "tune_offsets": False})
    for train, held in _stratified_folds(data.groups, config.inner_folds, config.seed + 1):
        model = _fit_heads(data.subset(train), inner, embedder_name, harm)
        log_probs[held] = model.predict([data.texts[i] for i in held], data.embeddings[held])["log_probs"]
    labelled = np.array([g is not None for g in data.groups])
    y = np.array([GROUPS.index(g) for g in data.groups if g is not None])
    return best_offsets(log_probs[labelled], y, config.offset_grid), log_probs[labelled], y


def fit_confidence_map(log_probs: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """Platt ``(a, b)`` for ``group_confidence`` from held-out predictions: a logistic regression of "the predicted
    group is the labelled one" on the logit of its probability. None when every prediction is right or every one
    wrong (nothing to fit)."""
    probs = np.exp(log_probs - log_probs.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return fit_platt(probs.max(axis=1), probs.argmax(axis=1) == np.asarray(y))


def fit_platt(probability: np.ndarray, outcome: np.ndarray) -> tuple[float, float] | None:
    """Platt scaling ``(a, b)``: a logistic regression of the 0/1 ``outcome`` on logit ``probability``
    (unregularised in effect); None when the outcome never varies."""
    from sklearn.linear_model import LogisticRegression

    outcome = np.asarray(outcome).astype(int)
    if outcome.all() or not outcome.any():
        return None
    fit = LogisticRegression(C=1e4).fit(_logit(probability)[:, None], outcome)
    return float(fit.coef_[0, 0]), float(fit.intercept_[0])


def apply_platt(probability: np.ndarray, ab: tuple[float, float]) -> np.ndarray:
    """σ(a · logit p + b): probabilities through a Platt map from :func:`fit_platt`."""
    return _sigmoid(ab[0] * _logit(probability) + ab[1])


def best_offsets(log_probs: np.ndarray, y: np.ndarray, grid: Sequence[float]) -> np.ndarray:
    """Grid search over offsets for EHD, IHD, MHD (OTHER and BENIGN stay 0); ties keep the smallest change."""
    grid = np.asarray(grid, dtype=np.float64)
    best_score, best = -1.0, np.zeros(len(GROUPS), dtype=np.float32)
    for a in grid:
        for b in grid:
            for c in grid:
                off = np.array([a, b, c, 0.0, 0.0])
                score = macro_f1(y, (log_probs + off).argmax(axis=1), labels=range(3))
                if score > best_score + 1e-12 or (
                    abs(score - best_score) <= 1e-12 and np.abs(off).sum() < np.abs(best).sum()
                ):
                    best_score, best = score, off.astype(np.float32)
    return best


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, labels: Iterable[int]) -> float:
    """Mean F1 over ``labels`` (a label absent from both truth and prediction scores 0, as in scikit-learn)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    scores = []
    for label in labels:
        tp = np.sum((y_true == label) & (y_pred == label))
        denom = np.sum(y_true == label) + np.sum(y_pred == label)
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


def cross_validate(data: LabelledPrompts, folds: int = 5, config: FitConfig | None = None,
                   embedder_name: str | None = None, fallback: Categoriser | None = None,
                   always_train: LabelledPrompts | None = None) -> dict[str, Any]:
    """k-fold CV on the group-labelled rows: every score comes from a model that never saw the row.

    ``always_train``: extra rows (e.g. harmful/benign prompts with no group) added to every training fold.
    Returns macro-F1 on EHD/IHD/MHD (5-class predictions), 5-class macro-F1, accuracy, and the held-out
    predictions (``predicted``, ``log_probs``) aligned with ``data``.
    """
    config = config or FitConfig()
    labelled = np.array([g is not None for g in data.groups])
    if labelled.sum() < folds:
        raise CategoriserError(f"need at least {folds} group-labelled rows for {folds}-fold cross-validation")
    log_probs = np.full((len(data), len(GROUPS)), np.nan)
    for train, held in _stratified_folds(data.groups, folds, config.seed):
        held = held[labelled[held]]
        train_data = data.subset(train)
        if always_train is not None:
            train_data = _concat(train_data, always_train)
        model = fit_arrays(train_data, config, embedder_name, fallback)
        log_probs[held] = model.predict([data.texts[i] for i in held], data.embeddings[held])["log_probs"]
    y = np.array([GROUPS.index(g) for g in data.groups if g is not None])
    pred = log_probs[labelled].argmax(axis=1)
    return {
        "folds": folds,
        "rows": int(labelled.sum()),
        "macro_f1_ehd_ihd_mhd": macro_f1(y, pred, range(3)),
        "macro_f1_5class": macro_f1(y, pred, range(len(GROUPS))),
        "accuracy": float(np.mean(y == pred)),
        "per_group_f1": {g: macro_f1(y, pred, [k]) for k, g in enumerate(GROUPS)},
        "predicted": [GROUPS[k] for k in pred],
        "log_probs": log_probs,
    }


def _concat(a: LabelledPrompts, b: LabelledPrompts) -> LabelledPrompts:
    return LabelledPrompts(a.texts + b.texts, np.vstack([a.embeddings, b.embeddings]),
                           a.groups + b.groups, a.harmful + b.harmful)
