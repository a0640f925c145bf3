"""The mix's data card: a ``huggingface_hub.DatasetCard`` (YAML metadata from ``DatasetCardData``, then prose).

The YAML declares a ``default`` config (the mixture's train/test shards, rows in ``rank`` order, so
``split="train[:10%]"`` is a balanced subset) and a ``pool`` config, so ``datasets.load_dataset("mix/", name)``
works for each (one group: ``.filter(lambda row: row["group"] == "EHD")``). Beside the configs it carries the
Hub's dataset metadata: the licence (with ``license_name``/``license_link`` when it is ``other``), the
``source_datasets`` the rows came from, ``dataset_info`` with each config's split sizes (``datasets`` checks
them when it loads the mix), and the ``size_categories`` of what the default config serves (the mixture).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from equi.schema import GROUPS, SPLITS

#: ``license_name``/``license_link`` written when the licence is ``other``: the mix holds rows of several
#: sources, each under its own licence, listed in the card's "Licences" section (the link's target).
OTHER_LICENSE_NAME = "equi-mixture-of-source-licences"
OTHER_LICENSE_LINK = "README.md#licences"
_FILE_SUFFIXES = {".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".gz", ".zst", ".arrow"}

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


def card_configs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``configs`` section: ``equi verify`` checks that the default one serves exactly the mixture shards."""
    shards = manifest["shards"]
    data = [s for s in shards if s["split"] in SPLITS]
    configs = []
    if data:
        configs.append({"config_name": "default", "default": True,
                        "data_files": [{"split": split, "path": f"data/{split}-*.parquet"}
                                       for split in SPLITS if any(s["split"] == split for s in data)]})
    configs.append({"config_name": "pool", "data_files": [{"split": "train", "path": "pool/pool-*.parquet"}]}
                   if data else {"config_name": "pool", "default": True,
                                 "data_files": [{"split": "train", "path": "pool/pool-*.parquet"}]})
    return configs


def dataset_info(manifest: dict[str, Any], root: str | Path | None = None) -> list[dict[str, Any]]:
    """``dataset_info`` per config, in the order of :func:`card_configs`: each split's ``num_examples`` from the
    manifest's shard rows and, when ``root`` holds the shards, ``num_bytes`` (their uncompressed size, which
    ``datasets`` needs to read the entry at all); no ``features``: the Parquet schema is the source of truth."""
    shards = manifest["shards"]

    def size(shard: dict[str, Any]) -> int | None:
        import pyarrow.parquet as pq

        path = Path(root) / shard["path"] if root is not None else None
        if path is None or not path.is_file():
            return None
        meta = pq.ParquetFile(path).metadata
        return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))

    def splits(selected: list[dict[str, Any]], names: tuple[str, ...]) -> list[dict[str, Any]]:
        out = []
        for name in names:
            files = [s for s in selected if s["split"] == name]
            if files:
                sizes = [size(s) for s in files]
                out.append({"name": name, "num_examples": sum(int(s["rows"]) for s in files),
                            **({"num_bytes": sum(sizes)} if None not in sizes else {})})
        return out

    data = [s for s in shards if s["split"] in SPLITS]
    pool = [s for s in shards if s["split"] == "pool"]
    infos = []
    if data:
        infos.append({"config_name": "default", "splits": splits(data, SPLITS)})
    infos.append({"config_name": "pool",  # the pool's shards are served as the pool config's train split
                  "splits": [{**split, "name": "train"} for split in splits(pool, ("pool",))]})
    return infos


def served_rows(manifest: dict[str, Any]) -> int:
    """Rows the default config serves: the mixture (train + test), or the pool when the mixture is empty."""
    data = [int(s["rows"]) for s in manifest["shards"] if s["split"] in SPLITS]
    if data:
        return sum(data)
    return sum(int(s["rows"]) for s in manifest["shards"] if s["split"] == "pool")


def source_datasets(manifest: dict[str, Any], root: str | Path | None = None) -> list[str]:
    """The sources the mix's rows came from: the distinct ``source`` values of its shards (a row's own
    ``source`` field, else the input file it was read from) when ``root`` holds them, else the inputs' names."""
    found: set[str] = set()
    if root is not None:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        for shard in manifest["shards"]:
            path = Path(root) / shard["path"]
            if path.is_file() and "source" in pq.read_schema(path).names:
                column = pq.read_table(path, columns=["source"]).column("source")
                found.update(_source_name(v) for v in pc.unique(column).to_pylist() if isinstance(v, str) and v)
    if not found:
        found = {Path(item["path"]).name for item in manifest.get("inputs", []) if item.get("path")}
    return sorted(found)


def _source_name(source: str) -> str:
    """A row's ``source`` as the card names it: an input file by its name alone (no local path in the card), a
    dataset id (``owner/name``) or a label as given."""
    path = PurePosixPath(source.replace("\\", "/"))
    if path.is_absolute() or path.suffix.lower() in _FILE_SUFFIXES or source.endswith(".gz"):
        return path.name
    return source


def card_data(manifest: dict[str, Any], root: str | Path | None = None):
    """The card's metadata as ``huggingface_hub.DatasetCardData``."""
    from huggingface_hub import DatasetCardData

    license_id = manifest["config"].get("license", "other") or "other"
    extra: dict[str, Any] = {}
    if license_id == "other":
        extra = {"license_name": OTHER_LICENSE_NAME, "license_link": OTHER_LICENSE_LINK}
    return DatasetCardData(
        license=license_id,
        **extra,
        language=["en"],
        task_categories=["text-generation"],
        tags=["safety", "preference", "dpo", "equi"],
        pretty_name="equi safety mixture",
        size_categories=[size_category(served_rows(manifest))],
        source_datasets=source_datasets(manifest, root),
        configs=card_configs(manifest),
        dataset_info=dataset_info(manifest, root),
    )


