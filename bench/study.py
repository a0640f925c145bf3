"""What equi does to a model (issue 19): naive vs FDC vs FDC+AMA data-scaling ladders, curves in ``docs/study/``.

One command curates the bundled real data twice (the group-balanced FDC mixture, and the same pairs in input order:
the naive baseline), trains a ladder per arm with the same model, steps and number of training pairs per rung,
evaluates every rung and the untrained model on harmful suites (safety) and benign suites (over-refusal), and writes
``equi report``'s curves (Wilson 95% intervals), ``summary.md``, ``report.json``, ``results.md`` (one row per run)
and ``study.json`` (settings, versions, hardware, wall time per stage) to ``--out``::

    python bench/study.py --profile cpu --data-dir ../shared/data            # ~40 min on 2 CPU cores → docs/study/
    python bench/study.py --profile gpu --data-dir ../shared/data            # one GPU, bf16 → docs/study/gpu/
    python bench/study.py --profile tiny --model TINY_MODEL --out /tmp/s     # seconds: what tests/test_study.py runs

Arms (all on the same base model, seed, steps, batch, learning rate and rung sizes):

- ``naive``: ``equi curate --order input``: every de-duplicated pair, whatever its group, ranked in input order (no
  grouping, no balancing, no helpfulness share), plain DPO;
- ``FDC``: ``equi curate`` (EHD:IHD:MHD = 10:3:1 plus a 0.2 BENIGN share), plain DPO;
- ``FDC+AMA``: the same FDC mix, AMA-DPO.

Resumable: a finished mix is kept, ``equi scale`` keeps finished rungs and evaluations and resumes an interrupted
rung from its last checkpoint, so re-running the same command continues. Work (mixes, runs) goes to ``--work``
(default ``study-work/PROFILE``, ignored by git); only the report goes to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "data"
BUNDLED_INPUTS = [EXAMPLES / "advbench_behaviors.jsonl", EXAMPLES / "hh_rlhf_harmless_sample.jsonl.gz",
                  EXAMPLES / "xstest_prompts.jsonl"]
STUDY_FILE = "study.json"
RESULTS_FILE = "results.md"


@dataclass(frozen=True)
class Arm:
    """One curve of the study: a mix (``fdc`` or ``input`` order) trained with one algorithm."""

    name: str  # the run folder under work/runs/
    mix: str  # "fdc" | "input" (equi curate --order)
    algo: str

    @property
    def label(self) -> str:
        """The series' group label in the report (its algorithm is added there): naive · dpo, FDC · ama-dpo."""
        return "naive" if self.mix == "input" else "FDC"


ARMS = (Arm("naive", "input", "dpo"), Arm("fdc", "fdc", "dpo"), Arm("fdc-ama", "fdc", "ama-dpo"))
MIX_NAMES = {"fdc": "mix-fdc", "input": "mix-naive"}


@dataclass
class StudyProfile:
    """Everything that defines a study run (written to ``study.json``).

    Data: ``inputs`` (raw JSONL for ``equi curate``), ``embedder`` (None = bundled MiniLM), ``rungs`` (whole numbers
    of ranked pairs, the same for every arm). Training (every rung of every arm): ``model`` (None = SmolLM2-135M-
    Instruct), ``max_steps``, ``batch_size``, ``lr``, ``beta``, ``lora_r``, ``max_length``, ``truncation_mode``
    (``keep_end``: every pair of a rung is trained, a prompt longer than ``max_length`` loses its start; TRL's
    ``keep_start`` would drop such pairs, so arms would train on different numbers of pairs), ``seed``. Evaluation:
    ``suites``, ``eval_limit`` (prompts per suite), ``max_new_tokens``, ``eval_batch_size``.
    """

    name: str
    rungs: list[int]
    max_steps: int
    lr: float
    batch_size: int = 4
    beta: float = 0.1
    lora_r: int = 0
    max_length: int = 256
    truncation_mode: str = "keep_end"  # a long prompt loses its first turns, never its pair: equal pairs per rung
    seed: int = 0
    model: str | None = None
    inputs: list[str] = field(default_factory=lambda: [str(p) for p in BUNDLED_INPUTS])
    embedder: str | None = None
    suites: list[str] = field(default_factory=lambda: ["advbench", "harmbench", "xstest-safe", "alpaca"])
    eval_limit: int = 100
    max_new_tokens: int = 48
    eval_batch_size: int = 32
    save_steps: int = 10

    def __post_init__(self) -> None:
        if len(self.rungs) < 1 or any(r < 2 for r in self.rungs) or sorted(set(self.rungs)) != list(self.rungs):
            raise ValueError(f"rungs must be increasing whole numbers of pairs >= 2, got {self.rungs}")
        if self.max_steps < 1 or self.batch_size < 1 or self.eval_limit < 1:
            raise ValueError("max_steps, batch_size and eval_limit must be at least 1")


