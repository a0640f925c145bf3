"""Curation throughput: rows/s end to end, peak RSS, and the ratio to the raw encoder on the same texts.

Real rows (HH-RLHF harmless-base pairs, XSTest completions, AdvBench behaviours from ../shared/data),
resampled with replacement to --rows lines. Resampling repeats rows, so exact duplicates make most of a large
input: the pool and every pass scale with --rows, but the mixture stays small (duplicates are dropped).

    python bench/curate_throughput.py [--rows 20000] [--embedder NAME|static] [--workers N]

With ``--embedder static`` (``pip install -e ".[fast]"``) a categoriser for the static embeddings is first fit on
the Equilibrate relabelled BeaverTails prompts (``shared/data/equilibrate_relabel_dev``) and cached in
``$EQUI_CACHE/bench``. Targets (issue 6, 2 cores): static ≥ 20,000 rows/s end to end, MiniLM pipeline ≥ 0.9×
the raw encoder, peak RSS < 2 GiB at 1,000,000 rows.

    python bench/curate_throughput.py --heuristics-only [--repeats 5]

prints the CPU cost a row of each per-row heuristic (refusal detector on every response, the withheld score the
cost reads, AMA segment spans, the categoriser's prompt lexicon) on ~5,700 distinct real rows (~7,500 responses), no
encoder and no GPU: the ceiling those heuristics put on rows/s per core, whatever the encoder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_input(rows: int, seed: int, path: Path) -> None:
    import numpy as np

    from tests.realdata import advbench_rows, hh_lines, xstest_single_responses

    shared = REPO.parent / "shared" / "data"
    pool = hh_lines(shared, 1850)
    pool += [json.dumps(r) for m in ("llama2new", "mistralinstruct", "gpt4") for r in xstest_single_responses(shared, m)]
    pool += [json.dumps(r) for r in advbench_rows(shared)]
    picks = np.random.default_rng(seed).integers(0, len(pool), rows)
    lines = [pool[i] for i in picks]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def encoder_rows_per_s(raw: Path, embedder: str | None, limit: int | None = None, batch: int = 4096) -> float:
    """The raw encoder alone on exactly the texts the pipeline embeds (the first ``limit`` of them), in the
    pipeline's batches of ``batch`` lines (``equi curate``'s default ``--batch-size``): an encoder call embeds each
    distinct text once, so one call over a resampled input would embed far fewer texts than the pipeline does."""
    from curation.embed import get_embedder
    from curation.steps import text_for_embedding
    from curation.readers import RawRow, read_rows

    texts = [text_for_embedding(row.prompt) for row in read_rows([str(raw)]) if isinstance(row, RawRow)]
    texts = texts[:limit] if limit else texts
    model = get_embedder(embedder)
    model.encode(texts[:64])  # warm-up
    start = time.perf_counter()
    for first in range(0, len(texts), batch):
        model.encode(texts[first:first + batch])
    return len(texts) / (time.perf_counter() - start)


def static_categoriser() -> Path:
    """A categoriser fit on static embeddings of real labelled prompts (the bundled one is fit on MiniLM's)."""
    from equi.cache import cache_dir

    path = cache_dir() / "bench" / "categoriser-static.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        labelled = REPO.parent / "shared" / "data" / "equilibrate_relabel_dev" / "beavertails_relabelled_dev.jsonl"
        subprocess.run([sys.executable, "-m", "equi.cli", "fit-categoriser", str(labelled), "--embedder", "static",
                        "--folds", "0", "--out", str(path)], check=True, stdout=subprocess.DEVNULL)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--embedder", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="equi curate --workers")
    parser.add_argument("--cache", action="store_true",
                        help="let the pipeline use its embedding cache (resampled rows repeat, so it embeds fewer "
                             "texts than the raw encoder; off by default for a like-for-like ratio)")
    parser.add_argument("--raw-rows", type=int, default=None,
                        help="time the raw encoder on the first N texts only (default: all; MiniLM takes ~2 h "
                             "for 1,000,000 on 2 cores)")
    parser.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--heuristics-only", action="store_true",
                        help="time only the per-row heuristics (no encoder), µs a row by heuristic")
    parser.add_argument("--repeats", type=int, default=5, help="--heuristics-only: timings taken (the min is shown)")
    args = parser.parse_args()
    if args.heuristics_only:
        heuristics_only(args.repeats)
        return
    if args.build_only:
        build_input(args.rows, args.seed, args.build_only)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.jsonl"
        # Built in a child: a process forked from a parent that held the input starts with the parent's
        # RSS, which would then count as the pipeline's peak.
        subprocess.run([sys.executable, __file__, "--build-only", str(raw), "--rows", str(args.rows),
                        "--seed", str(args.seed)], check=True)
        # The pipeline runs in a child process so its peak RSS is its own.
        cmd = [sys.executable, "-m", "equi.cli", "curate", str(raw), "--out", str(Path(tmp) / "mix"), "--quiet"]
        if args.embedder:
            cmd += ["--embedder", args.embedder]
        cmd += ["--workers", str(args.workers)]
        if args.embedder == "static":
            cmd += ["--categoriser", str(static_categoriser())]
        if not args.cache:
            cmd += ["--no-cache"]
        # The raw encoder is timed before and after the pipeline: this machine's speed drifts by up to 20% over
        # minutes, and a single timing taken after a long run compared two different machines.
        raw_before = encoder_rows_per_s(raw, args.embedder, args.raw_rows)
        start = time.perf_counter()
        child = subprocess.Popen(cmd)
        tree = TreeRss(child.pid)
        _, status, usage = os.wait4(child.pid, 0)
        elapsed = time.perf_counter() - start
        tree.stop()
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"equi curate failed: {cmd}")
        # That process's peak (or, with --workers, its largest worker's, if larger).
        peak_mib = usage.ru_maxrss / 1024
        # CPU time of the process and its workers: steadier than wall time on a machine shared with others.
        cpu_s = usage.ru_utime + usage.ru_stime
        timings = json.loads((Path(tmp) / "mix" / "manifest.json").read_text())["timings_s"]
        raw_after = encoder_rows_per_s(raw, args.embedder, args.raw_rows)
    raw_rate = (raw_before + raw_after) / 2
    rate = args.rows / elapsed
    print(f"rows                 {args.rows}")
    print(f"end-to-end           {rate:,.0f} rows/s ({elapsed:.1f} s, including model load)")
    on = f"the first {args.raw_rows:,} of the same prompts" if args.raw_rows else "the same prompts"
    print(f"raw encoder          {raw_rate:,.0f} rows/s on {on} (mean of {raw_before:,.0f} before and "
          f"{raw_after:,.0f} after the pipeline)")
    print(f"pipeline / encoder   {rate / raw_rate:.2f}x (against the slower timing {rate / min(raw_before, raw_after):.2f}x, "
          f"the faster {rate / max(raw_before, raw_after):.2f}x)")
    pass1 = args.rows / timings["read_and_score"]
    print(f"pass 1 (read+score)  {pass1:,.0f} rows/s, {pass1 / raw_rate:.2f}x the raw encoder; the rest of the "
          f"{elapsed:.0f} s: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items() if k != "read_and_score")
          + f", the rest (Python start-up, manifest) {elapsed - sum(timings.values()):.1f} s")
    print(f"CPU time             {cpu_s:.1f} s ({1000 * cpu_s / args.rows:.2f} s per 1,000 rows, workers included)")
    print(f"peak RSS             {peak_mib:,.0f} MiB (the largest process)")
    print(f"peak RSS, all        {tree.peak_mib:,.0f} MiB (curate and its workers together, sampled every 0.1 s)")
    print(f"| {args.embedder or 'all-MiniLM-L6-v2'} | {args.workers} | {args.rows:,} | {rate:,.0f} rows/s | {raw_rate:,.0f} rows/s "
          f"| {rate / raw_rate:.2f}x | {1000 * cpu_s / args.rows:.2f} s | {peak_mib / 1024:.2f} GiB "
          f"| {tree.peak_mib / 1024:.2f} GiB |")


