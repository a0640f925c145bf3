"""``equi curate``: raw JSONL → categorised pool → FDC mixture, written atomically as a mix directory.

The flow, with bounded memory (only the embeddings matrix and slim metadata grow with the input):

1. read lines in batches (rejects stream to ``rejects.jsonl``) and score each batch with small
   step functions (:mod:`curation.steps`: embed, categorise, refusal, cost, AMA spans) into staged
   Parquet (:mod:`curation.staging`), on the engine the config names (:mod:`curation.engine_local`,
   :mod:`curation.engine_ray`);
2. cluster the prompt embeddings, then stream the staged rows into the pool shards with a
   ``cluster`` column;
3. choose the mixture from pool metadata (:mod:`curation.mixer`) and write it, one group per shard;
4. write the manifest (with balanced accounting) and the data card; rename the directory into place.

This module only drives the stage: the load of the models, the run's fingerprint, the manifest and card.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from equi.config import CurateConfig, config_hash
from equi.manifest import (check_writable, equi_version, file_checksums, resumable_directory, sha256_file,
                           shard_entry, utc_now, write_json_atomic)
from equi.schema import CARD, DATA_DIR, GROUPS, MANIFEST, POOL_DIR, REJECTS, SCHEMA_VERSION

from curation.card import render_card
from curation.cluster import choose_k, fit_assign_clusters
from curation.engine_local import read_and_score
from curation.engine_ray import read_and_score_ray
from curation.mixer import select_mixture
from curation.readers import InputError
from curation.staging import build_mixture_rows, write_mixture, write_pool
from curation.steps import load_models


@dataclass
class CurateResult:
    out: Path
    manifest: dict
    warnings: list[str] = field(default_factory=list)
    resumed_batches: int = 0  # batches read back from an interrupted run instead of scored again


def curate(config: CurateConfig, embedder=None, categoriser=None) -> CurateResult:
    """Run the whole curation stage for ``config``; returns the written mix's manifest."""
    clock = _Laps()
    check_writable(config.out, config.overwrite, _read_paths(config))  # before the models' load, not after it
    files = input_files(config)
    given_embedder = embedder
    embedder, categoriser = load_models(config, embedder, categoriser)
    clock.lap("load_models")
    # A Ray run is not resumed: its actors score the whole input again.
    fingerprint = run_fingerprint(config, embedder, files) if config.resume and config.engine == "local" else None
    with resumable_directory(config.out, fingerprint, overwrite=config.overwrite, inputs=_read_paths(config)) as run:
        work = run.path
        if config.engine == "ray":
            scored = read_and_score_ray(config, work, embedder, categoriser)
        else:
            scored = read_and_score(config, work, embedder, categoriser, resume=run.resumed,
                                    given_embedder=given_embedder)
        clock.lap("read_and_score")
        k = min(config.clusters or choose_k(scored.n_rows), max(scored.n_rows, 1))
        clusters = fit_assign_clusters(scored.embeddings, k, config.seed)
        clock.lap("cluster")
        for leftover in (POOL_DIR, DATA_DIR):  # from an interrupted run that got past pass 1
            shutil.rmtree(work / leftover, ignore_errors=True)
        multimodal = scored.multimodal
        pool_files = write_pool(scored.stage_files, clusters, work / POOL_DIR, config, multimodal)
        clock.lap("write_pool")
        meta = scored.meta.with_columns(pl.Series("cluster", clusters, pl.Int32))
        selection = select_mixture(meta, scored.embeddings, ratios=config.ratios, size=config.size,
                                   benign_share=config.benign_share, dup_threshold=config.dup_threshold,
                                   seed=config.seed, order=config.order)
        scored.embeddings = None  # the largest thing held, and no longer needed
        mixture = build_mixture_rows(scored.stage_files, selection.mixture, config.eval_fraction,
                                     interleave=config.order == "fdc")
        data_files = write_mixture(work / DATA_DIR, mixture, config.shard_rows, multimodal)
        scored.remove_stage()
        unchanged_since_start(files)
        clock.lap("mix")
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "equi_version": equi_version(),
            "created_at": utc_now(),
            "config": config.to_dict(),
            "config_hash": _config_hash(config),
            "embedder": embedder.name,
            "embedder_device": embedder_device(embedder),
            "categoriser": config.categoriser or "bundled",
            # which labeller made each pooled row's group: the heads, the --judge, or the heads where the judge's
            # answer could not be parsed; and what gave prompt harm and answer costs: the heads or the --guard-model
            "labellers": {"judge": config.judge, "group": _labeller_counts(meta["group_labeller"].to_list()),
                          "guard": config.guard_model, "harm_and_cost": "guard" if config.guard_model else "heads"},
            "clusters": int(k),
            "multimodal": multimodal,  # image columns present (some row has an image)
            "inputs": [{"path": name, "sha256": files[name]["sha256"] if name in files else None, "lines": lines}
                       for name, lines in scored.stats.lines_by_file.items()],
            "shards": [shard_entry(work, p, rows, "pool") for p, rows, _ in pool_files]
            + [shard_entry(work, p, rows, split, group) for p, rows, (split, group) in data_files],
            "counts": {"pool": _count(meta["group"].to_list()), "mixture": _count_by_split(mixture)},
            "ratios": {"requested": config.ratios, "effective": selection.effective_ratios},
            "accounting": {
                "input_lines": sum(scored.stats.lines_by_file.values()),
                "pooled": scored.n_rows,
                "rejected": scored.n_rejected,
                # A pair of single responses uses two pool rows.
                "mixed": selection.mixture.height + int(selection.mixture["rejected_idx"].is_not_null().sum()),
                "mixture_rows": mixture.height,
                "not_selected": selection.reason_counts(),
            },
            "warnings": selection.warnings + ([] if mixture.height else
                                              ["the mixture is empty: no usable preference pairs in the input"]),
            # Wall-clock seconds per phase (manifest and card writing excluded); read_and_score includes encoding.
            "timings_s": clock.laps,
        }
        # Card first, then the manifest with the card's and rejects' sha256 (the card never needs the manifest's).
        (work / CARD).write_text(render_card(manifest, work), encoding="utf-8")
        manifest["files"] = file_checksums(work, [CARD, REJECTS])
        write_json_atomic(work / MANIFEST, manifest)
    return CurateResult(out=Path(config.out), manifest=manifest, warnings=manifest["warnings"],
                        resumed_batches=scored.resumed_batches)


