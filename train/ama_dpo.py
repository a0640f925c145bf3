"""AMA-DPO on TRL's ``DPOTrainer``: per-sequence log-ratios sum only over tokens whose AMA mask is 1.

The seam (TRL 1.16): ``DPOTrainer._compute_loss`` turns the batch's ``completion_mask`` into ``labels``
(−100 where the mask is 0) and the fused LM head returns exactly 0 log-prob at label −100; the reference
pass (live, or precomputed through the same collator) does the same. So multiplying the AMA mask into
``completion_mask`` in the collator gives

    L = −log σ(β[Σ m_w·log(π/π_ref)(y_w) − Σ m_l·log(π/π_ref)(y_l)])

without copying TRL's loss code. What else reads ``completion_mask`` then sees only unmasked tokens too:
``ipo``/``sigmoid_norm`` normalise by the unmasked count, and the entropy / logits / accuracy metrics are over
unmasked tokens. ``ld_alpha`` (length-desensitised DPO) would re-interpret masked holes as length, so it is refused.
The EOS/end-of-turn tokens TRL or the chat template append lie outside every span and keep mask 1.

``dpo`` uses the same trainer with masks off, so the baseline differs from AMA in the masks only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from equi.config import ConfigError

from train.masks import response_token_mask, truncate_like_collator
from train.mixdata import chat_format

logger = logging.getLogger(__name__)

AMA_COLUMNS = ("chosen_ama_mask", "rejected_ama_mask")
# Collator outputs that are statistics, not model inputs; removed before the model sees the batch.
_AMA_STAT_KEYS = ("ama_response_tokens", "ama_kept_tokens")


@dataclass
class AmaPreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator, with the AMA token masks multiplied into ``completion_mask``.

    The AMA vectors are laid out position by position like ``prompt_ids + response_ids``, truncated with the
    collator's own rule and padded with 1, so they stay aligned with whatever TRL did to the ids.
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        if AMA_COLUMNS[0] not in examples[0]:
            return output
        width = output["completion_mask"].shape[1]
        rows = []
        for side in AMA_COLUMNS:
            for example in examples:
                per_position = [1] * len(example["prompt_ids"]) + list(example[side])
                per_position = truncate_like_collator(per_position, self.max_length, self.truncation_mode)
                rows.append(per_position + [1] * (width - len(per_position)))
        ama = torch.tensor(rows, dtype=output["completion_mask"].dtype)
        before = output["completion_mask"]
        output["completion_mask"] = before * ama
        output["ama_response_tokens"] = before.sum().reshape(1)
        output["ama_kept_tokens"] = output["completion_mask"].sum().reshape(1)
        return output


def _response_offsets(tokenizer, example: dict[str, Any], side: str) -> tuple[list[int], list, int] | None:
    """Token ids and character offsets of prompt+response as TRL tokenises them, and where the response starts.

    ``None`` when the response cannot be located in the rendered text (a template that rewrites content).
    """
    prompt, response = example["prompt"], example[side]
    if isinstance(prompt, list):  # conversational: TRL renders prompt+response with the chat template
        text = tokenizer.apply_chat_template(prompt + response, tokenize=False)
        content = response[0]["content"]
        rendered_prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        shared = os.path.commonprefix([rendered_prompt, text])
        start = text.find(content, len(shared))
        lead = 0
        if start < 0:  # templates that trim content: find the stripped text and shift spans by what was cut
            stripped = content.strip()
            lead = len(content) - len(content.lstrip())
            start = text.find(stripped, len(shared)) if stripped else -1
            if start < 0:
                return None
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return encoding["input_ids"], encoding["offset_mapping"], start - lead
    text = prompt + response  # TRL appended the EOS text to the response already
    encoding = tokenizer(text, return_offsets_mapping=True)
    return encoding["input_ids"], encoding["offset_mapping"], len(prompt)


def ama_masks_for_example(example: dict[str, Any], tokenizer) -> dict[str, Any]:
    """The AMA mask of each response's tokens, aligned with TRL's ``chosen_ids`` / ``rejected_ids``.

    If our tokenisation does not reproduce TRL's ids (it should; this is a guard), the row keeps all-ones
    masks — plain DPO for that row — and is counted in ``ama_unaligned``.
    """
    out: dict[str, Any] = {"ama_unaligned": False}
    prompt_len = len(example["prompt_ids"])
    for side in ("chosen", "rejected"):
        response_ids = example[f"{side}_ids"]
        located = _response_offsets(tokenizer, example, side)
        mask = None
        if located is not None:
            ids, offsets, start = located
            if ids[: prompt_len + len(response_ids)] == list(example["prompt_ids"]) + list(response_ids):
                completion_offsets = offsets[prompt_len : prompt_len + len(response_ids)]
                mask = response_token_mask(completion_offsets, example.get(f"{side}_spans"), side, start)
        if mask is None:
            out["ama_unaligned"] = True
            mask = [1] * len(response_ids)
        out[f"{side}_ama_mask"] = mask
    return out


class AmaDPOTrainer(DPOTrainer):
    """``DPOTrainer`` that reads a mix: AMA token masks, per-group sampling weights, a shared reference cache.

    Args (beyond ``DPOTrainer``'s):
        use_ama_masks: ``False`` gives plain TRL DPO (the ``dpo`` baseline) with the same data plumbing.
        group_weights: ``{group: weight}``; pairs are drawn with probability ∝ weight, so each group's pairs
            count ``weight`` times in expectation (the same gradient as scaling their loss, without touching
            TRL's loss code). ``None`` = uniform shuffling. Exact per-pair loss scaling has no seam in TRL 1.16:
            ``DPOTrainer._compute_loss`` reduces ``per_sequence_loss.mean()`` inside the one method (its only
            per-pair factor is WPO's ``use_weighting``, computed from the policy's own probabilities), so it would
            mean copying that method; sampling gives the same expected gradient, with more variance.
        ref_cache_dir: where reference log-probs are cached per row id; ``None`` = no cross-run cache.
    """

    _tag_names = ["trl", "dpo", "equi", "ama-dpo"]

    def __init__(
        self,
        model,
        *,
        use_ama_masks: bool = True,
        group_weights: dict[str, float] | None = None,
        ref_cache_dir: str | os.PathLike | None = None,
        **kwargs,
    ):
        self.use_ama_masks = use_ama_masks
        self.group_weights = group_weights
        self.ref_cache_dir = Path(ref_cache_dir) if ref_cache_dir is not None else None
        self._train_pair_weights: list[float] | None = None
        self.ama_unaligned_rows = 0
        self.ref_cache_hits: dict[str, int] = {}  # per dataset name: rows whose reference log-probs were cached
        self.rows_dropped_too_long = 0  # TRL drops pairs whose prompt alone fills max_length; we count them
        args = kwargs.get("args")  # keyword-only here, so equi can build the AMA collator from it
        if args is not None and use_ama_masks and args.ld_alpha is not None:
            raise ValueError("ama-dpo cannot be combined with ld_alpha: masked tokens would count as length")
        if kwargs.get("data_collator") is None and args is not None:
            # The pad token is only known once the tokenizer is; build the collator like DPOTrainer would.
            tokenizer = kwargs.get("processing_class")
            if tokenizer is not None and tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            if tokenizer is not None:
                kwargs["data_collator"] = AmaPreferenceCollator(
                    pad_token_id=tokenizer.pad_token_id,
                    max_length=args.max_length,
                    truncation_mode=args.truncation_mode,
                    pad_to_multiple_of=args.pad_to_multiple_of,
                )
        super().__init__(model, **kwargs)

    # ---- data -------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if AMA_COLUMNS[0] in dataset.column_names:  # already prepared (evaluate() re-enters here)
            return dataset
        tokenizer = self._tokenizer
        # Instruct models see their chat template (TRL renders it for conversational rows); others, plain text.
        dataset = chat_format(dataset, tokenizer)
        if dataset_name == "train" and self.group_weights is not None and "group" in dataset.column_names:
            self._train_pair_weights = [float(self.group_weights.get(g, 1.0)) for g in dataset["group"]]
        rows_before = len(dataset)
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if rows_before and not len(dataset):
            use = "train" if dataset_name == "train" else "evaluate"
            raise ConfigError(f"every one of the {rows_before} {dataset_name} pairs has a prompt longer than "
                              f"--max-length {args.max_length} tokens: nothing left to {use} on; raise --max-length")
        if dataset_name == "train":
            self.rows_dropped_too_long += rows_before - len(dataset)
        if dataset_name == "train" and self._train_pair_weights is not None:
            if len(self._train_pair_weights) != len(dataset):  # TRL dropped fully truncated prompts
                self._train_pair_weights = [float(self.group_weights.get(g, 1.0)) for g in dataset["group"]]
            if not any(self._train_pair_weights):
                raise ConfigError(f"--group-weights give weight 0 to every training pair (their groups: "
                                  f"{', '.join(sorted(set(dataset['group'])))}): nothing would be sampled")
        if self.use_ama_masks:
            dataset = dataset.map(
                ama_masks_for_example,
                fn_kwargs={"tokenizer": tokenizer},
                desc=f"AMA token masks for {dataset_name} dataset",
            )
        else:
            dataset = dataset.map(
                lambda ex: {
                    "chosen_ama_mask": [1] * len(ex["chosen_ids"]),
                    "rejected_ama_mask": [1] * len(ex["rejected_ids"]),
                    "ama_unaligned": False,
                },
                desc=f"All-ones masks for {dataset_name} dataset",
            )
        unaligned = sum(dataset["ama_unaligned"])
        if unaligned:
            logger.warning("%d %s rows could not be aligned for AMA masks and train unmasked", unaligned, dataset_name)
        self.ama_unaligned_rows += unaligned
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in AMA_COLUMNS:
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _get_train_sampler(self, train_dataset=None):
        if self._train_pair_weights is None:
            return super()._get_train_sampler(train_dataset)
        generator = torch.Generator().manual_seed(self.args.seed)
        weights = torch.tensor(self._train_pair_weights, dtype=torch.double)
        return torch.utils.data.WeightedRandomSampler(weights, len(weights), replacement=True, generator=generator)

    # ---- loss -------------------------------------------------------------------------------------------------

    def _pop_ama_stats(self, inputs: dict[str, Any]) -> None:
        response = inputs.pop("ama_response_tokens", None)
        kept = inputs.pop("ama_kept_tokens", None)
        if response is None:
            return
        mode = "train" if self.model.training else "eval"
        response = self.accelerator.gather_for_metrics(response.sum()).sum().item()
        kept = self.accelerator.gather_for_metrics(kept.sum()).sum().item()
        self._metrics[mode]["ama/masked_fraction"].append(1.0 - kept / response if response else 0.0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._pop_ama_stats(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def compute_ref_log_probs(self, model, inputs):
        for key in _AMA_STAT_KEYS:
            inputs.pop(key, None)
        return super().compute_ref_log_probs(model, inputs)

    # ---- reference log-prob cache -------------------------------------------------------------------------------

    def _ref_cache_key(self) -> str:
        tokenizer = self._tokenizer
        identity = {
            "model": self._precompute_model_hash,
            "tokenizer": hashlib.sha256(
                json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()
                + str(tokenizer.chat_template).encode()
            ).hexdigest(),
            "max_length": self.args.max_length,
            "truncation_mode": self.args.truncation_mode,
            "ama": self.use_ama_masks,
            "ld_alpha": self.args.ld_alpha,
            "rows": "id+tokens",  # rows are keyed by id and content (see _ref_row_keys); older caches keyed by id
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        """Reference log-probs per row id, cached across runs.

        Keyed by (reference weights, tokenizer, truncation, masks) and, per row, its ``id`` and tokens (see
        :func:`_ref_row_keys`), so the rungs of a scale ladder (nested subsets of one mix) reuse what earlier rungs
        computed instead of recomputing it, and a row whose answers changed (``dual`` swaps chosen and rejected
        but keeps the id) is computed afresh.
        """
        if self.ref_cache_dir is None or "id" not in dataset.column_names:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        import pyarrow as pa
        import pyarrow.parquet as pq

        cache_file = self.ref_cache_dir / f"{self._ref_cache_key()}.parquet"
        cached: dict[str, tuple[float, float]] = {}
        if cache_file.is_file():
            table = pq.read_table(cache_file)
            for row_id, chosen, rejected in zip(
                table["id"].to_pylist(), table["ref_chosen_logps"].to_pylist(), table["ref_rejected_logps"].to_pylist()
            ):
                cached[row_id] = (chosen, rejected)
        ids = _ref_row_keys(dataset)
        missing = [i for i, row_id in enumerate(ids) if row_id not in cached]
        if missing:
            fresh = self._compute_ref_logps_rows(dataset.select(missing), name, batch_size)
            for index, pair in zip(missing, fresh):
                cached[ids[index]] = pair
            if self.accelerator.is_main_process:
                self.ref_cache_dir.mkdir(parents=True, exist_ok=True)
                table = pa.table(
                    {
                        "id": list(cached),
                        "ref_chosen_logps": [v[0] for v in cached.values()],
                        "ref_rejected_logps": [v[1] for v in cached.values()],
                    }
                )
                partial = cache_file.with_suffix(f".{os.getpid()}.partial")
                pq.write_table(table, partial)
                os.replace(partial, cache_file)
        self.ref_cache_hits[name] = len(ids) - len(missing)
        dataset = dataset.add_column("ref_chosen_logps", [cached[i][0] for i in ids])
        return dataset.add_column("ref_rejected_logps", [cached[i][1] for i in ids])

    def _compute_ref_logps_rows(self, dataset, name: str, batch_size: int) -> list[tuple[float, float]]:
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        keep = [c for c in dataset.column_names if c in ("prompt_ids", "chosen_ids", "rejected_ids", *AMA_COLUMNS)]
        loader = DataLoader(
            dataset.select_columns(keep),
            batch_size=batch_size,
            collate_fn=self.data_collator,
            shuffle=False,
        )
        loader = self.accelerator.prepare(loader)
        model = self.ref_model or self.model
        pairs: list[tuple[float, float]] = []
        for batch in tqdm(loader, desc=f"Reference log-probs ({name})", disable=bool(os.environ.get("TQDM_DISABLE"))):
            chosen, rejected = self.compute_ref_log_probs(model, batch)
            chosen, rejected = self.accelerator.gather_for_metrics((chosen, rejected))
            pairs.extend(zip(chosen.float().cpu().tolist(), rejected.float().cpu().tolist()))
        return pairs


#: What a row's reference log-probs depend on besides the model and tokenizer (the cache key's part).
_REF_ROW_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_ama_mask", "rejected_ama_mask")


def _ref_row_keys(dataset) -> list[str]:
    """``id:digest`` per row, the digest over the tokens and masks the reference log-probs are computed from."""
    columns = [dataset[c] for c in _REF_ROW_COLUMNS if c in dataset.column_names]
    keys = []
    for row_id, *values in zip(dataset["id"], *columns):
        digest = hashlib.blake2b(json.dumps(values, separators=(",", ":")).encode(), digest_size=12).hexdigest()
        keys.append(f"{row_id}:{digest}")
    return keys
