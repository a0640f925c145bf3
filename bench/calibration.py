"""Are equi's probabilities calibrated? Reliability curves and expected calibration error (issue 16 item 6).

For the three probabilities curation writes and thresholds — the prompt's harm (``harm`` of the categoriser: the
cost and the safety interlock read it), a response's refusal (``*_refusal``: refusal ≥ 0.5 is what the curves and the
cost count) and ``group_confidence`` (the probability of the group a prompt was given) — on rows the scoring model
was not fit on:

* harm: leave-one-source-out over every labelled source of ``bench/quality_loso.py`` (each source scored by a model
  fit without it: the way a user's new data meets it);
* refusal: leave-one-source-out over the refusal sources of ``bench/quality_loso.py``;
* group_confidence: 5-fold CV on ``equilibrate_relabel_dev`` (the only source with group labels), confidence of the
  predicted group against whether it is the labelled one.

Each gets a reliability table (10 equal-width bins: mean predicted probability against the observed frequency) and
ECE = Σ_b (n_b / N) · |mean p_b − frequency_b|, written as a PNG (``--plot``). Next to it, what a post-hoc Platt
calibration (a logistic regression on logit p) would give, itself fit leave-one-source-out (the map for a source is
fit on the other sources' held-out predictions), so the number is one a user meeting a new source would see.

    python bench/calibration.py                         # shipped MiniLM embeddings (embedding cache: slow once)
    python bench/calibration.py --embedder static       # the static embedder: fast
    python bench/calibration.py --plot docs/calibration.png --json /tmp/calibration.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

BINS = 10


def reliability(p: np.ndarray, y: np.ndarray, bins: int = BINS) -> dict:
    """Equal-width reliability bins and the expected calibration error of probabilities ``p`` for outcomes ``y``."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        m = which == b
        if not m.any():
            continue
        mean_p, freq = float(p[m].mean()), float(y[m].mean())
        ece += m.sum() / len(p) * abs(mean_p - freq)
        table.append({"bin": f"{b / bins:.1f}-{(b + 1) / bins:.1f}", "n": int(m.sum()), "mean_p": round(mean_p, 4),
                      "frequency": round(freq, 4)})
    return {"ece": round(float(ece), 4), "n": int(len(p)), "bins": table,
            "brier": round(float(np.mean((p - y) ** 2)), 4) if len(p) else None}


def platt(p_fit: np.ndarray, y_fit: np.ndarray, p_apply: np.ndarray) -> np.ndarray:
    """Platt scaling (:func:`curation.categorise.fit_platt`) fit on ``(p_fit, y_fit)``, applied to ``p_apply``
    (unchanged where ``y_fit`` has one class only)."""
    from curation.categorise import apply_platt, fit_platt

    ab = fit_platt(p_fit, y_fit)
    return np.asarray(p_apply, dtype=np.float64) if ab is None else apply_platt(p_apply, ab)


