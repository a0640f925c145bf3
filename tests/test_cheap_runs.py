"""Cheap runs (issue 17 item 4): a finished run leaves ``final/`` and its records, not its checkpoints (unless
``--keep-checkpoints``); ``final/`` keeps the dtype it was trained in and is saved for inference; an interrupted
run keeps what ``--resume`` needs. On the tiny local model and a real mini-mix (HH-RLHF rows, synthetic labels)."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from typer.testing import CliRunner

from train_fixtures import build_hh_mix, build_tiny_model

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("private_equi_cache")


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    root = tmp_path_factory.mktemp("cheap")
    return build_hh_mix(root / "mix", n_rows=16, n_eval=2), build_tiny_model(root / "model")




def train_args(mix, model, out, *extra):
    return ["train", "--mix", str(mix), "--model", str(model), "--out", str(out), "--batch-size", "4", "--lr", "1e-3",
            "--max-length", "96", "--max-steps", "2", "--save-steps", "1", "--quiet", *extra]


def invoke(*args):
    from equi.cli import app

    return runner.invoke(app, list(args))


def checkpoints(run_dir):
    return sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("checkpoint-*"))


def safetensors_dtypes(folder) -> set[str]:
    from safetensors import safe_open

    found = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            found |= {str(handle.get_slice(name).get_dtype()) for name in handle.keys()}
    return found


def test_keep_checkpoints_keeps_them_and_final_is_saved_for_inference_in_the_trained_dtype(material, tmp_path):
    from transformers import PreTrainedModel

    mix, model = material
    out = tmp_path / "kept"
    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, PreTrainedModel)}  # e.g. an earlier test's encoder
    result = invoke(*train_args(mix, model, out, "--keep-checkpoints"))
    assert result.exit_code == 0, result.output
    # Nothing of the run stays in memory (the trainer holds the model in reference cycles): equi scale trains and
    # evaluates rung after rung in one process.
    assert not [o for o in gc.get_objects() if isinstance(o, PreTrainedModel) and id(o) not in before]
    assert checkpoints(out) == ["checkpoint-1", "checkpoint-2"]
    assert (out / "checkpoint-2" / "optimizer.pt").is_file()  # what --resume needs, kept as asked
    # The trainer leaves use_cache off in the config it saves; final/ is saved for inference, as the base was.
    assert json.loads((out / "checkpoint-2" / "config.json").read_text())["use_cache"] is False
    final_config = json.loads((out / "final" / "config.json").read_text())
    assert final_config["use_cache"] is True
    # Trained in fp32 on a CPU: final/ holds fp32 weights, and both config.json and summary.json say so.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dtype"] == final_config["dtype"] == "float32"
    assert safetensors_dtypes(out / "final") == {"F32"}
    assert not (out / "final.partial").exists()  # written beside final/ and renamed


def test_bf16_training_saves_bf16(tmp_path):
    """final/ takes the dtype of the weights it gets, not fp32: a bf16 model (a GPU run) saves bf16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from equi.models import save_model_atomic
    from train.rundir import trained_dtype

    source = build_tiny_model(tmp_path / "model", vocab_size=300)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    model.config.use_cache = False  # as transformers' Trainer leaves it
    save_model_atomic(model, AutoTokenizer.from_pretrained(source), tmp_path / "final")
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert trained_dtype(model) == config["dtype"] == "bfloat16" and config["use_cache"] is True
    assert safetensors_dtypes(tmp_path / "final") == {"BF16"}


def test_an_interrupted_run_keeps_its_checkpoints_and_the_finished_resume_removes_them(material, tmp_path,
                                                                                       monkeypatch):
    import train.rundir

    mix, model = material
    out = tmp_path / "cut"
    saved = train.rundir.save_final

    def killed(*args, **kwargs):
        raise RuntimeError("killed after the last step, before final/")

    monkeypatch.setattr(train.rundir, "save_final", killed)
    assert invoke(*train_args(mix, model, out)).exit_code != 0
    assert checkpoints(out) == ["checkpoint-1", "checkpoint-2"] and not (out / "final").exists()
    monkeypatch.setattr(train.rundir, "save_final", saved)
    result = invoke("train", "--out", str(out), "--resume", "--model", str(model), "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["steps"] == 2
    assert checkpoints(out) == [] and (out / "final" / "model.safetensors").is_file()
    # What the run directory still holds: its records and final/, nothing of the optimiser.
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "final", "metrics.jsonl",
                                                     "summary.json"]


def test_a_finished_dual_run_leaves_no_round_checkpoints(material, tmp_path):
    mix, model = material
    out = tmp_path / "dual"
    result = invoke(*train_args(mix, model, out, "--algo", "dual", "--rounds", "2"))
    assert result.exit_code == 0, result.output
    assert checkpoints(out) == [] and (out / "final" / "model.safetensors").is_file()
    assert not list(out.rglob("optimizer.pt")) and not list(out.rglob("*.partial"))


def test_remove_checkpoints_frees_only_checkpoints(tmp_path):
    from train.rundir import remove_checkpoints

    for folder, size in (("checkpoint-2", 300), ("checkpoint-4", 500), ("round-0/checkpoint-1", 70),
                         ("final", 1000), ("round-1/end-model", 9), ("checkpoint-notes.txt", 0)):
        path = tmp_path / folder
        if folder.endswith(".txt"):
            path.write_text("a note, not a checkpoint folder")
            continue
        path.mkdir(parents=True)
        (path / "blob").write_bytes(b"x" * size)
    assert remove_checkpoints(tmp_path) == 870
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert left == ["checkpoint-notes.txt", "final", "final/blob", "round-1", "round-1/end-model",
                    "round-1/end-model/blob"]  # round-0 was left empty and went too


def test_keep_checkpoints_is_not_a_training_setting(material):
    from train.config import TrainConfig

    mix, _ = material
    assert TrainConfig(mix=str(mix), keep_checkpoints=True).hash() == TrainConfig(mix=str(mix)).hash()
    for command in ("train", "scale"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "--keep-checkpoints" in result.output
