"""`equi curate` end to end on real data: contract, ratios, ladder, accounting, rejects, atomicity, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from equi.cli import app
from equi.manifest import verify_mix
from equi.schema import MIX_SCHEMA, POOL_SCHEMA, SAFETY_GROUPS, check_schema
from tests.realdata import advbench_rows, hh_lines, write_jsonl, xstest_prompts, xstest_single_responses

runner = CliRunner()

# Synthetic broken lines (not data): one of each kind of damage, appended to the real input.
BROKEN = [b"{not json", b'{"prompt": 7}', b'{"chosen": "no transcript", "rejected": "x"}', b"\xff\xfe\xfa", b""]


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def raw_inputs(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    hh = write_jsonl(root / "hh.jsonl", hh_lines(shared_data, 300))
    with open(hh, "ab") as fh:
        fh.write(b"\n".join(BROKEN) + b"\n")
    # Three models' answers to the same XSTest prompts: single responses the mixer pairs.
    singles = [row for model in ("llama2new", "mistralinstruct", "gpt4")
               for row in xstest_single_responses(shared_data, model, n=120)]
    xs = write_jsonl(root / "xstest_completions.jsonl", singles)
    prompts = write_jsonl(root / "prompts.jsonl", xstest_prompts(shared_data)[:40] + advbench_rows(shared_data, 40))
    return [hh, xs, prompts]


@pytest.fixture(scope="module")
def mix(raw_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixes") / "mix"
    result = _invoke("curate", *raw_inputs, "--out", out, "--quiet", "--seed", "3")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def manifest(mix):
    return json.loads((mix / "manifest.json").read_text())


@pytest.fixture(scope="module")
def mixture(mix):
    return pl.read_parquet(mix / "data" / "*.parquet")


def test_mix_loads_with_datasets_and_has_the_contract_columns(mix):
    from datasets import load_dataset

    by_dir = load_dataset("parquet", data_dir=str(mix / "data"))
    assert by_dir["train"].column_names == MIX_SCHEMA.names
    by_card = load_dataset(str(mix))
    assert set(by_card) == {"train", "test"}  # TRL's default split names
    assert by_card["train"].num_rows + by_card["test"].num_rows == sum(
        pq.ParquetFile(p).metadata.num_rows for p in (mix / "data").glob("*.parquet"))
    for path in (mix / "data").glob("*.parquet"):
        assert check_schema(pq.read_schema(path), MIX_SCHEMA) is None
    for path in (mix / "pool").glob("*.parquet"):
        assert check_schema(pq.read_schema(path), POOL_SCHEMA) is None


def test_rows_are_conversational_and_every_turn_is_kept(mix, mixture, raw_inputs):
    from datasets import load_dataset

    train = load_dataset(str(mix), split="train")
    assert "image" not in train.column_names and "image_severity" not in train.column_names  # text-only mix
    for row in train:
        assert row["prompt"] and row["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in row["chosen"]] == ["assistant"] == [m["role"] for m in row["rejected"]]
    # hh transcripts of several turns keep every turn as a message, never flattened into "Human:" text
    multi = [p for p in mixture["prompt"].to_list() if len(p) > 1]
    assert multi, "the real hh rows include multi-turn dialogues"
    for prompt in multi:
        assert [m["role"] for m in prompt][::2] == ["user"] * ((len(prompt) + 1) // 2)
        assert not any("\n\nHuman:" in m["content"] or "\n\nAssistant:" in m["content"] for m in prompt)


def test_a_prefix_of_the_train_split_keeps_the_group_ratios(mix, mixture):
    from datasets import load_dataset

    train = mixture.filter(pl.col("split") == "train")
    shares = {g: n / train.height for g, n in zip(*train.group_by("group").len().to_dict(as_series=False).values())}
    for percent in (10, 30, 50):
        prefix = load_dataset(str(mix), split=f"train[:{percent}%]")
        assert prefix["rank"] == sorted(prefix["rank"])  # shards in rank order, not one group each
        groups = prefix["group"]
        for group, share in shares.items():
            assert abs(groups.count(group) - share * len(groups)) <= 1.0, (percent, group)


def test_safety_groups_follow_the_ratios_exactly(manifest, mixture):
    counts = mixture.group_by("group").len().to_dict(as_series=False)
    counts = dict(zip(counts["group"], counts["len"]))
    ratios = {"EHD": 10, "IHD": 3, "MHD": 1}
    active = [g for g in SAFETY_GROUPS if counts.get(g, 0)]
    assert active, "the real mix must hold safety pairs"
    multiples = {counts[g] / ratios[g] for g in active}
    assert len(multiples) == 1 and float(multiples.pop()).is_integer()
    for g in set(SAFETY_GROUPS) - set(active):
        assert any(g in w for w in manifest["warnings"])
    safety = sum(counts[g] for g in active)
    assert counts.get("BENIGN", 0) == round(0.2 / 0.8 * safety) or any("BENIGN" in w for w in manifest["warnings"])


def test_every_prefix_of_the_ladder_keeps_the_shares(mixture):
    for split in ("train", "test"):  # ranks count within a split
        ordered = mixture.filter(pl.col("split") == split).sort("rank")
        assert ordered["rank"].to_list() == list(range(ordered.height))
        groups = ordered["group"].to_list()
        totals = {g: groups.count(g) for g in set(groups)}
        for k in range(1, len(groups) + 1):
            for g, n in totals.items():
                assert abs(groups[:k].count(g) - k * n / len(groups)) <= 1.0


def test_accounting_balances_and_rejects_name_file_line_and_reason(mix, manifest, raw_inputs):
    acc = manifest["accounting"]
    assert acc["input_lines"] == 300 + len(BROKEN) + 360 + 80
    assert acc["input_lines"] == acc["pooled"] + acc["rejected"]
    assert acc["pooled"] == acc["mixed"] + sum(acc["not_selected"].values())
    rejects = [json.loads(line) for line in (mix / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == acc["rejected"]
    broken = [r for r in rejects if r["line"] > 300]
    assert [r["line"] for r in broken] == list(range(301, 301 + len(BROKEN)))
    assert all(r["file"] == str(raw_inputs[0]) and r["reason"] for r in broken)
    pool_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in (mix / "pool").glob("*.parquet"))
    assert pool_rows == acc["pooled"]
    assert acc["not_selected"].get("prompt_only") == 40  # the XSTest prompts; AdvBench rows are single responses
    assert [i["lines"] for i in manifest["inputs"]] == [300 + len(BROKEN), 360, 80]


def test_manifest_times_each_phase(manifest):
    phases = manifest["timings_s"]
    assert list(phases) == ["load_models", "read_and_score", "cluster", "write_pool", "mix"]
    assert all(isinstance(v, float) and v >= 0 for v in phases.values())
    assert phases["read_and_score"] > 0  # 740 real lines embedded and scored take well over 0.05 s


def test_the_summary_says_where_the_time_went(manifest, mix, capsys):
    from equi.commands.curate import print_summary

    print_summary(manifest, mix)
    lines = capsys.readouterr().out.splitlines()
    took = [line for line in lines if line.startswith("took ")]  # a result: stdout
    assert len(took) == 1 and "read and score" in took[0] and "cluster" in took[0]
    assert float(took[0].split()[1]) == pytest.approx(sum(manifest["timings_s"].values()), abs=0.05)
    assert f"embedder {manifest['embedder']} on cpu" in lines  # and where the encoder ran (--device)


def test_single_responses_are_paired_safer_first(mixture):
    paired = mixture.filter(pl.col("source").str.starts_with("xstest_"))
    assert paired.height > 0
    assert (paired["chosen_cost"] <= paired["rejected_cost"]).all()
    assert (paired["chosen"] != paired["rejected"]).all()
    assert paired["response"].is_null().all()


def test_scores_spans_and_clusters_are_well_formed(mix, mixture):
    pool = pl.read_parquet(mix / "pool" / "*.parquet")
    for frame in (pool, mixture):
        for column in ("group_confidence", "explicit_score", "intent_score"):
            values = frame[column].to_numpy()
            assert np.all((values >= 0) & (values <= 1))
        assert frame["cluster"].min() >= 0
        assert set(frame["severity"].drop_nulls().unique().to_list()) <= {"minor", "moderate", "severe"}
    signs = []
    for column in ("chosen", "rejected"):
        for messages, spans in zip(mixture[column].to_list(), mixture[f"{column}_spans"].to_list()):
            text = messages[0]["content"]  # spans index the assistant message's content
            for span in spans or []:
                assert 0 <= span["start"] < span["end"] <= len(text) and span["sign"] in (-1, 1)
                signs.append(span["sign"])
    assert set(signs) == {-1, 1}  # real answers get key segments of both kinds
    labelled = pool.filter(pl.col("source") == "advbench")
    assert (labelled["response_cost"] > 0).all()  # is_safe=false labels are kept as unsafe costs
    assert pool["cluster"].n_unique() > 1


def test_verify_passes_then_catches_tampering(mix, tmp_path):
    assert verify_mix(mix) == []
    assert _invoke("verify", mix).exit_code == 0
    copy = tmp_path / "mix"
    shutil.copytree(mix, copy)
    shard = sorted((copy / "data").glob("train-*.parquet"))[0]
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, table.num_rows - 1), shard)
    result = _invoke("verify", copy)
    assert result.exit_code == 3 and shard.name in result.output
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["accounting"]["rejected"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert any("input_lines" in p for p in verify_mix(copy))
    # rejects.jsonl must hold the rejected lines the manifest counts.
    again = tmp_path / "mix-rejects"
    shutil.copytree(mix, again)
    rejects = (again / "rejects.jsonl").read_text().splitlines(keepends=True)
    (again / "rejects.jsonl").write_text("".join(rejects[:-1]))
    result = _invoke("verify", again)
    assert result.exit_code == 3 and f"{len(rejects) - 1} lines" in result.output
    (again / "rejects.jsonl").unlink()
    assert any("rejects.jsonl: missing" in p for p in verify_mix(again))
    # A manifest that is JSON but no object is a problem found, not a traceback.
    (again / "manifest.json").write_text("[]")
    result = _invoke("verify", again)
    assert result.exit_code == 3 and "not an object" in result.output
    # A folder that is no mix at all is bad input (exit 2), named once.
    result = _invoke("verify", tmp_path)
    assert result.exit_code == 2 and result.output.count(str(tmp_path)) == 1


def test_existing_out_is_refused_without_overwrite(mix, raw_inputs):
    result = _invoke("curate", raw_inputs[2], "--out", mix, "--quiet")
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert json.loads((mix / "manifest.json").read_text())["accounting"]["input_lines"] > 80  # untouched


def test_overwrite_replaces_only_what_equi_wrote(raw_inputs, tmp_path, monkeypatch):
    """--overwrite with a mistyped --out must not delete the user's files (or the input itself)."""
    prompts = Path(raw_inputs[2])
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    inside = folder / "prompts.jsonl"
    inside.write_bytes(prompts.read_bytes())
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("keep me too")
    cases = [(inside, folder, "not an equi output"), (prompts, a_file, "not an equi output")]
    for source, out, message in cases:
        result = _invoke("curate", source, "--out", out, "--overwrite", "--quiet")
        assert result.exit_code == 2 and message in result.output, result.output
    assert (folder / "notes.txt").read_text() == "keep me" and inside.read_bytes() == prompts.read_bytes()
    assert a_file.read_text() == "keep me too" and not list(tmp_path.glob(".*old*"))
    # A mix that holds the input, and the directory the command runs in: refused too.
    mix_dir = tmp_path / "old-mix"
    mix_dir.mkdir()
    (mix_dir / "manifest.json").write_text("{}")
    (mix_dir / "raw.jsonl").write_bytes(prompts.read_bytes())
    result = _invoke("curate", mix_dir / "raw.jsonl", "--out", mix_dir, "--overwrite", "--quiet")
    assert result.exit_code == 2 and "lies inside --out" in result.output and (mix_dir / "raw.jsonl").is_file()
    monkeypatch.chdir(mix_dir)
    result = _invoke("curate", prompts, "--out", ".", "--overwrite", "--quiet")
    assert result.exit_code == 2 and "current directory" in result.output and (mix_dir / "raw.jsonl").is_file()


