"""Reading run directories into records, and turning records into curve data. No plotting here.

A run directory (``equi train`` / ``equi scale``) holds ``config.json`` and, once trained, ``summary.json`` (with
the number of safety and benign rows it trained on); ``equi scale`` adds ``ladder.json`` (mix, scale, group, number
of safety examples) and ``equi eval`` adds
``eval/metrics.json`` + ``eval/answers.parquet``. The report needs nothing else.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from equi.evaluation.audit import ANSWERS_FILE, EVAL_DIR, METRICS_FILE
from equi.reporting.intervals import Rate, balanced_interval, metric_rate
from equi.schema import FINAL_DIR, RUN_CONFIG, RUN_SUMMARY, TRAIN_CONFIG_KEY

LADDER_FILE = "ladder.json"
METRICS = ("safety", "over_refusal", "balanced")
METRIC_LABELS = {"safety": "Safety", "over_refusal": "Over-refusal", "balanced": "Balanced score"}
#: The group label of a run trained on every safety group together (no ``--groups``).
ALL_GROUPS = "ALL"
BASELINE = "baseline"
#: Joins group and algorithm in a series label (``"EHD · dpo"``) when the runs span more than one algorithm.
SERIES_SEP = " · "
#: The algorithm label of a run whose config does not name one.
UNKNOWN_ALGO = "unknown"


@dataclass
class RunRecord:
    """What the report knows about one run directory."""

    name: str
    path: Path
    group: str | None = None
    scale: int | float | None = None
    n_safety: int | None = None
    n_benign: int | None = None
    algo: str | None = None
    baseline: bool = False
    summary: dict[str, Any] | None = None  # eval/metrics.json "summary"; None = not evaluated (or eval_error)
    suites: dict[str, Any] = field(default_factory=dict)
    xstest_types: dict[str, Any] = field(default_factory=dict)
    answers: Path | None = None
    problems: list[str] = field(default_factory=list)
    eval_error: str | None = None  # eval/metrics.json is there but unusable: why (the run is then not on the curves)
    #: ``safety`` / ``over_refusal`` → the prompts behind the rate (k of n) and its Wilson 95% interval
    rates: dict[str, Rate] = field(default_factory=dict)
    audit: Path | None = None  # the report's copy of answers.parquet + metrics.json (set by build_report)

    def interval(self, metric: str) -> tuple[float, float] | None:
        """The Wilson 95% interval of ``summary[metric]`` (``balanced``: from the other two's), or None."""
        if metric == "balanced":
            return balanced_interval(self.rates.get("safety"), self.rates.get("over_refusal"))
        rate = self.rates.get(metric)
        return None if rate is None else (rate.lo, rate.hi)


@dataclass(frozen=True)
class CurvePoint:
    """One run on a curve: its rates, and (when the metrics file lets the report count them) the prompts behind
    each rate and its Wilson 95% interval ``[lo, hi]`` (fractions, like the rates)."""

    run: str
    n_safety: int
    safety: float | None
    over_refusal: float | None
    balanced: float | None
    safety_rate: Rate | None = None
    over_refusal_rate: Rate | None = None
    balanced_ci: tuple[float, float] | None = None

    def value(self, metric: str) -> float | None:
        return getattr(self, metric)

    def rate(self, metric: str) -> Rate | None:
        """The counts behind ``safety`` / ``over_refusal`` (None for ``balanced`` or when unknown)."""
        return {"safety": self.safety_rate, "over_refusal": self.over_refusal_rate}.get(metric)

    def interval(self, metric: str) -> tuple[float, float] | None:
        if metric == "balanced":
            return self.balanced_ci
        rate = self.rate(metric)
        return None if rate is None else (rate.lo, rate.hi)

    def prompts(self, metric: str) -> int | None:
        """n: the prompts a rate rests on (``balanced``: both kinds together)."""
        if metric == "balanced":
            parts = [r.n for r in (self.safety_rate, self.over_refusal_rate) if r is not None]
            return sum(parts) if len(parts) == 2 else None
        rate = self.rate(metric)
        return None if rate is None else rate.n


def _read_json(path: Path, problems: list[str], name: str | None = None) -> dict[str, Any] | None:
    """The JSON object in ``path``; None (with a note in ``problems``, naming the file as ``name``) when it is
    unreadable or not an object."""
    if not path.is_file():
        return None
    name = name or path.name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{name} unreadable ({exc})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{name} is malformed: it holds a JSON {_json_kind(data)}, not an object")
        return None
    return data


def _json_kind(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages (``list`` → ``"array"``)."""
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null",
             dict: "object"}
    return names.get(type(value), type(value).__name__)


def as_number(value: Any) -> float | None:
    """``value`` if it is a finite number (not a boolean), else None: a hand-edited or broken file may hold text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _count(value: Any, what: str, problems: list[str]) -> int | None:
    """A row count read from a run file: a whole number >= 0, else None with a note (``"forty"``, -3, 2.5)."""
    if value is None:
        return None
    number = as_number(value)
    if number is None or number < 0 or not float(number).is_integer():
        problems.append(f"{what} is {value!r}, not a whole number of rows: not on the curves")
        return None
    return int(number)


def _summary_metrics(summary: Any, problems: list[str]) -> dict[str, Any] | None:
    """The ``summary`` of ``eval/metrics.json`` with each metric a number or None; a value that is not a number
    is dropped with a note (drawing or printing it would fail), a summary that is not an object is malformed."""
    if summary is None:
        problems.append(f"{EVAL_DIR}/{METRICS_FILE} is malformed: it has no summary")
        return None
    if not isinstance(summary, dict):
        problems.append(f"{EVAL_DIR}/{METRICS_FILE} is malformed: its summary is a JSON {_json_kind(summary)}, "
                        "not an object")
        return None
    kept = dict(summary)
    for metric in METRICS:
        value = summary.get(metric)
        if value is not None and as_number(value) is None:
            problems.append(f"{EVAL_DIR}/{METRICS_FILE}: summary {metric} is {value!r}, not a number: left out")
            kept[metric] = None
    return kept


def _objects(value: Any) -> dict[str, dict[str, Any]]:
    """``{name: {...}}`` entries of a per-suite table; anything else in a malformed file is skipped."""
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, dict)}


