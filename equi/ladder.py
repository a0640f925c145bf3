"""Data-scaling ladders: one training run per (group, scale), each evaluated, all readable by ``equi report``.

``equi scale --mix mix/ --scales 0.1,0.3,1.0 --groups EHD,IHD,MHD`` trains, for every group, one run
per scale on the nested subset ``rank < K`` of the mix (``K`` = scale × ranked rows for a fraction,
or the number itself for a whole number > 1), keeping only that group's safety rows plus the BENIGN
share. Without ``--groups`` each rung trains on every group. The untrained model is evaluated once
as the ``baseline`` (0 safety examples) so every curve starts from where the model was.

Each run directory gets ``ladder.json`` next to train's ``config.json``::

    {"mix", "mix_manifest_hash", "group", "groups", "scale", "rank_limit",
     "n_safety", "n_benign", "n_train", "n_selected", "counts", "algo", "baseline"}

``n_safety``/``n_benign`` count the pairs the run trained on (from its ``summary.json``: TRL drops a pair whose
prompt alone is longer than ``--max-length``); ``n_selected`` and ``counts`` are the pairs selected from the mix.

A rung whose ``final/`` model (or ``eval/metrics.json``) already exists is not trained (or evaluated)
again, so an interrupted ladder continues where it stopped. A rung is only kept (or resumed) when it was
trained with what this ladder would train (its ``config.json``: the training settings and the mix's manifest
hash), and the baseline only when it evaluated the same model; otherwise ``run_ladder`` refuses before any
training, naming the folder and the settings that differ. ``ladder.json`` is written when a rung is trained
(or when it is missing), never over the record of a rung that was not retrained. ``ladder-config.json`` in
``--out`` lists every ladder that trained into it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from equi.config import ConfigError
from equi.schema import DATA_DIR, EVAL_DIR, EVAL_METRICS, FINAL_DIR, RUN_CONFIG, RUN_SUMMARY, SAFETY_GROUPS, run_record
from train.config import TrainConfig

LADDER_FILE = "ladder.json"
LADDER_CONFIG_FILE = "ladder-config.json"
BASELINE_RUN = "baseline"
#: ScaleConfig fields that do not change what a ladder trains or evaluates (for ladder-config.json).
_NOT_DEFINING = ("out", "quiet")


def parse_scales(text: str) -> list[float]:
    """``"0.1,0.3,1.0"`` → ``[0.1, 0.3, 1.0]``; fractions in (0, 1] or whole numbers of ranked rows > 1."""
    scales: list[float] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            value = float(part)
        except ValueError:
            raise ConfigError(f"bad scale {part!r}: expected a number such as 0.1 or 500") from None
        if not valid_scale(value):
            raise ConfigError(f"bad scale {part!r}: use a fraction in (0, 1] or a whole number of rows")
        scales.append(value)
    if not scales:
        raise ConfigError("--scales needs at least one value, e.g. 0.1,0.3,1.0")
    return sorted(set(scales))


def valid_scale(value: float) -> bool:
    """A fraction in (0, 1] or a whole number of rows; ``nan`` and ``inf`` are neither (``nan`` passes every
    comparison-based check, so it is ruled out first)."""
    return math.isfinite(value) and value > 0 and (value <= 1 or float(value).is_integer())


def check_scales_fit(scales: list[float], n_ranked: int) -> None:
    """Refuse scales that would train the same rows twice, or more rows than the mix ranks: such rungs train
    identical subsets under different names, and the curve would show a flat step that is not data.

    Raises ``ConfigError`` naming the scales and the mix's number of ranked rows.
    """
    beyond = [s for s in scales if s > 1 and s > n_ranked]
    if beyond:
        labels = ", ".join(scale_label(s) for s in beyond)
        raise ConfigError(f"--scales {labels} asks for more rows than the mix ranks ({n_ranked}): every such rung "
                          f"would train on the whole mix; use at most {n_ranked} (or 1.0 for all of it)")
    by_limit: dict[int, list[float]] = {}
    for scale in scales:
        by_limit.setdefault(rank_limit(scale, n_ranked), []).append(scale)
    for limit, same in sorted(by_limit.items()):
        if len(same) > 1:
            names, each = " and ".join(scale_label(s) for s in same), "both" if len(same) == 2 else "all"
            raise ConfigError(f"--scales {names} {each} select rank < {limit} of the mix's {n_ranked} ranked rows: "
                              "their rungs would be identical; keep one")


def ranked_rows(mix_dir: str | Path) -> int:
    """Number of ranked train rows (``max(rank) + 1``: ranks count within a split, and the ladder trains on train)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = sorted((Path(mix_dir) / DATA_DIR).glob("train-*.parquet"))
    best = -1
    for path in files:
        ranks = pq.read_table(path, columns=["rank"]).column("rank")
        if len(ranks) and (top := pc.max(ranks).as_py()) is not None:
            best = max(best, int(top))
    return best + 1


