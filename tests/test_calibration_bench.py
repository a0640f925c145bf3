"""``bench/calibration.py``'s measures: reliability bins and ECE, and the out-of-source Platt map (SYNTHETIC data)."""

from __future__ import annotations

import numpy as np

from tests.benches import load_bench


def test_ece_is_near_zero_when_calibrated_and_large_when_over_confident():
    bench = load_bench("calibration")
    rng = np.random.default_rng(0)
    p = rng.uniform(size=20000)
    calibrated = rng.uniform(size=20000) < p
    assert bench.reliability(p, calibrated)["ece"] < 0.02
    over = rng.uniform(size=20000) < 0.5 + (p - 0.5) / 2  # truth half as extreme as the prediction
    result = bench.reliability(p, over)
    assert 0.1 < result["ece"] < 0.15  # E|p - (0.5 + (p - 0.5)/2)| = E|p - 0.5| / 2 = 0.125
    assert sum(b["n"] for b in result["bins"]) == 20000 and len(result["bins"]) == 10


def test_the_out_of_source_map_is_fit_without_the_source():
    bench = load_bench("calibration")
    rng = np.random.default_rng(1)
    p = rng.uniform(0.01, 0.99, 6000)
    sources = np.repeat(np.array(["a", "b", "c"]), 2000)
    truth = rng.uniform(size=6000) < 0.5 + (p - 0.5) / 2  # the same over-confidence in every source: a map transfers
    mapped = bench.platt_out_of_source(p, truth, sources)
    assert bench.reliability(mapped, truth)["ece"] < bench.reliability(p, truth)["ece"] / 3
    truth[sources == "c"] = True  # a source unlike the others (all positive): its map, fit on a and b, cannot know
    mapped = bench.platt_out_of_source(p, truth, sources)
    assert bench.reliability(mapped[sources == "c"], truth[sources == "c"])["ece"] > 0.2
