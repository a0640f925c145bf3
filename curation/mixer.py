"""The FDC (fine-grained data-centric) mixer: pool rows → a group-balanced, de-duplicated mixture.

Works on a slim metadata frame (one row per pool row: index, prompt key, group, cluster, kind, cost),
never on the full texts, so it scales with the pool. Every pool row ends up either in the mixture
or with a ``not_selected`` reason; :func:`select_mixture` returns both.

Steps (each a small function):
1. :func:`pair_single_responses` — single responses to the same prompt become chosen (safer) /
   rejected (less safe) pairs.
2. :func:`near_duplicates` — candidates whose prompts are near-duplicates (cosine above the
   threshold, compared within embedding clusters) are removed.
3. :func:`group_quotas` — exact group counts from the ratios (and the BENIGN share).
4. :func:`cluster_round_robin` — within a group, take rows cluster by cluster so a quota spreads
   over the whole embedding space instead of sampling the biggest cluster.
5. :func:`ladder_ranks` — interleave groups so that every prefix ``rank < k`` keeps the ratios. The mixer
   only orders its picks (``rank`` = pick order, group after group); the ladder is made once the held-out
   split is drawn, within each split (:func:`curation.staging.rank_within_splits`).

``order="input"`` skips 3-5: every de-duplicated pair of any group, ranked in input order (the naive
baseline a group-balanced mixture is compared with: safety data as it comes).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from equi.config import MIX_ORDERS
from equi.schema import SAFETY_GROUPS, TEST_SPLIT, UNCERTAIN_HARM_BAND

# Reasons a pool row is not in the mixture (the manifest counts each).
DUPLICATE = "duplicate"
PROMPT_ONLY = "prompt_only"
UNPAIRED = "unpaired_response"
NO_SAFETY_DIFFERENCE = "responses_equally_safe"
GROUP_NOT_MIXED = "group_not_in_mixture"
OVER_RATIO = "over_ratio"
#: A BENIGN pair whose prompt's harm estimate is uncertain (``equi.schema.UNCERTAIN_HARM_BAND``): the safety
#: interlock keeps it out of the helpfulness data, whatever the order and shares.
UNCERTAIN_HARM = "uncertain_harm"
BEYOND_SIZE = "beyond_size"

#: Two single responses must differ at least this much in cost to make a preference pair.
MIN_COST_GAP = 0.2


@dataclass
class Selection:
    """The mixer's answer: mixture rows (as pool indices) and a reason for every other pool row."""

    # columns: chosen_idx, rejected_idx (null for native pairs), group, cluster, rank: the pick order (fdc: group
    # after group, each in cluster round-robin order; input: input order), made a ladder per split when written.
    mixture: pl.DataFrame
    not_selected: dict[int, str] = field(default_factory=dict)
    effective_ratios: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def reason_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for reason in self.not_selected.values():
            counts[reason] = counts.get(reason, 0) + 1
        return dict(sorted(counts.items()))


def prompt_key(prompts: pl.Expr, images: pl.Expr | None = None) -> pl.Expr:
    """A 64-bit key equal for prompts that differ only in case and white space (pairing needs no full text).

    With ``images``, a prompt about an image is keyed with its image too: "What is happening in this image?"
    asked of two images is two prompts, and answers to one are never paired with answers to the other.
    """
    key = prompts.str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars().hash(seed=0)
    if images is None:
        return key
    return pl.when(images.is_null()).then(key).otherwise(key.xor(images.hash(seed=1)))


def pair_single_responses(singles: pl.DataFrame) -> tuple[pl.DataFrame, dict[int, str]]:
    """Pair single responses to the same prompt: lowest cost → chosen, highest cost → rejected.

    ``singles`` has columns ``idx``, ``prompt_key`` (:func:`prompt_key`), ``response_cost``. Returns the pairs
    (``chosen_idx``, ``rejected_idx``) and a reason for every single response left unpaired.
    """
    reasons: dict[int, str] = {}
    if singles.height == 0:
        return pl.DataFrame(schema={"chosen_idx": pl.Int64, "rejected_idx": pl.Int64}), reasons
    keyed = singles.rename({"prompt_key": "_key"})
    chosen, rejected = [], []
    for group in keyed.sort(["_key", "response_cost", "idx"]).partition_by("_key", maintain_order=True):
        idx = group["idx"].to_list()
        cost = group["response_cost"].to_list()
        if len(idx) < 2:
            reasons[idx[0]] = UNPAIRED
            continue
        if cost[-1] - cost[0] < MIN_COST_GAP:
            reasons.update({i: NO_SAFETY_DIFFERENCE for i in idx})
            continue
        chosen.append(idx[0])
        rejected.append(idx[-1])
        reasons.update({i: UNPAIRED for i in idx[1:-1]})
    return pl.DataFrame({"chosen_idx": chosen, "rejected_idx": rejected},
                        schema={"chosen_idx": pl.Int64, "rejected_idx": pl.Int64}), reasons


