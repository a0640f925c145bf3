"""``equi eval`` as a library call: ``evaluate(EvalConfig(...)) -> EvalResult``."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from equi.config import ConfigError
from equi.evaluation.audit import EVAL_DIR, write_answers, write_metrics
from equi.models import generate_answers, load_model
from equi.evaluation.metrics import LABELS, compute_metrics
from equi.evaluation.suites import Suite, SuiteError, load_suites, parse_suite_names, resolve_data_dir
from equi.schema import FINAL_DIR, run_record, saved_train_config


@dataclass
class EvalConfig:
    """Everything ``equi eval`` needs.

    Target:
        target: a run directory (its ``final/`` model is evaluated and results go to ``RUN/eval/``),
            a model directory or hub id, or ``None`` for equi's default model (SmolLM2-135M-Instruct).
        out: where to write ``answers.parquet`` and ``metrics.json``; required unless ``target`` is a run.
    Prompts:
        suites: built-in suite names, group names (``harmful``, ``benign``, ``xstest``) or ``.jsonl``
            paths of user suites (``hf:OWNER/NAME`` for a hub dataset); empty = every available built-in suite
            (the ones shipped with equi, plus ``alpaca`` when the data directory holds it).
        limit: at most this many prompts per suite (spread over XSTest types); ``None`` = all.
        data_dir: a folder laid out like the workspace's ``shared/data`` (else ``$EQUI_DATA_DIR``, else
            ``../shared/data`` beside a checkout); suites it lacks come from the copies shipped with equi.
    Generation (greedy):
        max_new_tokens: answer length bound; a refusal shows in the first sentences.
        batch_size: prompts per generate call.
        device: ``cuda``/``cpu``; ``None`` picks CUDA when available.
    """

    target: str | None = None
    out: str | None = None
    suites: list[str] = field(default_factory=list)
    limit: int | None = None
    data_dir: str | None = None
    max_new_tokens: int = 64
    batch_size: int = 16
    device: str | None = None
    quiet: bool = False
    # Filled in by __post_init__:
    run_dir: str | None = None
    model_path: str | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError("--limit must be at least 1")
        if self.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be at least 1")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        try:
            self.suites = parse_suite_names(",".join(self.suites) if self.suites else None, self.data_dir)
        except SuiteError as exc:
            raise ConfigError(str(exc)) from None
        for name in self.suites:
            if name.endswith(".jsonl") and not Path(name).is_file():
                raise ConfigError(f"suite file not found: {name}")
        if self.target is not None:
            target = Path(self.target)
            if (algo := (saved_train_config(target) or {}).get("algo")) in ("reward-model", "cost-model"):
                raise ConfigError(f"{target} is a {algo} run: it scores answers and "
                                  "writes none; evaluate a policy run (or pass it to --reward-model/--cost-model)")
            if (target / FINAL_DIR).is_dir():
                self.run_dir = str(target)
                self.model_path = str(target / FINAL_DIR)
            elif _is_run_dir(target):
                raise ConfigError(f"{target} is a training run without a final/ model: training has not finished "
                                  f"(`equi train --out {target} --resume` finishes it)")
            elif target.exists() and not (target / "config.json").is_file():
                raise ConfigError(f"{target} is neither a run directory (with final/) nor a model directory")
            else:
                self.model_path = str(self.target)
        if self.out is None:
            if self.run_dir is None:
                taken_as = ("a model directory" if self.target and Path(self.target).exists() else
                            "a hub id (there is no such directory here)" if self.target else "equi's default model")
                raise ConfigError(f"--out DIR is required when TARGET is not a run directory "
                                  f"({self.target or 'no TARGET'}: taken as {taken_as})")
            self.out = str(Path(self.run_dir) / EVAL_DIR)
        self.out = str(self.out)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_run_dir(path: Path) -> bool:
    """Whether ``path`` is an ``equi train`` run directory."""
    return saved_train_config(path) is not None


@dataclass
class EvalResult:
    out_dir: Path
    metrics: dict[str, Any]
    rows: list[dict[str, Any]]


def classify_answers(answers: list[str]) -> tuple[list[str], list[float]]:
    """Labels and refusal probabilities from the curation refusal detector (the one equi uses everywhere)."""
    from curation.refusal import classify_responses, refusal_scores

    if not answers:
        return [], []
    scores = [float(s) for s in refusal_scores(answers)]
    labels = [str(label) for label in classify_responses(answers)]
    bad = set(labels) - set(LABELS)
    if bad:  # the detector's contract; a new label would silently skew every rate
        raise RuntimeError(f"refusal detector returned unknown labels {sorted(bad)}")
    return labels, scores


def evaluate_suites(model, tokenizer, suites: list[Suite], config: EvalConfig) -> list[dict[str, Any]]:
    """Generate, classify and return one audit row per prompt of every suite."""
    prompts = [p for suite in suites for p in suite.prompts]
    generations = generate_answers(
        model, tokenizer, [p.prompt for p in prompts],
        max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, quiet=config.quiet,
    )
    labels, scores = classify_answers([g.answer for g in generations])
    return [
        {
            "suite": p.suite, "prompt_id": p.prompt_id, "prompt": p.prompt, "expected": p.expected,
            "subtype": p.subtype, "answer": g.answer, "label": label, "refusal_score": score,
            "new_tokens": g.new_tokens, "truncated": g.truncated,
        }
        for p, g, label, score in zip(prompts, generations, labels, scores)
    ]


def evaluate(config: EvalConfig) -> EvalResult:
    """Run the whole evaluation and write ``answers.parquet`` + ``metrics.json`` into ``config.out``."""
    needs_data = any(not name.endswith(".jsonl") for name in config.suites)
    data_dir = resolve_data_dir(config.data_dir) if needs_data else None
    suites = load_suites(config.suites, data_dir, config.limit)
    model_path = config.model_path
    if model_path is None:
        from equi.models import resolve_model

        model_path = resolve_model(None, quiet=config.quiet)
    started = time.perf_counter()
    model, tokenizer = load_model(model_path, device=config.device, quiet=config.quiet)
    loaded = time.perf_counter()
    rows = evaluate_suites(model, tokenizer, suites, config)
    answered = time.perf_counter()
    metrics = compute_metrics(rows)
    metrics.update({
        # Wall-clock seconds (the model's load, then generating and labelling every answer): what an evaluation
        # costs on this machine, for comparing runs and models (bench/ladder_bench.py reads them).
        "seconds": {"load": round(loaded - started, 2), "answer": round(answered - loaded, 2),
                    "per_prompt": round((answered - loaded) / len(rows), 3) if rows else None},
        "model": model_path,
        "run": config.run_dir,
        "data_dir": str(data_dir) if data_dir else None,
        "suite_notes": {s.name: {"source": s.source, "n": len(s.prompts), "notes": s.notes} for s in suites},
        "config": config.to_dict(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    out_dir = Path(config.out)
    write_answers(out_dir, rows)
    write_metrics(out_dir, metrics)
    if config.run_dir is not None and run_record(config.run_dir) is not None:  # its model card gains these numbers
        from train.card import write_model_card

        write_model_card(config.run_dir, eval_dir=out_dir)
    return EvalResult(out_dir, metrics, rows)