def _label(value: Any) -> str | None:
    """A group or algorithm name as text (a malformed file may hold a number or a list)."""
    return None if value is None or value == "" else str(value)


def group_label(groups: Any) -> str:
    """``["IHD", "BENIGN"]`` → ``"IHD"``; no restriction → ``"ALL"``. BENIGN is the shared helpfulness share."""
    if not groups:
        return ALL_GROUPS
    if isinstance(groups, str):
        groups = groups.split(",")
    elif not isinstance(groups, (list, tuple)):  # a malformed config.json: show what it holds
        return str(groups)
    safety = [str(g) for g in groups if g != "BENIGN"]
    return "+".join(safety) if safety else "BENIGN"


def read_run(path: Path) -> RunRecord:
    """A record from one directory; never raises for missing or broken files, notes them instead."""
    record = RunRecord(name=path.name, path=path)
    config = _read_json(path / RUN_CONFIG, record.problems) or {}
    ladder = _read_json(path / LADDER_FILE, record.problems) or {}
    trained = _read_json(path / RUN_SUMMARY, record.problems) or {}  # equi train: the rows it trained on
    train = config.get(TRAIN_CONFIG_KEY) or config.get("train") or config  # equi train nests TrainConfig
    if not isinstance(train, dict):
        train = {}
    record.algo = _label(ladder.get("algo") or train.get("algo"))
    record.baseline = ladder.get("baseline", False) is True
    record.group = BASELINE if record.baseline else _label(ladder.get("group")) or group_label(train.get("groups"))
    record.scale = ladder.get("scale", train.get("scale"))
    raw_n_safety = ladder.get("n_safety", config.get("n_safety", trained.get("n_safety")))
    record.n_safety = _count(raw_n_safety, "n_safety", record.problems)
    record.n_benign = _count(ladder.get("n_benign", config.get("n_benign", trained.get("n_benign"))),
                             "n_benign", record.problems)
    metrics_path = path / EVAL_DIR / METRICS_FILE
    noted = len(record.problems)
    metrics = _read_json(metrics_path, record.problems, f"{EVAL_DIR}/{METRICS_FILE}")
    if metrics is None and not metrics_path.is_file():
        record.problems.append(f"not evaluated (no {EVAL_DIR}/{METRICS_FILE}): run `equi eval " + str(path) + "`")
    elif metrics is None:
        record.eval_error = record.problems[-1]  # unreadable or not an object: _read_json said which
    else:
        record.summary = _summary_metrics(metrics.get("summary"), record.problems)
        if record.summary is None:
            record.eval_error = "; ".join(record.problems[noted:])
        record.suites = _objects(metrics.get("suites"))
        if record.summary is not None:
            record.rates = {m: rate for m in ("safety", "over_refusal")
                            if (rate := metric_rate(record.summary, record.suites, m)) is not None}
        record.xstest_types = _objects(metrics.get("xstest_types"))
        answers = path / EVAL_DIR / ANSWERS_FILE
        record.answers = answers if answers.is_file() else None
    if raw_n_safety is None and not record.baseline:
        record.problems.append("number of safety examples unknown (no ladder.json, and no n_safety in "
                               "summary.json: trained before equi recorded it, or not finished): not on the curves")
    return record


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in (RUN_CONFIG, LADDER_FILE)) or (
        path / EVAL_DIR / METRICS_FILE).is_file()