def near_duplicates(embeddings: np.ndarray, clusters: np.ndarray, order: np.ndarray, threshold: float,
                    block: int = 2048) -> np.ndarray:
    """Boolean mask over ``order``: True where the row is a near-duplicate of an earlier kept row.

    Rows are compared only within their cluster (sub-quadratic overall); ``order`` decides which copy
    is kept (the first). ``embeddings`` must be L2-normalised. Rows go ``block`` at a time: first against
    the rows already kept (``block`` columns at a time), then one by one within the block, so no similarity
    matrix is larger than ``block`` × ``block`` however large a cluster is.
    """
    is_dup = np.zeros(len(order), dtype=bool)
    by_cluster: dict[int, list[int]] = {}
    for pos, row in enumerate(order):
        by_cluster.setdefault(int(clusters[row]), []).append(pos)
    for positions in by_cluster.values():
        if len(positions) < 2:
            continue
        vecs = embeddings[order[positions]].astype(np.float32)
        kept = np.zeros(len(positions), dtype=bool)
        for start in range(0, len(positions), block):
            rows = vecs[start:start + block]
            kept_before = np.flatnonzero(kept[:start])
            dup = np.zeros(len(rows), dtype=bool)
            for first in range(0, len(kept_before), block):
                dup |= (rows @ vecs[kept_before[first:first + block]].T >= threshold).any(axis=1)
            within = rows @ rows.T
            for i in range(len(rows)):
                if dup[i] or (within[i, :i][kept[start:start + i]] >= threshold).any():
                    is_dup[positions[start + i]] = True
                else:
                    kept[start + i] = True
    return is_dup


def group_quotas(available: dict[str, int], ratios: dict[str, float], size: int | None,
                 benign_share: float) -> tuple[dict[str, int], list[str]]:
    """Exact per-group counts for the mixture.

    Safety groups follow ``ratios`` exactly (largest-remainder rounding when ``size`` is not a
    multiple of the ratio sum); a group with a positive ratio but no rows is dropped from the
    ratios with a warning instead of emptying the whole mixture. BENIGN rows make up
    ``benign_share`` of the final mixture, as far as there are enough.
    """
    warnings = []
    active = {g: r for g, r in ratios.items() if r > 0}
    for g in list(active):
        if available.get(g, 0) == 0:
            warnings.append(f"no {g} pairs available: {g} dropped from the ratios")
            del active[g]
    quotas = {g: 0 for g in SAFETY_GROUPS}
    if active:
        total_ratio = sum(active.values())
        # The largest scale the scarcest group allows: every group gets ratio * m rows.
        m = min(available[g] / r for g, r in active.items())
        if all(float(r).is_integer() for r in active.values()) and m >= 1:
            m = np.floor(m)  # whole multiples of integer ratios keep them exact (240:72:24, not 245:74:24)
        elif m < 1:  # even one multiple of the ratios is too many: keep them as nearly as the rows allow
            scarce = min(active, key=lambda g: available[g] / active[g])
            warnings.append(f"only {available[scarce]} {scarce} pairs, fewer than its ratio {active[scarce]:g}: "
                            "the safety groups follow the ratios only approximately")
        target = sum(r * m for r in active.values())
        target = int(np.floor(target + 1e-9))
        if size is not None:
            if size > target:
                warnings.append(f"--size {size} asks for more safety pairs than the ratios allow ({target})")
            target = min(size, target)
        exact = {g: target * r / total_ratio for g, r in active.items()}
        quotas.update({g: int(np.floor(v + 1e-9)) for g, v in exact.items()})
        short = target - sum(quotas[g] for g in active)
        for g in sorted(active, key=lambda g: (exact[g] - quotas[g], active[g]), reverse=True)[:short]:
            quotas[g] += 1
        for g in active:
            quotas[g] = min(quotas[g], available[g])
    safety_total = sum(quotas.values())
    wanted_benign = int(round(benign_share / (1 - benign_share) * safety_total)) if safety_total else 0
    if not active and benign_share > 0:  # no safety pairs at all: a helpfulness-only mixture
        wanted_benign = available.get("BENIGN", 0) if size is None else min(size, available.get("BENIGN", 0))
    quotas["BENIGN"] = min(wanted_benign, available.get("BENIGN", 0))
    if quotas["BENIGN"] < wanted_benign:
        warnings.append(f"only {quotas['BENIGN']} BENIGN pairs for a share of {benign_share:.2f} "
                        f"({wanted_benign} wanted)")
    return quotas, warnings


