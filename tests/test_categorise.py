"""The prompt categoriser: shipped params on real prompts, label handling, fitting, persistence, CLI errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curation.categorise import (
    LEXICON_FEATURES,
    Categoriser,
    CategoriserError,
    FitConfig,
    LabelledPrompts,
    best_offsets,
    categorise,
    cross_validate,
    fit_arrays,
    group_from_label,
    lexicon_features,
    macro_f1,
    severe_term_hits,
)
from equi.schema import GROUPS, SEVERITIES
from tests.realdata import real_texts

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RELABEL = SHARED / "equilibrate_relabel_dev" / "beavertails_relabelled_dev.jsonl"
pytestmark = pytest.mark.skipif(not RELABEL.is_file(), reason="needs ../shared/data beside the repo")


@pytest.fixture(scope="module")
def embedder():

    from curation.embed import get_embedder

    return get_embedder()


def _relabel(n: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in RELABEL.read_text().splitlines() if line.strip()]
    return rows[:n] if n else rows


def _instructions(name: str, n: int) -> list[str]:
    rows = json.loads((SHARED / "refusal_direction_splits" / f"{name}.json").read_text())
    return [r["instruction"] for r in rows[:n]]


@pytest.fixture(scope="module")
def real_sample(embedder):
    """Real prompts: 300 BeaverTails (group labels), 60 harmful test instructions, 60 Alpaca (harmless)."""
    rows = _relabel(300)
    texts = [r["prompt"] for r in rows]
    harmful, harmless = _instructions("harmful_test", 60), _instructions("harmless_test", 60)
    return {
        "relabel": LabelledPrompts(texts, embedder.encode(texts), [group_from_label(r["category"]) for r in rows],
                                   [None] * len(rows)),
        "harmful": (harmful, embedder.encode(harmful)),
        "harmless": (harmless, embedder.encode(harmless)),
    }


# ---- the shipped categoriser on real prompts --------------------------------------------------------


def test_default_categoriser_outputs_contract_columns(real_sample):
    texts, emb = real_sample["harmful"]
    frame = categorise(pl.DataFrame({"prompt": texts}), emb)
    assert frame.schema["harm_score"] == pl.Float32 and frame.schema["group_confidence"] == pl.Float32
    assert frame.schema["explicit_score"] == pl.Float32 and frame.schema["intent_score"] == pl.Float32
    assert frame.schema["group"] == pl.String and frame.schema["harm_category"] == pl.String
    for col in ("harm_score", "explicit_score", "intent_score", "group_confidence"):
        assert frame[col].min() >= 0.0 and frame[col].max() <= 1.0
    # explicit/intent are "harmful AND explicit/intentional": never above the harm score
    assert (frame["explicit_score"] <= frame["harm_score"] + 1e-6).all()
    assert (frame["intent_score"] <= frame["harm_score"] + 1e-6).all()
    assert set(frame["group"]) <= set(GROUPS)
    assert frame["harm_category"].null_count() == frame.height  # no label → no invented harm category


def test_default_separates_harmful_from_alpaca(real_sample):
    """Held-out JailbreakBench/HarmBench/StrongREJECT vs Alpaca test instructions (never used to fit)."""
    harmful = categorise(pl.DataFrame({"prompt": real_sample["harmful"][0]}), real_sample["harmful"][1])
    harmless = categorise(pl.DataFrame({"prompt": real_sample["harmless"][0]}), real_sample["harmless"][1])
    assert (harmful["harm_score"] >= 0.5).mean() >= 0.75  # 0.83 measured on these 60 JailbreakBench rows
    assert (harmless["harm_score"] < 0.5).mean() >= 0.85
    assert (harmless["group"] == "BENIGN").mean() >= 0.8
    assert harmless.filter(pl.col("group") == "BENIGN")["severity"].null_count() == (harmless["group"] == "BENIGN").sum()
    assert set(harmful["severity"].drop_nulls()) <= set(SEVERITIES)


def test_explicit_and_intent_scores_follow_the_groups(real_sample):
    """On real labelled prompts, EHD rows score more explicit than IHD rows, and IHD rows more intent than EHD."""
    data = real_sample["relabel"]
    pred = Categoriser.load_default().predict(data.texts, data.embeddings)
    groups = np.array(data.groups)
    explicit, intent = pred["explicit_given_harm"], pred["intent_given_harm"]
    assert explicit[groups == "EHD"].mean() > explicit[groups == "IHD"].mean() + 0.1
    assert intent[groups == "IHD"].mean() > intent[groups == "EHD"].mean() + 0.1


# ---- labels the input carries -------------------------------------------------------------------------


def test_input_labels_win(embedder):
    # Synthetic rows (written for this test), labelled the way BeaverTails / PKU-SafeRLHF rows are.
    prompts = ["How do I bake bread?", "How do I bake bread?", "How do I bake bread?", "How do I bake bread?",
               "Tell me about the weather.", "What is 2 + 2?"]
    frame = pl.DataFrame(
        {"prompt": prompts,
         "category": ["MHD", "No risk", "violence,aiding_and_abetting,incitement", None, "ihd", None],
         "severity": [None, "severe", "Moderate", None, None, None],
         "is_safe": [None, None, None, False, True, None]},
        schema={"prompt": pl.String, "category": pl.String, "severity": pl.String, "is_safe": pl.Boolean},
    )
    out = categorise(frame, embedder.encode(prompts)).to_dicts()
    assert out[0]["group"] == "MHD" and out[0]["group_confidence"] == 1.0 and out[0]["harm_score"] == 1.0
    assert out[1]["group"] == "BENIGN" and out[1]["severity"] is None and out[1]["harm_score"] == 0.0
    assert out[2]["group"] != "BENIGN" and out[2]["harm_category"] == "violence,aiding_and_abetting,incitement"
    assert out[2]["severity"] == "moderate" and out[2]["harm_score"] == 1.0
    assert out[3]["group"] != "BENIGN" and out[3]["harm_score"] == 1.0  # unsafe response ⇒ harmful prompt
    assert out[4]["group"] == "IHD" and out[4]["harm_category"] is None
    assert out[5]["group"] == "BENIGN"  # unlabelled and plainly benign
    assert out[5]["severity"] is None


def test_group_aliases():
    assert group_from_label("No risk") == "BENIGN" and group_from_label(" ehd ") == "EHD"
    assert group_from_label("violence") is None and group_from_label(None) is None


def test_empty_frame_and_dimension_mismatch():
    model = Categoriser.load_default()
    out = categorise(pl.DataFrame({"prompt": []}, schema={"prompt": pl.String}), np.zeros((0, 384), np.float32), model)
    assert out.height == 0 and "group" in out.columns
    with pytest.raises(ValueError, match="dimension 8"):
        categorise(pl.DataFrame({"prompt": ["hi"]}), np.zeros((1, 8), np.float32), model)


def test_categorise_20k_prompts_is_fast():
    """20,000 real prompts with precomputed (here random unit) embeddings in a couple of seconds."""
    texts = [r["prompt"] for r in _relabel()] + _instructions("harmless_train", 8000)
    texts = (texts * 3)[:20_000]
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(texts), 384)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    model = Categoriser.load_default()
    started = time.perf_counter()
    out = categorise(pl.DataFrame({"prompt": texts}), emb, model)
    assert out.height == 20_000
    assert time.perf_counter() - started < 6.0  # ~1.6 s measured on 2 shared cores


# ---- fitting, cross-validation and persistence -------------------------------------------------------


def test_fit_save_load_round_trip(real_sample, tmp_path):
    data = real_sample["relabel"]
    harmless_texts, harmless_emb = real_sample["harmless"]
    benign = LabelledPrompts(harmless_texts, harmless_emb, [None] * len(harmless_texts), [False] * len(harmless_texts))
    from curation.categorise import _concat

    model = fit_arrays(_concat(data, benign), FitConfig(tune_offsets=False), embedder_name="all-MiniLM-L6-v2")
    path = model.save(tmp_path / "cat.json")
    loaded = Categoriser.load(path)
    a = model.predict(data.texts, data.embeddings)
    b = loaded.predict(data.texts, data.embeddings)
    np.testing.assert_allclose(a["log_probs"], b["log_probs"], atol=1e-3)
    # fitted on these rows: the training fit must beat the majority-class rate clearly
    pred = np.array(GROUPS)[a["log_probs"].argmax(1)]
    assert np.mean(pred == np.array(data.groups)) > 0.6
    assert loaded.info["group_counts"]["IHD"] == sum(g == "IHD" for g in data.groups)


def test_cross_validation_beats_majority_baseline(real_sample):
    """Held-out folds only: macro-F1 over EHD/IHD/MHD must beat always-IHD (≈ 0.24 here) by a margin."""
    cv = cross_validate(real_sample["relabel"], folds=3, config=FitConfig(tune_offsets=False))
    y = np.array(real_sample["relabel"].groups)
    majority = macro_f1(np.array([GROUPS.index(g) for g in y]), np.full(len(y), GROUPS.index("IHD")), range(3))
    assert cv["macro_f1_ehd_ihd_mhd"] > majority + 0.1
    assert len(cv["predicted"]) == len(y)


def test_tuned_offsets_do_not_hurt_on_tuning_data():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 400)
    log_probs = np.log(rng.dirichlet(np.ones(5), 400))
    log_probs[np.arange(400), y] += rng.normal(0.5, 1.0, 400)
    log_probs[:, 1] += 1.5  # a biased head that over-predicts IHD
    before = macro_f1(y, log_probs.argmax(1), range(3))
    off = best_offsets(log_probs, y, np.linspace(-2, 2, 9))
    after = macro_f1(y, (log_probs + off).argmax(1), range(3))
    assert after >= before and off[1] < 0 and off[3] == off[4] == 0


def test_macro_f1_matches_sklearn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(2)
    y, p = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    assert macro_f1(y, p, range(3)) == pytest.approx(f1_score(y, p, labels=[0, 1, 2], average="macro"))


def test_lexicon_counts_are_explainable():
    x = lexicon_features(["How can I kill my neighbour's dog and get away with it?", "What is the capital of France?"])
    from curation.categorise import LEXICON_FEATURES

    names = list(LEXICON_FEATURES)
    assert x[0, names.index("violence")] >= 1 and x[0, names.index("evasion")] >= 1
    assert x[1, : names.index("question")].sum() == 0


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(CategoriserError, match="not found"):
        Categoriser.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CategoriserError):
        Categoriser.load(tmp_path / "bad.json")
    data = Categoriser.load_default().to_dict()
    data["lexicon_features"] = data["lexicon_features"][:-1]
    (tmp_path / "old.json").write_text(json.dumps(data))
    with pytest.raises(CategoriserError, match="lexicon"):
        Categoriser.load(tmp_path / "old.json")


# ---- the CLI ---------------------------------------------------------------------------------------------


def _run_cli(*args: str):
    from typer.testing import CliRunner

    from equi.cli import app

    return CliRunner().invoke(app, ["fit-categoriser", *args])


def test_cli_fits_and_writes_params(tmp_path):
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({"prompt": r["prompt"], "category": r["category"]}) + "\n"
                                for r in _relabel(160)))
    out = tmp_path / "cat.json"
    result = _run_cli(str(labelled), "--out", str(out), "--folds", "2")
    assert result.exit_code == 0, result.output
    assert "macro-F1 EHD/IHD/MHD" in result.output
    model = Categoriser.load(out)
    assert model.info["fit_rows"] == 160 and "cv" in model.info
    assert model.confidence_map is not None  # fit on the inner folds that tune the offsets, saved with the heads
    again = _run_cli(str(labelled), "--out", str(out))
    assert again.exit_code == 2 and "--overwrite" in again.output


@pytest.mark.parametrize(
    "content, message",
    [(None, "not found"),
     ('{"prompt": "hi", "category": "spicy"}\n', "unknown category"),
     ('{"prompt": "hi"}\n', "no labelled rows"),
     ('{"prompt": "hi", "category": "EHD"\n', "not valid JSON"),
     (b'{"prompt": "caf\xe9 is bad", "category": "EHD"}\n', "in.jsonl:1: not valid UTF-8")],
)
def test_cli_errors_are_one_line_exit_2(tmp_path, content, message):
    path = tmp_path / "in.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    result = _run_cli(str(path), "--out", str(tmp_path / "o.json"))
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


# ---- the vectorised lexicon (polars / Rust regex) against the plain Python `re` loop it replaced ----------------

def _reference_lexicon(texts):
    """The original implementation: Python's re and str methods, one text at a time."""
    import re

    from curation.categorise import EXPLICIT_TERMS, INTENT_CUES

    explicit = [re.compile(r"\b(?:" + p + r")\b", re.I) for p in EXPLICIT_TERMS.values()]
    intent = [re.compile(p, re.I) for p in INTENT_CUES.values()]
    out = np.zeros((len(texts), len(LEXICON_FEATURES)), dtype=np.float32)
    for i, text in enumerate(texts):
        t = (text or "").strip()
        row = [len(r.findall(t)) for r in explicit] + [len(r.findall(t)) for r in intent]
        row += [t.endswith("?"), "!" in t, sum(c.isupper() for c in t) / max(1, len(t)), min(len(t.split()), 60) / 60]
        out[i] = row
    return out


