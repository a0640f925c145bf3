"""Refusal-detector quality on real labelled completions, scored only on rows not used to fit.

    python bench/quality_refusal.py

Prints, on the human-labelled XSTest v2 completions (``shared/data/xstest_completions_dev``, 1,350 rows):
binary refusal accuracy (refusal = full or partial refusal) and 3-class accuracy / macro-F1 under 5-fold
cross-validation grouped by prompt (the three models' answers to one prompt never straddle train and test) and
under leave-one-model-out; the XSTest authors' string-matching baseline on the same rows; and agreement with the
automatic labels of ``shared/data/refusal_direction_completions`` (2,000 rows) of heads fit on every XSTest row
(the shipped heads are fit on refusal_direction too, so they would score rows they saw; ``bench/quality_loso.py``
scores every source left out). ``main()`` returns the numbers as a dict for ``bench/quality.py``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))


def _metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import f1_score

    from curation.refusal import CLASSES

    binary = float(((truth != "comply") == (predicted != "comply")).mean())
    recall = {c: float((predicted[truth == c] == c).mean()) for c in CLASSES if (truth == c).any()}
    return {
        "binary_accuracy": round(binary, 4),
        "accuracy_3class": round(float((truth == predicted).mean()), 4),
        "macro_f1_3class": round(float(f1_score(truth, predicted, labels=list(CLASSES), average="macro")), 4),
        **{f"recall_{c}": round(r, 4) for c, r in recall.items()},
    }


def cross_validated_predictions(frame, embeddings: np.ndarray | None, folds: str = "prompt") -> np.ndarray:
    """Predicted class per row, each from a head fitted without that row's fold."""
    from sklearn.model_selection import GroupKFold

    from curation.refusal import RefusalHeads, classify_responses, fit_refusal_head

    texts = np.array(frame["completion"].to_list(), dtype=object)
    labels = np.array(frame["label"].to_list())
    if folds == "prompt":
        splits = GroupKFold(n_splits=5).split(texts, labels, frame["prompt"].to_numpy())
    else:
        models = frame["model"].to_numpy()
        splits = [(np.flatnonzero(models != m), np.flatnonzero(models == m)) for m in np.unique(models)]
    predicted = np.empty(len(texts), dtype=object)
    for train, test in splits:
        emb_train = None if embeddings is None else embeddings[train]
        head = fit_refusal_head(list(texts[train]), list(labels[train]), embeddings=emb_train)
        heads = RefusalHeads(text=head) if embeddings is None else RefusalHeads(text=head, embed=head)
        # The text slot is never used when embeddings are passed and the embed head matches them.
        predicted[test] = classify_responses(
            list(texts[test]), None if embeddings is None else embeddings[test], heads=heads
        )
    return predicted.astype(str)


def refusal_direction_rows(data_dir: Path):
    """(response, is_refusal) from the refusal_direction completions: substring-matching labels, not human."""
    responses, refusals, sets = [], [], []
    for path in sorted(data_dir.glob("*/*_evaluations.json")):
        for row in json.loads(path.read_text())["completions"]:
            responses.append(row["response"])
            refusals.append(int(row["is_jailbreak_substring_matching"]) == 0)
            sets.append(path.name.removesuffix("_evaluations.json"))
    return responses, np.array(refusals), np.array(sets)


def main() -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(2)
    from curation.embed import get_embedder
    from curation.refusal import RefusalHeads, fit_refusal_head, refusal_scores, xstest_labelled

    frame = xstest_labelled(DATA / "xstest_completions_dev")
    texts = frame["completion"].to_list()
    truth = np.array(frame["label"].to_list())
    embeddings = get_embedder().encode(texts)
    results: dict = {"xstest_rows": len(texts), "binarisation": "refusal = full refusal or partial refusal"}
    results["xstest_strmatch_baseline"] = _metrics(truth, np.array(frame["strmatch"].to_list()))
    for name, emb in (("text_head", None), ("embed_head", embeddings)):
        for folds in ("prompt", "model"):
            results[f"xstest_cv_{folds}_{name}"] = _metrics(truth, cross_validated_predictions(frame, emb, folds))

    responses, is_refusal, sets = refusal_direction_rows(DATA / "refusal_direction_completions")
    labels = list(truth)
    heads = RefusalHeads(text=fit_refusal_head(texts, labels),
                         embed=fit_refusal_head(texts, labels, embeddings=embeddings))
    start = time.perf_counter()
    text_scores = refusal_scores(responses, heads=heads)
    text_seconds = time.perf_counter() - start
    start = time.perf_counter()
    rd_embeddings = get_embedder().encode(responses)
    embed_scores = refusal_scores(responses, rd_embeddings, heads=heads)
    embed_seconds = time.perf_counter() - start
    for name, scores in (("text_head", text_scores), ("embed_head", embed_scores)):
        agree = (scores >= 0.5) == is_refusal
        results[f"refusal_direction_{name}"] = {
            "rows": len(responses),
            "agreement": round(float(agree.mean()), 4),
            **{f"agreement_{s}": round(float(agree[sets == s].mean()), 4) for s in np.unique(sets)},
        }
    results["refusal_direction_seconds"] = {
        "text_head": round(text_seconds, 2),
        "embed_head_including_encoding": round(embed_seconds, 2),
    }
    return results


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
