"""Test material for ``train/``: a small real mix and a tiny locally built model.

The mix holds REAL text: single-turn Anthropic HH-RLHF harmless-base test pairs from ``shared/data``
(MIT licence, see its SOURCE.md). Its group / score / cost / span columns are SYNTHETIC labels made by the
simple rules below — they exercise the contract's layout, they are not curation output. When ``equi curate``
is available end to end, ``build_hh_mix`` can be replaced by a call to it on the same file.

The model is a 2-layer Llama (hidden size 32) with a byte-level BPE tokenizer trained here, in process, on
the same texts, and a ChatML chat template (like SmolLM2's), saved to disk so the real loading code runs.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from equi.schema import MIX_SCHEMA, POOL_SCHEMA, SCHEMA_VERSION, shard_name

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_HARMLESS = SHARED_DATA / "hh_rlhf_harmless_base" / "test.jsonl.gz"

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_REFUSAL = re.compile(r"\b(sorry|can't|cannot|won't|not able|i don't think|shouldn't)\b", re.IGNORECASE)
_EXPLICIT = re.compile(r"\b(kill|poison|bomb|gun|drug|steal|hack|weapon|murder|hurt)\w*", re.IGNORECASE)


def read_hh_single_turn(limit: int, path: Path = HH_HARMLESS) -> list[dict]:
    """Single-turn pairs from the hh-rlhf file: prompt = the Human turn, chosen/rejected = the Assistant turns."""
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            record = json.loads(line)
            parsed = [_split_single_turn(record[key]) for key in ("chosen", "rejected")]
            if None in parsed or parsed[0][0] != parsed[1][0]:
                continue
            (prompt, chosen), (_, rejected) = parsed
            if not chosen or not rejected or chosen == rejected:
                continue
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "source_line": line_number})
            if len(rows) >= limit:
                break
    return rows


def _split_single_turn(transcript: str) -> tuple[str, str] | None:
    if transcript.count("\n\nHuman:") != 1 or transcript.count("\n\nAssistant:") != 1:
        return None
    human, _, assistant = transcript.partition("\n\nAssistant:")
    return human.replace("\n\nHuman:", "", 1).strip(), assistant.strip()


def _sentence_bounds(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(r"[^.!?\n]+[.!?]?", text) if m.group().strip()]


def synthetic_labels(row: dict) -> dict:
    """Rule-based labels on real text (NOT curation output): enough to exercise every contract column."""
    explicit = 1.0 if _EXPLICIT.search(row["prompt"]) else 0.0
    intent = 1.0 if re.search(r"\b(how (do|can) i|best way|help me)\b", row["prompt"], re.IGNORECASE) else 0.0
    group = {(1.0, 1.0): "MHD", (1.0, 0.0): "EHD", (0.0, 1.0): "IHD"}.get((explicit, intent), "BENIGN")
    chosen_refuses = bool(_REFUSAL.search(row["chosen"]))
    rejected_refuses = bool(_REFUSAL.search(row["rejected"]))
    chosen_sentences, rejected_sentences = _sentence_bounds(row["chosen"]), _sentence_bounds(row["rejected"])
    # Rule: the last sentence of a multi-sentence chosen answer is a "bad segment" (sign -1); the first
    # sentence of a rejected answer is a "good segment" (sign +1). Arbitrary, but real offsets into real text.
    chosen_spans = (
        [{"start": chosen_sentences[-1][0], "end": chosen_sentences[-1][1], "sign": -1}]
        if len(chosen_sentences) > 1
        else []
    )
    rejected_spans = (
        [{"start": rejected_sentences[0][0], "end": rejected_sentences[0][1], "sign": 1}] if rejected_sentences else []
    )
    safety = group != "BENIGN"
    return {
        "group": group,
        "group_confidence": 0.5,
        "explicit_score": explicit,
        "intent_score": intent,
        "severity": ("severe" if explicit and intent else "moderate" if explicit else "minor") if safety else None,
        "harm_category": None,
        "cluster": 0,
        "chosen_refusal": 1.0 if chosen_refuses else 0.0,
        "rejected_refusal": 1.0 if rejected_refuses else 0.0,
        "response_refusal": None,
        "chosen_cost": -1.0,
        "rejected_cost": 1.0 if safety and not rejected_refuses else -0.5,
        "response_cost": None,
        "chosen_spans": chosen_spans,
        "rejected_spans": rejected_spans,
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_hh_mix(out: Path, n_rows: int = 48, n_eval: int = 8) -> Path:
    """Write a contract-shaped mix directory of ``n_rows`` real hh-rlhf pairs (``n_eval`` of them in ``test``), in
    the contract's conversational format."""
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    pairs = read_hh_single_turn(n_rows)
    assert len(pairs) == n_rows, f"{HH_HARMLESS} has only {len(pairs)} single-turn pairs"
    records = []
    for index, pair in enumerate(pairs):
        record = {
            "id": hashlib.sha256(json.dumps(pair, sort_keys=True).encode()).hexdigest()[:16],
            "source": HH_HARMLESS.name,
            "source_line": pair["source_line"],
            "prompt": [{"role": "user", "content": pair["prompt"]}],
            "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}],
            "response": None,
            "split": "test" if index >= n_rows - n_eval else "train",
            "rank": index if index < n_rows - n_eval else index - (n_rows - n_eval),  # ranks count within a split
        }
        record.update(synthetic_labels(pair))
        records.append(record)
    shards = []
    for split in ("train", "test"):
        rows = [r for r in records if r["split"] == split]
        path = out / "data" / shard_name(split, 0, 1)
        pq.write_table(pa.Table.from_pylist(rows, schema=MIX_SCHEMA), path)
        shards.append({"path": f"data/{path.name}", "sha256": _sha256(path), "rows": len(rows), "split": split})
    counts: dict[str, dict[str, int]] = {}
    for r in records:
        counts.setdefault(r["group"], {}).setdefault(r["split"], 0)
        counts[r["group"]][r["split"]] += 1
    # The pool holds every row (all of them mixed) and the card's default config reads data/: a complete mix that
    # `equi verify` checks like a curated one.
    (out / "pool").mkdir(exist_ok=True)
    pool = out / "pool" / shard_name("pool", 0, 1)
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "rank"} for r in records],
                                        schema=POOL_SCHEMA), pool)
    shards.insert(0, {"path": f"pool/{pool.name}", "sha256": _sha256(pool), "rows": n_rows, "split": "pool"})
    (out / "README.md").write_text("---\nconfigs:\n- config_name: default\n  default: true\n  data_files:\n"
                                   "  - split: train\n    path: data/train-*.parquet\n"
                                   "  - split: test\n    path: data/test-*.parquet\n---\n\n"
                                   "# Test fixture: real hh-rlhf text, synthetic labels\n")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "equi_version": "test-fixture",
        "created_at": "1970-01-01T00:00:00Z",
        "config": {"note": "tests/train_fixtures.py: real hh-rlhf text, synthetic labels"},
        "inputs": [{"path": str(HH_HARMLESS), "sha256": _sha256(HH_HARMLESS)}],
        "shards": shards,
        "counts": {"pool": {g: sum(by_split.values()) for g, by_split in counts.items()}, "mixture": counts},
        "files": {"README.md": _sha256(out / "README.md")},
        "accounting": {
            "input_lines": n_rows,
            "pooled": n_rows,
            "rejected": 0,
            "mixed": n_rows,
            "mixture_rows": n_rows,
            "not_selected": {},
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def build_tiny_model(out: Path, texts: list[str] | None = None, vocab_size: int = 400, seed: int = 0,
                     layers: int = 2) -> Path:
    """A 2-layer (``layers``) Llama (hidden 32) and a byte-level BPE tokenizer trained here; saved for
    ``from_pretrained``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    if texts is None:
        texts = [t for r in read_hh_single_turn(200) for t in (r["prompt"], r["chosen"], r["rejected"])]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out
