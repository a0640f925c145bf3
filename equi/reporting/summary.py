"""The report's words: a short Markdown summary of what the curves show. Pure: records in, text out."""

from __future__ import annotations

import re

from equi.reporting.mix import MixSummary
from equi.reporting.runs import BASELINE, CurvePoint, RunRecord, split_label


#: Characters that make inline Markdown (emphasis, code, links, HTML, tables, strikethrough, math, entities).
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~$&])")


def md_text(value: object) -> str:
    """``value`` as literal Markdown text: run names and groups come from run files and folder names, and a ``*``,
    ``_`` or ``[`` in one must not turn the rest of the summary bold or into a link."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(value).splitlines()))


def md_code(value: object) -> str:
    """``value`` as a Markdown code span, fenced with more backticks than any run of them inside (CommonMark), so a
    backtick in a path cannot close the span early."""
    text = " ".join(str(value).splitlines())
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text[:1] in ("`", " ") or text[-1:] in ("`", " ") else ""  # one space each side is stripped
    return f"{fence}{pad}{text}{pad}{fence}"


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _trend(points: list[CurvePoint], metric: str) -> str | None:
    kept = [p for p in points if p.value(metric) is not None]
    if len(kept) < 2:
        return None
    first, last = kept[0], kept[-1]
    delta = 100 * (last.value(metric) - first.value(metric))
    direction = "rises" if delta > 0.5 else "falls" if delta < -0.5 else "stays flat"
    return (f"{direction} from {pct(first.value(metric))} (n={first.n_safety}) to {pct(last.value(metric))} "
            f"(n={last.n_safety})" + (f", {delta:+.1f} points" if direction != "stays flat" else ""))


def _sentence(lead: str, rest: str) -> str:
    return lead + rest if lead else rest[0].upper() + rest[1:]


def _compare_groups(series: dict[str, list[CurvePoint]], algo: str | None) -> list[str]:
    """Which group drives over-refusal, balances best, grows fastest (within one algorithm's series)."""
    lead = f"With **{md_text(algo)}**, " if algo else ""
    lines: list[str] = []
    last = {g: pts[-1] for g, pts in series.items() if g != BASELINE and pts and pts[-1].over_refusal is not None}
    if len(last) >= 2:
        worst = max(last, key=lambda g: last[g].over_refusal)
        best = max((g for g in last if last[g].balanced is not None), key=lambda g: last[g].balanced, default=None)
        rates = {round(p.over_refusal, 6) for p in last.values()}
        if len(rates) == 1:  # a tie (e.g. all 0%) names no culprit
            lines.append(_sentence(lead, f"at each group's largest size over-refusal is the same for every group "
                                         f"({pct(last[worst].over_refusal)} of benign prompts refused): no group "
                                         "drives it here."))
        else:
            lines.append(_sentence(lead, f"at each group's largest size, **{md_text(worst)}** drives over-refusal most "
                                         f"({pct(last[worst].over_refusal)} of benign prompts refused at "
                                         f"n={last[worst].n_safety})."))
        if best is not None:
            lines.append(_sentence(lead, f"the best balance of safety and helpfulness comes from **{md_text(best)}** "
                                         f"(balanced {pct(last[best].balanced)} at n={last[best].n_safety})."))
        growth = {g: pts[-1].over_refusal - pts[0].over_refusal for g, pts in series.items()
                  if g != BASELINE and len(pts) >= 2 and pts[0].over_refusal is not None
                  and pts[-1].over_refusal is not None}
        if growth:
            fastest = max(growth, key=growth.get)
            if growth[fastest] > 0:
                lines.append(_sentence(lead, f"over-refusal grows fastest with more **{md_text(fastest)}** data "
                                             f"({100 * growth[fastest]:+.1f} points across its ladder): more of it "
                                             "makes the model overly safe rather than more truly safe."))
    return lines


def _compare_algos(series: dict[str, list[CurvePoint]]) -> list[str]:
    """For each group trained with more than one algorithm: the algorithms side by side at their largest size."""
    by_group: dict[str, dict[str, CurvePoint]] = {}
    for label, points in series.items():
        group, algo = split_label(label)
        if algo is not None and points:
            by_group.setdefault(group, {})[algo] = points[-1]
    lines = []
    for group, last in by_group.items():
        if len(last) < 2:
            continue
        sides = "; ".join(f"{md_text(algo)} safety {pct(p.safety)}, over-refusal {pct(p.over_refusal)}, balanced "
                          f"{pct(p.balanced)} (n={p.n_safety})" for algo, p in last.items())
        line = f"**{md_text(group)}** at each algorithm's largest size: {sides}."
        balanced = {a: p.balanced for a, p in last.items() if p.balanced is not None}
        if len(balanced) >= 2 and len({round(v, 6) for v in balanced.values()}) > 1:
            best = max(balanced, key=balanced.get)
            line += f" Best balance: **{md_text(best)}**."
        lines.append(line)
    return lines


def findings(series: dict[str, list[CurvePoint]]) -> list[str]:
    """Sentences comparing the groups (and, when the series are per algorithm, the algorithms); empty when there
    is nothing to compare. Series labels are groups, or ``"GROUP · ALGO"`` when the runs span several algorithms."""
    lines: list[str] = []
    for group, points in series.items():
        if group == BASELINE:
            continue
        parts = [f"{name} {text}" for name, metric in (("safety", "safety"), ("over-refusal", "over_refusal"))
                 if (text := _trend(points, metric))]
        if parts:
            lines.append(f"**{md_text(group)}**: " + "; ".join(parts) + ".")
        elif points:
            p = points[-1]
            lines.append(f"**{md_text(group)}**: one point (n={p.n_safety}): safety {pct(p.safety)}, over-refusal "
                         f"{pct(p.over_refusal)}, balanced {pct(p.balanced)}.")
    per_algo: dict[str | None, dict[str, list[CurvePoint]]] = {}
    for label, points in series.items():
        if label != BASELINE:
            group, algo = split_label(label)
            per_algo.setdefault(algo, {})[group] = points
    for algo, group_series in sorted(per_algo.items(), key=lambda item: item[0] or ""):
        lines += _compare_groups(group_series, algo)
    return lines + _compare_algos(series)


def render_summary(records: list[RunRecord], series: dict[str, list[CurvePoint]], mix: MixSummary | None,
                   runs_root: str | None) -> str:
    out = ["# equi report", ""]
    evaluated = [r for r in records if r.summary is not None]
    if runs_root is not None:
        out.append(f"Runs read from {md_code(runs_root)}: {len(records)} found, {len(evaluated)} evaluated.")
        out.append("")
    if runs_root is not None and not records:
        out += ["No run directories were found, so there are no curves yet. Train with `equi scale` or "
                "`equi train`, then `equi eval RUN`.", ""]
    for r in records:
        if r.summary is None and r.eval_error:
            out.append(f"- {md_code(r.name)} has a malformed evaluation ({md_text(r.eval_error)}): run "
                       f"{md_code(f'equi eval {r.path}')} again to put it on the curves.")
        elif r.summary is None:
            out.append(f"- {md_code(r.name)} is not evaluated yet: run {md_code(f'equi eval {r.path}')} to put it on "
                       "the curves.")
    if any(r.summary is None for r in records):
        out.append("")
    lines = findings(series)
    if lines:
        out += ["## What the curves show", ""] + [f"- {line}" for line in lines] + [""]
        out += ["Safety is the share of harmful prompts (AdvBench, HarmBench, JailbreakBench, StrongREJECT, "
                "XSTest unsafe) that the model refused or partly refused; over-refusal is the same share on "
                "benign prompts (XSTest safe, Alpaca). Answers are labelled by the curation refusal detector.", ""]
    elif evaluated:
        out += ["The evaluated runs have no known number of safety examples (no `ladder.json`), so they are in "
                "the tables but not on the curves.", ""]
    if mix is not None:
        total = mix.mixture_rows
        shares = ", ".join(f"{md_text(g)} {sum(c.values())} ({100 * sum(c.values()) / total:.0f}%)"
                           for g, c in mix.composition.items()) if total else "empty"
        out += ["## Mix", "", f"{md_code(mix.path)}: {total} mixture rows: {shares}.",
                f"{len(mix.cluster_sizes)} embedding clusters over {sum(mix.cluster_sizes)} pool rows; "
                f"{mix.rejects} input lines rejected."]
        if mix.accounting_problems:
            out.append("Accounting does NOT balance: " + "; ".join(mix.accounting_problems) + ".")
        else:
            acc = mix.accounting
            out.append(f"Accounting balances: {acc.get('input_lines')} input lines = {acc.get('pooled')} pooled + "
                       f"{acc.get('rejected')} rejected; {acc.get('pooled')} pooled = {acc.get('mixed')} mixed + "
                       f"{sum((acc.get('not_selected') or {}).values())} not selected.")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