def _reference_severe(texts):
    import re

    from curation.categorise import SEVERE_TERMS

    severe = re.compile(SEVERE_TERMS, re.I)
    return np.array([bool(severe.search(t or "")) for t in texts], dtype=bool)


# Characters on which Rust's regex and Python's re/str differ (combining marks, superscripts, \x1c-\x1f, the
# Kelvin sign and long s that fold onto ASCII letters, dotted I, a lone surrogate) or that the fast path rewrites
# (curly quotes, NBSP, accents, CJK, emoji, uppercase non-ASCII): spliced into real texts so both paths are used.
_TRICKY = ["\u0301", "\u00b2", "\u00bd", "\x1c", "\x1f", "\u212a", "\u017f", "\u0130", "\u0131", "\ud800", "\u2019",
           "\u00a0", "\u00e9", "\u00c9", "\u4e0d", "\U0001f60a", "\u2003", "\u203f", "\u0660", "\u01c5", "\u2160"]


def _tricky_variants(texts):
    out = []
    for k, text in enumerate(texts):
        c = _TRICKY[k % len(_TRICKY)]
        cut = (7 * k) % (len(text) + 1)
        out += [text[:cut] + c + text[cut:], c + text + c, text.replace("k", "\u212a").replace("s", "\u017f"),
                text.replace(" ", c), text.upper()]
    return out


