"""Config dataclasses for the curation stage, TRL style: one dataclass, validated in ``__post_init__``.

The config is written into every artifact it made (``manifest.json``) together with its hash, so a
mix says exactly how it was built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from equi.errors import UsageError
from equi.schema import SAFETY_GROUPS

DEFAULT_RATIOS: dict[str, float] = {"EHD": 10.0, "IHD": 3.0, "MHD": 1.0}
INPUT_FORMATS = ("auto", "pair", "conversation", "hh", "single", "prompt")
ENGINES = ("local", "ray")
#: ``--order``: ``fdc`` a group-balanced mixture; ``input`` every pair as it comes (the naive baseline).
MIX_ORDERS = ("fdc", "input")
#: Default ``--max-line-bytes``: a longer input line is rejected unparsed (one 50 MB line took minutes and 10 GB).
DEFAULT_MAX_LINE_BYTES = 1 << 20


class ConfigError(UsageError):
    """A config value a user can fix; the message says how."""


def parse_ratios(text: str) -> dict[str, float]:
    """Parse ``"EHD=10,IHD=3,MHD=1"`` into ``{"EHD": 10.0, ...}``."""
    ratios: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip().upper()
        if not sep or name not in SAFETY_GROUPS:
            raise ConfigError(
                f"bad ratio {part!r}: expected GROUP=NUMBER with GROUP in {', '.join(SAFETY_GROUPS)}"
            )
        try:
            ratios[name] = float(value)
        except ValueError:
            raise ConfigError(f"bad ratio {part!r}: {value!r} is not a number") from None
    return ratios


def _refuse_repeated_inputs(inputs: list[str]) -> None:
    """An input named twice (an overlapping glob, ``- -``) would be read twice while the manifest counts its lines
    once, and the accounting would not balance: refused."""
    seen: dict[str, str] = {}
    for path in inputs:
        key = path if path == "-" else os.path.realpath(path)
        if key in seen:
            raise ConfigError(f"input {path!r} is given twice: name each input once" if seen[key] == path else
                              f"inputs {seen[key]!r} and {path!r} are the same file: name each input once")
        seen[key] = path


def config_hash(config: Any) -> str:
    """A short, stable hash of a config dataclass (or dict): what defines an artifact."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


#: ``--device`` values: ``auto`` (CUDA when torch sees a device, else the CPU), or a torch device.
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"


def valid_device(device: str | None) -> bool:
    """Whether ``device`` names a device ``--device`` takes (:data:`DEVICE_HELP`); None means ``auto``."""
    if device in (None, "auto", "cpu", "cuda", "mps"):
        return True
    kind, _, index = str(device).partition(":")
    return kind == "cuda" and index.isdigit()


