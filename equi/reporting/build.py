"""``equi report`` as a library call: ``build_report(ReportConfig(...)) -> ReportResult``."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from equi.config import ConfigError
from equi.reporting.mix import MixSummary, summarise_mix
from equi.reporting.runs import METRICS, RunRecord, collect_runs, curve_series, series_labels

CURVE_FILES = {"safety": "curve_safety.png", "over_refusal": "curve_over_refusal.png",
               "balanced": "curve_balanced.png"}
TRADEOFF_FILE = "tradeoff.png"
MIX_FILES = {"composition": "mix_composition.png", "severity": "mix_severity.png", "clusters": "mix_clusters.png"}
HTML_FILE = "report.html"
SUMMARY_FILE = "summary.md"
DATA_FILE = "report.json"
#: Where the report keeps its copies of each run's audit files (answers + metrics), so its links survive a move.
AUDIT_DIR = "audit"


def copy_audit_files(records: list[RunRecord], runs_root: Path, out: Path) -> None:
    """Copy each evaluated run's ``eval/answers.parquet`` and ``eval/metrics.json`` to ``out/audit/<run path
    under the runs root>/`` (flat: no ``eval/`` folder, so a report written under the runs root is not read back
    as a run) and note the copy in ``record.audit``."""
    from equi.evaluation.audit import METRICS_FILE

    root = runs_root.resolve()
    for record in records:
        if record.answers is None:
            continue
        try:
            rel = record.path.resolve().relative_to(root)
        except ValueError:
            rel = Path(record.name)
        target = out / AUDIT_DIR / (rel if rel.parts else Path(record.name))
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(record.answers, target / record.answers.name)
        metrics = record.answers.parent / METRICS_FILE
        if metrics.is_file():
            shutil.copy2(metrics, target / METRICS_FILE)
        record.audit = target


@dataclass
class ReportConfig:
    """Inputs and output of ``equi report``.

    runs: a directory of run directories (or one run); ``None`` = no curves.
    mix: a mix directory to chart (composition, severity, clusters, accounting); ``None`` = none.
    out: the report directory (PNG files, ``report.html``, ``summary.md``, ``report.json``).
    """

    out: str
    runs: str | None = None
    mix: str | None = None
    title: str = "equi report: safety vs over-refusal"

    def __post_init__(self) -> None:
        if self.runs is None and self.mix is None:
            raise ConfigError("nothing to report: pass --runs DIR and/or --mix DIR")
        if self.runs is not None and not Path(self.runs).is_dir():
            raise ConfigError(f"--runs {self.runs} is not a directory")
        if self.mix is not None and not Path(self.mix).is_dir():
            raise ConfigError(f"--mix {self.mix} is not a directory")
        self.out = str(self.out)


@dataclass
class ReportResult:
    out_dir: Path
    html: Path
    summary: Path
    records: list[RunRecord]
    plots: dict[str, dict[str, Any]] = field(default_factory=dict)
    mix: MixSummary | None = None


def build_report(config: ReportConfig, records: list[RunRecord] | None = None) -> ReportResult:
    """Write the report. ``records``: runs already read under ``config.runs`` (e.g. relabelled by a study that
    compares mixes: a series is named by ``record.group``); ``None`` = :func:`collect_runs` of ``config.runs``."""
    from equi.reporting import plots as charts
    from equi.reporting.html import render_html
    from equi.reporting.summary import render_summary

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if records is None:
        records = collect_runs(Path(config.runs)) if config.runs else []
    if config.runs:
        copy_audit_files(records, Path(config.runs), out)
    series = curve_series(records)
    plot_data: dict[str, dict[str, Any]] = {}
    curve_plots: dict[str, Path] = {}
    if config.runs is not None and any(r.summary is not None for r in records):
        for metric in METRICS:
            path = out / CURVE_FILES[metric]
            plot_data[path.name] = charts.plot_curve(series, metric, path)
            curve_plots[path.name] = path
        path = out / TRADEOFF_FILE
        plot_data[path.name] = charts.plot_tradeoff(series, path)
        curve_plots[path.name] = path
    mix = summarise_mix(config.mix) if config.mix else None
    mix_plots: dict[str, Path] = {}
    if mix is not None:
        for name, draw, data in (("composition", charts.plot_composition, mix.composition),
                                 ("severity", charts.plot_severity, mix.severity),
                                 ("clusters", charts.plot_cluster_sizes, mix.cluster_sizes)):
            path = out / MIX_FILES[name]
            plot_data[path.name] = draw(data, path)
            mix_plots[path.name] = path
    created_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    summary_text = render_summary(records, series, mix, config.runs)
    summary_path = out / SUMMARY_FILE
    summary_path.write_text(summary_text, encoding="utf-8")
    html_path = out / HTML_FILE
    html_path.write_text(render_html(title=config.title, summary_markdown=summary_text, curve_plots=curve_plots,
                                     records=records, mix=mix, mix_plots=mix_plots, out_dir=out,
                                     created_at=created_at), encoding="utf-8")
    report_data = {
        "config": dataclasses.asdict(config),
        "created_at": created_at,
        "series": {g: [dataclasses.asdict(p) for p in pts] for g, pts in series.items()},
        "runs": [{"name": r.name, "path": str(r.path), "group": r.group, "scale": r.scale, "n_safety": r.n_safety,
                  "algo": r.algo, "series": label, "baseline": r.baseline, "summary": r.summary,
                  "answers": str(r.answers) if r.answers else None,
                  "audit": r.audit.relative_to(out).as_posix() if r.audit else None,
                  "rates": {m: dataclasses.asdict(rate) for m, rate in r.rates.items()},
                  "intervals": {m: list(ci) for m in METRICS if (r.summary or {}).get(m) is not None
                                and (ci := r.interval(m)) is not None},
                  "problems": r.problems}
                 for r, label in zip(records, series_labels(records))],
        "plots": plot_data,
    }
    (out / DATA_FILE).write_text(json.dumps(report_data, indent=2, default=str) + "\n", encoding="utf-8")
    return ReportResult(out, html_path, summary_path, records, plot_data, mix)