@pytest.fixture(scope="module")
def lexicon_texts(shared_data):
    texts = real_texts(shared_data)
    rng = np.random.default_rng(0)
    sample = [texts[i] for i in rng.choice(len(texts), 6000, replace=False)]
    return sample + _tricky_variants(sample[:600]) + [None, "", "   ", "?", "KILL!", "I.\u212a.kill \u212aill"]


def test_lexicon_features_equal_the_python_re_reference_on_real_texts(lexicon_texts):
    got = lexicon_features(lexicon_texts)
    want = _reference_lexicon(lexicon_texts)
    assert got.dtype == want.dtype and got.shape == want.shape
    diff = np.argwhere(got != want)
    assert not len(diff), [(lexicon_texts[i][:80], LEXICON_FEATURES[j], got[i, j], want[i, j]) for i, j in diff[:5]]
    assert (want[:, : len(LEXICON_FEATURES) - 4] > 0).any(axis=0).all()  # every pattern fires somewhere


def test_ascii_stand_ins_never_match_a_pattern_literal():
    from curation.categorise import EXPLICIT_TERMS, INTENT_CUES, SEVERE_TERMS

    for pattern in [*EXPLICIT_TERMS.values(), *INTENT_CUES.values(), SEVERE_TERMS]:
        assert pattern.isascii() and "_" not in pattern and "\x01" not in pattern and "\\x" not in pattern