#: ``--profile``: cpu took 37 min on 2 (shared) cores; gpu one GPU in minutes; tiny is what the test runs.
PROFILES: dict[str, StudyProfile] = {
    # 3 arms × 3 rungs (8, 16, 32 pairs) × 8 full fine-tuning steps of 4 pairs (the largest rung once, the smallest
    # four times); 100 AdvBench + 100 XSTest-safe prompts per evaluation, 32 new tokens (refusals show at once).
    "cpu": StudyProfile(name="cpu", rungs=[8, 16, 32], max_steps=8, lr=5e-5, batch_size=4, max_length=192,
                        suites=["advbench", "xstest-safe"], eval_limit=100, max_new_tokens=32, eval_batch_size=50,
                        save_steps=4),
    # A 1.7B instruct model in bf16 (a hub id read from the local Hugging Face cache, or --model PATH); rungs up to
    # nearly the whole FDC mix of the bundled data (94 pairs: the interlock holds 53 BENIGN pairs back); 200 prompts
    # per suite, AdvBench + HarmBench (harmful), XSTest-safe + Alpaca (benign; Alpaca needs --data-dir).
    "gpu": StudyProfile(name="gpu", rungs=[20, 40, 80], max_steps=48, lr=5e-6, batch_size=8, max_length=512,
                        model="HuggingFaceTB/SmolLM2-1.7B-Instruct", eval_limit=200, max_new_tokens=64,
                        eval_batch_size=64, save_steps=24),
    # Seconds: two rungs, two steps, four prompts per suite (tests/test_study.py, with a tiny test-built model).
    # max_length 96 truncates most HH dialogues: keep_end must still train every pair of every rung.
    "tiny": StudyProfile(name="tiny", rungs=[4, 8], max_steps=2, lr=1e-3, batch_size=2, max_length=96,
                         suites=["advbench", "xstest-safe"], eval_limit=4, max_new_tokens=8,
                         eval_batch_size=4, save_steps=1,
                         inputs=[str(EXAMPLES / "hh_rlhf_harmless_sample.jsonl.gz")]),
}


def _say(message: str) -> None:
    print(f"study: {message}", file=sys.stderr, flush=True)


def curate_mixes(profile: StudyProfile, work: Path) -> dict[str, Path]:
    """Both mixes (``fdc``, ``input`` order) from the profile's inputs; a finished one is kept."""
    from curation.pipeline import curate
    from equi.config import CurateConfig

    mixes = {}
    for order, name in MIX_NAMES.items():
        out = work / name
        if not (out / "manifest.json").is_file():
            _say(f"curating {out} (--order {order})")
            # No held-out split: every arm trains on exactly the rung's number of pairs (the suites are the test).
            curate(CurateConfig(inputs=list(profile.inputs), out=str(out), order=order, eval_fraction=0.0,
                                embedder=profile.embedder, seed=profile.seed, quiet=True))
        mixes[order] = out
    return mixes


def check_rungs(profile: StudyProfile, mixes: dict[str, Path]) -> dict[str, int]:
    """Every rung must fit every mix (else arms would train on different numbers of pairs): the ranked rows."""
    from equi.ladder import ranked_rows

    sizes = {order: ranked_rows(path) for order, path in mixes.items()}
    if max(profile.rungs) > min(sizes.values()):
        raise SystemExit(f"study: rung {max(profile.rungs)} is larger than a mix ({sizes}): lower --rungs or add "
                         "data, so every arm trains on the same number of pairs")
    return sizes


