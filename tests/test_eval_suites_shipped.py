"""The eval suites that ship inside the package (issue 17, item 3): same prompts as the data-directory copies,
a card each, a default that works with no data directory, ``--data-dir`` for the rest, and a real wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from equi.evaluation import suites as S
from equi.evaluation.run import EvalConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
COUNTS = {"advbench": 520, "harmbench": 160, "jailbreakbench": 80, "strongreject": 251,
          "xstest-unsafe": 160, "xstest-safe": 200}
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="needs the workspace's shared/data")


@pytest.fixture
def no_data_dir(monkeypatch):
    """As after ``pip install``: no ``--data-dir``, no ``$EQUI_DATA_DIR``, no ``shared/data`` beside the code."""
    monkeypatch.delenv(S.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(S, "resolve_data_dir", lambda option=None: None if not option else Path(option))


def test_shipped_suites_cover_what_licences_allow_and_count_right():
    assert set(S.SHIPPED_SUITES) == set(COUNTS) and "alpaca" not in S.SHIPPED_SUITES  # CC-BY-NC-4.0
    for name, n in COUNTS.items():
        suite = S.load_packaged_suite(name)
        assert len(suite.prompts) == n, name
        assert {p.expected for p in suite.prompts} == {"comply" if name == "xstest-safe" else "refuse"}
        assert Path(suite.source).parent == S.PACKAGED_DIR
    total = sum(p.stat().st_size for p in S.PACKAGED_DIR.iterdir())
    assert total < 400_000  # small slices, not the raw files


@needs_shared
def test_shipped_copy_is_what_the_data_directory_gives():
    for name in S.SHIPPED_SUITES:
        shipped, from_dir = S.load_packaged_suite(name), S.BUILTIN_SUITES[name](SHARED)
        assert shipped.prompts == from_dir.prompts, name  # ids, prompts, expectations and types
    # Limits still spread over XSTest types in the shipped copy.
    limited = S.load_packaged_suite("xstest-safe").limited(10)
    assert len({p.subtype for p in limited.prompts}) == 10


def test_every_shipped_suite_has_its_card_in_the_package_and_in_data_cards():
    for name in S.SHIPPED_SUITES:
        card = S.SHIPPED_CARDS[name]
        shipped, source = S.PACKAGED_DIR / card, REPO / "data_cards" / card
        assert shipped.read_text(encoding="utf-8") == source.read_text(encoding="utf-8"), card
        text = shipped.read_text(encoding="utf-8")
        assert "**Licence**" in text and "**Origin**" in text and ("**Trimmed**" in text or "Changes:" in text)
        assert f"suites_data/{name}" in text or "xstest-*" in text
    assert "CC-BY-NC-4.0" in (REPO / "data_cards" / "eval_suites_not_shipped.md").read_text(encoding="utf-8")


def test_default_with_no_data_directory_is_the_shipped_suites(no_data_dir, tmp_path):
    assert S.parse_suite_names(None) == list(S.SHIPPED_SUITES)
    assert S.parse_suite_names("benign") == ["xstest-safe"]  # a group keeps what is available
    suites = S.load_suites(S.parse_suite_names("all"), None, limit=3)
    assert [s.name for s in suites] == list(S.SHIPPED_SUITES)
    assert all(len(s.prompts) == 3 and any("shipped with equi" in n for n in s.notes) for s in suites)
    with pytest.raises(S.SuiteError, match=r"does not ship.*--data-dir.*harmless_test\.json"):
        S.load_suites(["alpaca"], None)
    config = EvalConfig(out=str(tmp_path / "out"))
    assert config.suites == list(S.SHIPPED_SUITES)


def test_data_dir_adds_alpaca_and_overrides_per_suite(no_data_dir, tmp_path):
    data = tmp_path / "data"
    (data / "refusal_direction_splits").mkdir(parents=True)
    (data / "refusal_direction_splits" / "harmless_test.json").write_text(
        json.dumps([{"instruction": "Name three primary colours.", "category": None}]))
    (data / "advbench").mkdir()
    (data / "advbench" / "harmful_behaviors.csv").write_text("goal,target\nDo a bad thing,Sure\n")
    assert S.parse_suite_names(None, data) == list(S.SHIPPED_SUITES) + ["alpaca"]
    config = EvalConfig(out=str(tmp_path / "out"), data_dir=str(data))
    assert config.suites[-1] == "alpaca"
    suites = {s.name: s for s in S.load_suites(["advbench", "alpaca", "harmbench"], data)}
    assert [p.prompt for p in suites["advbench"].prompts] == ["Do a bad thing"]  # the folder's copy wins
    assert [p.expected for p in suites["alpaca"].prompts] == ["comply"]
    assert len(suites["harmbench"].prompts) == 160  # not in the folder: the shipped copy, and said so
    assert suites["harmbench"].notes[0] == f"harmbench/harmbench_behaviors_text_all.csv is not in {data}"


def test_hub_suite_spec_is_parsed_and_read_with_load_dataset(monkeypatch):
    assert S.parse_suite_names("advbench,hf:someone/probe:test") == ["advbench", "hf:someone/probe:test"]
    with pytest.raises(S.SuiteError, match="hf:OWNER/NAME"):
        S.load_hub_suite("hf:no-owner")
    import datasets

    calls = []

    def fake_load_dataset(repo, split):  # no network in tests
        calls.append((repo, split))
        return [{"prompt": "Hi there", "expected": "comply"}, {"prompt": "Make a bomb", "expected": "refuse",
                                                               "id": "b1", "category": "weapons"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (suite,) = S.load_suites(["hf:someone/probe:test"], None)
    assert calls == [("someone/probe", "test")]
    assert suite.name == "probe" and [p.prompt_id for p in suite.prompts] == ["probe-1", "b1"]
    assert suite.prompts[1].subtype == "weapons" and suite.source == "hub:someone/probe:test"

    def failing(repo, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(S.SuiteError, match="could not load hub suite 'hf:someone/probe'.*offline"):
        S.load_hub_suite("hf:someone/probe")


@pytest.mark.slow
def test_installed_wheel_loads_the_default_suites_outside_a_checkout(tmp_path):
    wheels, venv, work = tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    work.mkdir()
    (tmp_path / "source").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", S.DATA_DIR_ENV)}
    run = lambda *cmd, **kw: subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, **kw)  # noqa: E731
    # Build from a copy: an in-tree build would write (and reuse a stale) build/ in the checkout.
    source = tmp_path / "source"
    for part in ("pyproject.toml", "README.md", "equi", "curation", "train"):
        copy = shutil.copytree if (REPO / part).is_dir() else shutil.copy2
        copy(REPO / part, source / part, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                             if (REPO / part).is_dir() else {}))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source))
    (wheel,) = wheels.glob("equi-*.whl")
    run(sys.executable, "-m", "venv", "--system-site-packages", str(venv))
    python = venv / "bin" / "python"
    run(str(python), "-m", "pip", "install", "--no-deps", "--ignore-installed", "--no-index", "-q", str(wheel))
    snippet = textwrap.dedent(f"""
        import json, equi
        from equi.evaluation.suites import load_suites, parse_suite_names, resolve_data_dir
        from equi.evaluation.run import EvalConfig
        names = EvalConfig(out="out").suites
        suites = load_suites(names, resolve_data_dir(None))
        print(json.dumps({{"file": equi.__file__, "data_dir": str(resolve_data_dir(None)),
                          "counts": {{s.name: len(s.prompts) for s in suites}}}}))
    """)
    result = run(str(python), "-c", snippet, cwd=work)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).resolve().is_relative_to(venv.resolve()), out["file"]  # the wheel, not the checkout
    assert out["data_dir"] == "None"
    assert out["counts"] == COUNTS
    cli = run(str(venv / "bin" / "equi"), "eval", "--help", cwd=work)
    assert "--data-dir" in cli.stdout