def cluster_round_robin(clusters: np.ndarray, seed: int) -> np.ndarray:
    """An order over ``range(len(clusters))`` that visits clusters in turn (random cluster and row order)."""
    rng = np.random.default_rng(seed)
    members: dict[int, list[int]] = {}
    for i in rng.permutation(len(clusters)):
        members.setdefault(int(clusters[i]), []).append(int(i))
    cluster_order = list(members)
    rng.shuffle(cluster_order)
    order, depth = [], 0
    while len(order) < len(clusters):
        for c in cluster_order:
            if depth < len(members[c]):
                order.append(members[c][depth])
        depth += 1
    return np.asarray(order, dtype=np.int64)


def ladder_ranks(groups: list[str]) -> np.ndarray:
    """Ranks for rows listed group by group in selection order, interleaving groups by their share.

    Slot k (1-based) goes to the group furthest behind its share, ``k · n_g / n − taken_g`` (ties: the group listed
    first), and to that group's next row in selection order. This greedy keeps every prefix ``rank < k`` within one
    row of each group's share (sorting by ``(i + 0.5) / n_g`` instead missed by up to 1.45 rows where keys tie) —
    the nested scale ladder.
    """
    n = len(groups)
    rows: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        rows.setdefault(g, []).append(i)
    order = list(rows)  # first appearance: the tie-break
    share = [len(rows[g]) / n for g in order] if n else []
    size = [len(rows[g]) for g in order]
    taken = [0] * len(order)
    ranks = np.empty(n, dtype=np.int64)
    for k in range(1, n + 1):
        best, best_deficit = -1, -np.inf
        for g in range(len(order)):
            if taken[g] < size[g]:
                deficit = k * share[g] - taken[g]
                if deficit > best_deficit + 1e-12:
                    best, best_deficit = g, deficit
        ranks[rows[order[best]][taken[best]]] = k - 1
        taken[best] += 1
    return ranks


def eval_split(ids: list[str], fraction: float) -> list[str]:
    """A stable held-out split by id hash: the same row lands in the same split as the mix grows."""
    if fraction <= 0:
        return ["train"] * len(ids)
    bound = int(fraction * 2**32)
    return [TEST_SPLIT if int(hashlib.sha256(i.encode()).hexdigest()[:8], 16) < bound else "train" for i in ids]


def select_mixture(meta: pl.DataFrame, embeddings: np.ndarray, *, ratios: dict[str, float], size: int | None,
                   benign_share: float, dup_threshold: float, seed: int, order: str = "fdc") -> Selection:
    """Choose the mixture from pool metadata.

    ``meta`` columns: ``idx`` (row index into ``embeddings``), ``prompt_key``, ``kind`` (pair/single/prompt),
    ``group``, ``cluster``, ``response_cost``.

    ``order="input"`` ignores ``ratios``, ``benign_share`` and ``seed``: every de-duplicated pair, whatever its
    group, ranked by its position in the input (the first copy of a near-duplicate is kept); ``size`` caps the
    number of pairs (the rest are ``beyond_size``).
    """
    if order not in MIX_ORDERS:
        raise ValueError(f"unknown mixture order {order!r}; choose one of {', '.join(MIX_ORDERS)}")
    not_selected: dict[int, str] = {}
    for i in meta.filter(pl.col("kind") == "prompt")["idx"].to_list():
        not_selected[i] = PROMPT_ONLY
    pairs, single_reasons = pair_single_responses(
        meta.filter(pl.col("kind") == "single").select("idx", "prompt_key", "response_cost"))
    not_selected.update(single_reasons)
    native = meta.filter(pl.col("kind") == "pair").select(pl.col("idx").alias("chosen_idx"),
                                                          pl.lit(None, pl.Int64).alias("rejected_idx"))
    candidates = pl.concat([native, pairs]).join(
        meta.select(pl.col("idx").alias("chosen_idx"), "group", "cluster"), on="chosen_idx", how="left")
    uncertain = uncertain_benign(candidates, meta)
    for c, r in zip(candidates.filter(uncertain)["chosen_idx"].to_list(),
                    candidates.filter(uncertain)["rejected_idx"].to_list()):
        not_selected.update({c: UNCERTAIN_HARM} | ({r: UNCERTAIN_HARM} if r is not None else {}))
    candidates = candidates.filter(~uncertain)
    if order == "input":
        return _input_order_mixture(meta, embeddings, candidates.sort("chosen_idx"), not_selected, size,
                                    dup_threshold)
    # A fixed random order decides which near-duplicate survives and feeds the round robin.
    rng = np.random.default_rng(seed)
    candidates = candidates[rng.permutation(candidates.height)] if candidates.height else candidates

    def reject(rows: pl.DataFrame, reason: str) -> None:
        for c, r in zip(rows["chosen_idx"].to_list(), rows["rejected_idx"].to_list()):
            not_selected[c] = reason
            if r is not None:
                not_selected[r] = reason

    mixed_groups = set(g for g, r in ratios.items() if r > 0) | ({"BENIGN"} if benign_share > 0 else set())
    reject(candidates.filter(~pl.col("group").is_in(list(mixed_groups))), GROUP_NOT_MIXED)
    candidates = candidates.filter(pl.col("group").is_in(list(mixed_groups)))

    chosen_idx = candidates["chosen_idx"].to_numpy()
    dup = (near_duplicates(embeddings, _cluster_lookup(meta), chosen_idx, dup_threshold)
           if candidates.height else np.zeros(0, dtype=bool))
    reject(candidates.filter(pl.Series(dup)), DUPLICATE)
    candidates = candidates.filter(~pl.Series(dup))

    available = candidates.group_by("group").len().to_dict(as_series=False)
    available = dict(zip(available["group"], available["len"]))
    quotas, warnings = group_quotas(available, ratios, size, benign_share)

    picked = []
    for g in list(SAFETY_GROUPS) + ["BENIGN"]:
        rows = candidates.filter(pl.col("group") == g)
        if rows.height == 0:
            continue
        rows = rows[cluster_round_robin(rows["cluster"].to_numpy(), seed)]
        reject(rows[quotas.get(g, 0):], OVER_RATIO)
        if quotas.get(g, 0):
            picked.append(rows[: quotas[g]])
    if picked:
        mixture = pl.concat(picked)
        mixture = mixture.with_columns(pl.Series("rank", np.arange(mixture.height, dtype=np.int64)))
    else:
        mixture = candidates.clear().with_columns(pl.lit(0, pl.Int64).alias("rank"))
    total = sum(quotas.values()) or 1
    return Selection(
        mixture=mixture.sort("rank"),
        not_selected=not_selected,
        effective_ratios={g: quotas[g] / total for g in quotas if quotas[g]},
        warnings=warnings,
    )


