"""``equi report``: data-scaling curves (safety, over-refusal, balanced vs safety examples, one line
per group, or per group and algorithm when the runs used several), mix charts and accounting, an HTML page with everything embedded, and a summary in words.

Reading (``runs``, ``mix``), words (``summary``), charts (``plots``) and the page (``html``) are
separate modules; ``build`` ties them together.
"""

from equi.reporting.build import ReportConfig, ReportResult, build_report
from equi.reporting.mix import MixReadError, MixSummary, summarise_mix
from equi.reporting.runs import CurvePoint, RunRecord, collect_runs, curve_series, read_run

__all__ = ["CurvePoint", "MixReadError", "MixSummary", "ReportConfig", "ReportResult", "RunRecord",
           "build_report", "collect_runs", "curve_series", "read_run", "summarise_mix"]