def test_prompt_only_input_writes_the_pool_and_an_empty_mixture(shared_data, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", xstest_prompts(shared_data)[:80])
    out = tmp_path / "prompts-mix"
    result = _invoke("curate", prompts, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "mixture is empty" in result.output and "equi curate →" not in result.output  # warned even when quiet
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["accounting"]["pooled"] == 80 and manifest["accounting"]["mixed"] == 0
    assert verify_mix(out) == []
    from datasets import load_dataset

    assert load_dataset(str(out), "pool")["train"].num_rows == 80


@pytest.mark.parametrize("args,message", [
    (["{missing}"], "no such file"),
    (["{folder}"], "is a directory"),
    (["{prompts}", "--size", "0"], "--size must be at least 1"),
    (["{empty}"], "input is empty"),
    (["{prompts}", "--embedder", "no-such-embedder-xyz"], "cannot load embedder"),
    (["{prompts}", "--ratios", "EHD=1,XYZ=2"], "bad ratio"),
    (["{prompts}", "--ratios", "EHD=inf"], "--ratios must be finite"),  # crashed after scoring every line
    (["{prompts}", "--ratios", "EHD=nan,IHD=1"], "--ratios must be finite"),  # dropped EHD silently
    (["{prompts}", "--ratios", "EHD=1e308,IHD=1e308"], "finite sum"),  # their sum overflowed: a traceback
    (["{prompts}", "{prompts}"], "is given twice"),  # read twice, counted once: unbalanced accounting
    (["{prompts}", "{prompts_again}"], "are the same file"),
    (["{prompts}", "--categoriser", "{list_json}"], "not a categoriser JSON file"),
    (["{bad}", "--strict"], "bad.jsonl:2: invalid JSON"),
    (["{all_bad}"], "all 2 input lines were rejected, so nothing was written"),
    (["{bad}", "--strict", "--workers", "2"], "bad.jsonl:2: invalid JSON"),  # raised in a worker process
])
def test_bad_invocations_are_one_line_errors_with_exit_2(raw_inputs, tmp_path, args, message):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "fine"}\n{oops\n')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "all_bad.jsonl").write_text('{oops\n{"foo": 1}\n')  # synthetic, and no usable line
    names = {"missing": tmp_path / "missing.jsonl", "empty": tmp_path / "empty.jsonl",
             "prompts": raw_inputs[2], "bad": tmp_path / "bad.jsonl", "folder": tmp_path,
             "list_json": tmp_path / "list.json", "all_bad": tmp_path / "all_bad.jsonl",
             "prompts_again": raw_inputs[2].parent / ".." / raw_inputs[2].parent.name / raw_inputs[2].name}
    args = [a.format(**names) for a in args]
    out = tmp_path / "out"
    result = runner.invoke(app, ["curate", *args, "--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_an_interrupted_run_leaves_no_half_mix(raw_inputs, tmp_path, monkeypatch):
    import curation.pipeline
    from equi.config import CurateConfig
    from equi.manifest import Interrupted
    from curation.pipeline import curate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C raises in the middle of the run

    monkeypatch.setattr(curation.pipeline, "select_mixture", interrupted)
    out = tmp_path / "mix"
    with pytest.raises(Interrupted):
        curate(CurateConfig(inputs=[str(raw_inputs[2])], out=str(out), quiet=True))
    # Nothing that looks whole at --out: only the work kept for a resume.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".mix.partial"]


def test_a_failed_run_keeps_no_work(raw_inputs, tmp_path, monkeypatch):
    import curation.pipeline
    from equi.config import CurateConfig
    from curation.pipeline import curate

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(curation.pipeline, "select_mixture", broken)
    with pytest.raises(RuntimeError):
        curate(CurateConfig(inputs=[str(raw_inputs[2])], out=str(tmp_path / "mix"), quiet=True))
    assert list(tmp_path.iterdir()) == []


def test_data_card_front_matter_is_valid_for_the_hub(mix):
    text = (mix / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    allowed = {"n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "100M<n<1B",
               "1B<n<10B", "10B<n<100B", "100B<n<1T", "n>1T"}
    assert set(front["size_categories"]) <= allowed
    names = [c["config_name"] for c in front["configs"]]
    assert names[0] == "default" and "pool" in names
    assert front["license"]
    assert "## Sources" in text and "## Limitations" in text and "rejects.jsonl" in text


def test_a_categoriser_fit_for_another_embedder_is_refused_before_any_work(raw_inputs, tmp_path):
    from curation.embed import EmbedderError
    from curation.pipeline import curate
    from equi.config import CurateConfig

    class EightDimensional:  # a stand-in embedder of another size (not a real model)
        name, identity, dim = "eight", "eight", 8

        def encode(self, texts):
            return np.ones((len(texts), 8), dtype=np.float32) / np.sqrt(8)

    out = tmp_path / "mix"
    with pytest.raises(EmbedderError, match="fit-categoriser"):
        curate(CurateConfig(inputs=[str(raw_inputs[2])], out=str(out), quiet=True), embedder=EightDimensional())
    assert not out.exists()


def test_quiet_loads_the_encoder_without_a_bar_and_restores_the_setting(capfd):
    """--quiet and ``CurateConfig(quiet=True)`` alike: no "Loading weights" bar (the CLI used to do it alone)."""
    from transformers.utils import logging as hf_logging

    from curation.embed import get_embedder
    from curation.steps import load_models
    from equi.config import CurateConfig

    shown = []
    for quiet in (True, False):
        get_embedder.cache_clear()  # a cached encoder would load nothing, bar or not
        load_models(CurateConfig(inputs=["raw.jsonl"], out="mix", quiet=quiet, embedding_cache=False))
        shown.append("Loading weights" in capfd.readouterr().err)
        assert hf_logging.is_progress_bar_enabled()  # the caller's setting is back
    assert shown == [False, True]


def test_quiet_transformers_off_does_not_import_transformers(fresh_python):
    # nor does a quiet run without --judge or --guard-model load its (absent) labellers under it
    code = ("import sys; from equi.progress import quiet_transformers\n"
            "with quiet_transformers(False):\n    pass\n"
            "from curation.steps import configured_labellers; from equi.config import CurateConfig\n"
            "labellers = configured_labellers(CurateConfig(inputs=['raw.jsonl'], out='mix', quiet=True))\n"
            "assert labellers.judge is None and labellers.guard is None\n"
            "assert 'transformers' not in sys.modules\n")
    result = fresh_python(code)
    assert result.returncode == 0, result.stderr[-2000:]


def test_an_encoder_that_fills_every_core_gets_no_neighbour_thread(raw_inputs, tmp_path):
    """MiniLM on the CPU (a torch thread per core) is called in the scoring thread, one batch at a time; an encoder
    that leaves cores idle embeds in a thread beside the heuristics. The pool is the same either way."""
    import threading

    from curation.embed import get_embedder
    from curation.pipeline import curate
    from equi.config import CurateConfig

    class Recording:  # the real encoder, with a record of the thread each call ran in
        def __init__(self, fills: bool):
            self.inner = get_embedder(None)
            self.name, self.identity, self.dim = self.inner.name, self.inner.identity, self.inner.dim
            self.fills_every_core, self.threads = fills, []

        def encode(self, texts):
            self.threads.append(threading.get_ident())
            return self.inner.encode(texts)

    pools = []
    for fills in (True, False):
        embedder, out = Recording(fills), tmp_path / f"mix-{fills}"
        curate(CurateConfig(inputs=[str(raw_inputs[2])], out=str(out), quiet=True, batch_size=16,
                            embedding_cache=False), embedder=embedder)
        assert len(embedder.threads) == 5  # 80 prompts in batches of 16
        assert all((thread == threading.get_ident()) == fills for thread in embedder.threads)
        pools.append([path.read_bytes() for path in sorted((out / "pool").iterdir())])
    assert pools[0] and pools[0] == pools[1]


def test_minilm_fills_every_core_only_with_a_torch_thread_per_core(monkeypatch):
    import torch

    from curation import embed
    from curation.embed import get_embedder

    threads = torch.get_num_threads()
    model = get_embedder(None)
    try:
        monkeypatch.setattr(embed, "usable_cores", lambda: 2)
        torch.set_num_threads(2)
        assert model.fills_every_core
        torch.set_num_threads(1)
        assert not model.fills_every_core
    finally:
        torch.set_num_threads(threads)
