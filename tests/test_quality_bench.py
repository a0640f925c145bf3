"""bench/quality_loso.py's measurement of an external guard (``--guard-model``) and judge (``--judge``) on the real
labelled sources. The labellers here are SYNTHETIC stand-ins (an oracle that reads the true label, one that flags
everything, one that answers gibberish), so that what the bench reports can be checked against what must come out;
loading real guard and judge models is tested in test_guard_labels.py and test_judge.py."""

from __future__ import annotations

import numpy as np
import pytest

from tests.benches import load_bench

CAP = 6


@pytest.fixture(scope="module")
def loso():
    return load_bench("quality_loso")


def test_sample_per_source_caps_each_source_and_is_seeded(loso):
    sources = np.array(["a"] * 10 + ["b"] * 3 + ["a"] * 5 + ["c"] * 8)
    picked = loso.sample_per_source(sources, 4)
    assert (np.diff(picked) > 0).all()
    assert {s: int((sources[picked] == s).sum()) for s in "abc"} == {"a": 4, "b": 3, "c": 4}
    assert picked.tolist() == loso.sample_per_source(sources, 4).tolist()
    assert picked.tolist() != loso.sample_per_source(sources, 4, seed=1).tolist()
    assert loso.sample_per_source(sources, None).tolist() == list(range(len(sources)))


class _Guard:
    """SYNTHETIC guard: P(unsafe) = ``verdict(prompt text)``."""

    def __init__(self, verdict):
        self.verdict, self.asked = verdict, 0

    def unsafe_probability(self, conversations):
        self.asked += len(conversations)
        return np.array([self.verdict(c[-1]["content"]) for c in conversations], dtype=np.float32)


def _stub_guard(monkeypatch, verdict) -> _Guard:
    import curation.guard_labels as guard_labels

    guard = _Guard(verdict)
    monkeypatch.setattr(guard_labels, "load_guard_labeller",
                        lambda model, use_cache=True, device=None: guard_labels.GuardLabeller(model, guard, "stub"))
    return guard


def test_a_guard_that_knows_the_labels_scores_one_everywhere(loso, monkeypatch):
    harmful = {r["text"] for r in loso.harm_rows() if r["harmful"]}
    guard = _stub_guard(monkeypatch, lambda text: float(text in harmful))
    result = loso.evaluate_guard_harm("oracle", cap=CAP, device="cpu")
    sources = {r["source"] for r in loso.harm_rows()}
    assert set(result["per_source"]) == sources
    assert result["rows"] == sum(s["n"] for s in result["per_source"].values()) == guard.asked <= CAP * len(sources)
    assert all(s["score"] == 1.0 and s["n"] <= CAP for s in result["per_source"].values())
    assert result["pooled"]["balanced_accuracy"] == result["pooled"]["benign_but_risky_pass"] == 1.0
    assert result["pooled"]["benign_but_risky_rows"] > 0


def test_a_guard_that_flags_everything_passes_no_benign_prompt(loso, monkeypatch):
    _stub_guard(monkeypatch, lambda text: 0.9)
    heads = {"pooled": {"balanced_accuracy_loso": 0.7}, "per_source": {"advbench": {"loso": {"score": 0.8}}}}
    result = loso.evaluate_guard_harm("always unsafe", cap=CAP, device="cpu", heads=heads)
    pooled = result["pooled"]
    assert pooled["harmful_caught"] == 1.0 and pooled["benign_passed"] == 0.0 and pooled["balanced_accuracy"] == 0.5
    assert pooled["benign_but_risky_pass"] == 0.0
    both = [s for s in result["per_source"].values() if s["kind"] == "BA"]
    assert both and all(s["score"] == 0.5 for s in both)
    assert result["per_source"]["advbench"]["kind"] == "TPR" and result["per_source"]["advbench"]["score"] == 1.0


def _stub_judge(monkeypatch, answer):
    import curation.judge as judge_module

    monkeypatch.setattr(judge_module, "load_judge", lambda model, quiet=False, use_cache=True, device=None:
                        judge_module.Judge(model, lambda texts: [answer(t) for t in texts], "stub"))


def _labelled(loso):
    return [r for r in loso.harm_rows() if r["source"] == "equilibrate_relabel_dev"]


def test_a_judge_that_knows_the_labels_lifts_the_curated_groups(loso, monkeypatch):
    rows = _labelled(loso)
    truth = {r["text"]: r["group"] for r in rows}
    risk = {"EHD": "Factual Risk", "IHD": "Intentional Risk", "MHD": "Mixed Risk"}
    _stub_judge(monkeypatch, lambda text: f"Determination: {risk.get(truth[text], 'none')}")
    # The heads as the bench would pass them: here, a SYNTHETIC guess that calls every prompt EHD.
    heads = ["EHD"] * len(rows)
    result = loso.evaluate_judge_group("oracle", heads, cap=200, device="cpu")
    assert result["rows"] == 200 and result["judged_rows"] == 200
    assert result["judge_alone_macro_f1_on_ehd_ihd_mhd_rows"] == 1.0
    assert result["curated_with_judge_macro_f1"] > result["heads_cv_macro_f1_same_rows"]
    assert result["parse_rate"] < 1.0  # OTHER and BENIGN rows get an answer with no risk type
    with pytest.raises(ValueError, match="heads' predictions"):
        loso.evaluate_judge_group("oracle", heads[:-1], cap=10, device="cpu")


def test_an_unparseable_judge_leaves_the_heads_groups(loso, monkeypatch):
    rows = _labelled(loso)
    _stub_judge(monkeypatch, lambda text: "[Instructions]\n\n[Instructions]")
    heads = [r["group"] if i % 3 else "IHD" for i, r in enumerate(rows)]
    result = loso.evaluate_judge_group("gibberish", heads, cap=None, device="cpu")
    assert result["rows"] == len(rows) and result["parse_rate"] == 0.0
    assert result["answers_given"] == {"unparseable": len(rows)}
    assert result["judge_alone_macro_f1_on_ehd_ihd_mhd_rows"] == 0.0
    assert result["curated_with_judge_macro_f1"] == result["heads_cv_macro_f1_same_rows"] < 1.0
