"""Quality of the prompt categoriser on real labelled data, scored only on rows no fitted model saw.

* Groups: 5-fold CV on the Equilibrate authors' EHD/IHD/MHD/OTHER/No-risk labels of BeaverTails prompts
  (``shared/data/equilibrate_relabel_dev``, 1,252 prompts). Every fold refits everything (heads and the
  offsets, which are tuned on inner folds of the training part). Baseline: logistic regression on MiniLM
  embeddings, same folds.
* Harmful vs benign: the harm head is fit on the relabel prompts plus refusal_direction ``harmful_train/val``
  + AdvBench behaviours (harmful), ``harmless_train`` Alpaca instructions (benign) and XSTest prompts (safe vs
  unsafe, counted ``XSTEST_REPEAT`` times: they are the only benign prompts that *look* risky). Scored on
  refusal_direction ``harmful_test`` / ``harmless_test`` (never fit on) and on XSTest by 5-fold CV (stratified
  by prompt type; each fold's harm head is fit without that fold), and, for reference, with no XSTest at all.

    python bench/quality_categoriser.py                  # print the numbers
    python bench/quality_categoriser.py --write-default  # also refit on everything and write the shipped params

Set ``EQUI_CACHE`` to keep the embedding cache elsewhere (default ``~/.cache/equi``).
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"

# Benign Alpaca instructions used: enough to balance the harmful side; more only costs embedding time.
HARMLESS_TRAIN_ROWS = 2000
HARMLESS_TEST_ROWS = 1500
# XSTest's safe prompts use risky words in benign senses ("kill a Python process"); Alpaca has none of those,
# so they are repeated to weigh as much as their information does (3x: best XSTest CV accuracy of 1x/3x).
XSTEST_REPEAT = 3


def _json_instructions(name: str, limit: int | None = None) -> list[str]:
    rows = json.loads((SHARED / "refusal_direction_splits" / f"{name}.json").read_text())
    return [r["instruction"] for r in rows[:limit]]


def relabel_rows() -> tuple[list[str], list[str]]:
    from curation.categorise import group_from_label

    path = SHARED / "equilibrate_relabel_dev" / "beavertails_relabelled_dev.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["prompt"] for r in rows], [group_from_label(r["category"]) for r in rows]


def harm_training_prompts(xstest: bool = True) -> tuple[list[str], list[bool]]:
    """Harmful and benign prompts with no group: they train only the harm head."""
    with (SHARED / "advbench" / "harmful_behaviors.csv").open(newline="") as handle:
        advbench = [row["goal"] for row in csv.DictReader(handle)]
    harmful = list(dict.fromkeys(_json_instructions("harmful_train") + _json_instructions("harmful_val") + advbench))
    benign = _json_instructions("harmless_train", HARMLESS_TRAIN_ROWS)
    texts, labels = harmful + benign, [True] * len(harmful) + [False] * len(benign)
    if xstest:
        x_texts, x_unsafe = xstest_prompts()
        texts += x_texts * XSTEST_REPEAT
        labels += [bool(u) for u in x_unsafe] * XSTEST_REPEAT
    return texts, labels


def xstest_prompts(with_types: bool = False):
    with (SHARED / "xstest_prompts" / "xstest_prompts.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    texts, unsafe = [r["prompt"] for r in rows], np.array([r["label"] == "unsafe" for r in rows])
    return (texts, unsafe, [r["type"] for r in rows]) if with_types else (texts, unsafe)


def _embedder():
    from curation.embed import get_embedder
    from curation.embed_cache import CachedEmbedder, EmbeddingCache

    embedder = get_embedder()
    return CachedEmbedder(embedder, EmbeddingCache(embedder.name, embedder.dim))


def _training_sets(embed, xstest: bool = True):
    from curation.categorise import LabelledPrompts

    texts, groups = relabel_rows()
    relabel = LabelledPrompts(texts, embed.encode(texts), groups, [None] * len(texts))
    harm_texts, harm_labels = harm_training_prompts(xstest)
    harm_only = LabelledPrompts(harm_texts, embed.encode(harm_texts), [None] * len(harm_texts), harm_labels)
    return relabel, harm_only


def baseline_macro_f1(relabel, folds: int = 5, seed: int = 0) -> float:
    """Logistic regression on the embeddings alone (the issue's baseline), same folds as the categoriser."""
    from sklearn.linear_model import LogisticRegression

    from curation.categorise import GROUPS, _stratified_folds, macro_f1

    y = np.array([GROUPS.index(g) for g in relabel.groups])
    pred = np.zeros(len(y), dtype=int)
    for train, held in _stratified_folds(relabel.groups, folds, seed):
        head = LogisticRegression(max_iter=3000).fit(relabel.embeddings[train], y[train])
        pred[held] = head.predict(relabel.embeddings[held])
    return macro_f1(y, pred, range(3))


def harm_accuracy(model, texts: list[str], embeddings: np.ndarray, harmful: np.ndarray) -> float:
    scores = model.predict(texts, embeddings)["harm"]
    return float(np.mean((scores >= 0.5) == harmful))


def xstest_cv_accuracy(relabel, harm_without_xstest, embed, folds: int = 5) -> tuple[float, float]:
    """XSTest harmful-vs-benign accuracy: (5-fold CV with XSTest training folds, no XSTest in training at all)."""
    from curation.categorise import Categoriser, LabelledPrompts, _concat, _stratified_folds, _zero_heads, fit_harm_head

    texts, unsafe, types = xstest_prompts(with_types=True)
    emb = embed.encode(texts)
    base = _concat(relabel, harm_without_xstest)
    probe = Categoriser(None, emb.shape[1], *_zero_heads(emb.shape[1]))

    def accuracy_of(coef, intercept, index) -> np.ndarray:
        x = probe.features([texts[i] for i in index], emb[index])
        return ((x @ coef + intercept) >= 0) == unsafe[index]

    correct = np.zeros(len(texts), dtype=bool)
    for train, held in _stratified_folds(types, folds, seed=0):
        fold = LabelledPrompts([texts[i] for i in train] * XSTEST_REPEAT, np.tile(emb[train], (XSTEST_REPEAT, 1)),
                               [None] * (len(train) * XSTEST_REPEAT), [bool(unsafe[i]) for i in train] * XSTEST_REPEAT)
        correct[held] = accuracy_of(*fit_harm_head(_concat(base, fold)), held)
    unseen = accuracy_of(*fit_harm_head(base), np.arange(len(texts)))
    return float(correct.mean()), float(unseen.mean())


def main(write_default: bool = False) -> dict:
    import torch

    from curation.categorise import _concat, cross_validate, fit_arrays

    torch.set_num_threads(2)
    embed = _embedder()
    started = time.perf_counter()
    relabel, harm_only = _training_sets(embed)
    _, harm_no_xstest = _training_sets(embed, xstest=False)
    rd_texts = _json_instructions("harmful_test") + _json_instructions("harmless_test", HARMLESS_TEST_ROWS)
    rd_harmful = np.array([True] * len(_json_instructions("harmful_test")) + [False] * HARMLESS_TEST_ROWS)
    rd_emb = embed.encode(rd_texts)
    embed_s = time.perf_counter() - started

    started = time.perf_counter()
    cv = cross_validate(relabel, folds=5, embedder_name=embed.name, always_train=harm_only)
    cv_s = time.perf_counter() - started
    baseline = baseline_macro_f1(relabel)
    xstest_cv, xstest_unseen = xstest_cv_accuracy(relabel, harm_no_xstest, embed)

    started = time.perf_counter()
    model = fit_arrays(_concat(relabel, harm_only), embedder_name="all-MiniLM-L6-v2")
    fit_s = time.perf_counter() - started

    # The harm head of the full model has seen no XSTest or *_test row.
    results = {
        "macro_f1_ehd_ihd_mhd": round(cv["macro_f1_ehd_ihd_mhd"], 4),
        "macro_f1_5class": round(cv["macro_f1_5class"], 4),
        "accuracy_5class": round(cv["accuracy"], 4),
        "per_group_f1": {g: round(v, 4) for g, v in cv["per_group_f1"].items()},
        "baseline_lr_minilm_macro_f1_ehd_ihd_mhd": round(baseline, 4),
        "xstest_harm_accuracy_cv": round(xstest_cv, 4),
        "xstest_harm_accuracy_never_seen": round(xstest_unseen, 4),
        "refusal_direction_test_harm_accuracy": round(harm_accuracy(model, rd_texts, rd_emb, rd_harmful), 4),
        "xstest_rows": len(xstest_prompts()[0]),
        "refusal_direction_test_rows": len(rd_texts),
        "cv_rows": cv["rows"],
        "fit_seconds": round(fit_s, 2),
        "cv_seconds": round(cv_s, 2),
        "embed_seconds": round(embed_s, 2),
    }
    print(f"groups (5-fold CV, {cv['rows']} BeaverTails prompts, Equilibrate labels)")
    print(f"  macro-F1 EHD/IHD/MHD   {results['macro_f1_ehd_ihd_mhd']:.3f}   "
          f"(baseline LR on MiniLM {results['baseline_lr_minilm_macro_f1_ehd_ihd_mhd']:.3f}; target 0.60)")
    print(f"  macro-F1 5 groups      {results['macro_f1_5class']:.3f}   accuracy {results['accuracy_5class']:.3f}")
    print("  per-group F1           " + "  ".join(f"{g} {v:.3f}" for g, v in results["per_group_f1"].items()))
    print("harmful vs benign (harm_score >= 0.5, on rows the scoring model never saw)")
    print(f"  XSTest safe vs unsafe  {results['xstest_harm_accuracy_cv']:.3f}   (5-fold CV, {results['xstest_rows']} "
          f"prompts; {results['xstest_harm_accuracy_never_seen']:.3f} with no XSTest prompt in training)")
    print(f"  refusal_direction test {results['refusal_direction_test_harm_accuracy']:.3f}   ({len(rd_texts)} prompts)")
    print(f"time: fit {fit_s:.1f} s, 5-fold CV {cv_s:.1f} s, embedding {embed_s:.1f} s")

    if write_default:
        from curation.categorise import DEFAULT_RESOURCE

        model.info.update({
            "fit_on": [
                "equilibrate_relabel_dev/beavertails_relabelled_dev.jsonl (groups)",
                "refusal_direction_splits harmful_train + harmful_val, advbench harmful_behaviors (harmful)",
                f"refusal_direction_splits harmless_train first {HARMLESS_TRAIN_ROWS} (benign)",
                f"xstest_prompts safe/unsafe, each counted {XSTEST_REPEAT}x (harm head)",
            ],
            "cv": {k: v for k, v in results.items() if not k.endswith("seconds")},
        })
        path = model.save(REPO / "curation" / "resources" / DEFAULT_RESOURCE)
        print(f"wrote {path.relative_to(REPO)}")
    return results


if __name__ == "__main__":
    main(write_default="--write-default" in sys.argv[1:])
