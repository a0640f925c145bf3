"""The FDC mixer's pure steps: quotas, pairing, near-duplicates, cluster spread, the nested ladder."""

from __future__ import annotations

import numpy as np
import pytest
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from curation import mixer


def test_quotas_follow_ratios_exactly_and_are_limited_by_the_scarcest_group():
    quotas, warnings = mixer.group_quotas({"EHD": 100, "IHD": 50, "MHD": 7, "BENIGN": 1000},
                                          {"EHD": 10, "IHD": 3, "MHD": 1}, None, 0.2)
    assert (quotas["EHD"], quotas["IHD"], quotas["MHD"]) == (70, 21, 7)
    assert quotas["BENIGN"] == round(0.25 * 98) and not warnings


def test_quotas_with_size_use_largest_remainder_and_drop_missing_groups_with_a_warning():
    quotas, warnings = mixer.group_quotas({"EHD": 100, "IHD": 50, "BENIGN": 0},
                                          {"EHD": 10, "IHD": 3, "MHD": 1}, 20, 0.2)
    assert (quotas["EHD"], quotas["IHD"], quotas["MHD"]) == (15, 5, 0)
    assert any("MHD" in w for w in warnings) and any("BENIGN" in w for w in warnings)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["EHD", "IHD", "MHD"]), st.integers(0, 500), min_size=3),
       st.integers(1, 20), st.integers(1, 20), st.integers(1, 20), st.one_of(st.none(), st.integers(0, 800)))
def test_quotas_never_exceed_availability_or_size(available, r1, r2, r3, size):
    ratios = {"EHD": r1, "IHD": r2, "MHD": r3}
    quotas, _ = mixer.group_quotas(available, ratios, size, 0.0)
    assert all(quotas[g] <= available[g] for g in available)
    if size is not None:
        assert sum(quotas[g] for g in ("EHD", "IHD", "MHD")) <= size
    active = [g for g in ratios if available[g] > 0]
    m = min((available[g] // ratios[g] for g in active), default=0)
    if size is None and m >= 1:  # everything the ratios allow, in exact whole multiples of the ratios
        assert {g: quotas[g] for g in active} == {g: ratios[g] * m for g in active}
    if active and size != 0:  # safety rows exist: never an empty safety mixture
        assert sum(quotas[g] for g in ("EHD", "IHD", "MHD")) >= 1


def test_too_few_rows_for_one_multiple_of_the_ratios_still_give_safety_pairs_and_a_warning():
    # 7 EHD rows cannot make even one 10:3:1 multiple; the mixture used to fall back to BENIGN rows alone.
    quotas, warnings = mixer.group_quotas({"EHD": 7, "IHD": 23, "MHD": 16, "BENIGN": 4},
                                          {"EHD": 10, "IHD": 3, "MHD": 1}, None, 0.2)
    assert (quotas["EHD"], quotas["IHD"], quotas["MHD"]) == (6, 2, 1)
    assert quotas["BENIGN"] == 2  # 0.2 of the mixture, not every BENIGN row
    assert any("only 7 EHD pairs" in w for w in warnings)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["EHD", "IHD", "MHD", "BENIGN"]), min_size=1, max_size=200))
def test_every_ladder_prefix_keeps_group_shares_within_one_row(groups):
    ranks = mixer.ladder_ranks(groups)
    assert sorted(ranks.tolist()) == list(range(len(groups)))
    by_rank = np.asarray(groups)[np.argsort(ranks)]
    totals = {g: groups.count(g) for g in set(groups)}
    for k in range(1, len(groups) + 1):
        prefix = by_rank[:k].tolist()
        for g, n in totals.items():
            assert abs(prefix.count(g) - k * n / len(groups)) <= 1.0 + 1e-9


def test_round_robin_visits_every_cluster_before_repeating_one():
    clusters = np.array([0] * 10 + [1] * 3 + [2] * 1)
    order = mixer.cluster_round_robin(clusters, seed=1)
    assert sorted(order.tolist()) == list(range(14))
    assert len(set(clusters[order[:3]])) == 3  # the first three picks come from three clusters
    assert len(set(clusters[order[3:5]])) == 2