def card_front_matter(manifest: dict[str, Any], root: str | Path | None = None) -> dict[str, Any]:
    """The card's YAML metadata as a plain dict (what the Hub and ``datasets`` read)."""
    return card_data(manifest, root).to_dict()


def _judge_line(manifest: dict[str, Any]) -> str:
    """What ``--guard-model`` and ``--judge`` decided, from the manifest's ``labellers`` (empty without them)."""
    labellers = manifest.get("labellers") or {}
    line = ""
    if labellers.get("guard"):
        line += (f" Prompt harm (BENIGN below 0.5) and answer costs (2·P(unsafe) − 1) by the guard "
                 f"`{labellers['guard']}`; refusal scores by equi's detector.")
    if labellers.get("judge"):
        counts = labellers.get("group", {})
        line += (f" EHD/IHD/MHD re-decided by the judge `{labellers['judge']}` (Equilibrate's prompt) for "
                 f"{counts.get('judge', 0)} rows; {counts.get('heads (judge unparseable)', 0)} judge answers could "
                 "not be parsed and kept the heads' group.")
    return line


def render_card(manifest: dict[str, Any], root: str | Path | None = None) -> str:
    """The card's text. ``root``: the mix directory being written, read for the rows' sources (optional)."""
    from huggingface_hub import DatasetCard

    data = card_data(manifest, root)
    acc = manifest["accounting"]
    counts = manifest["counts"]
    cfg = manifest["config"]
    lines = ["# equi safety mixture", "",
             f"Built by `equi curate` (equi {manifest['equi_version']}, schema {manifest['schema_version']}) on "
             f"{manifest['created_at']}; config hash `{manifest['config_hash']}`.", "",
             "## Groups", ""]
    lines += [f"- **{g}**: {GROUP_MEANING[g]}" for g in GROUPS]
    lines += ["", "## Counts", "", "| group | pool | mixture train | mixture test |", "|---|---:|---:|---:|"]
    for g in GROUPS:
        mix = counts["mixture"].get(g, {})
        lines.append(f"| {g} | {counts['pool'].get(g, 0)} | {mix.get('train', 0)} | {mix.get('test', 0)} |")
    ratio_text = ", ".join(f"{g}={v:g}" for g, v in cfg["ratios"].items())
    lines += ["", "## How it was built", "",
              f"- Inputs: {len(manifest['inputs'])} file(s), {acc['input_lines']} lines; "
              f"{acc['rejected']} rejected (see `rejects.jsonl`), {acc['pooled']} in the pool.",
              f"- Embeddings: `{manifest['embedder']}` (on {manifest.get('embedder_device', 'cpu')}); "
              f"{manifest['clusters']} MiniBatchKMeans clusters over the distinct prompt embeddings.",
              f"- Groups from explicit-content and intent scores (categoriser `{manifest['categoriser']}`); "
              "labels carried by the input (`category`, `is_safe`, `severity`) are kept." + _judge_line(manifest),
              f"- FDC mixture: safety ratios {ratio_text}, BENIGN share {cfg['benign_share']}, near-duplicate "
              f"prompts (cosine ≥ {cfg['dup_threshold']}) removed, selection round-robin over clusters, seed "
              f"{cfg['seed']}. `rank` orders the mixture so that every prefix keeps the ratios.",
              f"- Not selected ({sum(acc['not_selected'].values())} pool rows): "
              + (", ".join(f"{k} {v}" for k, v in acc["not_selected"].items()) or "none") + ".",
              "", "## Using it", "",
              "Rows are in TRL's conversational preference format (`prompt`, `chosen`, `rejected` as lists of "
              "`{role, content}` messages), splits `train` and `test`, so `load_dataset(\"path/to/mix\")` trains "
              "with plain TRL (`DPOTrainer`, `trl dpo --dataset_name path/to/mix`). Shards are in `rank` order: "
              "`split=\"train[:10%]\"` keeps the group ratios. One group: "
              "`.filter(lambda row: row[\"group\"] == \"EHD\")`; every categorised input row: the `pool` config.",
              "", "## Sources", ""]
    for item in manifest["inputs"]:
        lines.append(f"- `{item['path']}` — {item['lines']} lines, sha256 `{item['sha256'] or 'n/a (stdin)'}`")
    lines += ["", "Row sources (`source_datasets`, from each row's `source` field): "
              + (", ".join(f"`{s}`" for s in data.source_datasets) or "none") + ".",
              "", "## Licences", "",
              f"Licence: `{data.license}`"
              + (f" (`{data.license_name}`): no single licence covers the mix." if data.get("license_name") else ".")
              + " The licences of the source datasets apply to their rows; see each source's own card.",
              "", "## Limitations", "",
              "- Groups, severities, refusal probabilities and costs are estimated automatically (heuristics, "
              "embeddings and a small fitted head) unless the input carried labels; expect noise, "
              "especially between IHD and MHD.",
              "- Single responses are paired by cost; two equally safe responses to a prompt make no pair.",
              "- AMA spans are sentence-level heuristics, not human annotations."]
    if manifest.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in manifest["warnings"]]
    return str(DatasetCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines) + "\n"))
