"""equi scale: the ladder plan, then real training + eval of every rung and a report built from the dirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from equi.config import ConfigError
from equi.ladder import ScaleConfig, parse_scales, plan_ladder, rank_limit, run_ladder

REPO = Path(__file__).resolve().parents[1]


def test_scales_parse_and_map_to_rank_limits():
    assert parse_scales("1.0, 0.1,0.3,0.1") == [0.1, 0.3, 1.0]
    assert parse_scales("200,0.5") == [0.5, 200.0]
    for bad, message in (("0", "fraction"), ("1.5", "fraction"), ("x", "not|expected"), ("", "at least one")):
        with pytest.raises(ConfigError, match=message):
            parse_scales(bad)
    assert [rank_limit(s, 48) for s in (0.1, 0.5, 1.0, 30.0)] == [5, 24, 48, 30]
    assert rank_limit(0.001, 48) == 1  # never an empty rung by rounding


def test_plan_has_one_rung_per_group_and_scale(tmp_path):
    mix = tmp_path / "mix"
    mix.mkdir()
    (mix / "manifest.json").write_text("{}")
    config = ScaleConfig(mix=str(mix), scales=[1.0, 0.25], groups=["ehd", "IHD"], out=str(tmp_path / "runs"))
    rungs = plan_ladder(config, n_ranked=40)
    assert [(r.group, r.scale, r.rank_limit, r.run_dir.name) for r in rungs] == [
        ("EHD", 0.25, 10, "ama-dpo-ehd-s0.25"), ("EHD", 1.0, 40, "ama-dpo-ehd-s1"),
        ("IHD", 0.25, 10, "ama-dpo-ihd-s0.25"), ("IHD", 1.0, 40, "ama-dpo-ihd-s1")]
    assert rungs[0].train_groups == ["EHD", "BENIGN"]
    (together,) = plan_ladder(ScaleConfig(mix=str(mix), scales=[0.5]), 40)
    assert together.group == "ALL" and together.train_groups is None
    with pytest.raises(ConfigError, match="--groups"):
        ScaleConfig(mix=str(mix), groups=["BENIGN"])
    with pytest.raises(ConfigError, match="not found"):
        ScaleConfig(mix=str(tmp_path / "nope"))


def test_scale_command_bad_input_is_one_line_exit_2(tmp_path):
    from equi.cli import app

    result = CliRunner().invoke(app, ["scale", "--mix", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "not found" in result.output
    help_text = CliRunner().invoke(app, ["scale", "--help"]).output
    assert "Example" in help_text and "--scales" in help_text


def _independent_count(mix: Path, limit: int, group: str) -> int:
    """Train-split pairs of ``group`` with rank < limit, counted straight from the Parquet shards."""
    n = 0
    for path in (mix / "data").glob("train-*.parquet"):
        for row in pq.read_table(path).to_pylist():
            n += (row["rank"] < limit and row["group"] == group and row["chosen"] is not None
                  and row["rejected"] is not None)
    return n


def test_ladder_trains_evaluates_and_reports_each_rung(tmp_path):
    """Real hh-rlhf text with synthetic labels (tests/train_fixtures.py), a tiny model, 1 step per rung."""
    from train_fixtures import build_hh_mix, build_tiny_model

    from equi.reporting import ReportConfig, build_report

    mix = build_hh_mix(tmp_path / "mix")
    model = build_tiny_model(tmp_path / "model")
    config = ScaleConfig(mix=str(mix), scales=[0.5, 1.0], groups=["IHD"], out=str(tmp_path / "runs"),
                         model=str(model), max_steps=1, batch_size=2, suites=["xstest-safe", "advbench"],
                         eval_limit=2, max_new_tokens=4, quiet=True)
    result = run_ladder(config)
    ladders = [json.loads((r.run_dir / "ladder.json").read_text()) for r in result.rungs]
    assert [l["rank_limit"] for l in ladders] == [20, 40]  # of the 40 ranked train rows
    assert [l["n_safety"] for l in ladders] == [_independent_count(mix, 20, "IHD"), _independent_count(mix, 40, "IHD")]
    assert ladders[0]["n_safety"] < ladders[1]["n_safety"]
    for rung in result.rungs:
        train_config = json.loads((rung.run_dir / "config.json").read_text())["train_config"]
        assert train_config["scale"] == rung.rank_limit and train_config["groups"] == ["IHD", "BENIGN"]
        assert (rung.run_dir / "final" / "config.json").is_file()
        metrics = json.loads((rung.run_dir / "eval" / "metrics.json").read_text())
        assert set(metrics["suites"]) == {"xstest-safe", "advbench"} and metrics["summary"]["n_prompts"] == 4
    assert json.loads((result.baseline_dir / "ladder.json").read_text())["n_safety"] == 0
    assert (result.baseline_dir / "eval" / "answers.parquet").is_file()
    again = run_ladder(config)  # finished rungs are kept, not retrained
    assert sum("already trained" in n for n in again.notes) == 2
    report = build_report(ReportConfig(out=str(tmp_path / "report"), runs=str(tmp_path / "runs"), mix=str(mix)))
    ihd = report.plots["curve_safety.png"]["series"]["IHD"]
    assert ihd["x"] == [0.0] + [float(l["n_safety"]) for l in ladders]
    safety = [json.loads((p / "eval" / "metrics.json").read_text())["summary"]["safety"] * 100
              for p in [result.baseline_dir] + [r.run_dir for r in result.rungs]]
    assert ihd["y"] == pytest.approx(safety)


@pytest.mark.slow
def test_ladder_end_to_end_curate_scale_eval_report(tmp_path):
    """The README loop on bundled real data: equi curate → equi scale → equi report, as subprocesses."""
    from train_fixtures import build_tiny_model

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "2"}

    def equi(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "equi.cli", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]

    mix, runs, report = tmp_path / "mix", tmp_path / "runs", tmp_path / "report"
    equi("curate", str(REPO / "examples" / "data" / "hh_rlhf_harmless_sample.jsonl.gz"),
         str(REPO / "examples" / "data" / "xstest_prompts.jsonl"), "--out", str(mix), "--size", "60", "--quiet")
    counts = json.loads((mix / "manifest.json").read_text())["counts"]["mixture"]
    groups = [g for g in ("EHD", "IHD", "MHD") if counts.get(g, {}).get("train", 0) >= 2][:2]
    assert groups, f"curate put no safety pairs in the mix: {counts}"
    model = build_tiny_model(tmp_path / "model")
    equi("scale", "--mix", str(mix), "--scales", "0.5,1.0", "--groups", ",".join(groups), "--out", str(runs),
         "--model", str(model), "--max-steps", "1", "--batch-size", "2", "--suite", "xstest-safe,advbench",
         "--eval-limit", "2", "--max-new-tokens", "4", "--quiet")
    equi("report", "--runs", str(runs), "--mix", str(mix), "--out", str(report), "--quiet")
    data = json.loads((report / "report.json").read_text())
    assert set(data["plots"]["curve_over_refusal.png"]["series"]) == set(groups)
    assert all(len(s["x"]) == 3 for s in data["plots"]["curve_over_refusal.png"]["series"].values())
    assert data["plots"]["mix_composition.png"]["series"]["train"]
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 7


# --- Re-running a ladder: kept rungs must be what this ladder would train (training faked, mix real) ---


@pytest.fixture()
def fake_ladder(tmp_path, monkeypatch):
    """A real mix and run directories written by train's own ``prepare_run_dir``; training and eval are faked
    (a ``final/`` folder, a metrics.json naming the model), so each ladder takes well under a second."""
    import equi.evaluation
    import train.run
    import train.rundir
    from train.mixdata import manifest_hash
    from train_fixtures import build_hh_mix

    trained: list[tuple[str, bool]] = []

    def fake_train(config):
        run_dir = train.rundir.prepare_run_dir(config, manifest_hash(config.mix))  # checks --resume like train
        (run_dir / "final").mkdir()
        # What train records of the pairs it trained on (fewer than selected when prompts are over --max-length).
        (run_dir / "summary.json").write_text(json.dumps({"n_safety": 7, "n_benign": 3}))
        trained.append((run_dir.name, config.resume))

    def fake_evaluate(config):
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"model": config.model_path, "summary": {"safety": 0.5},
                                                      "config": config.to_dict()}))

    monkeypatch.setattr(train.run, "train", fake_train)
    monkeypatch.setattr(equi.evaluation, "evaluate", fake_evaluate)
    mix = build_hh_mix(tmp_path / "mix")

    def make(**overrides) -> ScaleConfig:
        settings = dict(mix=str(mix), scales=[0.5, 1.0], groups=["IHD"], out=str(tmp_path / "runs"),
                        model="tiny/model-a", max_steps=1, batch_size=2, quiet=True)
        return ScaleConfig(**{**settings, **overrides})

    make.trained = trained
    make.runs = tmp_path / "runs"
    return make


def _snapshot(runs: Path) -> dict[str, str]:
    return {str(p.relative_to(runs)): p.read_text() for p in sorted(runs.rglob("*.json"))
            if p.name != "ladder-config.json"}


def test_rerun_with_changed_settings_refuses_before_training_and_keeps_every_record(fake_ladder):
    first = run_ladder(fake_ladder())
    assert fake_ladder.trained == [("ama-dpo-ihd-s0.5", False), ("ama-dpo-ihd-s1", False)]
    before = _snapshot(fake_ladder.runs)
    rung = json.loads(before["ama-dpo-ihd-s0.5/ladder.json"])
    assert rung["rank_limit"] == 20 and (rung["n_safety"], rung["n_benign"], rung["n_train"]) == (7, 3, 10)
    assert rung["n_selected"] == sum(rung["counts"].values())
    # Unchanged settings (talking or not does not define a run): all kept, nothing rewritten.
    again = run_ladder(fake_ladder(quiet=False))
    assert len(fake_ladder.trained) == 2 and sum("already trained" in n for n in again.notes) == 2
    assert _snapshot(fake_ladder.runs) == before
    changed = {"max_steps": 2, "lr": 1e-5, "train_options": {"max_length": 256}}
    for setting, value in changed.items():
        with pytest.raises(ConfigError) as error:
            run_ladder(fake_ladder(**{setting: value}))
        message = str(error.value)
        assert "\n" not in message and "ama-dpo-ihd-s0.5 holds a run trained with other settings" in message
        assert "new --out" in message and "delete" in message and "1 more differ" in message
        flag = "--" + (setting if setting != "train_options" else "max_length").replace("_", "-")
        assert flag in message, message
    with pytest.raises(ConfigError, match=r"--max-steps 2 \(run: 1\)"):
        run_ladder(fake_ladder(max_steps=2))
    # Another model: the baseline (the 0 point of every curve) and every rung differ.
    with pytest.raises(ConfigError, match=r"baseline holds the evaluation of another untrained model: "
                                          r"--model 'tiny/model-b' \(evaluated: 'tiny/model-a'\).*2 more differ"):
        run_ladder(fake_ladder(model="tiny/model-b"))
    with pytest.raises(ConfigError, match=r"ama-dpo-ihd-s0.5 .*--model 'tiny/model-b' \(run: 'tiny/model-a'\)"):
        run_ladder(fake_ladder(model="tiny/model-b", baseline=False))
    # The mix changed since the rungs were trained (simulated: the run records another manifest hash).
    config_path = fake_ladder.runs / "ama-dpo-ihd-s1" / "config.json"
    saved = config_path.read_text()
    config_path.write_text(json.dumps({**json.loads(saved), "mix_manifest_hash": "0" * 64}))
    with pytest.raises(ConfigError, match=r"ama-dpo-ihd-s1 holds a run trained .*the mix"):
        run_ladder(fake_ladder())
    config_path.write_text(saved)
    assert len(fake_ladder.trained) == 2  # nothing was trained by any refused ladder
    assert _snapshot(fake_ladder.runs) == before
    assert first.baseline_dir and json.loads((first.baseline_dir / "ladder.json").read_text())["model"] == "tiny/model-a"


def test_rerun_resumes_an_interrupted_rung_and_refuses_one_started_differently(fake_ladder):
    import shutil

    run_ladder(fake_ladder())
    shutil.rmtree(fake_ladder.runs / "ama-dpo-ihd-s1" / "final")  # interrupted: config.json, no final/
    (fake_ladder.runs / "ama-dpo-ihd-s1" / "ladder.json").unlink()
    before = _snapshot(fake_ladder.runs)
    # Another setting, and a new rung (s0.25) that would train first: refused before that one starts.
    with pytest.raises(ConfigError, match=r"ama-dpo-ihd-s0.5 holds a run trained .*--seed 1 \(run: 0\).*"
                                          r"1 more differ: .*ama-dpo-ihd-s1"):
        run_ladder(fake_ladder(scales=[0.25, 0.5, 1.0], seed=1))
    assert len(fake_ladder.trained) == 2 and not (fake_ladder.runs / "ama-dpo-ihd-s0.25").exists()
    assert _snapshot(fake_ladder.runs) == before
    again = run_ladder(fake_ladder(scales=[0.25, 0.5, 1.0]))
    assert fake_ladder.trained[2:] == [("ama-dpo-ihd-s0.25", False), ("ama-dpo-ihd-s1", True)]
    assert "ama-dpo-ihd-s0.5: already trained, kept" in again.notes
    assert json.loads((fake_ladder.runs / "ama-dpo-ihd-s1" / "ladder.json").read_text())["rank_limit"] == 40


def test_a_second_algorithm_shares_the_baseline_and_both_ladders_are_recorded(fake_ladder):
    run_ladder(fake_ladder())
    baseline = (fake_ladder.runs / "baseline" / "ladder.json").read_text()
    run_ladder(fake_ladder(algo="dpo", scales=[1.0]))
    assert fake_ladder.trained[2:] == [("dpo-ihd-s1", False)]
    assert (fake_ladder.runs / "baseline" / "ladder.json").read_text() == baseline
    ladders = json.loads((fake_ladder.runs / "ladder-config.json").read_text())["ladders"]
    assert [(l["config"]["algo"], l["config"]["scales"]) for l in ladders] == [("ama-dpo", [0.5, 1.0]),
                                                                              ("dpo", [1.0])]
    run_ladder(fake_ladder(quiet=False))  # the same ladder again replaces its own entry
    ladders = json.loads((fake_ladder.runs / "ladder-config.json").read_text())["ladders"]
    assert [l["config"]["algo"] for l in ladders] == ["dpo", "ama-dpo"]


def test_scale_command_refuses_changed_settings_with_one_line_exit_2(fake_ladder):
    from equi.cli import app

    config = fake_ladder()
    run_ladder(config)
    args = ["scale", "--mix", config.mix, "--scales", "0.5,1.0", "--groups", "IHD", "--out", config.out,
            "--model", "tiny/model-a", "--batch-size", "2", "--quiet"]
    assert CliRunner().invoke(app, args + ["--max-steps", "1"]).exit_code == 0
    result = CliRunner().invoke(app, args + ["--max-steps", "3"])
    assert result.exit_code == 2, result.output
    assert "--max-steps 3 (run: 1)" in result.output and "ama-dpo-ihd-s0.5" in result.output
    assert len(fake_ladder.trained) == 2


def test_scale_passes_max_length_and_other_train_options_to_every_rung(fake_ladder, tmp_path):
    from equi.cli import app

    config = fake_ladder()
    options = tmp_path / "train.yaml"
    options.write_text("severity_weights: severe=8\nlambda_lr: 0.5\n")
    args = ["scale", "--mix", config.mix, "--scales", "0.5,1.0", "--groups", "IHD", "--out", config.out,
            "--model", "tiny/model-a", "--batch-size", "2", "--max-steps", "1", "--no-eval", "--quiet"]
    result = CliRunner().invoke(app, args + ["--max-length", "256", "--train-config", str(options)])
    assert result.exit_code == 0, result.output
    for rung in ("ama-dpo-ihd-s0.5", "ama-dpo-ihd-s1"):
        saved = json.loads((fake_ladder.runs / rung / "config.json").read_text())["train_config"]
        assert saved["max_length"] == 256 and saved["lambda_lr"] == 0.5 and saved["severity_weights"]["severe"] == 8
    options.write_text("lr: 0.1\n")  # a setting equi scale has its own flag for
    result = CliRunner().invoke(app, args + ["--train-config", str(options)])
    assert result.exit_code == 2 and "set lr with equi scale's own flags" in result.output


def test_evaluations_made_with_other_eval_settings_are_made_again(fake_ladder):
    run_ladder(fake_ladder(eval_limit=4))
    again = run_ladder(fake_ladder(eval_limit=4))
    assert sum("already evaluated, kept" in n for n in again.notes) == 3  # two rungs and the baseline
    bigger = run_ladder(fake_ladder(eval_limit=8, max_new_tokens=32))
    redone = [n for n in bigger.notes if "evaluated again" in n]
    assert len(redone) == 3 and all("--eval-limit 8 (was 4)" in n and "--max-new-tokens 32 (was 64)" in n
                                    for n in redone)
    for run in ("baseline", "ama-dpo-ihd-s0.5", "ama-dpo-ihd-s1"):
        assert json.loads((fake_ladder.runs / run / "eval" / "metrics.json").read_text())["config"]["limit"] == 8
    assert len(fake_ladder.trained) == 2  # training settings did not change: nothing retrained
