"""``equi eval``: answer real prompt suites, label every answer with the curation refusal detector,
and measure safety, over-refusal and their balance. Every answer is kept for audit."""

from equi.evaluation.audit import ANSWERS_FILE, EVAL_DIR, METRICS_FILE, read_answers, read_metrics
from equi.evaluation.metrics import compute_metrics, label_rates
from equi.evaluation.run import EvalConfig, EvalResult, evaluate
from equi.evaluation.suites import (
    BENIGN_SUITES, BUILTIN_SUITES, HARMFUL_SUITES, EvalPrompt, Suite, SuiteError, load_suites, load_user_suite,
    resolve_data_dir,
)

__all__ = [
    "ANSWERS_FILE", "EVAL_DIR", "METRICS_FILE", "BENIGN_SUITES", "BUILTIN_SUITES", "HARMFUL_SUITES",
    "EvalConfig", "EvalPrompt", "EvalResult", "Suite", "SuiteError", "compute_metrics", "evaluate",
    "label_rates", "load_suites", "load_user_suite", "read_answers", "read_metrics", "resolve_data_dir",
]