def run_rung(profile: StudyProfile, arm: Arm, rung: int, mix: Path, runs: Path, data_dir: str | None,
             baseline: bool) -> None:
    """One arm's rung through ``equi scale``'s library call (kept when finished, resumed when interrupted)."""
    from equi.ladder import ScaleConfig, run_ladder

    config = ScaleConfig(mix=str(mix), scales=[float(rung)], out=str(runs / arm.name),
                         algo=arm.algo, model=profile.model, max_steps=profile.max_steps,
                         batch_size=profile.batch_size, lr=profile.lr, beta=profile.beta, seed=profile.seed,
                         lora_r=profile.lora_r,
                         train_options={"max_length": profile.max_length, "truncation_mode": profile.truncation_mode,
                                        "save_steps": profile.save_steps},
                         baseline=baseline, suites=list(profile.suites), eval_limit=profile.eval_limit,
                         max_new_tokens=profile.max_new_tokens, eval_batch_size=profile.eval_batch_size,
                         data_dir=data_dir, quiet=True)
    result = run_ladder(config)
    for note in result.notes:
        _say(f"{arm.name}: {note}")


def arm_records(runs: Path):
    """The runs under ``runs/`` with each trained run's series named by its arm (naive / FDC) instead of ``ALL``."""
    from equi.reporting import collect_runs

    labels = {arm.name: arm.label for arm in ARMS}
    records = collect_runs(runs)
    for record in records:
        arm = record.path.resolve().relative_to(runs.resolve()).parts[0]
        if not record.baseline and arm in labels:
            record.group = labels[arm]
    return records


def write_report(runs: Path, mixes: dict[str, Path], out: Path, title: str):
    from equi.reporting import ReportConfig, build_report

    return build_report(ReportConfig(out=str(out), runs=str(runs), mix=str(mixes["fdc"]), title=title),
                        records=arm_records(runs))


