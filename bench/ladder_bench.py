"""What a small data-scaling ladder costs (issue 17 item 4): seconds per training step, seconds per eval prompt,
peak memory and disk per run.

Runs ``equi scale`` as a user would (a subprocess of this Python, so ``PYTHONPATH`` picks the equi it measures) on a
mix (default: ``equi curate`` of the real public slices in ``examples/data/``) with the bundled
SmolLM2-135M-Instruct, then reads what each run directory holds:

- seconds per step: the trainer's ``train_runtime`` / steps (``metrics.jsonl``; checkpoint saves included);
- seconds per eval prompt: each phase's wall time between ``equi scale``'s progress lines / its prompts (model load,
  generation and labelling), and ``eval/metrics.json``'s ``seconds.per_prompt`` (generation and labelling only)
  where the equi measured records it;
- peak RSS: the ``equi scale`` process's own maximum (``wait4``), and the largest sampled every 0.2 s in each phase;
- disk: each run directory, split into ``final/``, ``checkpoint-*`` and the rest, after the ladder has finished.

Example::

    python bench/ladder_bench.py --scales 0.5,1.0 --groups EHD,IHD --max-steps 2 --eval-limit 3 --json ladder.json

Timings depend on the machine and its load (note both with the numbers, bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASE = re.compile(r"equi scale: (?:\[\d+/\d+\] )?(evaluating|training) (\S+)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mix", help="mix directory [default: curate examples/data/ into --out]")
    parser.add_argument("--out", help="working directory [default: a temporary one, removed after]")
    parser.add_argument("--scales", default="0.5,1.0")
    parser.add_argument("--groups", default="EHD,IHD")
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--eval-limit", type=int, default=3)
    parser.add_argument("--model", help="--model for equi scale [default: the bundled SmolLM2-135M-Instruct]")
    parser.add_argument("--keep-checkpoints", action="store_true", help="pass --keep-checkpoints to equi scale")
    parser.add_argument("--extra", default="", help="more equi scale options, one string (e.g. '--batch-size 2')")
    parser.add_argument("--json", help="also write the numbers to this file")
    return parser.parse_args(argv)


def equi(*args: str) -> list[str]:
    return [sys.executable, "-m", "equi.cli", *args]


def run_measured(command: list[str]) -> dict:
    """Run ``command``; its wall time, exit code, peak RSS (wait4), and per phase (from its stderr progress lines)
    the wall seconds and the largest RSS sampled."""
    import psutil

    started = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO)
    phases: list[dict] = [{"phase": "start", "run": None, "t0": 0.0, "rss_max": 0}]
    tail: list[str] = []

    def read_stderr() -> None:
        for line in process.stderr:
            tail.append(line.rstrip())
            del tail[:-20]
            if match := PHASE.search(line):
                run = "baseline" if "untrained model" in line else match.group(2)
                phases.append({"phase": match.group(1), "run": run, "t0": time.perf_counter() - started,
                               "rss_max": 0})

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    watched = psutil.Process(process.pid)
    while True:
        done, status, usage = os.wait4(process.pid, os.WNOHANG)  # wait4: the child's own peak RSS when it ends
        if done:
            break
        try:
            rss = watched.memory_info().rss + sum(c.memory_info().rss for c in watched.children(recursive=True))
        except psutil.Error:
            rss = 0
        phases[-1]["rss_max"] = max(phases[-1]["rss_max"], rss)
        time.sleep(0.2)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    reader.join(timeout=5)
    for here, after in zip(phases, phases[1:] + [{"t0": wall}]):
        here["seconds"] = round(after["t0"] - here["t0"], 1)
    return {"seconds": round(wall, 1), "exit_code": process.returncode, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "phases": phases, "stderr_tail": tail}


def disk(run_dir: Path) -> dict:
    def size(paths) -> int:
        return sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())

    checkpoints = [*run_dir.glob("checkpoint-*"), *run_dir.glob("round-*/checkpoint-*")]
    total = size([run_dir])
    return {"total": total, "final": size([run_dir / "final"]) if (run_dir / "final").exists() else 0,
            "checkpoints": size(checkpoints), "optimizer_files": len(list(run_dir.rglob("optimizer.pt")))}


def run_numbers(run_dir: Path, phases: list[dict]) -> dict:
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    runtime = next((m["train_runtime"] for m in reversed(metrics) if "train_runtime" in m), None)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    steps = summary.get("steps")
    evaluation = json.loads((run_dir / "eval" / "metrics.json").read_text()) \
        if (run_dir / "eval" / "metrics.json").is_file() else {}
    n_prompts = sum(s.get("n", 0) for s in (evaluation.get("suites") or {}).values())
    eval_phase = [p for p in phases if p["phase"] == "evaluating" and p["run"] == run_dir.name]
    train_phase = [p for p in phases if p["phase"] == "training" and p["run"] == run_dir.name]
    return {
        "run": run_dir.name,
        "steps": steps,
        "seconds_per_step": round(runtime / steps, 1) if runtime and steps else None,
        "train_phase_seconds": train_phase[-1]["seconds"] if train_phase else None,
        "train_phase_peak_rss": train_phase[-1]["rss_max"] if train_phase else None,
        "dtype": summary.get("dtype"),
        "eval_prompts": n_prompts,
        "eval_phase_seconds_per_prompt": round(eval_phase[-1]["seconds"] / n_prompts, 2)
        if eval_phase and n_prompts else None,
        "eval_answer_seconds_per_prompt": (evaluation.get("seconds") or {}).get("per_prompt"),
        "eval_load_seconds": (evaluation.get("seconds") or {}).get("load"),
        "eval_phase_peak_rss": eval_phase[-1]["rss_max"] if eval_phase else None,
        "disk": disk(run_dir),
    }


def gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}G"


def mib(n) -> str:
    return f"{n / 2**20:.0f}M"


def main(argv=None) -> int:
    args = parse_args(argv)
    import psutil

    temporary = None if args.out else tempfile.TemporaryDirectory(prefix="equi-ladder-bench-")
    out = Path(args.out or temporary.name)
    out.mkdir(parents=True, exist_ok=True)
    mix = Path(args.mix) if args.mix else out / "mix"
    if not args.mix and not (mix / "manifest.json").is_file():
        inputs = sorted(str(p) for p in (REPO / "examples" / "data").glob("*.jsonl*"))
        subprocess.run(equi("curate", *inputs, "--out", str(mix), "--quiet"), check=True, cwd=REPO)
    command = equi("scale", "--mix", str(mix), "--scales", args.scales, "--groups", args.groups,
                   "--max-steps", str(args.max_steps), "--eval-limit", str(args.eval_limit),
                   "--out", str(out / "runs"), *(["--model", args.model] if args.model else []),
                   *(["--keep-checkpoints"] if args.keep_checkpoints else []), *args.extra.split())
    print("running:", " ".join(command[2:]), f"(load average {os.getloadavg()[0]:.1f}, "
          f"{psutil.cpu_count()} CPUs)", file=sys.stderr)
    measured = run_measured(command)
    if measured["exit_code"] != 0:
        print("\n".join(measured["stderr_tail"]), file=sys.stderr)
        print(f"equi scale failed (exit {measured['exit_code']})", file=sys.stderr)
        return 1
    runs = sorted(p for p in (out / "runs").iterdir() if (p / "ladder.json").is_file())
    rows = [run_numbers(run, measured["phases"]) for run in runs]
    print(f"equi scale: {measured['seconds']} s, peak RSS {gib(measured['peak_rss_bytes'])} "
          f"(load average after: {os.getloadavg()[0]:.1f})")
    header = ("run", "s/step", "train s", "train RSS", "eval s/prompt", "answer s/prompt", "eval RSS", "disk",
              "final", "ckpt", "dtype")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join(str(x) for x in (
            r["run"], r["seconds_per_step"], r["train_phase_seconds"], gib(r["train_phase_peak_rss"]),
            r["eval_phase_seconds_per_prompt"], r["eval_answer_seconds_per_prompt"], gib(r["eval_phase_peak_rss"]),
            mib(r["disk"]["total"]), mib(r["disk"]["final"]), mib(r["disk"]["checkpoints"]), r["dtype"])))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command[2:], "ladder": {k: v for k, v in measured.items()
                                                                                  if k != "stderr_tail"},
                                               "runs": rows}, indent=2))
    if temporary is not None:
        temporary.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
