"""The report's words: a short Markdown summary of what the curves show. Pure: records in, text out."""

from __future__ import annotations

import re

from equi.reporting.intervals import ci_text
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


def rate_text(point: CurvePoint, metric: str) -> str:
    """``"60.0% [31.3, 83.2] of 10 prompts"``: the rate, its Wilson 95% interval and the prompts behind it (as
    much of that as is known)."""
    text = pct(point.value(metric))
    interval = point.interval(metric)
    if interval is not None:
        text += " " + ci_text(*interval)
    n = point.prompts(metric)
    return text + (f" of {n} prompts" if n is not None else "")


def _apart(a: CurvePoint, b: CurvePoint, metric: str) -> bool | None:
    """Whether the two points' 95% intervals for ``metric`` do not overlap; None when one has no interval."""
    ia, ib = a.interval(metric), b.interval(metric)
    if ia is None or ib is None:
        return None
    return ia[1] < ib[0] or ib[1] < ia[0]


def _prompt_n(points: list[CurvePoint], metric: str) -> str:
    ns = sorted({n for p in points if (n := p.prompts(metric)) is not None})
    return "n unknown" if not ns else f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}–{ns[-1]}"


def _trend(points: list[CurvePoint], metric: str) -> str | None:
    """How ``metric`` moves from the smallest to the largest run of a series; a change inside the two Wilson 95%
    intervals is said to be within noise, never a rise or fall. A run between them that stands above (or below)
    both ends beyond their intervals is named (:func:`_turn`): the ends alone would hide a peak or a dip."""
    kept = [p for p in points if p.value(metric) is not None]
    if len(kept) < 2:
        return None
    first, last = kept[0], kept[-1]
    delta = 100 * (last.value(metric) - first.value(metric))
    apart = _apart(first, last, metric)
    span = (f"{rate_text(first, metric)} at {first.n_safety} safety examples to {rate_text(last, metric)} at "
            f"{last.n_safety}")
    turn = _turn(kept, metric)
    if apart is False:
        return (f"is within noise ({_prompt_n([first, last], metric)} prompts): from {span}, {delta:+.1f} points"
                + turn)
    direction = "rises" if delta > 0.5 else "falls" if delta < -0.5 else "stays flat"
    caveat = "; prompt counts unknown, so no interval" if apart is None else ""
    return (f"{direction} from {span}" + (f", {delta:+.1f} points" if direction != "stays flat" else "") + caveat
            + turn)


def _turn(kept: list[CurvePoint], metric: str) -> str:
    """``", but peaks at … in between"``: the highest (and the lowest) run strictly between the ends when its 95%
    interval lies above (below) both ends' intervals; "" when there is none, or when the intervals are unknown."""
    inner = kept[1:-1]
    if not inner:
        return ""
    ends = (kept[0], kept[-1])
    notes = []
    for word, pick, beyond in (("peaks", max, lambda p, e: p.value(metric) > e.value(metric)),
                               ("dips", min, lambda p, e: p.value(metric) < e.value(metric))):
        point = pick(inner, key=lambda p: p.value(metric))
        if all(beyond(point, end) and _apart(point, end, metric) for end in ends):
            notes.append(f"{word} at {rate_text(point, metric)} at {point.n_safety} safety examples")
    return (", but " + " and ".join(notes) + " in between, beyond the ends' 95% intervals") if notes else ""


def _sentence(lead: str, rest: str) -> str:
    return lead + rest if lead else rest[0].upper() + rest[1:]


def _clear_leader(last: dict[str, CurvePoint], metric: str) -> tuple[str | None, str]:
    """The label whose ``metric`` is highest, if it is clearly so: not tied with, and its interval apart from,
    every other's. Else None, with why (``"tie"`` or ``"overlap"``); ``"unknown"`` when it leads but some
    interval is unknown (then it is named with that caveat)."""
    ranked = sorted(last, key=lambda g: last[g].value(metric), reverse=True)
    top = ranked[0]
    if any(round(last[g].value(metric), 6) == round(last[top].value(metric), 6) for g in ranked[1:]):
        return None, "tie"
    apart = [_apart(last[top], last[g], metric) for g in ranked[1:]]
    if any(a is False for a in apart):
        return None, "overlap"
    return top, "unknown" if any(a is None for a in apart) else "apart"


def _listing(last: dict[str, CurvePoint], metric: str) -> str:
    return "; ".join(f"**{md_text(g)}** {rate_text(p, metric)} at {p.n_safety} safety examples"
                     for g, p in sorted(last.items(), key=lambda item: -item[1].value(metric)))


def _growth(points: list[CurvePoint]) -> tuple[float, tuple[float, float] | None]:
    """Over-refusal change across a ladder and a cautious interval for it (from the two ends' intervals)."""
    first, last = points[0], points[-1]
    a, b = first.interval("over_refusal"), last.interval("over_refusal")
    return last.over_refusal - first.over_refusal, (None if a is None or b is None else (b[0] - a[1], b[1] - a[0]))


