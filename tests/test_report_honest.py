"""An honest report (issue 17, item 5): the prompts behind every rate, Wilson 95% intervals as error bars and in
the tables, no "best" or "trend" inside the noise, a readable trade-off plot, a page that survives being moved and
renders in a real browser (headless Chromium).

Run directories here are SYNTHETIC (made-up eval labels with known counts), as in ``test_report.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_report import _make_run, _write_synthetic_mix  # noqa: E402

from equi.evaluation.metrics import compute_metrics  # noqa: E402
from equi.reporting import ReportConfig, build_report  # noqa: E402
from equi.reporting.intervals import (  # noqa: E402
    balanced_interval, metric_rate, suite_counts, suite_mean_rate, wilson_interval)
from equi.reporting.runs import CurvePoint  # noqa: E402
from equi.reporting.summary import findings  # noqa: E402

#: What CI installs to run the browser test (Debian bookworm): see .ci/run.
CHROMIUM_INSTALL = "apt-get install -y --no-install-recommends chromium"


# ---------------------------------------------------------------- intervals


@pytest.mark.parametrize(("k", "n", "lo", "hi"), [
    (0, 10, 0.0, 0.277533),  # published Wilson values (e.g. R binom::binom.wilson, statsmodels)
    (2, 10, 0.056682, 0.509838),
    (5, 10, 0.236593, 0.763407),
    (10, 10, 0.722467, 1.0),
    (81, 263, 0.255289, 0.366210),
])
def test_wilson_interval_matches_known_values(k, n, lo, hi):
    got = wilson_interval(k / n, n)
    assert got == pytest.approx((lo, hi), abs=1e-6)


def test_wilson_interval_agrees_with_scipy():
    from scipy.stats import binomtest

    for k, n in ((0, 1), (1, 3), (7, 50), (49, 50), (300, 1000)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k / n, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert wilson_interval(0.5, 0) == (0.0, 1.0)  # no prompts: nothing known


def test_suite_mean_rate_uses_the_effective_number_of_prompts():
    equal = suite_mean_rate([(2, 10), (4, 10)])  # two suites of 10: n_eff is simply 20
    assert (equal.k, equal.n, equal.n_eff, equal.suites) == (6, 20, pytest.approx(20.0), 2)
    assert (equal.lo, equal.hi) == pytest.approx(wilson_interval(0.3, 20))
    unequal = suite_mean_rate([(1, 2), (50, 100)])  # a 2-prompt suite weighs as much as a 100-prompt one
    assert unequal.value == pytest.approx(0.5) and unequal.n == 102
    assert unequal.n_eff == pytest.approx(4 / (1 / 2 + 1 / 100))  # ~7.8, far below 102: the interval is wide
    assert unequal.hi - unequal.lo > 0.5
    assert suite_mean_rate([]) is None


def test_metrics_record_the_counts_behind_each_rate_and_old_files_still_give_them():
    rows = ([{"suite": "advbench", "expected": "refuse", "label": lab} for lab in ["refuse"] * 3 + ["comply"] * 5]
            + [{"suite": "harmbench", "expected": "refuse", "label": lab} for lab in ["partial", "comply"]]
            + [{"suite": "alpaca", "expected": "comply", "label": lab} for lab in ["refuse"] + ["comply"] * 9])
    metrics = compute_metrics(rows)
    summary = metrics["summary"]
    assert summary["n_harmful_not_complied"] == 4 and summary["n_harmful"] == 10
    assert summary["n_benign_not_complied"] == 1 and summary["n_benign"] == 10
    safety = metric_rate(summary, metrics["suites"], "safety")
    assert (safety.k, safety.n, safety.suites) == (4, 10, 2)
    assert safety.value == pytest.approx((3 / 8 + 1 / 2) / 2)
    assert safety.n_eff == pytest.approx(4 / (1 / 8 + 1 / 2))
    # Per suite the counts come back from n × (1 − compliance rate); a count recorded in the block wins.
    assert suite_counts(metrics["suites"], "refuse") == [(3, 8), (1, 2)]
    recorded = {name: block | {"n_not_complied": 0} for name, block in metrics["suites"].items()}
    assert suite_counts(recorded, "refuse") == [(0, 8), (0, 2)]
    # No suites table at all: the summary's pooled counts, one block.
    pooled = metric_rate(summary, {}, "over_refusal")
    assert (pooled.k, pooled.n) == (1, 10) and (pooled.lo, pooled.hi) == pytest.approx(wilson_interval(0.1, 10))


# ---------------------------------------------------------------- summary words


def _point(run: str, n_safety: int, safety_k: int, over_k: int, n: int) -> CurvePoint:
    """A SYNTHETIC curve point: safety_k of n harmful and over_k of n benign prompts refused."""
    sr, orr = suite_mean_rate([(safety_k, n)]), suite_mean_rate([(over_k, n)])
    return CurvePoint(run, n_safety, sr.value, orr.value, (sr.value + 1 - orr.value) / 2, sr, orr,
                      balanced_interval(sr, orr))


def test_summary_names_no_best_group_when_they_tie_or_their_intervals_overlap():
    tie = {"EHD": [_point("b", 0, 2, 0, 10), _point("e", 40, 6, 1, 10)],
           "IHD": [_point("b", 0, 2, 0, 10), _point("i", 12, 6, 1, 10)]}
    text = "\n".join(findings(tie))
    assert "best balance" not in text.lower().replace("clearly best", "")
    assert "No group balances safety and helpfulness clearly best: two or more tie" in text
    overlap = {"EHD": [_point("b", 0, 2, 0, 10), _point("e", 40, 7, 1, 10)],
               "IHD": [_point("b", 0, 2, 0, 10), _point("i", 12, 6, 1, 10)]}  # 80% vs 75%, n=20 each
    text = "\n".join(findings(overlap))
    assert "comes from" not in text and "their 95% intervals overlap" in text
    assert "drives over-refusal most" not in text  # 1/10 vs 1/10
    apart = {"EHD": [_point("b", 0, 20, 0, 100), _point("e", 40, 95, 2, 100)],
             "IHD": [_point("b", 0, 20, 0, 100), _point("i", 12, 40, 60, 100)]}
    text = "\n".join(findings(apart))
    assert "The best balance of safety and helpfulness comes from **EHD** (balanced 96.5% [90.9, 98.6] of 200" in text
    assert "**IHD** drives over-refusal most (60.0% [50.2, 69.1] of 100 prompts refused" in text
    assert "Over-refusal grows fastest with more **IHD** data (+60.0 points across its ladder, beyond noise)" in text


def test_a_change_inside_the_intervals_is_called_noise_not_a_trend():
    small = {"EHD": [_point("b", 0, 2, 0, 10), _point("e", 400, 4, 1, 10)]}
    text = "\n".join(findings(small))
    assert "safety is within noise (n=10 prompts): from 20.0% [5.7, 51.0] of 10 prompts at 0 safety examples" in text
    assert "rises" not in text and "falls" not in text
    big = {"EHD": [_point("b", 0, 20, 0, 100), _point("e", 400, 40, 1, 100)]}  # 20/100 → 40/100: apart
    text = "\n".join(findings(big))
    assert "safety rises from 20.0% [13.3, 28.9] of 100 prompts at 0 safety examples to 40.0%" in text
    assert "over-refusal is within noise (n=100 prompts)" in text  # 0/100 → 1/100


def test_a_peak_or_dip_between_the_ends_is_named_not_hidden_by_them():
    # SYNTHETIC curves: safety 20/100 -> 80/100 -> 25/100 (the ends overlap: "within noise" alone would hide the
    # peak); over-refusal 30/100 -> 2/100 -> 35/100 (a dip)
    peak = {"EHD": [_point("b", 0, 20, 30, 100), _point("m", 40, 80, 2, 100), _point("e", 400, 25, 35, 100)]}
    text = "\n".join(findings(peak))
    assert ("safety is within noise (n=100 prompts): from 20.0% [13.3, 28.9] of 100 prompts at 0 safety examples to "
            "25.0%") in text
    assert "but peaks at 80.0% [71.1, 86.7] of 100 prompts at 40 safety examples in between, beyond the ends'" in text
    assert "over-refusal" in text and "but dips at 2.0% [0.6, 7.0] of 100 prompts at 40 safety examples" in text
    # a middle run inside either end's interval is no turn
    bump = {"EHD": [_point("b", 0, 20, 0, 100), _point("m", 40, 30, 0, 100), _point("e", 400, 60, 1, 100)]}
    assert "peaks" not in "\n".join(findings(bump)) and "dips" not in "\n".join(findings(bump))
    # two points have nothing in between
    assert "peaks" not in "\n".join(findings({"EHD": [_point("b", 0, 20, 0, 100), _point("e", 400, 90, 0, 100)]}))


# ---------------------------------------------------------------- the report files


@pytest.fixture()
def honest_runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    _make_run(root, "base", None, None, (2, 0), baseline=True)
    for name, group, n_safety, refused in (("ehd-small", "EHD", 40, (5, 1)), ("ehd-big", "EHD", 400, (9, 6)),
                                           ("ihd-small", "IHD", 12, (4, 0)), ("ihd-big", "IHD", 120, (7, 2)),
                                           ("mhd-big", "MHD", 400, (9, 6)), ("all-big", "ALL", 400, (9, 6))):
        run = _make_run(root, name, group, n_safety, refused)
        ladder = json.loads((run / "ladder.json").read_text())
        (run / "ladder.json").write_text(json.dumps(ladder | {"scale": 0.5 if "small" in name else 1.0}))
    return root


def test_report_gives_n_and_wilson_intervals_for_every_point(honest_runs, tmp_path):
    out = tmp_path / "report"
    result = build_report(ReportConfig(out=str(out), runs=str(honest_runs)))
    data = json.loads((out / "report.json").read_text())
    ehd = data["series"]["EHD"]
    assert [p["safety_rate"]["k"] for p in ehd] == [2, 5, 9] and {p["safety_rate"]["n"] for p in ehd} == {10}
    assert ehd[-1]["safety_rate"]["lo"] == pytest.approx(0.5958, abs=1e-4)
    runs = {r["name"]: r for r in data["runs"]}
    assert runs["ehd-big"]["intervals"]["over_refusal"] == pytest.approx(list(wilson_interval(0.6, 10)))
    assert runs["ehd-big"]["rates"]["over_refusal"]["k"] == 6 and "balanced" in runs["ehd-big"]["intervals"]
    # Error bars on the curves are the Wilson intervals, read back from the drawn artists (percent).
    bars = data["plots"]["curve_safety.png"]["errorbars"]["EHD"]["y"]
    assert bars["at"] == [0, 40, 400]
    assert bars["lo"] == pytest.approx([100 * wilson_interval(k / 10, 10)[0] for k in (2, 5, 9)])
    assert bars["hi"] == pytest.approx([100 * wilson_interval(k / 10, 10)[1] for k in (2, 5, 9)])
    assert set(data["plots"]["tradeoff.png"]["errorbars"]["IHD"]) == {"x", "y"}
    assert "n = prompts per point: ALL 10; EHD 10; IHD 10; MHD 10" in data["plots"]["curve_safety.png"]["caption"]
    assert "ALL 20" in data["plots"]["curve_balanced.png"]["caption"]  # balanced rests on both kinds
    # The tables: rate, [lo, hi] and k/n, with the same in words on hover.
    html = result.html.read_text()
    assert "90.0%<br><span class=\"ci\">[59.6, 98.2] 9/10</span>" in html
    assert 'title="9 of 10 prompts harmful, refused or partly refused; Wilson 95% interval [59.6, 98.2]%"' in html
    assert "refuse + partial [95% CI]" in html  # per suite too
    summary = result.summary.read_text()
    assert "90.0% [59.6, 98.2] of 10 prompts" in summary


def test_report_html_has_a_viewport_and_shows_rows_not_scale_fractions(honest_runs, tmp_path):
    result = build_report(ReportConfig(out=str(tmp_path / "report"), runs=str(honest_runs)))
    html = result.html.read_text()
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
    assert "scale (rank <)" not in html and "<th class=\"\">safety examples</th>" in html
    row = re.search(r"<tr><td class=\"l\">ehd-small</td>(.*?)</tr>", html).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert re.sub(r"<[^>]+>", "", cells[3]) == "40"  # the safety examples, not the 0.5 it was scaled by
    assert not any(re.sub(r"<[^>]+>", "", c) in ("0.5", "1.0") for c in cells)
    assert "equi scale --scales 0.5: 40 safety rows" in row  # the scale stays on hover


def test_report_links_survive_moving_the_report_folder(honest_runs, tmp_path):
    out = tmp_path / "report"
    build_report(ReportConfig(out=str(out), runs=str(honest_runs)))
    moved = tmp_path / "elsewhere" / "moved-report"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    shutil.rmtree(honest_runs)  # the runs are gone too: the report still holds its audit files
    html = (moved / "report.html").read_text()
    links = re.findall(r'href="([^"]+)"', html)
    assert len([link for link in links if link.endswith("answers.parquet")]) == 7
    assert len([link for link in links if link.endswith("metrics.json")]) == 7
    for link in links:
        assert not link.startswith(("/", "file:", "..")), link
        assert (moved / link).is_file(), link
    import pyarrow.parquet as pq

    assert pq.read_table(moved / "audit" / "ehd-big" / "answers.parquet").num_rows == 20
    data = json.loads((moved / "report.json").read_text())
    assert {r["name"]: r["audit"] for r in data["runs"]}["ehd-big"] == "audit/ehd-big"
    assert "copied into <code>audit/</code> next to this page" in html


def test_report_under_the_runs_folder_does_not_read_its_copies_back_as_runs(honest_runs):
    build_report(ReportConfig(out=str(honest_runs / "report"), runs=str(honest_runs)))
    again = build_report(ReportConfig(out=str(honest_runs / "report"), runs=str(honest_runs)))
    assert len(again.records) == 7


def test_tradeoff_plot_is_sized_like_the_curves_and_its_labels_do_not_overprint(honest_runs, tmp_path):
    import matplotlib.image as mpimg

    out = tmp_path / "report"
    result = build_report(ReportConfig(out=str(out), runs=str(honest_runs)))
    assert mpimg.imread(out / "tradeoff.png").shape == mpimg.imread(out / "curve_safety.png").shape
    labels = result.plots["tradeoff.png"]["labels"]
    assert len(labels) == 4  # EHD, MHD and ALL end on the very same point (60%, 90%)
    boxes = [label["box"] for label in labels]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
            assert not overlap, (a, b)


# ---------------------------------------------------------------- a real browser


def _chromium() -> str:
    for name in (os.environ.get("EQUI_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.fail(f"headless Chromium is needed to check report.html renders: {CHROMIUM_INSTALL}")


_CHECK_SCRIPT = """<script>window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  document.body.setAttribute("data-equi-check", JSON.stringify({
    images: imgs.length,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
    scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth}));
});</script>"""


def _browser(*args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--no-first-run", "--disable-extensions"]
    return subprocess.run([_chromium(), *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_html_renders_in_headless_chromium(honest_runs, tmp_path):
    from PIL import Image

    mix = tmp_path / "mix"
    _write_synthetic_mix(mix)
    out = tmp_path / "report"
    build_report(ReportConfig(out=str(out), runs=str(honest_runs), mix=str(mix)))
    page = out / "report.html"
    # Every image loaded (checked in the page after its load event, at phone width: nothing wider than the screen).
    check = out / "_check.html"  # the same page plus a script that writes what it sees into the DOM
    check.write_text(page.read_text().replace("</body>", _CHECK_SCRIPT + "</body>"))
    dom = _browser("--window-size=390,844", "--virtual-time-budget=10000", "--dump-dom", check.as_uri())
    found = re.search(r'data-equi-check="([^"]+)"', dom.stdout)
    assert found, f"the page's load check did not run: {dom.stderr[-2000:]}"
    seen = json.loads(found.group(1).replace("&quot;", '"'))
    assert seen["images"] == 7 and seen["broken"] == []
    assert seen["scrollWidth"] <= seen["innerWidth"], seen  # no sideways scrolling at phone width
    # The screenshot is not blank: many distinct colours, a fair share of non-white pixels.
    shot = tmp_path / "shot.png"
    done = _browser("--window-size=1200,2400", f"--screenshot={shot}", page.as_uri())
    assert shot.is_file(), done.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2400)
    small = image.resize((300, 600))
    colours = small.getcolors(maxcolors=300 * 600)
    assert len(colours) > 50
    non_white = sum(count for count, rgb in colours if sum(rgb) < 720)
    assert non_white > 0.03 * 300 * 600
