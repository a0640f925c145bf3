"""The mix's data card: Hugging Face dataset-card YAML front matter plus prose.

The YAML declares a ``default`` config (every train/eval shard), one config per group (the
mixture's shards are written one group per shard, so a group config is a list of files) and a
``pool`` config, so ``datasets.load_dataset("mix/", name)`` works for each.
"""

from __future__ import annotations

from typing import Any

import yaml

from equi.schema import GROUPS

GROUP_MEANING = {
    "EHD": "explicit harmful data: harmful content or terms are present; safety hinges on knowledge",
    "IHD": "implicit harmful data: no explicit risk terms, but malicious intent",
    "MHD": "mixed harmful data: explicit content and malicious intent",
    "OTHER": "safety-related, none of the three",
    "BENIGN": "no safety risk (helpfulness data)",
}


def size_category(n: int) -> str:
    """One of the ``size_categories`` values the Hub accepts."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
    for bound, label in bounds:
        if n < bound:
            return label
    return "n>1T" if n >= 10**12 else "1B<n<10B"


def card_front_matter(manifest: dict[str, Any]) -> dict[str, Any]:
    shards = manifest["shards"]
    data = [s for s in shards if s["split"] in ("train", "eval")]
    configs = []
    if data:
        configs.append({"config_name": "default", "default": True,
                        "data_files": [{"split": split, "path": f"data/{split}-*.parquet"}
                                       for split in ("train", "eval") if any(s["split"] == split for s in data)]})
    for group in GROUPS:
        files = [s for s in data if s.get("group") == group]
        if files:
            configs.append({"config_name": group, "data_files": [
                {"split": split, "path": [s["path"] for s in files if s["split"] == split]}
                for split in ("train", "eval") if any(s["split"] == split for s in files)]})
    configs.append({"config_name": "pool", "data_files": [{"split": "train", "path": "pool/pool-*.parquet"}]}
                   if data else {"config_name": "pool", "default": True,
                                 "data_files": [{"split": "train", "path": "pool/pool-*.parquet"}]})
    total = manifest["accounting"]["pooled"]
    return {
        "license": manifest["config"].get("license", "other"),
        "language": ["en"],
        "task_categories": ["text-generation"],
        "tags": ["safety", "preference", "dpo", "equi"],
        "pretty_name": "equi safety mixture",
        "size_categories": [size_category(total)],
        "configs": configs,
    }


def render_card(manifest: dict[str, Any]) -> str:
    front = yaml.safe_dump(card_front_matter(manifest), sort_keys=False, allow_unicode=True)
    acc = manifest["accounting"]
    counts = manifest["counts"]
    cfg = manifest["config"]
    lines = ["---", front.rstrip(), "---", "", "# equi safety mixture", "",
             f"Built by `equi curate` (equi {manifest['equi_version']}, schema {manifest['schema_version']}) on "
             f"{manifest['created_at']}; config hash `{manifest['config_hash']}`.", "",
             "## Groups", ""]
    lines += [f"- **{g}**: {GROUP_MEANING[g]}" for g in GROUPS]
    lines += ["", "## Counts", "", "| group | pool | mixture train | mixture eval |", "|---|---:|---:|---:|"]
    for g in GROUPS:
        mix = counts["mixture"].get(g, {})
        lines.append(f"| {g} | {counts['pool'].get(g, 0)} | {mix.get('train', 0)} | {mix.get('eval', 0)} |")
    ratio_text = ", ".join(f"{g}={v:g}" for g, v in cfg["ratios"].items())
    lines += ["", "## How it was built", "",
              f"- Inputs: {len(manifest['inputs'])} file(s), {acc['input_lines']} lines; "
              f"{acc['rejected']} rejected (see `rejects.jsonl`), {acc['pooled']} in the pool.",
              f"- Embeddings: `{manifest['embedder']}`; {manifest['clusters']} MiniBatchKMeans clusters.",
              f"- Groups from explicit-content and intent scores (categoriser `{manifest['categoriser']}`); "
              "labels carried by the input (`category`, `is_safe`, `severity`) are kept.",
              f"- FDC mixture: safety ratios {ratio_text}, BENIGN share {cfg['benign_share']}, near-duplicate "
              f"prompts (cosine ≥ {cfg['dup_threshold']}) removed, selection round-robin over clusters, seed "
              f"{cfg['seed']}. `rank` orders the mixture so that every prefix keeps the ratios.",
              f"- Not selected ({sum(acc['not_selected'].values())} pool rows): "
              + (", ".join(f"{k} {v}" for k, v in acc["not_selected"].items()) or "none") + ".",
              "", "## Sources", ""]
    for item in manifest["inputs"]:
        lines.append(f"- `{item['path']}` — {item['lines']} lines, sha256 `{item['sha256'] or 'n/a (stdin)'}`")
    lines += ["", "The licences of the source datasets apply to their rows; see each source's own card.",
              "", "## Limitations", "",
              "- Groups, severities, refusal probabilities and costs are estimated automatically (heuristics, "
              "embeddings and a small fitted head) unless the input carried labels; expect noise, "
              "especially between IHD and MHD.",
              "- Single responses are paired by cost; two equally safe responses to a prompt make no pair.",
              "- AMA spans are sentence-level heuristics, not human annotations."]
    if manifest.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in manifest["warnings"]]
    return "\n".join(lines) + "\n"
