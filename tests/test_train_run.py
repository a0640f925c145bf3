"""``equi train`` end to end on a tiny local model and a real mini-mix: run directory, metrics, resume, errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from train_fixtures import build_hh_mix, build_tiny_model

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("private_equi_cache")


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    mix = build_hh_mix(root / "mix", n_rows=24, n_eval=4)
    model = build_tiny_model(root / "model")
    return root, mix, model




def invoke(*args: str):
    from equi.cli import app

    return runner.invoke(app, ["train", *args])


def common(mix, model, out, *extra):
    return ["--mix", str(mix), "--model", str(model), "--out", str(out), "--batch-size", "4", "--lr", "1e-3",
            "--max-length", "128", "--quiet", *extra]


def test_ama_dpo_run_writes_a_complete_run_directory(material, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, mix, model = material
    out = tmp_path / "ama"
    result = invoke(*common(mix, model, out, "--max-steps", "3"))
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["train_config"]["algo"] == "ama-dpo" and len(config["mix_manifest_hash"]) == 16
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert all("rewards/margins" in m and 0 < m["ama/masked_fraction"] < 1 for m in steps)
    assert any("eval_loss" in m for m in metrics)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["ama_unaligned_rows"] == 0
    # final/ is a plain checkpoint: it loads, differs from the start in every weight matrix, and generates.
    trained = AutoModelForCausalLM.from_pretrained(out / "final")
    start = AutoModelForCausalLM.from_pretrained(model)
    start_params = dict(start.named_parameters())
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, start_params[n])]
    assert len(changed) == len(start_params)
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "How do I pick a lock?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = trained.generate(**ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]


def test_dpo_baseline_masks_nothing_and_ref_logps_are_cached_across_scales(material, tmp_path):
    root, mix, model = material
    first = invoke(*common(mix, model, tmp_path / "dpo-all", "--algo", "dpo", "--max-steps", "5"))  # 20 rows, 4/step
    assert first.exit_code == 0, first.output
    steps = [json.loads(l) for l in (tmp_path / "dpo-all" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["ama/masked_fraction"] == 0 for m in steps if "loss" in m)
    # A smaller rung of the scale ladder: its rows are a subset, so every reference log-prob comes from the cache.
    second = invoke(*common(mix, model, tmp_path / "dpo-8", "--algo", "dpo", "--max-steps", "2", "--scale", "8"))
    assert second.exit_code == 0, second.output
    summary = json.loads((tmp_path / "dpo-8" / "summary.json").read_text())
    assert summary["train_rows"] == 8 and summary["ref_cache_hits"] == 8 and summary["ref_log_probs"] == "precomputed"
    assert summary["n_safety"] + summary["n_benign"] == 8 and summary["n_safety"] > 0  # where `equi report` plots it
    # A quick try that sees 4 of the 20 rows computes reference log-probs live instead of for every row first.
    quick = invoke(*common(mix, model, tmp_path / "dpo-quick", "--algo", "dpo", "--max-steps", "1"))
    assert quick.exit_code == 0, quick.output
    summary = json.loads((tmp_path / "dpo-quick" / "summary.json").read_text())
    assert summary["ref_log_probs"].startswith("live") and summary["ref_cache_hits"] == 0 and summary["steps"] == 1


def test_resume_continues_from_the_last_complete_checkpoint(material, tmp_path, monkeypatch):
    root, mix, model = material
    out = tmp_path / "resume"
    args = common(mix, model, out, "--max-steps", "4", "--save-steps", "2", "--keep-checkpoints")  # kills simulated below
    assert invoke(*args).exit_code == 0
    # Simulate a kill while checkpoint-4 was being saved: its trainer state, the final model and the summary never
    # got written (steps 3 and 4 are in metrics.jsonl already).
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()
    monkeypatch.chdir(mix.parent)  # the same mix, spelled differently: still the run's mix
    result = invoke("--out", str(out), "--resume", "--mix", f"./{mix.name}/", "--model", str(model), "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["steps"] == 4
    assert (out / "final" / "model.safetensors").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # steps 3-4 ran twice but are logged once
    # A finished run is not trained, evaluated or summarised again.
    before = (out / "summary.json").read_bytes()
    result = invoke("--out", str(out), "--resume", "--model", str(model), "--quiet")
    assert result.exit_code == 2 and "already finished" in result.output
    assert (out / "summary.json").read_bytes() == before
    # Killed after the last checkpoint (step 4 of 4) but before final/: restored, not trained a fifth step.
    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()
    assert invoke("--out", str(out), "--resume", "--model", str(model), "--quiet").exit_code == 0
    summary = json.loads((out / "summary.json").read_text())
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert summary["steps"] == 4 and len(losses) == 4 and not (out / "checkpoint-5").exists()
    assert summary["train_loss"] == pytest.approx(sum(losses) / 4)  # the whole run's, not this session's
    # A changed setting is named, not just "the settings differ".
    result = invoke("--out", str(out), "--resume", "--model", str(model), "--max-steps", "9", "--quiet")
    assert result.exit_code == 2 and "--max-steps 9 (run: 4)" in result.output, result.output


def test_dual_resume_continues_from_the_round_it_was_in(material, tmp_path, monkeypatch):
    import train.dual
    from safetensors.torch import load_file

    root, mix, model = material
    dual = ("--algo", "dual", "--rounds", "3", "--max-steps", "2", "--save-steps", "1", "--lambda-lr", "0.5",
            "--cost-threshold", "-2")
    assert invoke(*common(mix, model, tmp_path / "whole", *dual)).exit_code == 0
    measure, calls = train.dual.expected_cost, []

    def killed_in_round_1(*args, **kwargs):  # round 1 trained, then the process died before its λ update
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(*args, **kwargs)

    monkeypatch.setattr(train.dual, "expected_cost", killed_in_round_1)
    out = tmp_path / "cut"
    assert invoke(*common(mix, model, out, *dual)).exit_code != 0
    monkeypatch.setattr(train.dual, "expected_cost", measure)
    result = invoke("--out", str(out), "--resume", "--model", str(model), "--quiet")
    assert result.exit_code == 0, result.output

    def rounds(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"dual"' in line]

    assert [r["round"] for r in rounds(out)] == [0, 1, 2]
    assert [r["lambda_next"] for r in rounds(out)] == pytest.approx([r["lambda_next"] for r in rounds(tmp_path / "whole")])
    steps = [(m["round"], m["step"]) for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "loss" in m]
    assert steps == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2)]  # nothing logged twice
    whole, cut = load_file(tmp_path / "whole" / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert all(torch.allclose(whole[k], cut[k], atol=1e-6) for k in whole)
    assert not list(out.glob("round-*/end-model"))  # the per-round models are gone once final/ is written


def test_an_existing_run_is_not_overwritten(material, tmp_path):
    root, mix, model = material
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    result = invoke(*common(mix, model, tmp_path / "taken", "--max-steps", "1"))
    assert result.exit_code == 2 and "--resume" in result.output


def test_tampered_mix_is_refused_with_exit_3(material, tmp_path):
    root, mix, model = material
    bad = tmp_path / "bad-mix"
    shutil.copytree(mix, bad)
    shard = next((bad / "data").glob("train-*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    result = invoke(*common(bad, model, tmp_path / "out", "--max-steps", "1"))
    assert result.exit_code == 3
    assert "sha256" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--algo", "nope"], "unknown --algo"),
        (["--groups", "OTHER"], "no preference pairs"),
        (["--group-weights", "XYZ=1"], "bad group weight"),
        (["--beta", "0"], "--beta must be positive"),
        (["--truncation-mode", "middle"], "--truncation-mode must be one of keep_start, keep_end"),
        (["--group-weights", "EHD=inf"], "must be finite"),
        (["--severity-weights", "severe=nan"], "must be finite"),
        # Found only once the data is prepared or the model loaded: still one line, and no half-made run is left.
        (["--max-length", "8"], "longer than --max-length 8"),
        (["--group-weights", "EHD=0,IHD=0,MHD=0,BENIGN=0,OTHER=1"], "weight 0 to every training pair"),
        (["--model", "no-such-org/no-such-model"], "cannot load"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(material, tmp_path, extra, message):
    root, mix, model = material
    args = common(mix, model, tmp_path / "out", "--max-steps", "1")
    if "--model" in extra:  # the flag given last wins
        args = [a for a in args if a != str(model)]
        args.remove("--model")
    result = invoke(*args, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()  # the same command runs once the cause is fixed


def test_pairs_dropped_for_long_prompts_are_warned_and_not_counted_as_trained(material, tmp_path):
    root, mix, model = material
    out = tmp_path / "short"
    result = invoke(*common(mix, model, out, "--algo", "dpo", "--max-steps", "1", "--batch-size", "2"),
                    "--max-length", "48")  # about half of these real prompts are longer than 48 tokens
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    dropped = summary["rows_dropped_prompt_too_long"]
    assert 0 < dropped < summary["train_rows"]
    assert summary["n_safety"] + summary["n_benign"] == summary["train_rows"] - dropped  # the report's x: trained
    assert f"{dropped} of {summary['train_rows']} training pairs were dropped" in result.output  # even with --quiet

    # keep_end cuts the start of what is too long instead: every pair is trained, AMA masks and all.
    kept = tmp_path / "keep-end"
    result = invoke(*common(mix, model, kept, "--max-steps", "1", "--batch-size", "2"), "--max-length", "48",
                    "--truncation-mode", "keep_end")
    assert result.exit_code == 0, result.output
    summary = json.loads((kept / "summary.json").read_text())
    assert summary["rows_dropped_prompt_too_long"] == 0 and "dropped" not in result.output
    assert summary["n_safety"] + summary["n_benign"] == summary["train_rows"]
    assert json.loads((kept / "config.json").read_text())["train_config"]["truncation_mode"] == "keep_end"


def test_a_mix_given_as_a_file_is_named_so(material, tmp_path):
    root, mix, model = material
    result = invoke("--mix", str(next((mix / "data").glob("*.parquet"))), "--quiet")
    assert result.exit_code == 2 and "is a file" in result.output and "equi curate ... --out" not in result.output


def test_config_values_given_as_text_are_read_like_the_flags(material):
    from equi.config import ConfigError
    from train.config import TrainConfig

    root, mix, model = material
    config = TrainConfig(mix=str(mix), max_steps="2", lr="1e-4", groups="EHD,BENIGN",
                         severity_weights="severe=8", group_weights="EHD=2")
    assert config.max_steps == 2 and config.lr == 1e-4 and config.groups == ["EHD", "BENIGN"]
    assert config.severity_weights == {"minor": 1.0, "moderate": 2.0, "severe": 8.0}
    assert config.group_weights == {"EHD": 2.0}
    with pytest.raises(ConfigError, match="--max-steps: 'two' is not a number"):
        TrainConfig(mix=str(mix), max_steps="two")


def test_missing_mix_exits_2(tmp_path):
    result = invoke("--mix", str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "not found" in result.output


def test_help_has_an_example_block():
    result = invoke("--help")
    assert result.exit_code == 0 and "Example" in result.output and "--algo" in result.output


def test_scale_and_groups_select_nested_rows(material):
    from train.mixdata import load_split

    root, mix, model = material
    everything = load_split(mix, "train")
    assert len(everything.dataset) == 20
    small = load_split(mix, "train", scale=5)
    assert sorted(small.dataset["rank"]) == [0, 1, 2, 3, 4] and small.dropped == {"rank >= scale 5": 15}
    groups = sorted(set(everything.dataset["group"]))
    only = load_split(mix, "train", groups=groups[:1]).dataset
    assert set(only["group"]) == {groups[0]} and 0 < len(only) < 20


def test_config_file_is_read_and_flags_win(material, tmp_path):
    root, mix, model = material
    config = tmp_path / "train.yaml"
    config.write_text(f"mix: {mix}\nmodel: {model}\nalgo: dpo\nmax_steps: 5\nbatch_size: 4\nmax_length: 128\n")
    out = tmp_path / "from-yaml"
    result = invoke("--config", str(config), "--max-steps", "1", "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())["train_config"]
    assert saved["algo"] == "dpo" and saved["max_steps"] == 1


def test_dual_logs_lambda_cost_and_threshold_every_round(material, tmp_path):
    root, mix, model = material
    out = tmp_path / "dual"
    result = invoke(*common(mix, model, out, "--algo", "dual", "--rounds", "2", "--max-steps", "1",
                            "--lambda-lr", "0.5", "--cost-threshold", "-2"))
    assert result.exit_code == 0, result.output
    rounds = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"dual"' in l]
    assert [r["round"] for r in rounds] == [0, 1]
    assert all(r["cost_threshold"] == -2 and math.isfinite(r["expected_cost"]) for r in rounds)
    # E[C] lies between the pair costs (-1 .. 4 after severity scaling) and exceeds b = -2, so λ grows.
    assert rounds[1]["lambda"] == rounds[0]["lambda_next"] > rounds[0]["lambda"]
    assert (out / "final" / "model.safetensors").is_file()


def test_rerank_swaps_pairs_whose_chosen_costs_more(material):
    from train.dual import rerank_pairs
    from train.mixdata import load_split

    root, mix, model = material
    pairs = load_split(mix, "train").dataset.select(range(4))
    costly = pairs.map(lambda row, i: {"chosen_cost": 3.0 if i == 0 else row["chosen_cost"], "severity": None},
                       with_indices=True)
    reranked, swapped = rerank_pairs(costly, lam=1.0, severity_weights={})
    assert swapped == 1
    assert reranked[0]["chosen"] == pairs[0]["rejected"] and reranked[0]["rejected_cost"] == 3.0
    assert reranked[1]["chosen"] == pairs[1]["chosen"]
    assert rerank_pairs(costly, lam=0.0, severity_weights={})[1] == 0  # λ = 0: preferences alone decide


def test_quiet_prints_no_training_logs(material, tmp_path, capfd, recwarn):
    root, mix, model = material
    loud = invoke(*[a for a in common(mix, model, tmp_path / "loud", "--max-steps", "1") if a != "--quiet"])
    assert loud.exit_code == 0 and any(w.category is FutureWarning for w in recwarn)  # the control: they are real
    recwarn.clear()
    capfd.readouterr()
    result = invoke(*common(mix, model, tmp_path / "quiet", "--max-steps", "2"))
    assert result.exit_code == 0, result.output
    assert not [str(w.message) for w in recwarn if w.category is FutureWarning]  # libraries' deprecation notices
    out, err = capfd.readouterr()
    assert "'loss'" not in result.output + out + err  # transformers' PrinterCallback dicts
    assert (tmp_path / "quiet" / "metrics.jsonl").read_text().count('"loss"') >= 2  # still logged to the run