def results_table(records) -> str:
    """``results.md``: one row per evaluated run (arm, rung, pairs trained, both rates as k/n with their Wilson 95%
    intervals), the numbers docs/study/README.md quotes."""
    def cell(rate) -> str:
        if rate is None:
            return "—"
        return f"{rate.k}/{rate.n} = {100 * rate.value:.0f}% [{100 * rate.lo:.0f}, {100 * rate.hi:.0f}]"

    lines = ["| arm | algorithm | run | pairs trained (safety + benign) | safety: harmful refused | "
             "over-refusal: benign refused |", "|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (not r.baseline, r.group or "", r.algo or "", r.n_safety or 0)):
        if r.summary is None:
            continue
        pairs = (r.n_safety or 0) + (r.n_benign or 0)
        trained = "0 (untrained)" if r.baseline else f"{pairs} ({r.n_safety} + {r.n_benign})"
        lines.append(f"| {'—' if r.baseline else r.group} | {'—' if r.baseline else r.algo} | {r.path.parent.name}/"
                     f"{r.name} | {trained} | {cell(r.rates.get('safety'))} | {cell(r.rates.get('over_refusal'))} |")
    return "\n".join(lines) + "\n"


def environment() -> dict[str, Any]:
    """Versions and hardware, for study.json."""
    from importlib import metadata

    import torch
    import transformers
    import trl

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    return {"equi": metadata.version("equi"), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "git_head": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--short"))}


def mix_counts(mix: Path) -> dict[str, Any]:
    manifest = json.loads((mix / "manifest.json").read_text(encoding="utf-8"))
    return {"mixture": manifest["counts"]["mixture"], "accounting": manifest["accounting"]}


def rung_dir(runs: Path, arm: Arm, rung: int) -> Path:
    """Where ``equi scale`` puts an arm's rung (``equi.ladder.plan_ladder``'s naming for a ladder without groups)."""
    from equi.ladder import scale_label

    return runs / arm.name / f"{arm.algo}-all-s{scale_label(float(rung))}"


def finished_rungs(profile: StudyProfile, runs: Path) -> dict[str, list[int]]:
    """Per arm, the rungs trained and evaluated so far (what the report can show)."""
    return {arm.name: [r for r in profile.rungs if (rung_dir(runs, arm, r) / "eval" / "metrics.json").is_file()]
            for arm in ARMS}


def run_study(profile: StudyProfile, out: Path, work: Path, data_dir: str | None, train: bool = True) -> Path:
    """Curate, train and evaluate every arm (``train=False``: only report what is finished), write the report and
    ``study.json``; return ``out``."""
    started = time.time()
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    clock = time.time()
    mixes = curate_mixes(profile, work) if train else {k: work / v for k, v in MIX_NAMES.items()}
    if not all((path / "manifest.json").is_file() for path in mixes.values()):
        raise SystemExit(f"study: no mixes in {work}: run the study without --report-only first")
    sizes = check_rungs(profile, mixes)
    timings["curate"] = round(time.time() - clock, 1)
    runs = work / "runs"
    # Rung by rung across the arms, the largest rung first: every rung costs the same (the same steps), and a study
    # stopped half-way then still compares the arms, where they have had the most data.
    order = sorted(profile.rungs, reverse=True)
    for rung in order if train else []:
        for arm in ARMS:
            clock = time.time()
            _say(f"{arm.name}: {arm.algo} on {mixes[arm.mix].name}, {rung} pairs")
            first = rung == order[0] and arm == ARMS[0]  # the untrained model is evaluated once, for all arms
            run_rung(profile, arm, rung, mixes[arm.mix], runs, data_dir, baseline=first)
            timings[f"{arm.name}:{rung}"] = round(time.time() - clock, 1)
    clock = time.time()
    result = write_report(runs, mixes, out, f"equi study ({profile.name} profile): naive vs FDC vs FDC+AMA")
    timings["report"] = round(time.time() - clock, 1)
    (out / RESULTS_FILE).write_text(results_table(result.records), encoding="utf-8")
    finished = finished_rungs(profile, runs)
    record_path = out / STUDY_FILE
    previous = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
    sessions = previous.get("sessions", []) if previous.get("profile") == dataclasses.asdict(profile) else []
    # Each invocation's wall time per stage (a resumed study has several; finished stages then take seconds).
    sessions.append({"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                     "seconds": timings, "total_seconds": round(time.time() - started, 1)})
    record = {"profile": dataclasses.asdict(profile), "arms": [dataclasses.asdict(a) | {"label": a.label}
                                                                for a in ARMS],
              "data_dir": data_dir, "ranked_pairs": {MIX_NAMES[k]: v for k, v in sizes.items()},
              "mixes": {MIX_NAMES[k]: mix_counts(v) for k, v in mixes.items()},
              "environment": environment(), "sessions": sessions, "finished": finished,
              "complete": all(finished[a.name] == profile.rungs for a in ARMS),
              "report": {"html": result.html.name, "summary": result.summary.name, "plots": sorted(result.plots)}}
    record_path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    _say(f"done in {time.time() - started:.0f} s: {out / result.html.name}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Example:\n  python bench/study.py --profile cpu --data-dir ../shared/data")
    parser.add_argument("--profile", choices=sorted(PROFILES), required=True)
    parser.add_argument("--out", type=Path, help="report directory [docs/study, docs/study/gpu for gpu]")
    parser.add_argument("--work", type=Path, help="mixes and runs [study-work/PROFILE]")
    parser.add_argument("--data-dir", help="shared data directory: adds the alpaca suite (and its data)")
    parser.add_argument("--model", help="override the profile's model (a path or hub id)")
    parser.add_argument("--inputs", nargs="+", help="override the profile's raw JSONL inputs")
    parser.add_argument("--rungs", help="override the rungs, e.g. 20,40,80 (pairs)")
    parser.add_argument("--max-steps", type=int, help="override the steps per rung")
    parser.add_argument("--lr", type=float, help="override the learning rate")
    parser.add_argument("--lora-r", type=int, help="override the LoRA rank (0 = full fine-tuning)")
    parser.add_argument("--eval-limit", type=int, help="override prompts per suite")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: report the rungs finished so far (a study stopped half-way)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub id is read from the local cache, never downloaded
    overrides = {"model": args.model, "inputs": args.inputs, "max_steps": args.max_steps, "lr": args.lr,
                 "lora_r": args.lora_r, "eval_limit": args.eval_limit,
                 "rungs": [int(r) for r in args.rungs.split(",")] if args.rungs else None}
    profile = dataclasses.replace(PROFILES[args.profile], **{k: v for k, v in overrides.items() if v is not None})
    suites = list(profile.suites)
    if "alpaca" in suites and not args.data_dir:
        suites.remove("alpaca")  # CC-BY-NC: only from a data directory
        _say("no --data-dir: the alpaca suite is left out (over-refusal is measured on xstest-safe alone)")
    profile = dataclasses.replace(profile, suites=suites)
    out = args.out or REPO / "docs" / "study" / ("" if args.profile == "cpu" else args.profile)
    work = args.work or REPO / "study-work" / args.profile
    run_study(profile, out, work, args.data_dir, train=not args.report_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
