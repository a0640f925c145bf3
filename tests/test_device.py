"""``--device`` (``equi curate``, ``equi fit-categoriser``): where the encoder runs. ``auto`` takes a CUDA GPU when
torch sees one; a device named outright must exist; a non-CPU device is part of the encoder's identity, so the
embedding cache and a resume never mix its vectors with the CPU's. No GPU is needed: where one is asked about,
torch's answer is patched (the CPU path is the one that runs)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from curation.embed import EmbedderError, LMStateEmbedder, device_tag, get_embedder, model_digest, resolve_device
from equi.cli import app
from equi.config import ConfigError, CurateConfig, valid_device
from tests.realdata import advbench_rows, hh_lines, write_jsonl
from tests.train_fixtures import build_tiny_model

runner = CliRunner()


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def one_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_auto_takes_cuda_when_torch_sees_it_and_the_cpu_otherwise(monkeypatch, no_cuda):
    assert resolve_device("auto") == resolve_device(None) == "cpu"
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("cpu") == "cpu"  # asked for, the CPU is kept even beside a GPU


def test_a_device_that_is_not_there_is_a_clear_error(no_cuda):
    with pytest.raises(EmbedderError, match=r"--device cuda: torch sees no CUDA device.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(EmbedderError, match="unknown --device 'gpu'"):
        resolve_device("gpu")


def test_a_cuda_index_past_the_devices_is_a_clear_error(one_cuda):
    assert resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(EmbedderError, match=r"--device cuda:3: torch sees 1 CUDA device"):
        resolve_device("cuda:3")


@pytest.mark.parametrize("device,ok", [("auto", True), ("cpu", True), ("cuda", True), ("cuda:0", True),
                                       ("cuda:12", True), ("mps", True), (None, True), ("gpu", False),
                                       ("cuda:", False), ("cuda:x", False), ("CPU", False), ("", False)])
def test_which_device_names_the_config_takes(device, ok):
    assert valid_device(device) is ok
    if device is not None and not ok:
        with pytest.raises(ConfigError, match="--device"):
            CurateConfig(inputs=["raw.jsonl"], out="mix", device=device)


def test_the_device_tags_the_identity_only_off_the_cpu():
    assert device_tag("cpu") == device_tag(torch.device("cpu")) == ""  # vectors cached before --device stay valid
    assert device_tag("cuda:1") == device_tag(torch.device("cuda", 0)) == "|cuda"
    assert device_tag("mps") == "|mps"


def test_an_lm_embedder_on_the_cpu_keeps_its_identity_and_says_where_it_runs(tmp_path, no_cuda):
    tiny = build_tiny_model(tmp_path / "model")
    auto = get_embedder(f"lm:{tiny}", "auto")
    assert auto is get_embedder(f"lm:{tiny}", "cpu")  # auto resolved first: one model per device, not per spelling
    assert auto.model.device.type == "cpu"
    assert auto.identity == LMStateEmbedder(str(tiny)).identity and not auto.identity.endswith(("|cuda", "|mps"))


def test_curate_with_a_missing_device_exits_2_and_writes_nothing(shared_data, tmp_path, no_cuda):
    raw = write_jsonl(tmp_path / "hh.jsonl", hh_lines(shared_data, 5))
    mix = tmp_path / "mix"
    result = runner.invoke(app, ["curate", str(raw), "--out", str(mix), "--quiet", "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "--device cuda: torch sees no CUDA device" in result.output and "Traceback" not in result.output
    assert not mix.exists()
    result = runner.invoke(app, ["curate", str(raw), "--out", str(mix), "--quiet", "--device", "gpu"])
    assert result.exit_code == 2 and "unknown --device 'gpu'" in result.output


def test_the_manifest_records_the_device_and_auto_leaves_the_config_hash_alone(shared_data, tmp_path, no_cuda):
    raw = write_jsonl(tmp_path / "adv.jsonl", advbench_rows(shared_data, 30))
    hashes, shards = [], []
    for device in ("auto", "cpu"):
        mix = tmp_path / f"mix-{device}"
        result = runner.invoke(app, ["curate", str(raw), "--out", str(mix), "--quiet", "--device", device])
        assert result.exit_code == 0, result.output
        manifest = json.loads((mix / "manifest.json").read_text())
        assert manifest["embedder_device"] == "cpu" and manifest["config"]["device"] == device
        assert "(on cpu)" in (mix / "README.md").read_text(encoding="utf-8")  # the data card says so too
        hashes.append(manifest["config_hash"])
        shards.append([(s["path"], s["sha256"]) for s in manifest["shards"]])
    assert hashes[0] == hashes[1]
    assert shards[0] == shards[1] and shards[0]  # auto on a CPU machine writes what cpu writes


def test_fit_categoriser_takes_the_device_too(shared_data, tmp_path, no_cuda):
    labelled = shared_data / "equilibrate_relabel_dev" / "beavertails_relabelled_dev.jsonl"
    small = write_jsonl(tmp_path / "labelled.jsonl", [json.loads(line) for line in
                                                      labelled.read_text(encoding="utf-8").splitlines()[:40]])
    result = runner.invoke(app, ["fit-categoriser", str(small), "--folds", "0", "--out", str(tmp_path / "c.json"),
                                 "--quiet", "--device", "cuda"])
    assert result.exit_code == 2 and "torch sees no CUDA device" in result.output


def test_the_judge_and_guard_run_on_the_same_device(tmp_path, no_cuda):
    from curation.steps import configured_labellers
    from equi.models import load_model

    # a missing device fails before any model loads (the judge path does not even exist)
    config = CurateConfig(inputs=["raw.jsonl"], out="mix", judge=str(tmp_path / "no-such-judge"), device="cuda")
    with pytest.raises(EmbedderError, match="--device cuda: torch sees no CUDA device"):
        configured_labellers(config)
    tiny = build_tiny_model(tmp_path / "judge")
    labellers = configured_labellers(CurateConfig(inputs=["raw.jsonl"], out="mix", judge=str(tiny), device="cpu",
                                                  embedding_cache=False, quiet=True))
    assert labellers.judge is not None and labellers.guard is None
    model, tokenizer = load_model(str(tiny), device="cpu")
    model.tokenizer = tokenizer  # model_digest's own reading of a tokenizer, as before load_judge passed it
    assert labellers.judge.digest == model_digest(model)  # on the CPU: no device tag, the cache keys of before