def _compare_groups(series: dict[str, list[CurvePoint]], algo: str | None) -> list[str]:
    """Which group drives over-refusal, balances best, grows fastest (within one algorithm's series); a group is
    named only when it is clearly apart from the others (no tie, 95% intervals not overlapping)."""
    lead = f"With **{md_text(algo)}**, " if algo else ""
    lines: list[str] = []
    last = {g: pts[-1] for g, pts in series.items() if g != BASELINE and pts and pts[-1].over_refusal is not None}
    if len(last) >= 2:
        rates = {round(p.over_refusal, 6) for p in last.values()}
        worst, why = _clear_leader(last, "over_refusal")
        if len(rates) == 1:  # a tie (e.g. all 0%) names no culprit
            any_point = next(iter(last.values()))
            lines.append(_sentence(lead, f"at each group's largest size over-refusal is the same for every group "
                                         f"({pct(any_point.over_refusal)} of benign prompts refused): no group "
                                         "drives it here."))
        elif worst is None:
            lines.append(_sentence(lead, "no group clearly drives over-refusal: at each group's largest size "
                                         f"({_listing(last, 'over_refusal')}) the 95% intervals "
                                         + ("tie at the top." if why == "tie" else "overlap.")))
        else:
            caveat = " (prompt counts unknown: not checked against noise)" if why == "unknown" else ""
            lines.append(_sentence(lead, f"at each group's largest size, **{md_text(worst)}** drives over-refusal most "
                                         f"({rate_text(last[worst], 'over_refusal')} refused at "
                                         f"{last[worst].n_safety} safety examples){caveat}."))
        balanced = {g: p for g, p in last.items() if p.balanced is not None}
        if len(balanced) >= 2:
            best, why = _clear_leader(balanced, "balanced")
            if best is None:
                reason = "two or more tie" if why == "tie" else "their 95% intervals overlap"
                lines.append(_sentence(lead, f"no group balances safety and helpfulness clearly best: {reason} "
                                             f"({_listing(balanced, 'balanced')})."))
            else:
                caveat = " (prompt counts unknown: not checked against noise)" if why == "unknown" else ""
                lines.append(_sentence(lead, f"the best balance of safety and helpfulness comes from "
                                             f"**{md_text(best)}** (balanced {rate_text(balanced[best], 'balanced')} "
                                             f"at {balanced[best].n_safety} safety examples){caveat}."))
        growth = {g: _growth(pts) for g, pts in series.items()
                  if g != BASELINE and len(pts) >= 2 and pts[0].over_refusal is not None
                  and pts[-1].over_refusal is not None}
        if growth:
            fastest = max(growth, key=lambda g: growth[g][0])
            change, interval = growth[fastest]
            others = [growth[g] for g in growth if g != fastest]
            # Named only if its rise is beyond noise and beyond every other group's (cautious intervals).
            clear = interval is not None and interval[0] > 0 and all(
                o[1] is not None and o[1][1] < interval[0] for o in others)
            if change > 0 and clear:
                lines.append(_sentence(lead, f"over-refusal grows fastest with more **{md_text(fastest)}** data "
                                             f"({100 * change:+.1f} points across its ladder, beyond noise): more of "
                                             "it makes the model overly safe rather than more truly safe."))
            elif change > 0 and len(growth) >= 2:
                lines.append(_sentence(lead, "no group's over-refusal clearly grows fastest: the changes across the "
                                             "ladders (" + "; ".join(f"**{md_text(g)}** {100 * c:+.1f} points"
                                                                     for g, (c, _) in growth.items())
                                             + ") are within noise of one another."))
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
        sides = "; ".join(f"{md_text(algo)} safety {rate_text(p, 'safety')}, over-refusal "
                          f"{rate_text(p, 'over_refusal')}, balanced {rate_text(p, 'balanced')} "
                          f"({p.n_safety} safety examples)" for algo, p in last.items())
        line = f"**{md_text(group)}** at each algorithm's largest size: {sides}."
        balanced = {a: p for a, p in last.items() if p.balanced is not None}
        if len(balanced) >= 2:
            best, why = _clear_leader(balanced, "balanced")
            if best is not None:
                line += f" Best balance: **{md_text(best)}**" + (
                    " (prompt counts unknown: not checked against noise)." if why == "unknown" else ".")
            elif why == "overlap":
                line += " No algorithm balances clearly best: their 95% intervals overlap."
            else:
                line += " No algorithm balances best: they tie."
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
            lines.append(f"**{md_text(group)}**: one point ({p.n_safety} safety examples): safety "
                         f"{rate_text(p, 'safety')}, over-refusal {rate_text(p, 'over_refusal')}, balanced "
                         f"{rate_text(p, 'balanced')}.")
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
                "benign prompts (XSTest safe, Alpaca). Answers are labelled by the curation refusal detector. "
                "[lo, hi] is the Wilson 95% interval in percent (for a mean over suites, at the effective number of "
                "prompts; balanced: from the other two, cautiously wide); \"of n prompts\" is how many answers a "
                "rate rests on. A change or a lead inside those intervals is reported as noise, not as a trend.", ""]
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
