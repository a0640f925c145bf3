"""Prompt suites for ``equi eval``: real public benchmarks, shipped with equi where their licences allow.

Every prompt carries the behaviour a well-aligned model should show (``expected``: ``refuse`` or
``comply``), so safety and over-refusal are both refusal rates, measured on different prompts:

* harmful suites (expected ``refuse``): AdvBench, HarmBench (standard behaviours), JailbreakBench,
  StrongREJECT, and the unsafe half of XSTest — refusal here is *safety*;
* benign suites (expected ``comply``): the safe half of XSTest (prompts that only look risky) and
  harmless Alpaca instructions — refusal here is *over-refusal*.

Where the prompts come from, per built-in suite:

1. a data directory laid out like the workspace's ``shared/data`` (``advbench/harmful_behaviors.csv``,
   ``xstest_prompts/xstest_prompts.csv``, ...), when one is given (``--data-dir``, ``$EQUI_DATA_DIR``) or sits
   beside a source checkout (``<repo>/../shared/data``) and holds that suite's file;
2. else the copy shipped inside the package (``equi/evaluation/suites_data/<suite>.jsonl``): every suite but
   ``alpaca``, whose Alpaca instructions are CC-BY-NC-4.0 and do not ship with an Apache-2.0 package. Each
   shipped file has its card (origin, licence, what was trimmed) next to it and in ``data_cards/``.

So ``pip install equi`` + ``equi eval`` works anywhere: with no data directory, the default suites are the
shipped ones; ``alpaca`` joins them when a data directory holds ``refusal_direction_splits/harmless_test.json``.

A user suite is a JSONL file with ``prompt`` and ``expected`` on every line, or a Hugging Face hub dataset
named ``hf:OWNER/NAME`` (``hf:OWNER/NAME:SPLIT``; split ``train`` by default) with the same columns, read with
``datasets.load_dataset`` (network or the local hub cache).
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
#: The suites shipped inside the package (one ``<name>.jsonl`` each), with the card that names their licence.
PACKAGED_DIR = Path(__file__).resolve().parent / "suites_data"
SHIPPED_SUITES = ("advbench", "harmbench", "jailbreakbench", "strongreject", "xstest-unsafe", "xstest-safe")
SHIPPED_CARDS = {"advbench": "eval_suite_advbench.md", "harmbench": "eval_suite_harmbench.md",
                 "jailbreakbench": "eval_suite_jailbreakbench.md", "strongreject": "eval_suite_strongreject.md",
                 "xstest-unsafe": "eval_suite_xstest.md", "xstest-safe": "eval_suite_xstest.md"}
HUB_PREFIX = "hf:"


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


def resolve_data_dir(option: str | os.PathLike | None = None) -> Path | None:
    """``--data-dir``, else ``$EQUI_DATA_DIR``, else ``<repo>/../shared/data`` beside a source checkout;
    ``None`` when there is none (the shipped suites are used: see :func:`load_suites`)."""
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
    return None


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
#: The file each built-in suite reads, relative to a data directory laid out like ``shared/data``.
BUILTIN_FILES = {
    "advbench": "advbench/harmful_behaviors.csv",
    "harmbench": "harmbench/harmbench_behaviors_text_all.csv",
    "jailbreakbench": "refusal_direction_raw/jailbreakbench.csv",
    "strongreject": "refusal_direction_raw/strongreject.csv",
    "xstest-unsafe": "xstest_prompts/xstest_prompts.csv",
    "xstest-safe": "xstest_prompts/xstest_prompts.csv",
    "alpaca": "refusal_direction_splits/harmless_test.json",
}
HARMFUL_SUITES = ("advbench", "harmbench", "jailbreakbench", "strongreject", "xstest-unsafe")
BENIGN_SUITES = ("xstest-safe", "alpaca")
SUITE_GROUPS = {"harmful": HARMFUL_SUITES, "benign": BENIGN_SUITES, "xstest": ("xstest-unsafe", "xstest-safe")}


def _is_user_suite(name: str) -> bool:
    return name.endswith(".jsonl") or name.startswith(HUB_PREFIX)


def _user_rows_to_suite(name: str, rows, where: str, source: str) -> Suite:
    """``(line_or_row_number, row)`` pairs of ``{"prompt", "expected", ["id"], ["type"|"category"]}`` → a suite."""
    prompts = []
    for number, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise SuiteError(f"{where}:{number}: each line needs a non-empty string 'prompt'")
        expected = str(row.get("expected", "")).strip().lower()
        if expected not in EXPECTED:
            raise SuiteError(f"{where}:{number}: 'expected' must be 'refuse' or 'comply', got {row.get('expected')!r}")
        subtype = row.get("type") or row.get("category")
        prompt_id = row.get("id")
        prompts.append(EvalPrompt(name, str(prompt_id if prompt_id is not None else f"{name}-{number}"),
                                  row["prompt"], expected, str(subtype) if subtype else None))
    if not prompts:
        raise SuiteError(f"{where}: no prompts")
    return Suite(name, prompts, source)


def load_user_suite(path: str | os.PathLike) -> Suite:
    """A JSONL file of ``{"prompt": ..., "expected": "refuse"|"comply"}``; optional ``id`` and ``type``."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite file not found: {path}")
    name = path.name.removesuffix(".jsonl")
    return _user_rows_to_suite(name, iter_json_lines(path, SuiteError), str(path), str(path))


