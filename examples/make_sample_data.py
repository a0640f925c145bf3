"""Rebuild the bundled sample data in examples/data/ from the real datasets in ../shared/data.

Only permissively licensed sources are bundled (see data_cards/): Anthropic HH-RLHF harmless-base
(MIT), XSTest v2 prompts (CC-BY-4.0), AdvBench harmful behaviours (MIT). Rows are unchanged apart from
conversion to JSONL and the stated subsetting.

    python examples/make_sample_data.py [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=HERE.parents[1] / "shared" / "data")
    parser.add_argument("--hh-rows", type=int, default=600, help="first N HH-RLHF harmless test dialogues")
    args = parser.parse_args()
    out = HERE / "data"
    out.mkdir(exist_ok=True)

    # HH-RLHF lines are copied byte for byte (first N lines), re-gzipped with mtime 0 for reproducibility.
    with gzip.open(args.data_dir / "hh_rlhf_harmless_base" / "test.jsonl.gz", "rb") as src:
        lines = [next(src) for _ in range(args.hh_rows)]
    with open(out / "hh_rlhf_harmless_sample.jsonl.gz", "wb") as raw, \
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as dst:
        dst.writelines(lines)

    with open(args.data_dir / "xstest_prompts" / "xstest_prompts.csv", newline="", encoding="utf-8") as fh, \
            open(out / "xstest_prompts.jsonl", "w", encoding="utf-8") as dst:
        for row in csv.DictReader(fh):
            dst.write(json.dumps({"id": f"xstest-v2-{row['id']}", "prompt": row["prompt"], "source": "xstest_v2",
                                  "meta": {"type": row["type"], "label": row["label"]}}) + "\n")

    with open(args.data_dir / "advbench" / "harmful_behaviors.csv", newline="", encoding="utf-8") as fh, \
            open(out / "advbench_behaviors.jsonl", "w", encoding="utf-8") as dst:
        for i, row in enumerate(csv.DictReader(fh)):
            # AdvBench's target is the affirmative opening a jailbreak aims for: an unsafe single response.
            dst.write(json.dumps({"id": f"advbench-{i}", "prompt": row["goal"], "response": row["target"],
                                  "is_safe": False, "source": "advbench"}) + "\n")


if __name__ == "__main__":
    main()