def distinct_rows() -> list[str]:
    """Every real row once (no resampling, so no repeated text is scored from a cache): HH-RLHF harmless-base pairs,
    XSTest completions of all five models, refusal-direction completions and AdvBench targets, as JSON lines."""
    from tests.realdata import advbench_rows, hh_lines, xstest_single_responses

    shared = REPO.parent / "shared" / "data"
    lines = hh_lines(shared, 10**6)
    models = sorted(p.name.removeprefix("xstest_v2_completions_").removesuffix(".csv") for p in
                    (shared / "xstest_completions_dev" / "model_completions").glob("xstest_v2_completions_*.csv"))
    lines += [json.dumps(r) for m in models for r in xstest_single_responses(shared, m)]
    for path in sorted((shared / "refusal_direction_completions").glob("*/*_evaluations.json")):
        lines += [json.dumps({"prompt": r["prompt"], "response": r["response"], "source": "refusal_direction"})
                  for r in json.loads(path.read_text(encoding="utf-8"))["completions"]]
    lines += [json.dumps(r) for r in advbench_rows(shared)]
    return lines


def heuristics_only(repeats: int) -> None:
    """CPU µs a row of each per-row heuristic, called as ``equi curate`` calls them (min of ``repeats``)."""
    import numpy as np

    from curation import refusal
    from curation.categorise import lexicon_features
    from curation.readers import RawRow, read_rows
    from curation.segments import pair_span_columns, split_segments, withheld_scores

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.jsonl"
        raw.write_text("\n".join(distinct_rows()) + "\n", encoding="utf-8")
        rows = [r for r in read_rows([str(raw)]) if isinstance(r, RawRow)]
    n = len(rows)
    prompts = [r.prompt for r in rows]
    # as curation.steps calls them: the refusal detector once over every response column, spans over the pairs'
    # chosen and rejected answers (single-response rows are paired up later; here their response stands in)
    responses = [t for c in ("chosen", "rejected", "response") for t in (getattr(r, c) for r in rows) if t is not None]
    harm = list(np.random.default_rng(0).random(n).astype(np.float32))
    chosen = [r.chosen if r.chosen is not None else r.response for r in rows]
    rejected = [r.rejected for r in rows]
    distinct = list(dict.fromkeys(responses))
    refusal.load_heads()
    refusals = refusal.refusal_scores(responses)
    parts = {
        "refusal: heuristic features": lambda: refusal.refusal_features(distinct),
        "refusal: hashed n-grams": lambda: refusal._ngram_features(distinct),
        "refusal: whole (refusal_scores)": lambda: refusal.refusal_scores(responses),
        "cost: withheld (refuse-then-comply)": lambda: withheld_scores(responses, refusals),
        "spans: split_segments": lambda: [split_segments(t) for t in dict.fromkeys(chosen + rejected) if t],
        "spans: whole (pair_span_columns)": lambda: pair_span_columns(harm, chosen, rejected),
        "categoriser lexicon (prompts)": lambda: lexicon_features(prompts),
    }
    wholes = ("refusal: whole (refusal_scores)", "cost: withheld (refuse-then-comply)",
              "spans: whole (pair_span_columns)", "categoriser lexicon (prompts)")
    print(f"{n:,} distinct real rows, {len(responses):,} responses, {sum(t is not None for t in rejected):,} pairs; "
          f"CPU time (all threads) and wall, min of {repeats}")
    total_cpu = total_wall = 0.0
    for name, fn in parts.items():
        fn()  # warm-up: compiled patterns, polars' regex cache
        cpu, wall = [], []
        for _ in range(repeats):
            c, w = time.process_time(), time.perf_counter()
            fn()
            cpu.append(time.process_time() - c)
            wall.append(time.perf_counter() - w)
        print(f"  {name:<36} {1e6 * min(cpu) / n:7.1f} µs/row CPU  {1e6 * min(wall) / n:7.1f} µs/row wall")
        if name in wholes:
            total_cpu += min(cpu)
            total_wall += min(wall)
    print(f"  {'all heuristics':<36} {1e6 * total_cpu / n:7.1f} µs/row CPU  {1e6 * total_wall / n:7.1f} µs/row wall"
          f"  -> ceiling {n / total_cpu:,.0f} rows/s per CPU-second")


class TreeRss:
    """The peak of the summed resident memory of a process and its descendants, sampled from /proc (Linux)."""

    def __init__(self, pid: int, every: float = 0.1):
        import threading

        self.pid, self.every, self.peak_mib = pid, every, 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        page_mib = os.sysconf("SC_PAGE_SIZE") / 2**20
        while not self._done.wait(self.every):
            parents: dict[int, int] = {}
            for entry in Path("/proc").iterdir():
                try:
                    if entry.name.isdigit():  # the ppid is the field after the parenthesised command name
                        parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
            tree, grew = {self.pid}, True
            while grew:
                more = {p for p, parent in parents.items() if parent in tree} - tree
                tree |= more
                grew = bool(more)
            total = 0
            for p in tree:
                try:
                    total += int(Path(f"/proc/{p}/statm").read_text().split()[1])
                except (OSError, ValueError, IndexError):
                    continue
            self.peak_mib = max(self.peak_mib, total * page_mib)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


if __name__ == "__main__":
    main()
