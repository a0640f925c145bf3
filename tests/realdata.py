"""Real rows from ../shared/data turned into the raw JSONL shapes `equi curate` reads.

Nothing here is invented: every prompt and answer comes from a public dataset (see each SOURCE.md).
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path


def hh_lines(shared: Path, n: int) -> list[str]:
    """The first ``n`` HH-RLHF harmless-base test dialogues, as their original JSON lines."""
    with gzip.open(shared / "hh_rlhf_harmless_base" / "test.jsonl.gz", "rt", encoding="utf-8") as fh:
        return [line.rstrip("\n") for _, line in zip(range(n), fh)]


def xstest_single_responses(shared: Path, model: str = "llama2new", n: int | None = None) -> list[dict]:
    """XSTest completions as single-response rows; human labels give ``is_safe`` on unsafe prompts."""
    path = shared / "xstest_completions_dev" / "model_completions" / f"xstest_v2_completions_{model}.csv"
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            rows.append({"prompt": row["prompt"], "response": row["completion"], "source": f"xstest_{model}",
                         "meta": {"type": row["type"], "label": row["final_label"]}})
    return rows[:n] if n else rows


def xstest_prompts(shared: Path) -> list[dict]:
    with open(shared / "xstest_prompts" / "xstest_prompts.csv", newline="", encoding="utf-8") as fh:
        return [{"prompt": r["prompt"], "source": "xstest_v2"} for r in csv.DictReader(fh)]


def advbench_rows(shared: Path, n: int | None = None) -> list[dict]:
    with open(shared / "advbench" / "harmful_behaviors.csv", newline="", encoding="utf-8") as fh:
        rows = [{"prompt": r["goal"], "response": r["target"], "is_safe": False, "source": "advbench"}
                for r in csv.DictReader(fh)]
    return rows[:n] if n else rows


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def real_texts(shared: Path) -> list[str]:
    """Every prompt and answer text of the real datasets, in a fixed order (for implementation-equivalence tests).

    HH-RLHF transcripts (prompt, chosen, rejected), XSTest and refusal-direction completions, the relabelled
    BeaverTails prompts and the Alpaca/harmful instruction splits: curly quotes, accents, emoji, code and lists.
    """
    texts: list[str] = []
    with gzip.open(shared / "hh_rlhf_harmless_base" / "test.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            texts += [row["chosen"], row["rejected"]]
    for path in sorted((shared / "xstest_completions_dev" / "model_completions").glob("*.csv")):
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                texts += [row["prompt"], row["completion"]]
    for path in sorted((shared / "refusal_direction_completions").glob("*/*_evaluations.json")):
        texts += [row["response"] for row in json.loads(path.read_text(encoding="utf-8"))["completions"]]
    with open(shared / "equilibrate_relabel_dev" / "beavertails_relabelled_dev.jsonl", encoding="utf-8") as fh:
        texts += [json.loads(line)["prompt"] for line in fh if line.strip()]
    for path in sorted((shared / "refusal_direction_splits").glob("*.json")):
        texts += [row["instruction"] for row in json.loads(path.read_text(encoding="utf-8"))]
    return [t for t in texts if isinstance(t, str)]