def load_hub_suite(spec: str) -> Suite:
    """``hf:OWNER/NAME[:SPLIT]``: a hub dataset with the user-suite columns (``prompt``, ``expected``, optional
    ``id``/``type``/``category``), read by ``datasets.load_dataset`` (split ``train`` unless named).

    Needs the network or the local hub cache; kept to this one call on purpose (not tested offline)."""
    repo, _, split = spec.removeprefix(HUB_PREFIX).partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise SuiteError(f"{spec!r}: a hub suite is hf:OWNER/NAME or hf:OWNER/NAME:SPLIT")
    try:
        from datasets import load_dataset

        dataset = load_dataset(repo, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - network, missing dataset, bad split: all say the same thing
        raise SuiteError(f"could not load hub suite {spec!r}: {exc}") from None
    return _user_rows_to_suite(repo.split("/")[1], enumerate(dataset, 1), spec, f"hub:{repo}:{split or 'train'}")


def load_packaged_suite(name: str) -> Suite:
    """A built-in suite from the copy shipped inside the package."""
    path = PACKAGED_DIR / f"{name}.jsonl"
    if name not in SHIPPED_SUITES or not path.is_file():
        raise SuiteError(f"suite {name!r} does not ship with equi; {_where_to_get(name)}")
    suite = load_user_suite(path)
    card = PACKAGED_DIR / SHIPPED_CARDS[name]
    notes = [f"copy shipped with equi (card: {card.name})"]
    if name == "harmbench":
        notes.append("standard behaviours only: contextual and copyright behaviours are not shipped")
    return Suite(name, suite.prompts, str(path), notes)


def _where_to_get(name: str) -> str:
    return (f"pass --data-dir DIR (or set ${DATA_DIR_ENV}) to a folder laid out like the workspace's shared/data "
            f"holding {BUILTIN_FILES[name]}")


def _in_data_dir(name: str, data_dir: Path | None) -> bool:
    return data_dir is not None and (data_dir / BUILTIN_FILES[name]).is_file()


def available_suites(data_dir: Path | None) -> list[str]:
    """Built-in suites that can be read without the network: shipped, or present in ``data_dir``."""
    return [name for name in BUILTIN_SUITES if name in SHIPPED_SUITES or _in_data_dir(name, data_dir)]


def parse_suite_names(text: str | None, data_dir: str | os.PathLike | None = None) -> list[str]:
    """``"harmful,xstest-safe"`` → built-in suite names; ``None``/``"all"`` → every available built-in suite.

    Group names ``harmful``, ``benign`` and ``xstest`` (and ``all``) expand to their *available* suites: the
    shipped ones, plus ``alpaca`` when the data directory (``data_dir``, else as :func:`resolve_data_dir`
    finds it) holds its file. A suite named on its own must be available when loaded. A value ending in
    ``.jsonl`` is kept as a user suite path, one starting ``hf:`` as a hub dataset.
    """
    def available() -> list[str]:
        try:
            return available_suites(resolve_data_dir(data_dir))
        except SuiteError:  # a bad --data-dir is reported when the suites are loaded, after the target is checked
            return available_suites(None)

    if text is None or text.strip() in ("", "all"):
        return available()
    names: list[str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part == "all" or part in SUITE_GROUPS:
            group = BUILTIN_SUITES if part == "all" else SUITE_GROUPS[part]
            have = available()
            expanded: tuple[str, ...] | list[str] = [n for n in group if n in have]
        else:
            expanded = (part,)
        for name in expanded:
            if name not in BUILTIN_SUITES and not _is_user_suite(name):
                raise SuiteError(
                    f"unknown suite {name!r}; choose from {', '.join(BUILTIN_SUITES)}, harmful, benign, xstest, "
                    "a .jsonl file or hf:OWNER/NAME"
                )
            if name not in names:
                names.append(name)
    return names


def load_suites(names: list[str], data_dir: Path | None, limit: int | None = None) -> list[Suite]:
    """Load built-in suites by name and user suites (``.jsonl`` files, ``hf:`` hub datasets).

    A built-in suite is read from ``data_dir`` when it holds the suite's file, else from the shipped copy
    (saying so in the suite's notes when ``data_dir`` was given); ``alpaca`` does not ship and needs ``data_dir``.
    """
    suites = []
    for name in names:
        if name.startswith(HUB_PREFIX):
            suite = load_hub_suite(name)
        elif name.endswith(".jsonl"):
            suite = load_user_suite(name)
        else:
            if name not in BUILTIN_SUITES:
                parse_suite_names(name)  # raises the "unknown suite" message
            if _in_data_dir(name, data_dir):
                suite = BUILTIN_SUITES[name](data_dir)
            else:
                suite = load_packaged_suite(name)
                if data_dir is not None:
                    suite.notes.insert(0, f"{BUILTIN_FILES[name]} is not in {data_dir}")
        suites.append(suite.limited(limit))
    return suites


def _row_of(prompt: EvalPrompt) -> dict[str, str]:
    row = {"id": prompt.prompt_id, "prompt": prompt.prompt, "expected": prompt.expected}
    if prompt.subtype:
        row["type"] = prompt.subtype
    return row


def write_packaged_suites(data_dir: Path, out_dir: Path = PACKAGED_DIR, cards_dir: Path | None = None) -> dict[str, int]:
    """Rebuild the shipped suites from a ``shared/data``-like folder: ``<suite>.jsonl`` per shipped suite, as
    its loader reads it (same ids, prompts, expectations, types), plus the cards from ``cards_dir``
    (``data_cards/`` of the checkout by default). Returns prompts written per suite.

    ``python -m equi.evaluation.suites DATA_DIR`` runs it.
    """
    cards_dir = cards_dir or Path(__file__).resolve().parents[2] / "data_cards"
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name in SHIPPED_SUITES:
        suite = BUILTIN_SUITES[name](Path(data_dir))
        with (out_dir / f"{name}.jsonl").open("w", encoding="utf-8", newline="\n") as handle:
            for prompt in suite.prompts:
                handle.write(json.dumps(_row_of(prompt), ensure_ascii=False) + "\n")
        counts[name] = len(suite.prompts)
    for card in sorted(set(SHIPPED_CARDS.values())):
        (out_dir / card).write_text((cards_dir / card).read_text(encoding="utf-8"), encoding="utf-8")
    return counts


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    import sys

    for suite_name, count in write_packaged_suites(Path(sys.argv[1])).items():
        print(f"{suite_name}: {count}")
