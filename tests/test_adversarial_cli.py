"""Adversarial input to train / scale / report / eval (issue 14): crafted run folders, malformed run files, odd
scales. Every case must end in a clear one-line refusal (exit 2) or a report that shows the input as typed, never
a traceback, and a run folder must never choose what code equi loads.

All run folders, metrics files and model folders here are SYNTHETIC (written by the tests); the one mix used for
`equi scale` is real hh-rlhf text with synthetic labels (tests/train_fixtures.py).
"""

from __future__ import annotations

import html
import json
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from equi.cli import app


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


# --- equi train --resume: the run folder never picks the model or remote code ---------------------------------


@pytest.fixture()
def recorded_train(monkeypatch):
    """Replace the training itself: record the TrainConfig `equi train` would train with (nothing is loaded)."""
    import train.run
    import train.rundir

    calls = []

    def fake_train(config):
        calls.append(config)
        return train.rundir.RunResult(Path(config.out), Path(config.out) / "final", steps=0, summary={})

    monkeypatch.setattr(train.run, "train", fake_train)
    return calls


def _crafted_run(tmp_path: Path, **settings) -> Path:
    """A SYNTHETIC run folder whose config.json was written by someone else (not by equi train)."""
    mix = tmp_path / "mix"
    mix.mkdir(exist_ok=True)
    run = tmp_path / "run"
    run.mkdir()
    train_config = {"mix": str(mix), "algo": "dpo", "max_steps": 3, **settings}
    (run / "config.json").write_text(json.dumps({"train_config": train_config, "config_hash": "crafted"}))
    return run


def _model_folder(tmp_path: Path) -> Path:
    """A SYNTHETIC model folder that ships its own Python (what trust_remote_code would run)."""
    model = tmp_path / "model-with-code"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
    (model / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    return model


def test_resume_refuses_a_run_folders_trust_remote_code_and_model_unless_restated(tmp_path, recorded_train):
    model = _model_folder(tmp_path)
    run = _crafted_run(tmp_path, model=str(model), trust_remote_code=True)

    bare = invoke("train", "--out", run, "--resume", "--quiet")
    assert bare.exit_code == 2, bare.output
    assert "--trust-remote-code" in bare.output and f"--model {model}" in bare.output
    assert "Traceback" not in bare.output and recorded_train == []

    half = invoke("train", "--out", run, "--resume", "--quiet", "--trust-remote-code")
    assert half.exit_code == 2 and f"restate --model {model}" in half.output
    assert "restate --trust-remote-code" not in half.output and recorded_train == []

    other = invoke("train", "--out", run, "--resume", "--quiet", "--trust-remote-code", "--model", tmp_path)
    assert other.exit_code == 2 and "differs from the run's" in other.output and recorded_train == []

    restated = invoke("train", "--out", run, "--resume", "--quiet", "--trust-remote-code", "--model", model)
    assert restated.exit_code == 0, restated.output
    (config,) = recorded_train
    assert config.trust_remote_code is True and config.model == str(model)
    assert config.max_steps == 3 and config.algo == "dpo"  # the run's other settings are still taken


def test_resume_without_trust_remote_code_in_the_run_needs_no_restating(tmp_path, recorded_train):
    run = _crafted_run(tmp_path)
    result = invoke("train", "--out", run, "--resume", "--quiet")
    assert result.exit_code == 0, result.output
    (config,) = recorded_train
    assert config.trust_remote_code is False and config.model is None and config.max_steps == 3


def test_resume_refuses_a_run_folders_reward_model(tmp_path, recorded_train):
    run = _crafted_run(tmp_path, algo="repo", reward_model=str(_model_folder(tmp_path)))
    result = invoke("train", "--out", run, "--resume", "--quiet")
    assert result.exit_code == 2 and "restate --reward-model" in result.output and recorded_train == []


def test_resume_with_a_malformed_saved_setting_is_one_line_exit_2(tmp_path, recorded_train):
    run = _crafted_run(tmp_path, max_steps=[1, 2])
    result = invoke("train", "--out", run, "--resume", "--quiet")
    assert result.exit_code == 2 and "bad setting" in result.output and "Traceback" not in result.output


def test_code_settings_compare_by_what_they_name():
    from train.config import unrestated_code_settings

    assert unrestated_code_settings({"model": None, "trust_remote_code": False}, {}) == []
    assert unrestated_code_settings({"model": "."}, {"model": str(Path.cwd())}) == []  # one folder, two spellings
    assert unrestated_code_settings({"trust_remote_code": True}, {}) == ["restate --trust-remote-code"]
    assert unrestated_code_settings({"cost_model": "a b"}, {}) == ["restate --cost-model 'a b'"]


# --- equi scale: bad scales are refused before anything trains ------------------------------------------------


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "-1", "0", "0.5,NaN"])
def test_scale_refuses_non_finite_and_non_positive_scales(tmp_path, bad):
    mix = tmp_path / "mix"
    mix.mkdir()
    (mix / "manifest.json").write_text("{}")  # SYNTHETIC: never read, the scales are refused first
    result = invoke("scale", "--mix", mix, "--scales", bad, "--out", tmp_path / "runs", "--no-eval")
    assert result.exit_code == 2, result.output
    assert "bad scale" in result.output and "Traceback" not in result.output


