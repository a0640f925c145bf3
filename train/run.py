"""One ``equi train`` run: verify the mix, open the run directory (:mod:`train.rundir`), run ``--algo``'s runner.

This module only picks: each algorithm's runner lives in its own module, named in :data:`RUNNERS` and imported
when it runs (the online runner imports TRL's GRPO stack, which a DPO run does not need).
"""

from __future__ import annotations

import gc
import importlib
import os
import time
from pathlib import Path
from typing import Any

from equi.config import ConfigError
from equi.progress import no_library_deprecations, quiet_transformers
from train.card import write_model_card
from train.config import ONLINE_ALGOS, SCORER_ALGOS, TrainConfig
from train.mixdata import manifest_hash, verify_mix_or_raise
from train.rundir import (RunResult, prepare_run_dir, read_metrics, remove_checkpoints, remove_unstarted_run,
                          write_summary)

#: ``--algo`` → its runner, ``"module:function"``; a runner takes ``(config, manifest, run_dir)`` and returns a
#: :class:`train.rundir.RunResult`.
RUNNERS: dict[str, str] = {
    "dpo": "train.dpo:run_dpo",
    "ama-dpo": "train.dpo:run_dpo",
    "dual": "train.dual:run_dual",
    **{algo: "train.online:run_online" for algo in ONLINE_ALGOS},
    **{algo: "train.scorers:run_scorer_training" for algo in SCORER_ALGOS},
}


def train(config: TrainConfig) -> RunResult:
    """Run ``equi train`` for ``config``; returns where the model went and the logged metrics."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if config.quiet:
        import datasets

        datasets.disable_progress_bars()
    if config.resume and config.algo == "dual" and config.lora_r:
        raise ConfigError("--resume does not continue --algo dual runs with --lora-r yet (their rounds would start "
                          "again); train again with a new --out")
    manifest = verify_mix_or_raise(config.mix)
    mix_hash = manifest_hash(config.mix)
    existed = Path(config.out).exists()
    run_dir = prepare_run_dir(config, mix_hash)
    try:
        with quiet_transformers(config.quiet), no_library_deprecations(config.quiet):
            result = _run_algo(config, manifest, run_dir)
    except Exception:
        if not config.resume:
            remove_unstarted_run(run_dir, existed)
        raise
    finally:
        # The trainer, policy and optimiser state sit in reference cycles (TRL's fused LM head closes over the model
        # it patches) that outlive the runner: ~1 GB for SmolLM2-135M, which `equi scale` would carry into the
        # next rung's evaluation and training.
        gc.collect()
    write_summary(run_dir, result.summary)
    write_model_card(run_dir)  # final/README.md, now with the summary's steps and loss
    # Finished: final/ is the run's model, and the checkpoints' optimiser state would only fill the disk.
    if not config.keep_checkpoints and os.environ.get("RANK", "0") == "0":
        remove_checkpoints(run_dir)
    result.metrics = read_metrics(run_dir)
    return result


def _run_algo(config: TrainConfig, manifest: dict[str, Any], run_dir: Path) -> RunResult:
    started = time.time()
    if config.algo not in RUNNERS:  # pragma: no cover - TrainConfig validates algo
        raise ConfigError(f"unknown algo {config.algo}")
    module, name = RUNNERS[config.algo].split(":")
    result = getattr(importlib.import_module(module), name)(config, manifest, run_dir)
    result.summary.update({"algo": config.algo, "seconds": round(time.time() - started, 1), "run_dir": str(run_dir)})
    return result
