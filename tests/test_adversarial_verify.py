"""`equi verify` against an adversary: every claim of the manifest is checked against the files themselves.

Each test copies one real curated mix (real public rows from ../shared/data), tampers with it the way an
adversarial review did (re-signing the checksums where that kept the old verify quiet) and asserts that
`equi verify` exits 3 naming the problem. The tampering values (edited labels, counts, paths) are synthetic.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from equi.cli import app
from equi.manifest import sha256_file, verify_mix
from tests.realdata import hh_lines, write_jsonl, xstest_prompts, xstest_single_responses

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def mix(shared_data, tmp_path_factory):
    """A small real mix: HH-RLHF pairs, XSTest single responses and prompts, plus one synthetic broken line."""
    root = tmp_path_factory.mktemp("raw")
    hh = write_jsonl(root / "hh.jsonl", hh_lines(shared_data, 80) + ["{not json"])  # synthetic broken line
    singles = [r for model in ("llama2new", "gpt4") for r in xstest_single_responses(shared_data, model, n=30)]
    xs = write_jsonl(root / "xs.jsonl", singles)
    prompts = write_jsonl(root / "prompts.jsonl", xstest_prompts(shared_data)[:10])
    out = tmp_path_factory.mktemp("mixes") / "mix"
    result = _invoke("curate", hh, xs, prompts, "--out", out, "--quiet", "--seed", "3")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def copy(mix, tmp_path) -> Path:
    target = tmp_path / "mix"
    shutil.copytree(mix, target, symlinks=True)
    return target


def _manifest(mix: Path) -> dict:
    return json.loads((mix / "manifest.json").read_text())


def _write_manifest(mix: Path, manifest: dict) -> None:
    (mix / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _resign(mix: Path) -> None:
    """What the adversary did: make every checksum in the manifest match the files again."""
    manifest = _manifest(mix)
    for shard in manifest["shards"]:
        if (mix / shard["path"]).is_file():
            shard["sha256"] = sha256_file(mix / shard["path"])
    for name in manifest.get("files", {}):
        manifest["files"][name] = sha256_file(mix / name)
    _write_manifest(mix, manifest)


def _mixture_shard(mix: Path, group: str | None = None) -> dict:
    shards = [s for s in _manifest(mix)["shards"] if s["split"] != "pool" and (group is None or group in s["groups"])]
    return max(shards, key=lambda s: s["rows"])


def _set_column(path: Path, column: str, row: int, value: str) -> None:
    table = pq.read_table(path)
    values = table[column].to_pylist()
    values[row] = value
    index = table.schema.get_field_index(column)
    table = table.set_column(index, table.schema.field(index), pa.array(values, table.schema.field(index).type))
    pq.write_table(table, path)


def _fails(mix: Path, *words: str) -> str:
    result = _invoke("verify", mix)
    assert result.exit_code == 3, result.output
    for word in words:
        assert word in result.output, result.output
    assert "Traceback" not in result.output
    return result.output


def test_untouched_mix_verifies(mix):
    assert verify_mix(mix) == []
    result = _invoke("verify", mix)
    assert result.exit_code == 0 and "ok" in result.output
    manifest = _manifest(mix)
    assert set(manifest["files"]) == {"README.md", "rejects.jsonl"}
    assert manifest["files"]["README.md"] == sha256_file(mix / "README.md")


def test_split_label_edited_in_a_shard(copy):
    shard = _mixture_shard(copy)
    _set_column(copy / shard["path"], "split", 0, "test")  # synthetic edit: a train row relabelled
    _resign(copy)
    _fails(copy, shard["path"], "split other than")


def test_shard_removed_with_its_entry(copy):
    shard = _mixture_shard(copy)
    (copy / shard["path"]).unlink()
    manifest = _manifest(copy)
    manifest["shards"] = [s for s in manifest["shards"] if s["path"] != shard["path"]]
    _write_manifest(copy, manifest)
    _fails(copy, "counts: mixture", "mixture_rows")


def test_pool_shard_removed_with_its_entry(copy):
    manifest = _manifest(copy)
    pool = [s for s in manifest["shards"] if s["split"] == "pool"][0]
    (copy / pool["path"]).unlink()
    manifest["shards"].remove(pool)
    _write_manifest(copy, manifest)
    _fails(copy, "counts: pool", "pool shards hold 0 rows")


def test_mixture_counts_edited(copy):
    manifest = _manifest(copy)
    group = next(iter(manifest["counts"]["mixture"]))
    split = next(iter(manifest["counts"]["mixture"][group]))
    manifest["counts"]["mixture"][group][split] += 3  # synthetic edit
    _write_manifest(copy, manifest)
    _fails(copy, "counts: mixture counts by group × split")


def test_pool_counts_edited(copy):
    manifest = _manifest(copy)
    group = next(iter(manifest["counts"]["pool"]))
    manifest["counts"]["pool"][group] += 1  # synthetic edit
    _write_manifest(copy, manifest)
    _fails(copy, "counts: pool counts by group")


def test_balanced_accounting_edit(copy):
    manifest = _manifest(copy)
    acc = manifest["accounting"]
    acc["input_lines"] += 5  # synthetic edit that keeps both equations balanced
    acc["pooled"] += 5
    reason = next(iter(acc["not_selected"]))
    acc["not_selected"][reason] += 5
    _write_manifest(copy, manifest)
    _fails(copy, f"pooled {acc['pooled']}, but the pool shards hold {acc['pooled'] - 5} rows")


def test_mixture_rows_edited(copy):
    manifest = _manifest(copy)
    manifest["accounting"]["mixture_rows"] += 1  # synthetic edit
    _write_manifest(copy, manifest)
    _fails(copy, "mixture_rows")


def test_balanced_rejected_edit(copy):
    manifest = _manifest(copy)
    acc = manifest["accounting"]
    acc["rejected"] += 2  # synthetic edit, balanced by input_lines
    acc["input_lines"] += 2
    _write_manifest(copy, manifest)
    _fails(copy, "rejects.jsonl", "rejected lines")


def test_group_label_edited_in_a_mixture_shard(copy):
    shard = _mixture_shard(copy)
    group = pq.read_table(copy / shard["path"], columns=["group"])["group"][0].as_py()
    other = "BENIGN" if group != "BENIGN" else "EHD"
    _set_column(copy / shard["path"], "group", 0, other)  # synthetic edit
    manifest = _manifest(copy)  # the adversary even fixes the counts
    counts = manifest["counts"]["mixture"]
    counts[group][shard["split"]] -= 1
    counts.setdefault(other, {}).setdefault(shard["split"], 0)
    counts[other][shard["split"]] += 1
    _write_manifest(copy, manifest)
    _resign(copy)
    _fails(copy, shard["path"], "rows by group")


def test_group_label_edited_in_the_pool(copy):
    manifest = _manifest(copy)
    pool = [s for s in manifest["shards"] if s["split"] == "pool"][0]
    groups = pq.read_table(copy / pool["path"], columns=["group"])["group"].to_pylist()
    _set_column(copy / pool["path"], "group", 0, "OTHER" if groups[0] != "OTHER" else "BENIGN")  # synthetic edit
    _resign(copy)
    _fails(copy, "counts: pool counts by group")


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_shard_path_outside_the_mix(copy, where):
    manifest = _manifest(copy)
    shard = _mixture_shard(copy)
    outside = copy.parent / "x.parquet"
    shutil.move(copy / shard["path"], outside)
    entry = next(s for s in manifest["shards"] if s["path"] == shard["path"])
    entry["path"] = "../x.parquet" if where == "parent" else str(outside)
    _write_manifest(copy, manifest)
    _fails(copy, "path leads outside the mix directory")


def test_shard_symlinked_out_of_the_mix(copy):
    shard = _mixture_shard(copy)
    outside = copy.parent / "elsewhere.parquet"
    shutil.move(copy / shard["path"], outside)
    os.symlink(outside, copy / shard["path"])  # same bytes, so the checksum still matches
    _fails(copy, shard["path"], "symlink")


def test_card_edited(copy):
    card = (copy / "README.md").read_text()
    (copy / "README.md").write_text(card.replace("equi safety mixture", "a better mixture"))  # synthetic edit
    _fails(copy, "README.md: sha256 does not match")


def test_card_edited_to_serve_the_pool_as_train(copy):
    card = (copy / "README.md").read_text()
    assert "path: data/train-*.parquet" in card
    (copy / "README.md").write_text(card.replace("path: data/train-*.parquet", "path: pool/pool-*.parquet", 1))
    _resign(copy)  # even with its checksum updated
    _fails(copy, "README.md: the default config serves")


def test_rejects_edited(copy):
    lines = (copy / "rejects.jsonl").read_text().splitlines(keepends=True)
    (copy / "rejects.jsonl").write_text("".join(lines[:-1]) + '{"reason": "synthetic"}\n')  # same line count
    _fails(copy, "rejects.jsonl: sha256 does not match")


@pytest.mark.parametrize("name", ["data/train-00099-of-00099.parquet", "pool/extra.parquet", "notes.txt"])
def test_unlisted_file(copy, name):
    source = copy / _mixture_shard(copy)["path"]
    shutil.copyfile(source, copy / name)
    _fails(copy, f"{name}: ", "not listed in the manifest")


@pytest.mark.parametrize("damage, named", [
    (lambda s: s.pop("sha256"), "has no 'sha256'"),
    (lambda s: s.update(rows="10"), "'rows' is '10'"),
    (lambda s: s.pop("split"), "has no 'split'"),
    (lambda s: s.update(groups=7), "'groups' is 7"),
    (lambda s: s.update(split="eval"), "split 'eval' is none of pool, train, test"),  # schema 2's split name
])
def test_malformed_shard_entry(copy, damage, named):
    manifest = _manifest(copy)
    entry = manifest["shards"][1]
    damage(entry)  # synthetic damage
    _write_manifest(copy, manifest)
    out = _fails(copy, "shard entry 1", named)
    assert entry["path"] in out


@pytest.mark.parametrize("shards, named", [
    (lambda shards: shards + ["data/x.parquet"], "is a JSON str"),
    (lambda shards: "data/", "'shards' is str"),
])
def test_malformed_shards_list(copy, shards, named):
    manifest = _manifest(copy)
    manifest["shards"] = shards(manifest["shards"])  # synthetic damage
    _write_manifest(copy, manifest)
    _fails(copy, named)


@pytest.mark.parametrize("files, named", [
    ("README.md", "'files' is str"),
    ({"README.md": 3}, "sha256 3 is not"),
    ({"rejects.jsonl": "0" * 64}, "does not list README.md"),
])
def test_malformed_files_section(copy, files, named):
    manifest = _manifest(copy)
    manifest["files"] = files  # synthetic damage
    _write_manifest(copy, manifest)
    _fails(copy, named)


def test_malformed_accounting(copy):
    manifest = _manifest(copy)
    manifest["accounting"]["pooled"] = "149"  # synthetic damage
    _write_manifest(copy, manifest)
    _fails(copy, "no complete 'accounting' section")


def test_older_manifest_without_files_is_refused(copy):
    manifest = _manifest(copy)
    del manifest["files"]
    _write_manifest(copy, manifest)
    _fails(copy, "no 'files' section", "re-curate the mix")


def test_train_and_guard_refuse_a_malformed_entry_with_exit_3(copy, tmp_path):
    from equi.manifest import MixVerificationError
    from train.mixdata import verify_mix_or_raise

    manifest = _manifest(copy)
    manifest["shards"][0] = "pool/pool-00000-of-00001.parquet"  # synthetic damage: an entry that is no object
    _write_manifest(copy, manifest)
    with pytest.raises(MixVerificationError, match="shard entry 0"):
        verify_mix_or_raise(copy)
    result = _invoke("guard", copy, "--out", tmp_path / "guarded", "--rounds", "0", "--quiet")
    assert result.exit_code == 3 and "shard entry 0" in result.output


def test_a_schema_2_mix_is_refused_with_the_command_that_re_curates_it(copy, tmp_path):
    """A mix written by an older equi (schema 2: text columns, an `eval` split) is not read as if it were schema 3:
    verify and train refuse it and name the command that re-curates it from its inputs."""
    manifest = _manifest(copy)
    manifest["schema_version"] = 2  # what an older equi wrote
    _write_manifest(copy, manifest)
    first = verify_mix(copy)[0]
    assert first.startswith("schema_version 2") and "re-curate" in first
    assert f"equi curate {' '.join(i['path'] for i in manifest['inputs'])} --out" in first
    _fails(copy, "schema_version 2", "equi curate")
    trained = runner.invoke(app, ["train", "--mix", str(copy), "--out", str(tmp_path / "run"), "--max-steps", "1"])
    assert trained.exit_code == 3 and "re-curate" in trained.output and not (tmp_path / "run").exists()
