"""Step-time and peak-memory ratio of AMA-DPO over plain TRL DPO on the same batches.

    python bench/ama_dpo_overhead.py [--model PATH] [--steps 20] [--batch-size 4] [--max-length 256]

Both trainers see the same real hh-rlhf pairs (``shared/data``), the same model weights and the same collated
batches (AMA's only differ in ``completion_mask``); each step is forward + backward + optimiser step. Without
``--model`` a small Llama is built in process (no download). Prints the two ratios; target step-time ratio ≤ 1.05.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def peak_memory_mb(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS on Linux (KiB)


def time_steps(trainer, batches, steps: int) -> tuple[list[float], float]:
    import torch

    device = trainer.accelerator.device
    model = trainer.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps):
        batch = {k: v.to(device) for k, v in batches[step % len(batches)].items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, peak_memory_mb(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path [default: a small Llama built here]")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from train.ama_dpo import AmaDPOTrainer
    from train.mixdata import load_split
    from train_fixtures import build_hh_mix, build_tiny_model

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="equi-bench-"))
    n_pairs = args.batch_size * 8
    mix = build_hh_mix(work / "mix", n_rows=n_pairs + 2, n_eval=2)
    model_path = args.model or str(build_tiny_model(work / "model"))
    pairs = load_split(mix, "train").dataset
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    config = dict(beta=0.1, max_length=args.max_length, report_to="none", bf16=False, gradient_checkpointing=False,
                  precompute_ref_log_probs=False, dataloader_pin_memory=False)

    def build(kind: str):
        model = AutoModelForCausalLM.from_pretrained(model_path)
        ref = AutoModelForCausalLM.from_pretrained(model_path)
        dpo_args = DPOConfig(output_dir=str(work / kind), **config)
        if kind == "trl":
            return DPOTrainer(model, ref_model=ref, args=dpo_args, train_dataset=pairs,  # the mix's rows are conversational
                              processing_class=tokenizer)
        return AmaDPOTrainer(model, ref_model=ref, args=dpo_args, train_dataset=pairs, processing_class=tokenizer)

    results = {}
    for kind in ("trl", "ama", "trl", "ama"):  # interleaved twice, so drift hits both
        trainer = build(kind)
        trainer._set_signature_columns_if_needed()
        columns = set(trainer._signature_columns)
        rows = [{k: v for k, v in trainer.train_dataset[i].items() if k in columns} for i in range(n_pairs)]
        collate_start = time.perf_counter()
        batches = [trainer.data_collator(rows[i : i + args.batch_size]) for i in range(0, n_pairs, args.batch_size)]
        collate = (time.perf_counter() - collate_start) / len(batches)
        for batch in batches:
            for key in ("ama_response_tokens", "ama_kept_tokens"):
                batch.pop(key, None)
        times, peak = time_steps(trainer, batches, args.warmup + args.steps)
        measured = times[args.warmup :]
        results.setdefault(kind, []).append((statistics.median(measured) + collate, peak))
        del trainer

    step = {k: statistics.median(t for t, _ in v) for k, v in results.items()}
    peak = {k: max(p for _, p in v) for k, v in results.items()}
    device = "cuda" if torch.cuda.is_available() else f"cpu ({args.threads} threads)"
    print(f"device: {device}; model: {model_path}; batch {args.batch_size} pairs; max_length {args.max_length}")
    print(f"plain TRL DPO step: {step['trl'] * 1000:.1f} ms   AMA-DPO step: {step['ama'] * 1000:.1f} ms")
    print(f"step-time ratio AMA-DPO / TRL DPO: {step['ama'] / step['trl']:.3f}  (target <= 1.05)")
    print(f"peak-memory ratio AMA-DPO / TRL DPO: {peak['ama'] / peak['trl']:.3f}")


if __name__ == "__main__":
    main()