#: Config fields that do not change what a run writes. ``device`` changes the vectors' last digits, but the device
#: a run resolved to is part of the embedder's identity (:func:`curation.embed.device_tag`), which the resume
#: fingerprint and the embedding cache key on; ``auto`` alone would not say which device a run used.
_NOT_OUTPUT_DEFINING = ("out", "overwrite", "quiet", "resume", "engine", "ray_address", "workers", "device")


def embedder_device(embedder) -> str:
    """The torch device type the run's encoder ran on (``cpu`` for the static embedder and other numpy encoders)."""
    inner = getattr(embedder, "embedder", embedder)  # behind the embedding cache
    model = getattr(inner, "model", None)
    device = getattr(model, "device", None)
    return getattr(device, "type", None) or "cpu"


def _config_hash(config: CurateConfig) -> str:
    return config_hash({k: v for k, v in config.to_dict().items() if k not in _NOT_OUTPUT_DEFINING})


def _read_paths(config: CurateConfig) -> list[str]:
    """Every file the run reads: the inputs (``-`` for stdin) and a given categoriser."""
    return list(config.inputs) + ([config.categoriser] if config.categoriser else [])


def input_files(config: CurateConfig) -> dict[str, dict]:
    """Every file the run reads (not stdin), as given → its sha256, size and modification time, taken once at
    the start: the resume fingerprint and the manifest record these, and :func:`unchanged_since_start` checks
    at the end that no file changed while it was read (its checksum would then describe another file)."""
    files = {}
    for name in _read_paths(config):
        if name != "-":
            stat = Path(name).stat()
            files[name] = {"sha256": sha256_file(name), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return files


def unchanged_since_start(files: dict[str, dict]) -> None:
    for name, seen in files.items():
        stat = Path(name).stat()
        if (stat.st_size, stat.st_mtime_ns) != (seen["size"], seen["mtime_ns"]):
            raise InputError(f"{name} changed while it was being curated; run again once it is complete "
                             "(nothing was written)")


def run_fingerprint(config: CurateConfig, embedder, files: dict[str, dict]) -> dict | None:
    """What an interrupted run must share with this one to be resumed; ``None`` (never resume) for stdin.

    Inputs are identified by content (sha256): an input edited in place with its size and time kept must not
    reuse the batches staged from its old content.
    """
    if "-" in config.inputs:
        return None
    return {
        "equi_version": equi_version(),
        "config_hash": _config_hash(config),
        "embedder": getattr(embedder, "identity", embedder.name),
        "files": [{"path": str(Path(name).resolve()), "sha256": files[name]["sha256"]} for name in files],
    }


class _Laps:
    """Wall-clock seconds of consecutive phases, rounded to 0.1 s."""

    def __init__(self):
        self._now = time.perf_counter
        self._last = self._now()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = self._now()
        self.laps[name] = round(now - self._last, 1)
        self._last = now


def _labeller_counts(labellers: list[str]) -> dict[str, int]:
    return {name: labellers.count(name) for name in sorted(set(labellers))}


def _count(groups: list[str]) -> dict[str, int]:
    return {g: groups.count(g) for g in GROUPS if g in groups}


def _count_by_split(mixture: pl.DataFrame) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for group, split, n in mixture.group_by(["group", "split"]).len().iter_rows() if mixture.height else []:
        counts.setdefault(group, {})[split] = n
    return counts