def test_near_duplicates_keep_the_first_copy_only_within_clusters():
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(6, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    vecs[3] = vecs[1]
    vecs[4] = vecs[1]
    clusters = np.array([0, 0, 0, 0, 1, 0])
    dup = mixer.near_duplicates(vecs, clusters, np.arange(6), threshold=0.95)
    assert dup.tolist() == [False, False, False, True, False, False]  # row 4 is in another cluster
    dup_rev = mixer.near_duplicates(vecs, clusters, np.arange(6)[::-1].copy(), threshold=0.95)
    assert dup_rev.sum() == 1 and dup_rev[np.where(np.arange(6)[::-1] == 1)[0][0]]


def test_near_duplicates_in_blocks_match_comparing_every_earlier_kept_row():
    """Blocks (against kept rows, then within the block) decide exactly as one row at a time against all."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(25, 8)).astype(np.float32)
    vecs = base[rng.integers(0, 25, 300)] + rng.normal(scale=0.08, size=(300, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    clusters = rng.integers(0, 3, 300)
    order = rng.permutation(300)
    expected = np.zeros(300, dtype=bool)
    kept: dict[int, list[np.ndarray]] = {}
    for pos, row in enumerate(order):
        earlier = kept.setdefault(int(clusters[row]), [])
        expected[pos] = any(float(v @ vecs[row]) >= 0.95 for v in earlier)
        if not expected[pos]:
            earlier.append(vecs[row])
    assert 0 < expected.sum() < 300
    for block in (1, 7, 64, 2048):
        assert mixer.near_duplicates(vecs, clusters, order, 0.95, block=block).tolist() == expected.tolist()


def test_single_responses_pair_safest_with_least_safe():
    singles = pl.DataFrame({"idx": [0, 1, 2, 3, 4, 5], "prompt": ["A", "a ", "A", "B", "C", "C"],
                            "response_cost": [0.5, -1.0, 1.0, -1.0, 0.1, 0.2]})
    singles = singles.select("idx", mixer.prompt_key(pl.col("prompt")).alias("prompt_key"), "response_cost")
    pairs, reasons = mixer.pair_single_responses(singles)
    assert pairs.rows() == [(1, 2)]
    assert reasons == {0: mixer.UNPAIRED, 3: mixer.UNPAIRED, 4: mixer.NO_SAFETY_DIFFERENCE,
                       5: mixer.NO_SAFETY_DIFFERENCE}


def test_eval_split_is_stable_and_close_to_the_fraction():
    ids = [f"row-{i}" for i in range(4000)]
    split = mixer.eval_split(ids, 0.1)
    assert split == mixer.eval_split(ids, 0.1)
    assert 0.08 < split.count("test") / len(ids) < 0.12
    assert mixer.eval_split(ids[:10], 0.0) == ["train"] * 10


def _pool_meta(groups: list[str]) -> pl.DataFrame:
    n = len(groups)
    return pl.DataFrame({"idx": list(range(n)), "prompt_key": list(range(n)), "kind": ["pair"] * n, "group": groups,
                         "cluster": [0] * n, "response_cost": [None] * n},
                        schema_overrides={"prompt_key": pl.UInt64, "cluster": pl.Int32, "response_cost": pl.Float32})


def test_input_order_mixture_keeps_every_group_in_input_order_drops_duplicates_and_caps_at_size():
    # The naive arm of bench/study.py: pairs as they come, no ratios, no BENIGN share, the same de-duplication.
    groups = ["IHD", "BENIGN", "MHD", "IHD", "OTHER", "EHD", "IHD"]
    embeddings = np.eye(len(groups), dtype=np.float32)
    embeddings[3] = embeddings[0]  # row 3 repeats row 0's prompt: the later copy goes
    selection = mixer.select_mixture(_pool_meta(groups), embeddings, ratios={"EHD": 10, "IHD": 3, "MHD": 1},
                                     size=5, benign_share=0.2, dup_threshold=0.95, seed=7, order="input")
    assert selection.mixture["chosen_idx"].to_list() == [0, 1, 2, 4, 5]
    assert selection.mixture["rank"].to_list() == [0, 1, 2, 3, 4]
    assert selection.not_selected == {3: mixer.DUPLICATE, 6: mixer.BEYOND_SIZE}
    assert selection.effective_ratios == {"BENIGN": 0.2, "EHD": 0.2, "IHD": 0.2, "MHD": 0.2, "OTHER": 0.2}
    fdc = mixer.select_mixture(_pool_meta(groups), embeddings, ratios={"EHD": 10, "IHD": 3, "MHD": 1}, size=5,
                               benign_share=0.2, dup_threshold=0.95, seed=7)
    assert "OTHER" not in fdc.mixture["group"].to_list()  # the FDC mixer, by contrast, never mixes OTHER


def test_input_order_refuses_ratios_and_benign_share_it_would_ignore(tmp_path):
    from equi.config import ConfigError, CurateConfig

    for extra in ({"ratios": {"EHD": 1.0}}, {"benign_share": 0.5}, {"order": "random"}):
        with pytest.raises(ConfigError, match="--order|--ratios"):
            CurateConfig(inputs=["x.jsonl"], out=str(tmp_path / "mix"), **{"order": "input", **extra})
    assert CurateConfig(inputs=["x.jsonl"], out=str(tmp_path / "mix"), order="input").order == "input"