def rank_limit(scale: float, n_ranked: int) -> int:
    """The ``rank < K`` bound for a scale: a fraction of the ranked rows (at least 1), or the number itself."""
    return int(scale) if scale > 1 else max(1, math.ceil(scale * n_ranked))


def scale_label(scale: float) -> str:
    return str(int(scale)) if scale > 1 else f"{scale:g}"


@dataclass
class ScaleConfig:
    """A data-scaling ladder.

    Data:
        mix: the mix directory.
        scales: fractions of the ranked mixture in (0, 1] or whole numbers of ranked rows.
        groups: one ladder per safety group (each with the BENIGN share); ``None`` = one ladder on all groups.
    Training (passed to ``equi train``'s ``TrainConfig``):
        algo, model, max_steps, epochs, batch_size, lr, beta, seed, lora_r; ``train_options`` for any
        other ``TrainConfig`` field.
    Evaluation (``equi eval`` on every run, and on the untrained model as the baseline):
        evaluate, baseline, suites, eval_limit, max_new_tokens, eval_batch_size, data_dir.
    out: the directory that receives one run directory per rung.
    """

    mix: str
    scales: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0])
    groups: list[str] | None = None
    out: str = "runs"
    # Training settings equi scale sets itself; their defaults are TrainConfig's (set there, once).
    algo: str = TrainConfig.algo
    model: str | None = TrainConfig.model
    max_steps: int | None = TrainConfig.max_steps
    epochs: float = TrainConfig.epochs
    batch_size: int = TrainConfig.batch_size
    lr: float = TrainConfig.lr
    beta: float = TrainConfig.beta
    seed: int = TrainConfig.seed
    lora_r: int = TrainConfig.lora_r
    train_options: dict[str, Any] = field(default_factory=dict)
    evaluate: bool = True
    baseline: bool = True
    suites: list[str] = field(default_factory=list)
    eval_limit: int | None = 50
    max_new_tokens: int = 64
    eval_batch_size: int = 16
    data_dir: str | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        self.mix = str(self.mix)
        self.out = str(self.out)
        if not (Path(self.mix) / "manifest.json").is_file():
            raise ConfigError(f"mix directory {self.mix} not found (no manifest.json); make one with `equi curate`")
        if not self.scales:
            raise ConfigError("--scales needs at least one value, e.g. 0.1,0.3,1.0")
        for scale in self.scales:
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not valid_scale(scale):
                raise ConfigError(f"bad scale {scale}: use a fraction in (0, 1] or a whole number of rows")
        self.scales = sorted(set(float(s) for s in self.scales))
        if self.groups is not None:
            self.groups = [g.strip().upper() for g in self.groups if g.strip()]
            bad = sorted(set(self.groups) - set(SAFETY_GROUPS) - {"OTHER"})
            if bad or not self.groups:
                raise ConfigError(f"--groups names {bad or 'nothing'}; choose from {', '.join(SAFETY_GROUPS)}, OTHER")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ConfigError("--eval-limit must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Rung:
    group: str  # a safety group, or "ALL"
    scale: float
    rank_limit: int
    run_dir: Path

    @property
    def train_groups(self) -> list[str] | None:
        return None if self.group == "ALL" else [self.group, "BENIGN"]


@dataclass
class LadderResult:
    out_dir: Path
    rungs: list[Rung]
    baseline_dir: Path | None
    notes: list[str] = field(default_factory=list)


def plan_ladder(config: ScaleConfig, n_ranked: int) -> list[Rung]:
    """Every (group, scale) rung with its run directory; pure, so the plan can be shown before training."""
    groups = config.groups or ["ALL"]
    return [Rung(group, scale, rank_limit(scale, n_ranked),
                 Path(config.out) / f"{config.algo}-{group.lower()}-s{scale_label(scale)}")
            for group in groups for scale in config.scales]


def training_counts(mix_dir: str, limit: int, groups: list[str] | None) -> dict[str, int]:
    """Rows per group that ``equi train`` will train on for ``rank < limit`` and ``groups`` (pairs only)."""
    from train.mixdata import load_split

    split = load_split(mix_dir, "train", limit, groups, need_pairs=True)
    return dict(Counter(split.dataset["group"])) if len(split.dataset) else {}


def _same_place(a: Any, b: Any) -> bool:
    """Two spellings of one local path (``mix`` and ``./mix``); False for hub ids and missing paths."""
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    try:
        return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _train_config(config: ScaleConfig, rung: Rung):

    known = TrainConfig.field_names()
    unknown = sorted(set(config.train_options) - known)
    if unknown:
        raise ConfigError(f"unknown training option(s) {unknown}")
    return TrainConfig(mix=config.mix, algo=config.algo, model=config.model, out=str(rung.run_dir),
                       scale=rung.rank_limit, groups=rung.train_groups, max_steps=config.max_steps,
                       epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, beta=config.beta,
                       seed=config.seed, lora_r=config.lora_r, quiet=config.quiet,
                       # an interrupted rung (config.json but no final/) continues from its last checkpoint
                       resume=(rung.run_dir / RUN_CONFIG).is_file(), **config.train_options)


def rung_differences(train_config, run_dir: Path, mix_hash: str) -> list[str]:
    """What ``train_config`` would train that differs from the run already in ``run_dir`` ([] = the same run).

    :func:`train.rundir.run_differences` (the check ``equi train --resume`` makes) on the run's ``config.json``, plus
    a config hash that differs only because another equi version wrote it (``--resume`` would refuse it).
    """
    from train.rundir import run_differences

    record = run_record(run_dir)
    if record is None:
        return [f"its settings are unknown (no readable {RUN_CONFIG} from equi train)"]
    parts = run_differences(record, train_config, mix_hash)
    if not parts and train_config.resume and record.get("config_hash") != train_config.hash():
        # equi train --resume compares the exact hash; say so rather than fail half-way through the ladder
        parts.append("the settings recorded in its config.json (written by another equi version)")
    return parts


def _baseline_model(baseline_dir: Path) -> str | None:
    """The model the baseline evaluation answered with (eval/metrics.json, else ladder.json); None if unknown."""
    for path in (baseline_dir / EVAL_DIR / EVAL_METRICS, baseline_dir / LADDER_FILE):
        try:
            model = json.loads(path.read_text(encoding="utf-8")).get("model")
        except (OSError, ValueError, AttributeError):
            continue
        if model:
            return str(model)
    return None


def _eval_config(config: ScaleConfig, target: str | None, out: Path | None):
    from equi.evaluation import EvalConfig

    return EvalConfig(target=target, out=str(out) if out else None, suites=list(config.suites),
                      limit=config.eval_limit, data_dir=config.data_dir, max_new_tokens=config.max_new_tokens,
                      batch_size=config.eval_batch_size, quiet=config.quiet)


def _say(config: ScaleConfig, message: str) -> None:
    if not config.quiet:
        print(f"equi scale: {message}", file=sys.stderr)


def run_ladder(config: ScaleConfig) -> LadderResult:
    """Train and evaluate every rung (skipping finished ones) and the baseline; return what was made.

    Raises ``ConfigError`` before any training when a finished or interrupted rung in ``--out`` was trained with
    other settings or another mix, or the baseline evaluated another model.
    """
    from equi.evaluation import evaluate
    from train.mixdata import manifest_hash, verify_mix_or_raise
    from train.run import train

    verify_mix_or_raise(config.mix)
    mix_hash = manifest_hash(config.mix)
    n_ranked = ranked_rows(config.mix)
    if n_ranked == 0:
        raise ConfigError(f"mix {config.mix} has no ranked mixture rows to scale")
    check_scales_fit(config.scales, n_ranked)
    out = Path(config.out)
    rungs = plan_ladder(config, n_ranked)
    # Validate every rung's settings, and that what is already in --out is what this ladder would make,
    # before the first (slow) training run starts.
    conflicts: list[tuple[Path, str, list[str]]] = []
    for rung in rungs:
        train_config = _train_config(config, rung)
        finished = (rung.run_dir / FINAL_DIR).is_dir()
        if finished or (rung.run_dir / RUN_CONFIG).is_file():
            if differences := rung_differences(train_config, rung.run_dir, mix_hash):
                what = "holds a run trained" if finished else "holds an unfinished run started"
                conflicts.append((rung.run_dir, f"{what} with other settings", differences))
        if config.evaluate:
            _eval_config(config, None, rung.run_dir / EVAL_DIR)
    baseline_dir = model_path = None
    if config.evaluate and config.baseline:
        from equi.models import resolve_model

        baseline_dir = out / BASELINE_RUN
        model_path = resolve_model(config.model, quiet=config.quiet)
        if (baseline_dir / EVAL_DIR / EVAL_METRICS).is_file():
            evaluated = _baseline_model(baseline_dir)
            if evaluated is not None and evaluated != model_path and not _same_place(evaluated, model_path):
                conflicts.insert(0, (baseline_dir, "holds the evaluation of another untrained model",
                                     [f"--model {model_path!r} (evaluated: {evaluated!r})"]))
    if conflicts:
        (where, what, differences), others = conflicts[0], [str(c[0]) for c in conflicts[1:]]
        raise ConfigError(f"{where} {what}: {', '.join(differences)}; nothing was trained: use a new --out for "
                          f"these settings (or delete {where} to redo it)"
                          + (f"; {len(others)} more differ: {', '.join(others)}" if others else ""))
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    if baseline_dir is not None:
        record = {"mix": str(Path(config.mix).resolve()), "mix_manifest_hash": mix_hash, "group": BASELINE_RUN,
                  "baseline": True, "n_safety": 0, "n_benign": 0, "n_train": 0, "model": model_path}
        eval_config = _eval_config(config, model_path, baseline_dir / EVAL_DIR)
        if _kept_evaluation(baseline_dir, eval_config, notes):
            if not (baseline_dir / LADDER_FILE).is_file():  # evaluated with `equi eval --out BASELINE/eval`
                _write_json(baseline_dir / LADDER_FILE, record)
        else:
            _say(config, f"evaluating the untrained model {model_path} → {baseline_dir}")
            evaluate(eval_config)
            _write_json(baseline_dir / LADDER_FILE, record)
    for index, rung in enumerate(rungs, 1):
        finished = (rung.run_dir / FINAL_DIR).is_dir()
        if finished and (rung.run_dir / LADDER_FILE).is_file():
            notes.append(f"{rung.run_dir.name}: already trained, kept")  # and its ladder.json as it was
        else:
            counts = training_counts(config.mix, rung.rank_limit, rung.train_groups)
            n_safety = sum(n for g, n in counts.items() if g != "BENIGN")
            if sum(counts.values()) == 0:
                notes.append(f"{rung.run_dir.name}: no preference pairs for group {rung.group} below rank "
                             f"{rung.rank_limit}; skipped")
                continue
            if finished:  # trained with these settings (checked above) but its ladder.json is missing
                notes.append(f"{rung.run_dir.name}: already trained, kept")
            else:
                _say(config, f"[{index}/{len(rungs)}] training {rung.run_dir.name} on {sum(counts.values())} "
                             f"pairs ({n_safety} safety) with rank < {rung.rank_limit}")
                train(_train_config(config, rung))
            # The pairs the run trained on (its summary.json: after TRL dropped over-long prompts) where known,
            # else the pairs selected from the mix.
            trained = _read_summary(rung.run_dir)
            n_benign = trained.get("n_benign", counts.get("BENIGN", 0))
            n_safety = trained.get("n_safety", n_safety)
            _write_json(rung.run_dir / LADDER_FILE, {
                "mix": str(Path(config.mix).resolve()), "mix_manifest_hash": mix_hash, "group": rung.group,
                "groups": rung.train_groups, "scale": rung.scale, "rank_limit": rung.rank_limit,
                "n_safety": n_safety, "n_benign": n_benign, "n_train": n_safety + n_benign,
                "n_selected": sum(counts.values()), "counts": counts, "algo": config.algo, "baseline": False})
        if config.evaluate:
            eval_config = _eval_config(config, str(rung.run_dir), None)
            if not _kept_evaluation(rung.run_dir, eval_config, notes):
                _say(config, f"[{index}/{len(rungs)}] evaluating {rung.run_dir.name}")
                evaluate(eval_config)
    _record_ladder(out, {"config": config.to_dict(), "n_ranked": n_ranked,
                         "rungs": [str(r.run_dir) for r in rungs], "notes": notes})
    return LadderResult(out, rungs, baseline_dir, notes)


#: The evaluation settings that change what an evaluation measures (its prompts and answers).
_EVAL_SETTINGS = {"suites": "--suite", "limit": "--eval-limit", "max_new_tokens": "--max-new-tokens"}


def _kept_evaluation(run_dir: Path, eval_config, notes: list[str]) -> bool:
    """Whether ``run_dir/eval`` already holds an evaluation with ``eval_config``'s prompts and answer length.

    One made with other settings is evaluated again (a note says which changed): every point of a curve
    must come from the same prompts. An evaluation that predates recording its settings is kept.
    """
    from equi.evaluation.audit import read_metrics

    metrics = read_metrics(run_dir / EVAL_DIR)
    if metrics is None:
        return False
    saved, now = metrics.get("config") or {}, eval_config.to_dict()
    changed = [f"{flag} {now[key]!r} (was {saved[key]!r})" for key, flag in _EVAL_SETTINGS.items()
               if key in saved and saved[key] != now[key]]
    label = run_dir.name if run_dir.name != BASELINE_RUN else str(run_dir)
    if changed:
        notes.append(f"{label}: evaluated again, {', '.join(changed)}")
        return False
    notes.append(f"{label}: already evaluated, kept")
    return True


def _read_summary(run_dir: Path) -> dict[str, Any]:
    """A run's ``RUN_SUMMARY`` (train's), or {} when it has none yet."""
    try:
        summary = json.loads((run_dir / RUN_SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _record_ladder(out: Path, entry: dict[str, Any]) -> None:
    """Add this ladder to ``ladder-config.json`` (``{"ladders": [...]}``), replacing only an earlier run of the
    same ladder, so a second ladder into the same --out (another --algo, other groups) keeps the first's record."""
    path = out / LADDER_CONFIG_FILE
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        existing = {}
    if not isinstance(existing, dict):
        existing = {}
    ladders = existing.get("ladders") if isinstance(existing.get("ladders"), list) else (
        [existing] if "config" in existing else [])  # the one-ladder file of earlier versions

    def defining(item: Any) -> Any:
        cfg = item.get("config") if isinstance(item, dict) else None
        cfg = json.loads(json.dumps(cfg, default=str)) if isinstance(cfg, dict) else {}
        return {k: v for k, v in cfg.items() if k not in _NOT_DEFINING}

    mine = defining(entry)
    _write_json(path, {"ladders": [item for item in ladders if defining(item) != mine] + [entry]})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