def platt_out_of_source(p: np.ndarray, y: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Each source's probabilities through a Platt map fit on the other sources' (held-out) probabilities."""
    out = np.zeros(len(p))
    for source in dict.fromkeys(sources):
        m = sources == source
        out[m] = platt(p[~m], y[~m], p[m])
    return out


def harm_probabilities(embed, embedder_label: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leave-one-source-out P(harmful) of every harm row: ``(p, harmful, sources)``."""
    from curation.categorise import LabelledPrompts
    from quality_loso import _HarmFit, _norm, _train_without, harm_rows

    rows = harm_rows()
    texts = [r["text"] for r in rows]
    emb = embed.encode(texts)
    data = LabelledPrompts(texts, emb, [r["group"] for r in rows], [r["harmful"] for r in rows])
    sources = np.array([r["source"] for r in rows])
    keys = [_norm(t) for t in texts]
    p = np.zeros(len(rows))
    for source in dict.fromkeys(sources):
        held = np.flatnonzero(sources == source)
        p[held] = _HarmFit(data, _train_without(np.flatnonzero(sources != source), held, keys),
                           embedder_label).proba(data, held)
    return p, np.array([r["harmful"] for r in rows], dtype=float), sources


def refusal_probabilities() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leave-one-source-out P(refusal) of every refusal row: ``(p, refused, sources)``."""
    from quality_loso import _norm, held_out_refusal_scores, refusal_rows

    rows = refusal_rows()
    sources = np.array([r["source"] for r in rows])
    keys = [_norm(r["text"]) for r in rows]
    p = np.zeros(len(rows))
    for source in dict.fromkeys(sources):
        held = np.flatnonzero(sources == source)
        p[held] = held_out_refusal_scores(rows, np.flatnonzero(sources != source), held, keys)
    return p, np.array([r["refusal"] for r in rows], dtype=float), sources


def group_confidences(embed, embedder_label: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """5-fold CV on the Equilibrate labels: ``(probability of the predicted group, group_confidence as equi writes
    it (through the map each fold's model fit on its own inner folds), predicted == label, fold)``."""
    from curation.categorise import GROUPS, _concat, _stratified_folds, fit_arrays
    from quality_loso import FOLDS, group_data

    relabel, harm_only, _, _ = group_data(embed)
    y = np.array([GROUPS.index(g) for g in relabel.groups])
    confidence, written = np.zeros(len(y)), np.zeros(len(y))
    correct, folds = np.zeros(len(y)), np.zeros(len(y), dtype=int)
    for k, (train, held) in enumerate(_stratified_folds(relabel.groups, FOLDS, 0)):
        model = fit_arrays(_concat(relabel.subset(train), harm_only), embedder_name=embedder_label)
        log_probs = model.predict([relabel.texts[i] for i in held], relabel.embeddings[held])["log_probs"]
        probs = np.exp(log_probs - log_probs.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        confidence[held] = probs.max(axis=1)
        written[held] = model.calibrated_confidence(probs.max(axis=1))
        correct[held] = probs.argmax(axis=1) == y[held]
        folds[held] = k
    return confidence, written, correct, folds


def _row(name: str, p, y, groups, unit: str, written=None) -> dict:
    raw = reliability(p, y)
    calibrated = reliability(platt_out_of_source(np.asarray(p), np.asarray(y), np.asarray(groups)), y)
    print(f"\n{name}: n={raw['n']}, raw ECE {raw['ece']:.3f} (Brier {raw['brier']:.3f}); with a Platt map fit on "
          f"the other {unit}: ECE {calibrated['ece']:.3f} (Brier {calibrated['brier']:.3f})")
    entry = {"raw": raw, "platt_out_of_source": calibrated, "held_out_by": unit}
    if written is not None:
        entry["as_written"] = reliability(written, y)
        print(f"  as equi writes it (each model's own map, fit on its inner folds): ECE "
              f"{entry['as_written']['ece']:.3f} (Brier {entry['as_written']['brier']:.3f})")
    print("  bin        n      mean p   observed" + ("   | as written: mean p  observed" if written is not None else ""))
    shown = {b["bin"]: b for b in entry.get("as_written", {}).get("bins", [])}
    for b in raw["bins"]:
        tail = (f"   |             {shown[b['bin']]['mean_p']:.3f}    {shown[b['bin']]['frequency']:.3f}"
                if b["bin"] in shown else "")
        print(f"  {b['bin']}  {b['n']:6d}  {b['mean_p']:.3f}    {b['frequency']:.3f}{tail}")
    return entry


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.2))
    for ax, (name, entry) in zip(np.atleast_1d(axes), results.items()):
        names = {"raw": "held out, raw", "as_written": "as equi writes it (map fit on inner folds)",
                 "platt_out_of_source": f"Platt map fit on the other {entry['held_out_by']}"}
        for key, style in (("raw", "o-"), ("as_written", "^-"), ("platt_out_of_source", "s--")):
            if key not in entry:
                continue
            bins = entry[key]["bins"]
            ax.plot([b["mean_p"] for b in bins], [b["frequency"] for b in bins], style,
                    label=f"{names[key]} (ECE {entry[key]['ece']:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        ax.set_title(f"{name} (n={entry['raw']['n']}, held out by {entry['held_out_by']})", fontsize=9)
        ax.set_xlabel("predicted probability")
        ax.set_ylabel("observed frequency")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    from curation.embed import DEFAULT_EMBEDDER, get_embedder
    from curation.embed_cache import CachedEmbedder, EmbeddingCache
    from quality_loso import _MemoEmbedder

    embedder = argv[argv.index("--embedder") + 1] if "--embedder" in argv else "minilm"
    label = "static" if embedder == "static" else DEFAULT_EMBEDDER
    inner = get_embedder("static" if embedder == "static" else None)
    embed = _MemoEmbedder(CachedEmbedder(inner, EmbeddingCache(getattr(inner, "identity", inner.name), inner.dim)))
    started = time.perf_counter()
    results = {}
    p, y, sources = harm_probabilities(embed, label)
    results["harm"] = _row("harm (P harmful), leave-one-source-out", p, y, sources, "sources")
    p, y, sources = refusal_probabilities()
    results["refusal"] = _row("refusal (P refuses), leave-one-source-out", p, y, sources, "sources")
    p, written, y, folds = group_confidences(embed, label)
    results["group_confidence"] = _row("group_confidence (P of the predicted group), 5-fold CV", p, y, folds, "folds",
                                       written)
    # The map for a categoriser fit without inner folds (the bundled one): Platt on all these held-out predictions.
    from curation.categorise import fit_platt

    a, b = fit_platt(p, y)
    results["group_confidence"]["platt_on_all_folds"] = {"a": a, "b": b}
    print(f"  Platt map on all {len(p)} held-out predictions: a={a:.4f}, b={b:.4f}")
    print(f"\n{time.perf_counter() - started:.0f} s ({label} embeddings)")
    if "--plot" in argv:
        plot(results, Path(argv[argv.index("--plot") + 1]))
    if "--json" in argv:
        Path(argv[argv.index("--json") + 1]).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
