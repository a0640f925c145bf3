"""The package layering (issue 15), read from the source with ``ast`` (every import, at module top or inside a
function):

- ``curation/`` and ``train/`` import from ``equi/`` only its foundation modules;
- ``curation/`` never imports ``train/``; ``train/`` uses ``curation/`` only for its scorers (refusal, segments);
- no module of ``curation/`` imports ``curation.pipeline`` (the driver), no module of ``train/`` imports
  ``train.run`` (the dispatcher), and the engines never import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOUNDATION = {"equi", "equi.schema", "equi.manifest", "equi.config", "equi.jsonl", "equi.cache", "equi.progress",
              "equi.models", "equi.errors", "equi.messages"}  # messages: the contract's conversational columns
CURATION_SCORERS = {"curation.refusal", "curation.segments"}


def imports(path: Path, package: str | None = None) -> set[str]:
    """Every module ``path`` imports: ``from a.b import c`` counts as ``a.b``, and as ``a.b.c`` where that is a
    module of the repository; relative imports are resolved against ``package`` (default: the file's own)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = package or ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names
                         if (REPO / base.replace(".", "/") / f"{alias.name}.py").is_file())
    return found


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _ids(paths: list[Path]) -> list[str]:
    return [p.relative_to(REPO).as_posix() for p in paths]


@pytest.mark.parametrize("path", modules("curation") + modules("train"), ids=_ids(modules("curation") + modules("train")))
def test_curation_and_train_use_only_equis_foundation(path):
    used = {m for m in imports(path) if m == "equi" or m.startswith("equi.")}
    assert used <= FOUNDATION, f"{path.name} imports {sorted(used - FOUNDATION)} from equi/ (foundation only)"


@pytest.mark.parametrize("path", modules("curation"), ids=_ids(modules("curation")))
def test_curation_never_imports_train_or_its_own_driver(path):
    used = imports(path)
    assert not {m for m in used if m == "train" or m.startswith("train.")}, path.name
    if path.name != "pipeline.py":
        assert "curation.pipeline" not in used, f"{path.name} imports the driver curation.pipeline"


def test_the_engines_do_not_import_each_other():
    assert "curation.engine_local" not in imports(REPO / "curation" / "engine_ray.py")
    assert "curation.engine_ray" not in imports(REPO / "curation" / "engine_local.py")


@pytest.mark.parametrize("path", modules("train"), ids=_ids(modules("train")))
def test_train_uses_curation_only_for_its_scorers_and_never_its_dispatcher(path):
    used = imports(path)
    from_curation = {m for m in used if m == "curation" or m.startswith("curation.")}
    assert from_curation <= CURATION_SCORERS, f"{path.name} imports {sorted(from_curation - CURATION_SCORERS)}"
    if path.name != "run.py":
        assert "train.run" not in used, f"{path.name} imports the dispatcher train.run"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The rules hold for imports placed inside a function too (the old way of dodging a cycle)."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from train.run import train\n    from . import pipeline\n"
                     "    import equi.ladder\n")
    assert {"train.run", "curation.pipeline", "equi.ladder"} <= imports(probe, package="curation")