def test_scale_config_refuses_nan_given_directly(tmp_path):
    from equi.config import ConfigError
    from equi.ladder import ScaleConfig

    (tmp_path / "manifest.json").write_text("{}")  # SYNTHETIC mix folder, only its manifest is looked for
    with pytest.raises(ConfigError, match="bad scale"):
        ScaleConfig(mix=str(tmp_path), scales=[float("nan")])


def test_scales_that_select_the_same_rows_are_refused():
    from equi.config import ConfigError
    from equi.ladder import check_scales_fit

    check_scales_fit([0.25, 0.5, 1.0, 40.0], n_ranked=48)  # all distinct, all within the mix
    with pytest.raises(ConfigError, match=r"100 asks for more rows than the mix ranks \(48\)"):
        check_scales_fit([0.5, 100.0], n_ranked=48)
    with pytest.raises(ConfigError, match="1 and 48 both select rank < 48"):
        check_scales_fit([1.0, 48.0], n_ranked=48)
    with pytest.raises(ConfigError, match="0.01 and 0.02 both select rank < 1"):
        check_scales_fit([0.01, 0.02], n_ranked=48)


def test_scale_beyond_the_mix_is_refused_before_training(tmp_path, monkeypatch):
    import train.run
    from train_fixtures import build_hh_mix

    trained = []
    monkeypatch.setattr(train.run, "train", lambda config: trained.append(config))
    mix = build_hh_mix(tmp_path / "mix")  # 48 rows, 40 of them ranked train rows
    result = invoke("scale", "--mix", mix, "--scales", "0.5,1000", "--out", tmp_path / "runs", "--no-eval",
                    "--quiet")
    assert result.exit_code == 2, result.output
    assert "1000 asks for more rows than the mix ranks (40)" in " ".join(result.output.split())
    assert trained == [] and not (tmp_path / "runs").exists()


# --- equi report: malformed run files are reported, names shown as typed ---------------------------------------


