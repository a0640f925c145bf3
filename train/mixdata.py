"""Reading a mix (``shared/design/mix-contract.md``): verify it, then load a split as a ``datasets.Dataset``.

Rows are read from the Parquet shards through ``datasets`` (Arrow, memory-mapped), never copied into pandas.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from equi.errors import UsageError
from equi.manifest import MixVerificationError, sha256_file, verify_mix
from equi.messages import answer_text, prompt_text
from equi.schema import DATA_DIR, IMAGE_COLUMNS, MANIFEST, MIX_SCHEMA, TEST_SPLIT, check_row_schema
from train.config import TrainConfig


class MixError(UsageError):
    """The mix is missing, incomplete, tampered with or unusable for the chosen algorithm (one-line message)."""


def read_manifest(mix_dir: str | Path) -> dict[str, Any]:
    path = Path(mix_dir) / MANIFEST
    if not path.is_file():
        raise MixError(f"{mix_dir} is not a mix: {MANIFEST} is missing (was `equi curate` interrupted?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MixError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise MixError(f"{path} has no 'shards' list")
    return manifest


def manifest_hash(mix_dir: str | Path) -> str:
    """Hash of ``manifest.json``: it names every shard's sha256, so it identifies the mix's exact rows."""
    return sha256_file(Path(mix_dir) / MANIFEST)[:16]


def verify_mix_or_raise(mix_dir: str | Path) -> dict[str, Any]:
    """Refuse a tampered or incomplete mix with a one-line error; return the manifest."""
    if not (Path(mix_dir) / MANIFEST).is_file():
        read_manifest(mix_dir)  # no manifest: bad input, named by read_manifest
    problems = verify_mix(mix_dir)  # the one definition of a sound mix, shared with `equi verify`
    if problems:  # checked before the manifest is used, so a malformed entry is a failed verification
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise MixVerificationError(problems, f"mix {mix_dir} failed verification: {problems[0]}{more}")
    return read_manifest(mix_dir)


def split_shards(mix_dir: str | Path, manifest: dict[str, Any], split: str) -> list[str]:
    """The mixture shards of one split (``train``/``test``), from the manifest, in order."""
    paths = [
        str(Path(mix_dir) / s["path"])
        for s in manifest["shards"]
        if s.get("split") == split and str(s.get("path", "")).startswith(DATA_DIR + "/")
    ]
    return sorted(paths)


@dataclass
class LoadedSplit:
    """A split of the mix after selection, with an account of every row left out and why."""

    dataset: Any  # datasets.Dataset
    total_rows: int
    dropped: dict[str, int] = field(default_factory=dict)

    def group_sizes(self) -> dict[str, int]:
        """``n_safety`` (EHD, IHD, MHD, OTHER rows) and ``n_benign``: where ``equi report`` puts the run on its curves."""
        return group_sizes(self.dataset)


def group_sizes(dataset) -> dict[str, int]:
    """``n_safety`` and ``n_benign`` of any dataset with a ``group`` column (e.g. a trainer's, after TRL dropped
    the pairs whose prompt alone is longer than ``--max-length``)."""
    groups = dataset["group"] if len(dataset) and "group" in dataset.column_names else []
    n_benign = sum(1 for g in groups if g == "BENIGN")
    return {"n_safety": len(groups) - n_benign, "n_benign": n_benign}


def load_split(
    mix_dir: str | Path,
    split: str = "train",
    scale: int | None = None,
    groups: list[str] | None = None,
    need_pairs: bool = True,
    manifest: dict[str, Any] | None = None,
    skip_images: bool = False,
) -> LoadedSplit:
    """Load one split of a verified mix, keep ``rank < scale`` and ``group in groups``.

    ``need_pairs`` drops rows without both ``chosen`` and ``rejected`` (the counts go in ``dropped``).
    Rows with an ``image`` are refused (models trained here are text-only) unless ``skip_images`` drops them.
    Returns an empty dataset (not an error) when a split has no shards, so callers decide what that means.
    """
    import datasets

    manifest = manifest if manifest is not None else read_manifest(mix_dir)
    files = split_shards(mix_dir, manifest, split)
    if not files:
        empty = datasets.Dataset.from_dict({name: [] for name in MIX_SCHEMA.names})
        return LoadedSplit(empty, 0)
    dataset = datasets.load_dataset("parquet", data_files={split: files}, split=split)
    mismatch = check_row_schema(dataset.data.schema, mixture=True)
    if mismatch:
        raise MixError(f"mix {mix_dir} {split} shards do not follow the contract: {mismatch}")
    total = len(dataset)
    dropped: dict[str, int] = {}

    def keep(predicate, reason: str):
        nonlocal dataset
        before = len(dataset)
        dataset = dataset.filter(predicate, batched=True)
        if before - len(dataset):
            dropped[reason] = before - len(dataset)

    if scale is not None:
        keep(lambda batch: [r is not None and r < scale for r in batch["rank"]], f"rank >= scale {scale}")
    if groups is not None:
        allowed = set(groups)
        keep(lambda batch: [g in allowed for g in batch["group"]], f"group not in {','.join(groups)}")
    if "image" in dataset.column_names:  # a multimodal mix
        n_images = sum(1 for image in dataset["image"] if image is not None)
        if n_images and not skip_images:
            raise MixError(f"mix {mix_dir} has {n_images} {split} row(s) with an image; equi trains text-only "
                           "models: pass --skip-images to drop them")
        if n_images:
            keep(lambda batch: [i is None for i in batch["image"]], "image row (text-only model)")
        # TRL takes any dataset with an `image` column for a vision dataset, even an all-null one.
        dataset = dataset.remove_columns(list(IMAGE_COLUMNS))
    if need_pairs:
        keep(
            lambda batch: [bool(c) and bool(r) for c, r in zip(batch["chosen"], batch["rejected"])],
            "no chosen/rejected pair",
        )
    return LoadedSplit(dataset, total, dropped)


def as_messages(value: Any, role: str) -> list[dict[str, str]]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def chat_format(dataset, tokenizer, columns: tuple[str, ...] = ("prompt", "chosen", "rejected")):
    """Rows as ``tokenizer`` can take them. A mix's rows are TRL's conversational messages, which TRL renders with
    the chat template; a tokenizer without one gets plain text instead (the prompt's turns rendered
    ``Human: …\n\nAssistant: …``, each answer its content). Rows of plain strings (a dataset of one's own) get
    messages when the tokenizer has a template, so an instruct model always sees its chat format."""
    present = [c for c in columns if c in dataset.column_names]
    if not len(dataset) or not present:
        return dataset
    conversational = isinstance(dataset[0][present[0]], list)
    if bool(tokenizer.chat_template) == conversational:
        return dataset
    if conversational:
        return dataset.map(lambda row: {c: prompt_text(row[c]) if c == "prompt" else answer_text(row[c])
                                        for c in present},
                           desc="Rendering conversations as text (the tokenizer has no chat template)")
    return dataset.map(lambda row: {c: as_messages(row[c], "user" if c == "prompt" else "assistant")
                                    for c in present}, desc="Chat-formatting rows")


def load_pairs(config: TrainConfig, manifest: dict[str, Any]) -> tuple[LoadedSplit, LoadedSplit]:
    """The train and test pairs of the mix after ``--scale`` / ``--groups``; a one-line error when none are left."""
    train = load_split(config.mix, "train", config.scale, config.groups, need_pairs=True, manifest=manifest,
                       skip_images=config.skip_images)
    if len(train.dataset) == 0:
        why = ", ".join(f"{n} {reason}" for reason, n in train.dropped.items()) or "the split is empty"
        raise MixError(f"mix {config.mix} has no preference pairs to train {config.algo} on ({why})")
    evaluation = load_split(config.mix, TEST_SPLIT, None, config.groups, need_pairs=True, manifest=manifest,
                            skip_images=config.skip_images)
    return train, evaluation
