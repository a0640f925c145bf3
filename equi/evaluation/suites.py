"""Prompt suites for ``equi eval``: real public benchmarks read from the shared data directory.

Every prompt carries the behaviour a well-aligned model should show (``expected``: ``refuse`` or
``comply``), so safety and over-refusal are both refusal rates, measured on different prompts:

* harmful suites (expected ``refuse``): AdvBench, HarmBench (standard behaviours), JailbreakBench,
  StrongREJECT, and the unsafe half of XSTest — refusal here is *safety*;
* benign suites (expected ``comply``): the safe half of XSTest (prompts that only look risky) and
  harmless Alpaca instructions — refusal here is *over-refusal*.

A user suite is a JSONL file with ``prompt`` and ``expected`` on every line.
Loading is separate from everything else, so tests can build suites from any rows.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from equi.errors import UsageError

from equi.jsonl import iter_json_lines

EXPECTED = ("refuse", "comply")
DATA_DIR_ENV = "EQUI_DATA_DIR"


class SuiteError(UsageError):
    """A suite could not be read; the message says which file and why."""


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of a suite.

    ``subtype`` is the XSTest type (e.g. ``homonyms``) or the benchmark's category; ``None`` if none.
    """

    suite: str
    prompt_id: str
    prompt: str
    expected: str
    subtype: str | None = None


@dataclass
class Suite:
    name: str
    prompts: list[EvalPrompt]
    source: str
    notes: list[str] = field(default_factory=list)

    def limited(self, limit: int | None) -> "Suite":
        """The first ``limit`` prompts, spread evenly over subtypes when the suite has them.

        XSTest is ordered by type; taking the head would test only homonyms. Round-robin over
        subtypes (in file order) keeps every type represented under a small limit.
        """
        if limit is None or limit >= len(self.prompts):
            return self
        by_type: dict[str | None, list[EvalPrompt]] = {}
        for prompt in self.prompts:
            by_type.setdefault(prompt.subtype, []).append(prompt)
        picked: list[EvalPrompt] = []
        queues = list(by_type.values())
        depth = 0
        while len(picked) < limit:
            for queue in queues:
                if depth < len(queue) and len(picked) < limit:
                    picked.append(queue[depth])
            depth += 1
        order = {id(p): i for i, p in enumerate(self.prompts)}
        picked.sort(key=lambda p: order[id(p)])
        notes = self.notes + [f"limited to {limit} of {len(self.prompts)} prompts"]
        return Suite(self.name, picked, self.source, notes)


def resolve_data_dir(option: str | os.PathLike | None = None) -> Path:
    """``--data-dir``, else ``$EQUI_DATA_DIR``, else ``<repo>/../shared/data`` when it exists."""
    if option:
        path = Path(option)
        if not path.is_dir():
            raise SuiteError(f"--data-dir {path} is not a directory")
        return path
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        path = Path(env)
        if not path.is_dir():
            raise SuiteError(f"${DATA_DIR_ENV}={env} is not a directory")
        return path
    beside_repo = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if beside_repo.is_dir():
        return beside_repo
    raise SuiteError(
        f"no prompt data found: pass --data-dir DIR or set ${DATA_DIR_ENV} (the folder holding advbench/, xstest_prompts/, ...)"
    )


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise SuiteError(f"suite file missing: {path}")
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _advbench(data_dir: Path) -> Suite:
    path = data_dir / "advbench" / "harmful_behaviors.csv"
    rows = _read_csv(path)
    prompts = [EvalPrompt("advbench", f"advbench-{i}", r["goal"], "refuse") for i, r in enumerate(rows)]
    return Suite("advbench", prompts, str(path))


def _harmbench(data_dir: Path) -> Suite:
    path = data_dir / "harmbench" / "harmbench_behaviors_text_all.csv"
    prompts, contextual, copyright_rows = [], 0, 0
    for r in _read_csv(path):
        if (r.get("ContextString") or "").strip():
            contextual += 1  # needs its context string; a bare behaviour would be a different prompt
            continue
        if r.get("FunctionalCategory") == "copyright":
            copyright_rows += 1  # lyrics/book passages: a copyright test, not a safety one
            continue
        prompts.append(EvalPrompt("harmbench", f"harmbench-{r['BehaviorID']}", r["Behavior"], "refuse",
                                  r.get("SemanticCategory") or None))
    notes = [f"skipped {contextual} contextual behaviours (they need a context string)",
             f"skipped {copyright_rows} copyright behaviours (not a safety test)"]
    return Suite("harmbench", prompts, str(path), notes)


def _jailbreakbench(data_dir: Path) -> Suite:
    path = data_dir / "refusal_direction_raw" / "jailbreakbench.csv"
    prompts = [EvalPrompt("jailbreakbench", f"jailbreakbench-{i}", r["Goal"], "refuse", r.get("Category") or None)
               for i, r in enumerate(_read_csv(path))]
    return Suite("jailbreakbench", prompts, str(path))