def _run(root: Path, name: str, ladder: dict | None, metrics) -> Path:
    """A SYNTHETIC run folder: ladder.json and eval/metrics.json as given (metrics may be any JSON value)."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train_config": {"algo": "dpo"}}))
    if ladder is not None:
        (run / "ladder.json").write_text(json.dumps(ladder))
    if metrics is not None:
        (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    return run


def _summary(safety, over_refusal=0.1) -> dict:
    return {"summary": {"safety": safety, "over_refusal": over_refusal, "balanced": 0.5}}


def test_report_draws_a_mathtext_group_name_literally(tmp_path):
    group = "E$\\frac{H$D"  # not valid TeX: matplotlib raised on it
    root = tmp_path / "runs"
    _run(root, "small", {"group": group, "n_safety": 4}, _summary(0.2))
    _run(root, "big", {"group": group, "n_safety": 8}, _summary(0.6))
    result = invoke("report", "--runs", root, "--out", tmp_path / "report", "--quiet")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert list(data["plots"]["curve_safety.png"]["series"]) == [group]
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "**E\\$\\\\frac{H\\$D**" in summary  # escaped for Markdown (GitHub renders $...$ as math)
    assert f"<b>{html.escape(group)}</b>" in (tmp_path / "report" / "report.html").read_text()


def test_report_notes_a_non_numeric_metric_instead_of_failing(tmp_path):
    root = tmp_path / "runs"
    _run(root, "words", {"group": "EHD", "n_safety": 4}, _summary("high"))
    _run(root, "fine", {"group": "EHD", "n_safety": 8}, _summary(0.6))
    _run(root, "count", {"group": "EHD", "n_safety": "forty"}, _summary(0.7))
    result = invoke("report", "--runs", root, "--out", tmp_path / "report", "--quiet")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    runs = {r["name"]: r for r in data["runs"]}
    assert any("summary safety is 'high', not a number" in p for p in runs["words"]["problems"])
    assert any("n_safety is 'forty'" in p for p in runs["count"]["problems"]) and runs["count"]["series"] is None
    assert data["plots"]["curve_safety.png"]["series"]["EHD"] == {"x": [8.0], "y": [60.0]}
    assert data["plots"]["curve_over_refusal.png"]["series"]["EHD"]["x"] == [4.0, 8.0]


@pytest.mark.parametrize("metrics", [[1, 2], "done", {"summary": [0.5]}, {"suites": {}}])
def test_report_calls_a_malformed_metrics_file_malformed_not_unevaluated(tmp_path, metrics):
    root = tmp_path / "runs"
    _run(root, "broken", {"group": "EHD", "n_safety": 4}, metrics)
    result = invoke("report", "--runs", root, "--out", tmp_path / "report", "--quiet")
    assert result.exit_code == 0, result.output
    (record,) = json.loads((tmp_path / "report" / "report.json").read_text())["runs"]
    assert any("eval/metrics.json is malformed" in p for p in record["problems"])
    assert not any("not evaluated" in p for p in record["problems"])
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "has a malformed evaluation" in summary and "not evaluated yet" not in summary


def test_summary_escapes_markdown_in_run_names_and_groups(tmp_path):
    from equi.reporting.html import markdown_to_html
    from equi.reporting.summary import findings, md_code, md_text
    from equi.reporting.runs import CurvePoint

    name = "ehd_`x`_*big*"
    root = tmp_path / "runs"
    _run(root, name, {"group": "EHD", "n_safety": 4}, None)  # not evaluated: its name is in the summary
    result = invoke("report", "--runs", root, "--out", tmp_path / "report", "--quiet")
    assert result.exit_code == 0, result.output
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert f"``{name}``" in summary  # a fence longer than the backtick run in the name
    assert f"<code>{html.escape(name)}</code>" in (tmp_path / "report" / "report.html").read_text()

    line = findings({"E_H*D": [CurvePoint("a", 4, 0.5, 0.1, 0.7)]})[0]
    assert line.startswith("**E\\_H\\*D**:")
    assert markdown_to_html(f"- {line}").startswith("<ul>\n<li><b>E_H*D</b>:")
    assert md_text("[a](b) <i>|~&") == "\\[a\\](b) \\<i\\>\\|\\~\\&"
    assert md_code("`x") == "`` `x ``"


# --- equi eval: a LoRA adapter is loaded with the same offline rule as a plain model -------------------------


@pytest.fixture()
def fake_loaders(monkeypatch):
    """SYNTHETIC stand-ins for transformers' tokenizer and PEFT's loader: record the kwargs each is called with."""
    import transformers

    calls: dict[str, list] = {"tokenizer": [], "peft": []}

    class FakeModel:
        def merge_and_unload(self):
            return self

        def to(self, device):
            return self

        def eval(self):
            return self

    class FakeTokenizer:
        pad_token_id, eos_token_id, padding_side = 0, 0, "right"

    class FakeAutoTokenizer:
        @staticmethod
        def from_pretrained(path, **kwargs):
            calls["tokenizer"].append(kwargs)
            return FakeTokenizer()

    class FakeAutoPeft:
        @staticmethod
        def from_pretrained(path, **kwargs):
            calls["peft"].append(kwargs)
            return FakeModel()

    monkeypatch.setattr(transformers, "AutoTokenizer", FakeAutoTokenizer)
    monkeypatch.setitem(sys.modules, "peft", types.SimpleNamespace(AutoPeftModelForCausalLM=FakeAutoPeft))
    return calls


def _adapter(tmp_path: Path, base: str) -> Path:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))  # SYNTHETIC
    return adapter


@pytest.mark.parametrize("hub_offline, base_is_local, expected", [
    ("1", False, True), ("0", True, True), ("0", False, False)])
def test_lora_adapter_base_is_loaded_with_the_offline_rule(tmp_path, monkeypatch, fake_loaders, hub_offline,
                                                           base_is_local, expected):
    from equi.models import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", hub_offline)
    base = tmp_path / "base-model"
    base.mkdir()
    adapter = _adapter(tmp_path, str(base) if base_is_local else "some-org/some-model")
    load_model(str(adapter), device="cpu", trust_remote_code=False)
    (kwargs,) = fake_loaders["peft"]
    assert kwargs["local_files_only"] is expected and kwargs["trust_remote_code"] is False
    assert fake_loaders["tokenizer"][0]["local_files_only"] is True  # the adapter folder itself is local
