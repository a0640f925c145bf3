"""A self-contained HTML page: PNGs embedded as base64, tables of the numbers, links to audit files."""

from __future__ import annotations

import base64
import html
import os
import re
from pathlib import Path
from typing import Any

from equi.reporting.intervals import ci_text, suite_mean_rate
from equi.reporting.mix import MixSummary
from equi.reporting.runs import RunRecord, series_labels

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1,h2,h3{font-weight:600} table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right} th{background:#f3f3f3}
td.l,th.l{text-align:left} .plots img{max-width:49%;height:auto;margin:.3em 0;border:1px solid #eee}
.warn{color:#a30000} code{background:#f6f6f6;padding:0 .2em;overflow-wrap:anywhere} .ci{color:#555;font-size:.85em}
.scroll{overflow-x:auto;max-width:100%}
@media (max-width:700px){body{margin:.5em auto} .plots img{max-width:100%} table{font-size:.8em}}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _rate_cell(value: float | None, interval: tuple[float, float] | None, k: int | None, n: int | None,
               what: str) -> str:
    """``60.0%`` over ``[31.3, 83.2] 6/10``: the rate, its Wilson 95% interval and k of n prompts (shown, and on
    hover in words)."""
    if value is None:
        return "—"
    counts = f"{k}/{n}" if k is not None and n is not None else (f"n={n}" if n is not None else "n unknown")
    ci = ci_text(*interval) if interval is not None else "no interval"
    hover = (f"{k} of {n} prompts {what}" if k is not None and n is not None else f"{n} prompts" if n else
             "prompt count unknown") + (f"; Wilson 95% interval {ci}%" if interval is not None else "")
    return f'<span title="{_e(hover)}">{_pct(value)}<br><span class="ci">{_e(ci)} {_e(counts)}</span></span>'


def embed_png(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{_e(alt)}" title="{_e(alt)}" src="data:image/png;base64,{data}">'


#: A backslash escape (``\*``) or a code span fenced by one or more backticks (CommonMark): both are literal text.
_LITERAL = re.compile(r"\\([!-/:-@\[-`{-~])|(`+)(.+?)(?<!`)\2(?!`)", re.DOTALL)


def markdown_inline(text: str) -> str:
    """One line of the summary's Markdown as HTML: **bold**, `code` and backslash escapes, the way summary.md
    writes run names (escaped, or in code spans fenced past any backtick inside) so they show as typed."""
    literals: list[str] = []

    def keep(match: re.Match) -> str:
        if match.group(1) is not None:
            literals.append(_e(match.group(1)))
        else:
            code = match.group(3)
            if code.startswith(" ") and code.endswith(" ") and code.strip():
                code = code[1:-1]
            literals.append(f"<code>{_e(code)}</code>")
        return f"\x00{len(literals) - 1}\x00"

    html_text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", _e(_LITERAL.sub(keep, text.replace("\x00", ""))))
    return re.sub("\x00(\\d+)\x00", lambda m: literals[int(m.group(1))], html_text)


def markdown_to_html(text: str) -> str:
    """Enough Markdown for the summary: headings, bullets, paragraphs, **bold**, `code` and backslash escapes."""
    inline = markdown_inline

    out, in_list = [], False
    for line in text.splitlines():
        if line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{inline(line[2:])}</li>")
            continue
        if in_list:
            out.append("</ul>")
            in_list = False
        if line.startswith("## "):
            out.append(f"<h3>{inline(line[3:])}</h3>")
        elif line.startswith("# "):
            continue  # the page has its own title
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    if in_list:
        out.append("</ul>")
    return "\n".join(out)


def _table(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    head = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{cell}</td>' for i, cell in enumerate(row))
                   + "</tr>" for row in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _size_cell(r: RunRecord) -> str:
    """The run's number of safety examples (rows), with the ladder's scale on hover."""
    if r.n_safety is None:
        return "—"
    scale = f"equi scale --scales {r.scale}: " if r.scale is not None else ""
    return f'<span title="{_e(scale + f"{r.n_safety} safety rows (rank < K of the mix)")}">{_e(r.n_safety)}</span>'


def _runs_table(records: list[RunRecord], out_dir: Path) -> str:
    """One row per run; "curve" is the series label it is plotted under (as in report.json), "—" when on none."""
    rows = []
    for r, label in zip(records, series_labels(records)):
        s = r.summary or {}
        link = "—"
        if r.audit is not None:  # copied next to the page: the link survives moving the report folder
            rel = _e(Path(os.path.relpath(r.audit, out_dir)).as_posix())
            link = (f'<a href="{rel}/answers.parquet" title="copied from {_e(r.answers)}">answers.parquet</a>'
                    f' · <a href="{rel}/metrics.json">metrics.json</a>')
        elif r.answers:
            link = f'<a href="{_e(Path(os.path.relpath(r.answers, out_dir)).as_posix())}">answers.parquet</a>'
        sr, orr = r.rates.get("safety"), r.rates.get("over_refusal")
        n_both = sr.n + orr.n if sr is not None and orr is not None else None
        rows.append([_e(r.name), _e(r.group), _e(r.algo), _e(label) if label is not None else "—", _size_cell(r),
                     _rate_cell(s.get("safety"), r.interval("safety"), sr and sr.k, sr and sr.n,
                                "harmful, refused or partly refused"),
                     _rate_cell(s.get("over_refusal"), r.interval("over_refusal"), orr and orr.k, orr and orr.n,
                                "benign, refused or partly refused"),
                     _rate_cell(s.get("balanced"), r.interval("balanced") if s.get("balanced") is not None else None,
                                None, n_both, ""),
                     link, f'<span class="warn">{_e("; ".join(r.problems))}</span>' if r.problems else ""])
    return _table(["run", "group", "algo", "curve", "safety examples", "safety", "over-refusal", "balanced",
                   "audit", "notes"], rows, left=4)


def _suites_table(records: list[RunRecord]) -> str:
    rows = []
    for r in records:
        for name, b in r.suites.items():
            not_complied = "—"
            n, compliance = b.get("n"), b.get("compliance_rate")
            if isinstance(n, int) and n > 0 and isinstance(compliance, (int, float)):
                k = b.get("n_not_complied")
                k = k if isinstance(k, int) else round((1 - compliance) * n)
                rate = suite_mean_rate([(k, n)])
                if rate is not None:
                    not_complied = _rate_cell(rate.value, (rate.lo, rate.hi), rate.k, rate.n,
                                              "refused or partly refused")
            rows.append([_e(r.name), _e(name), _e(b.get("expected")), _e(b.get("n")), _pct(b.get("refusal_rate")),
                         _pct(b.get("partial_rate")), _pct(b.get("compliance_rate")), not_complied,
                         _pct(b.get("as_expected_rate"))])
    return _table(["run", "suite", "expected", "n", "refuse", "partial", "comply", "refuse + partial [95% CI]",
                   "as expected"], rows, left=3)


def _xstest_table(records: list[RunRecord]) -> str:
    types = sorted({t for r in records for t in r.xstest_types})
    evaluated = [r for r in records if r.xstest_types]
    if not types:
        return ""
    rows = [[_e(t)] + [_pct(r.xstest_types.get(t, {}).get("refusal_rate") if t in r.xstest_types else None)
                       for r in evaluated] for t in types]
    return ("<h3>XSTest refusal rate by prompt type</h3><p>Types starting with <code>contrast_</code> are unsafe "
            "(refusing is right); the others are safe prompts that only look risky.</p>"
            + _table(["XSTest type"] + [r.name for r in evaluated], rows))


def _mix_section(mix: MixSummary, plots: dict[str, Path]) -> str:
    parts = [f"<h2>Mix <code>{_e(mix.path)}</code></h2>", '<div class="plots">']
    parts += [embed_png(path, name) for name, path in plots.items()]
    parts.append("</div>")
    comp_rows = [[_e(g), _e(c.get("train", 0)), _e(c.get("test", 0)), _e(sum(c.values())),
                  _e(mix.pool_groups.get(g, 0))] for g, c in mix.composition.items()]
    parts.append(_table(["group", "train", "test", "mixture total", "pool"], comp_rows))
    acc = mix.accounting
    acc_rows = [[_e(k), _e(acc.get(k))] for k in ("input_lines", "pooled", "rejected", "mixed", "mixture_rows") if k in acc]
    acc_rows += [[_e(f"not selected: {reason}"), _e(n)] for reason, n in (acc.get("not_selected") or {}).items()]
    parts.append("<h3>Row accounting</h3>" + _table(["", "rows"], acc_rows))
    if mix.accounting_problems:
        parts.append('<p class="warn">' + _e("; ".join(mix.accounting_problems)) + "</p>")
    else:
        parts.append("<p>Accounting balances: input lines = pooled + rejected, pooled = mixed + not selected.</p>")
    if mix.reject_reasons:
        parts.append("<h3>Rejected input lines</h3>" + _table(
            ["reason", "lines"], [[_e(k), _e(v)] for k, v in mix.reject_reasons.items()]))
    for warning in mix.warnings:
        parts.append(f'<p class="warn">{_e(warning)}</p>')
    return "\n".join(parts)


def render_html(*, title: str, summary_markdown: str, curve_plots: dict[str, Path], records: list[RunRecord],
                mix: MixSummary | None, mix_plots: dict[str, Path], out_dir: Path, created_at: str) -> str:
    body = [f"<h1>{_e(title)}</h1>", f"<p>Made by <code>equi report</code> at {_e(created_at)}.</p>",
            markdown_to_html(summary_markdown)]
    if curve_plots:
        body += ["<h2>Data-scaling curves</h2>",
                 "<p>Bars are Wilson 95% intervals; each plot's caption gives n, the prompts behind each point. "
                 "Points whose bars overlap are not told apart by this evaluation.</p>", '<div class="plots">']
        body += [embed_png(path, name) for name, path in curve_plots.items()]
        body.append("</div>")
    if records:
        body += ["<h2>Runs</h2>",
                 "<p>Each rate shows its Wilson 95% interval [lo, hi] (percent) and k/n: k prompts refused or partly "
                 "refused of n. Safety and over-refusal are means over suites, so k/n can differ from the rate "
                 "when suites differ in size.</p>", _runs_table(records, out_dir)]
        copied = [r for r in records if r.audit is not None]
        if copied:
            body.append(f"<p>Audit files (each run's answers and metrics) are copied into <code>"
                        f"{_e(Path(os.path.relpath(copied[0].audit, out_dir)).parts[0])}/</code> next to this page, "
                        "so the links keep working when the report folder is moved; hover a link to see the run "
                        "folder it was copied from.</p>")
        if any(r.suites for r in records):
            body += ["<h3>Per suite</h3>", _suites_table(records), _xstest_table(records)]
    if mix is not None:
        body.append(_mix_section(mix, mix_plots))
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