def collect_runs(root: Path) -> list[RunRecord]:
    """Every run under ``root`` (``root`` itself may be a run), sorted by group then size."""
    root = Path(root)
    if is_run_dir(root):
        candidates = [root]
    else:
        candidates = sorted(p for p in root.rglob("*") if p.is_dir() and is_run_dir(p)
                            and not any(part in (FINAL_DIR, EVAL_DIR) or part.startswith("checkpoint-")
                                        for part in p.relative_to(root).parts))
    records = [read_run(p) for p in candidates]
    return sorted(records, key=lambda r: (r.group or "", r.algo or "", r.n_safety if r.n_safety is not None else -1,
                                          r.name))


def on_curves(record: RunRecord) -> bool:
    """Whether a run is a point of a curve: trained (not the baseline), evaluated, with a known data size."""
    return not record.baseline and record.summary is not None and record.n_safety is not None


def curve_algos(records: list[RunRecord]) -> list[str]:
    """The algorithms of the runs on the curves (``UNKNOWN_ALGO`` for a run that names none), sorted."""
    return sorted({r.algo or UNKNOWN_ALGO for r in records if on_curves(r)})


def series_label(record: RunRecord, by_algo: bool) -> str:
    """The curve a run is on: its group (``"EHD"``), or group and algorithm (``"EHD · dpo"``) when ``by_algo``."""
    group = record.group or ALL_GROUPS
    return f"{group}{SERIES_SEP}{record.algo or UNKNOWN_ALGO}" if by_algo else group


def series_labels(records: list[RunRecord]) -> list[str | None]:
    """Per run, the curve it is on (:func:`series_label`, by algorithm when the curves span several), or None."""
    by_algo = len(curve_algos(records)) > 1
    return [series_label(r, by_algo) if on_curves(r) else None for r in records]


def split_label(label: str) -> tuple[str, str | None]:
    """``"EHD · dpo"`` → ``("EHD", "dpo")``; ``"EHD"`` → ``("EHD", None)``."""
    group, sep, algo = label.partition(SERIES_SEP)
    return group, (algo if sep else None)


def curve_series(records: list[RunRecord]) -> dict[str, list[CurvePoint]]:
    """One series per training group: evaluated runs with a known safety-example count, by count.

    When the runs were trained with more than one algorithm (``ama-dpo`` and ``dpo`` ladders under one root),
    there is one series per (group, algorithm) instead, labelled ``"EHD · dpo"``, so the algorithms can be
    compared; with one algorithm the labels are the groups alone.

    An evaluated baseline run (the model before training, ``n_safety`` 0) starts every series, so
    each line shows the change from the untrained model.
    """
    def point(r: RunRecord, n: int) -> CurvePoint:
        s = r.summary or {}
        return CurvePoint(r.name, n, s.get("safety"), s.get("over_refusal"), s.get("balanced"),
                          r.rates.get("safety"), r.rates.get("over_refusal"),
                          r.interval("balanced") if s.get("balanced") is not None else None)

    baselines = [r for r in records if r.baseline and r.summary is not None]
    series: dict[str, list[CurvePoint]] = {}
    for record, label in zip(records, series_labels(records)):
        if label is not None:
            series.setdefault(label, []).append(point(record, int(record.n_safety)))
    for group, points in series.items():
        points.extend(point(b, 0) for b in baselines[:1])
        points.sort(key=lambda p: (p.n_safety, p.run))
    if not series and baselines:
        series[BASELINE] = [point(baselines[0], 0)]
    return dict(sorted(series.items()))