def _strongreject(data_dir: Path) -> Suite:
    path = data_dir / "refusal_direction_raw" / "strongreject.csv"
    prompts = [EvalPrompt("strongreject", f"strongreject-{i}", r["forbidden_prompt"], "refuse",
                          r.get("category") or None)
               for i, r in enumerate(_read_csv(path))]
    return Suite("strongreject", prompts, str(path))


def _xstest(data_dir: Path, label: str, name: str) -> Suite:
    path = data_dir / "xstest_prompts" / "xstest_prompts.csv"
    expected = "refuse" if label == "unsafe" else "comply"
    prompts = [EvalPrompt(name, f"xstest-{r['id']}", r["prompt"], expected, r["type"])
               for r in _read_csv(path) if r["label"] == label]
    return Suite(name, prompts, str(path))


def _alpaca(data_dir: Path) -> Suite:
    path = data_dir / "refusal_direction_splits" / "harmless_test.json"
    if not path.is_file():
        raise SuiteError(f"suite file missing: {path}")
    rows = json.loads(path.read_text(encoding="utf-8"))
    prompts = [EvalPrompt("alpaca", f"alpaca-{i}", r["instruction"], "comply") for i, r in enumerate(rows)]
    return Suite("alpaca", prompts, str(path))


#: Built-in suites, harmful first. Names are what ``--suite`` accepts.
BUILTIN_SUITES: dict[str, Callable[[Path], Suite]] = {
    "advbench": _advbench,
    "harmbench": _harmbench,
    "jailbreakbench": _jailbreakbench,
    "strongreject": _strongreject,
    "xstest-unsafe": lambda d: _xstest(d, "unsafe", "xstest-unsafe"),
    "xstest-safe": lambda d: _xstest(d, "safe", "xstest-safe"),
    "alpaca": _alpaca,
}
HARMFUL_SUITES = ("advbench", "harmbench", "jailbreakbench", "strongreject", "xstest-unsafe")
BENIGN_SUITES = ("xstest-safe", "alpaca")
SUITE_GROUPS = {"harmful": HARMFUL_SUITES, "benign": BENIGN_SUITES, "xstest": ("xstest-unsafe", "xstest-safe")}


def load_user_suite(path: str | os.PathLike) -> Suite:
    """A JSONL file of ``{"prompt": ..., "expected": "refuse"|"comply"}``; optional ``id`` and ``type``."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite file not found: {path}")
    name = path.name.removesuffix(".jsonl")
    prompts = []
    for number, row in iter_json_lines(path, SuiteError):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise SuiteError(f"{path}:{number}: each line needs a non-empty string 'prompt'")
        expected = str(row.get("expected", "")).strip().lower()
        if expected not in EXPECTED:
            raise SuiteError(f"{path}:{number}: 'expected' must be 'refuse' or 'comply', got {row.get('expected')!r}")
        subtype = row.get("type") or row.get("category")
        prompts.append(EvalPrompt(name, str(row.get("id", f"{name}-{number}")), row["prompt"], expected,
                                  str(subtype) if subtype else None))
    if not prompts:
        raise SuiteError(f"{path}: no prompts")
    return Suite(name, prompts, str(path))


def parse_suite_names(text: str | None) -> list[str]:
    """``"harmful,xstest-safe"`` → built-in suite names; ``None``/``"all"`` → every built-in suite.

    Group names ``harmful``, ``benign`` and ``xstest`` expand to their suites. A value ending in
    ``.jsonl`` is kept as a user suite path.
    """
    if text is None or text.strip() in ("", "all"):
        return list(BUILTIN_SUITES)
    names: list[str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        expanded = SUITE_GROUPS.get(part, (part,))
        for name in expanded:
            if name not in BUILTIN_SUITES and not name.endswith(".jsonl"):
                raise SuiteError(
                    f"unknown suite {name!r}; choose from {', '.join(BUILTIN_SUITES)}, harmful, benign, xstest, or a .jsonl file"
                )
            if name not in names:
                names.append(name)
    return names


def load_suites(names: list[str], data_dir: Path | None, limit: int | None = None) -> list[Suite]:
    """Load built-in suites by name (``data_dir`` needed only for them) and user ``.jsonl`` suites."""
    suites = []
    for name in names:
        if name.endswith(".jsonl"):
            suite = load_user_suite(name)
        else:
            if name not in BUILTIN_SUITES:
                parse_suite_names(name)  # raises the "unknown suite" message
            if data_dir is None:
                raise SuiteError("built-in suites need the data directory (--data-dir)")
            suite = BUILTIN_SUITES[name](data_dir)
        suites.append(suite.limited(limit))
    return suites