def _input_order_mixture(meta: pl.DataFrame, embeddings: np.ndarray, candidates: pl.DataFrame,
                         not_selected: dict[int, str], size: int | None, dup_threshold: float) -> Selection:
    """``order="input"``: ``candidates`` (in input order) less near-duplicates, the first ``size`` of them, ranked."""
    def reject(rows: pl.DataFrame, reason: str) -> None:
        for c, r in zip(rows["chosen_idx"].to_list(), rows["rejected_idx"].to_list()):
            not_selected[c] = reason
            if r is not None:
                not_selected[r] = reason

    dup = (near_duplicates(embeddings, _cluster_lookup(meta), candidates["chosen_idx"].to_numpy(), dup_threshold)
           if candidates.height else np.zeros(0, dtype=bool))
    reject(candidates.filter(pl.Series(dup)), DUPLICATE)
    candidates = candidates.filter(~pl.Series(dup))
    warnings = []
    if size is not None:
        if size > candidates.height:
            warnings.append(f"--size {size} asks for more pairs than there are ({candidates.height})")
        reject(candidates[size:], BEYOND_SIZE)
        candidates = candidates[:size]
    mixture = candidates.with_columns(pl.Series("rank", np.arange(candidates.height, dtype=np.int64)))
    shares = mixture.group_by("group").len().to_dict(as_series=False)
    total = mixture.height or 1
    return Selection(mixture=mixture, not_selected=not_selected,
                     effective_ratios={g: n / total for g, n in sorted(zip(shares["group"], shares["len"]))},
                     warnings=warnings)


def uncertain_benign(candidates: pl.DataFrame, meta: pl.DataFrame) -> pl.Series:
    """Boolean per candidate: BENIGN, and its prompt's harm_score (``meta``) is at least the low end of
    ``UNCERTAIN_HARM_BAND``. (A pair of single responses shares one prompt, so its chosen row speaks for both.)"""
    if "harm_score" not in meta.columns or candidates.height == 0:
        return pl.Series("uncertain", [False] * candidates.height, dtype=pl.Boolean)
    harm = np.zeros(int(meta["idx"].max()) + 1, dtype=np.float64)
    harm[meta["idx"].to_numpy()] = meta["harm_score"].fill_null(0.0).to_numpy()
    uncertain = (candidates["group"] == "BENIGN").to_numpy() & (
        harm[candidates["chosen_idx"].to_numpy()] >= UNCERTAIN_HARM_BAND[0])
    return pl.Series("uncertain", uncertain, dtype=pl.Boolean)


def _cluster_lookup(meta: pl.DataFrame) -> np.ndarray:
    lookup = np.zeros(int(meta["idx"].max()) + 1 if meta.height else 0, dtype=np.int64)
    lookup[meta["idx"].to_numpy()] = meta["cluster"].to_numpy()
    return lookup