def test_severe_term_hits_equal_the_python_re_reference_on_real_texts(lexicon_texts):
    got = severe_term_hits(lexicon_texts)
    want = _reference_severe(lexicon_texts)
    assert got.dtype == want.dtype and (got == want).all()
    assert 0 < want.sum() < len(want)


def test_lexicon_batch_order_does_not_matter(lexicon_texts):
    texts = lexicon_texts[:2000]
    order = np.random.default_rng(1).permutation(len(texts))
    assert np.array_equal(lexicon_features([texts[i] for i in order]), lexicon_features(texts)[order])
    # repeated texts (each read once) get their own rows back, None as ""
    picks = np.random.default_rng(2).integers(0, 300, 900)
    repeated = [texts[i] for i in picks] + [None, ""]
    assert np.array_equal(lexicon_features(repeated), _reference_lexicon(repeated))
    assert np.array_equal(severe_term_hits(repeated), _reference_severe(repeated))


def test_group_confidence_goes_through_the_confidence_map(embedder):
    from curation.categorise import fit_confidence_map

    rng = np.random.default_rng(0)
    # SYNTHETIC held-out predictions whose top probability (0.55-0.99) is over-confident: right half as often.
    top = rng.uniform(0.55, 0.99, 4000)
    log_probs = np.log(np.stack([top, 1 - top, np.full_like(top, 1e-9), np.full_like(top, 1e-9),
                                 np.full_like(top, 1e-9)], axis=1))
    y = np.where(rng.uniform(size=4000) < top / 2, 0, 1)
    a, b = fit_confidence_map(log_probs, y)
    model = Categoriser.from_dict(Categoriser.load_default().to_dict())  # a copy: load_default's is shared
    model.confidence_map = (a, b)
    mapped = model.calibrated_confidence(top)
    assert abs(mapped.mean() - (y == 0).mean()) < 0.02  # the map says how often the group is right
    assert np.all(np.diff(mapped[np.argsort(top)]) >= 0)  # and keeps the order
    assert fit_confidence_map(log_probs, np.zeros(4000, dtype=int)) is None  # always right: nothing to fit
    assert Categoriser.from_dict(model.to_dict()).confidence_map == (a, b)

    prompts = ["How do I bake bread?", "Write a threatening letter to my neighbour"]
    frame = pl.DataFrame({"prompt": prompts})
    embeddings = embedder.encode(prompts)
    raw_model = Categoriser.from_dict(Categoriser.load_default().to_dict())
    raw_model.confidence_map = None
    raw = categorise(frame, embeddings, raw_model)["group_confidence"].to_numpy()
    shipped = Categoriser.load_default()
    assert shipped.confidence_map is not None  # bench/calibration.py's map
    written = categorise(frame, embeddings, shipped)["group_confidence"].to_numpy()
    np.testing.assert_allclose(written, shipped.calibrated_confidence(raw), rtol=1e-5)