@dataclass
class CurateConfig:
    """Everything ``equi curate`` needs to turn raw JSONL into a mix.

    Reading:
        inputs: JSONL files (``.jsonl``/``.jsonl.gz``) or ``-`` for stdin.
        input_format: force one input shape (see the contract); ``auto`` detects it per line.
        strict: stop at the first bad line instead of writing it to ``rejects.jsonl``.
        max_line_bytes: a line longer than this (in bytes, its newline not counted) is rejected without being
            parsed, and only its first 1,000 characters go to ``rejects.jsonl``: one huge line costs no more
            than reading past it.
    Categorising:
        embedder: sentence-transformers model name or path; ``None`` = the bundled all-MiniLM-L6-v2.
        device: where the encoder, the judge and the guard model run: ``auto`` (a CUDA GPU when torch sees one,
            else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. Vectors differ in their last digits between
            devices, so the embedding cache and a resume keep each device's apart (the judge's and guard's answer
            caches too). The static embedder always runs on the CPU.
        embedding_cache: reuse prompt embeddings cached by (embedder, text hash) under ``$EQUI_CACHE``
            (default ``~/.cache/equi``), so a re-run embeds only new texts.
        categoriser: fitted categoriser parameters (``equi fit-categoriser``); ``None`` = the bundled one.
        judge: a causal LM (hub id or path) that re-decides EHD/IHD/MHD (:mod:`curation.judge`); ``None`` = heads only.
        guard_model: a Llama-Guard-style causal LM or a sequence-classification guard (hub id or path) that gives
            each prompt's harm and each answer's cost (:mod:`curation.guard_labels`); ``None`` = the heads.
        clusters: number of embedding clusters; ``None`` = chosen from the data size.
        dup_threshold: cosine similarity above which two prompts count as near-duplicates.
        batch_size: rows per processing batch (bounded memory).
        workers: processes that each take whole batches (parse, embed, score, stage) with their own encoder
            and one torch thread per core they get; 1 = everything in this process (the encoder in a thread
            beside the heuristics). The output is the same for any number. On 2 cores 2 pays with
            ``--embedder static`` but not with MiniLM (two single-threaded encoders lose to one two-threaded one,
            and each worker holds its own model); on more cores, use one per core.
    Running:
        engine: ``local`` scores in this process; ``ray`` scores the batches on a Ray cluster's actor pool
            (``pip install 'equi[ray]'``) and gives the same mix. Not part of the config hash.
        ray_address: the Ray cluster to join (``ray.init(address=...)``); ``None`` = ``$RAY_ADDRESS`` or a
            local Ray instance. Not part of the config hash.
    Mixing (FDC):
        size: target number of safety pairs in the mixture; ``None`` = all that the ratios allow.
        ratios: group ratios of the safety part, default EHD:IHD:MHD = 10:3:1 (Equilibrate RLHF).
        benign_share: share of BENIGN (helpfulness) pairs in the final mixture, 0-1.
        eval_fraction: share of the mixture held out as the ``test`` split.
        seed: random seed for every random choice.
        order: ``fdc`` (the mixer above) or ``input``: every de-duplicated pair of any group, ranked in input
            order, ``size`` capping the number of pairs; no ratios, no BENIGN share (the naive baseline that a
            group-balanced mixture is compared with).
    Writing:
        out: the mix directory (appears atomically).
        overwrite: replace an existing ``out``.
        resume: pick up an interrupted run of the same command (same config, inputs and models), kept in
            ``.{out}.partial`` beside ``out``; the result is byte-identical to an uninterrupted run.
        shard_rows: rows per Parquet shard.
        license: licence identifier written into the data card (the sources' licences apply).
    """

    inputs: list[str]
    out: str
    input_format: str = "auto"
    strict: bool = False
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    embedder: str | None = None
    device: str = "auto"
    categoriser: str | None = None
    judge: str | None = None
    guard_model: str | None = None
    embedding_cache: bool = True
    clusters: int | None = None
    dup_threshold: float = 0.95
    batch_size: int = 4096
    workers: int = 1
    size: int | None = None
    ratios: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RATIOS))
    benign_share: float = 0.2
    eval_fraction: float = 0.05
    seed: int = 0
    order: str = "fdc"
    overwrite: bool = False
    resume: bool = True
    shard_rows: int = 50_000
    license: str = "other"
    quiet: bool = False
    engine: str = "local"
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("no input given: pass one or more JSONL files, or - for stdin")
        self.inputs = [str(p) for p in self.inputs]
        _refuse_repeated_inputs(self.inputs)
        self.out = str(self.out)
        if self.input_format not in INPUT_FORMATS:
            raise ConfigError(f"unknown --format {self.input_format!r}; choose one of {', '.join(INPUT_FORMATS)}")
        if not valid_device(self.device):
            raise ConfigError(f"unknown --device {self.device!r}; choose one of {DEVICE_HELP}")
        if self.max_line_bytes < 1:
            raise ConfigError("--max-line-bytes must be at least 1")
        if self.clusters is not None and self.clusters < 1:
            raise ConfigError("--clusters must be at least 1")
        if not 0.0 < self.dup_threshold <= 1.0:
            raise ConfigError("--dup-threshold must be in (0, 1]")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        if self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if self.size is not None and self.size < 1:
            raise ConfigError("--size must be at least 1 (leave it out for all the pairs the ratios allow)")
        if set(self.ratios) - set(SAFETY_GROUPS):
            raise ConfigError(f"ratios name unknown groups: {sorted(set(self.ratios) - set(SAFETY_GROUPS))}")
        if not all(math.isfinite(v) for v in self.ratios.values()) or not math.isfinite(sum(self.ratios.values())):
            raise ConfigError(f"--ratios must be finite numbers with a finite sum, got {self.ratios}")
        if any(v < 0 for v in self.ratios.values()) or not any(v > 0 for v in self.ratios.values()):
            raise ConfigError("--ratios must be non-negative with at least one positive group")
        self.ratios = {g: float(self.ratios.get(g, 0.0)) for g in SAFETY_GROUPS}
        if not 0.0 <= self.benign_share < 1.0:
            raise ConfigError("--benign-share must be in [0, 1)")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError("--eval-fraction must be in [0, 1)")
        if self.order not in MIX_ORDERS:
            raise ConfigError(f"unknown --order {self.order!r}; choose one of {', '.join(MIX_ORDERS)}")
        if self.order == "input" and (self.benign_share != 0.2 or self.ratios != {
                g: DEFAULT_RATIOS.get(g, 0.0) for g in SAFETY_GROUPS}):
            raise ConfigError("--order input takes every pair as it comes: --ratios and --benign-share do not "
                              "apply (leave them out)")
        if self.shard_rows < 1:
            raise ConfigError("--shard-rows must be at least 1")
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown --engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.ray_address and self.engine != "ray":
            raise ConfigError("--ray-address needs --engine ray")
        if Path(self.out).exists() and not self.overwrite:
            raise ConfigError(f"{self.out} exists; pass --overwrite to replace it")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
