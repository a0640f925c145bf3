"""The safety interlock (issue 16 item 5): a prompt whose harm estimate is uncertain is never helpfulness data.

It is counted as ``uncertain_harm`` by the mixer (never mixed as BENIGN, in either mixture order) and the online
reward never pays compliance on it. The end-to-end test curates real XSTest prompts with real completions.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curation.mixer import UNCERTAIN_HARM, select_mixture  # noqa: E402
from equi.schema import UNCERTAIN_HARM_BAND  # noqa: E402
from train.rewards import batch_harms, safety_reward_values  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LOW, HIGH = UNCERTAIN_HARM_BAND


def _meta(groups: list[str], harms: list[float]) -> pl.DataFrame:
    n = len(groups)
    return pl.DataFrame({"idx": np.arange(n), "prompt_key": np.arange(n, dtype=np.uint64), "kind": ["pair"] * n,
                         "group": groups, "cluster": np.zeros(n, dtype=np.int32),
                         "response_cost": np.zeros(n, dtype=np.float32), "harm_score": np.array(harms, np.float32)},
                        schema_overrides={"idx": pl.Int64, "prompt_key": pl.UInt64})


@pytest.mark.parametrize("order", ["fdc", "input"])
def test_uncertain_benign_pairs_are_counted_not_mixed(order):
    groups = ["BENIGN", "BENIGN", "BENIGN", "EHD", "IHD", "EHD"]
    harms = [0.05, (LOW + HIGH) / 2, LOW, 0.9, 0.8, 0.7]
    emb = np.eye(len(groups), dtype=np.float32)  # no near-duplicates
    sel = select_mixture(_meta(groups, harms), emb, ratios={"EHD": 1, "IHD": 1, "MHD": 0}, size=None,
                         benign_share=0.5, dup_threshold=0.95, seed=0, order=order)
    mixed = set(sel.mixture["chosen_idx"].to_list())
    assert 0 in mixed and not mixed & {1, 2}  # only the certain BENIGN pair is helpfulness data
    assert sel.not_selected[1] == sel.not_selected[2] == UNCERTAIN_HARM
    assert len(mixed) + len(sel.not_selected) == len(groups)  # pooled = mixed + not_selected


def test_the_online_reward_never_pays_compliance_on_an_uncertain_prompt():
    kwargs = {"group": ["BENIGN", "BENIGN", "BENIGN", "EHD"], "explicit_score": [0.0, 0.0, LOW + 0.01, 0.6],
              "intent_score": [0.0, 0.0, 0.0, 0.2], "harm_score": [0.05, LOW, None, None]}
    harms, benign = batch_harms(4, kwargs)
    assert benign == [True, False, False, False]
    comply = safety_reward_values([0.0] * 4, harms, benign)  # r = 0: the completion complies
    assert comply[0] == 1.0 and all(r <= 0 for r in comply[1:])
    # without a harm_score column the explicit/intent lower bound decides
    harms, benign = batch_harms(2, {"group": ["BENIGN", "BENIGN"], "explicit_score": [0.01, LOW + 0.05],
                                    "intent_score": [0.02, 0.0]})
    assert benign == [True, False] and harms[1] == pytest.approx(LOW + 0.05)


# ---- end to end on real rows --------------------------------------------------------------------------------------


def _xstest_pairs() -> list[dict]:
    """XSTest prompts with two real completions each (GPT-4's as chosen, Llama-2's as rejected)."""
    folder = SHARED / "xstest_completions_dev" / "model_completions"
    answers: dict[str, dict[str, str]] = {}
    for model in ("gpt4", "llama2new"):
        with open(folder / f"xstest_v2_completions_{model}.csv", newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                answers.setdefault(row["prompt"], {})[model] = row["completion"]
    return [{"prompt": p, "chosen": a["gpt4"], "rejected": a["llama2new"], "source": "xstest"}
            for p, a in answers.items() if len(a) == 2 and a["gpt4"].strip() and a["llama2new"].strip()]


def _prompt_text(prompt) -> str:
    if isinstance(prompt, list):  # conversational: the user's turns
        return "\n".join(m["content"] for m in prompt if m["role"] == "user")
    return prompt


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "xstest_completions_dev").is_dir(), reason="needs ../shared/data beside the repo")
def test_curate_keeps_real_uncertain_prompts_out_of_the_benign_mixture(tmp_path):
    from curation.categorise import Categoriser, FitConfig, LabelledPrompts, categorise, fit_arrays, group_from_label
    from curation.embed import get_embedder
    from curation.pipeline import curate
    from equi.config import CurateConfig
    from equi.manifest import verify_mix
    from tests.realdata import write_jsonl

    # A categoriser for the static embedder, fit on real labelled prompts (none of them XSTest's).
    embedder = get_embedder("static")
    relabel = [json.loads(line) for line in (SHARED / "equilibrate_relabel_dev" / "beavertails_relabelled_dev.jsonl")
               .read_text().splitlines()[:400]]
    alpaca = [r["instruction"] for r in json.loads((SHARED / "refusal_direction_splits" / "harmless_train.json")
                                                   .read_text())[:400]]
    texts = [r["prompt"] for r in relabel] + alpaca
    data = LabelledPrompts(texts, embedder.encode(texts), [group_from_label(r["category"]) for r in relabel]
                           + [None] * len(alpaca), [None] * len(relabel) + [False] * len(alpaca))
    model = fit_arrays(data, FitConfig(tune_offsets=False), embedder_name="static")  # no inner folds: 4x faster
    cat_path = model.save(tmp_path / "categoriser.json")

    pairs = _xstest_pairs()
    prompts = [p["prompt"] for p in pairs]
    scored = categorise(pl.DataFrame({"prompt": prompts}), embedder.encode(prompts), Categoriser.load(cat_path))
    uncertain = {p for p, g, h in zip(prompts, scored["group"], scored["harm_score"]) if g == "BENIGN" and h >= LOW}
    assert uncertain, "the real XSTest prompts should include some with an uncertain harm estimate"

    out = tmp_path / "mix"
    result = curate(CurateConfig(inputs=[str(write_jsonl(tmp_path / "xstest_pairs.jsonl", pairs))], out=str(out),
                                 embedder="static", categoriser=str(cat_path), benign_share=0.5, quiet=True,
                                 embedding_cache=False, dup_threshold=0.999))
    acc = result.manifest["accounting"]
    assert acc["not_selected"].get(UNCERTAIN_HARM, 0) >= 1
    import datasets

    mix = datasets.load_dataset("parquet", data_dir=str(out / "data"))
    benign_prompts = {_prompt_text(r["prompt"]) for split in mix.values() for r in split if r["group"] == "BENIGN"}
    assert benign_prompts and not (benign_prompts & uncertain)
    assert verify_mix(out) == []  # pooled = mixed + not_selected still balances
