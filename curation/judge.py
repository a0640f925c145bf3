"""``equi curate --judge MODEL``: an LLM judge decides EHD / IHD / MHD, as the Equilibrate RLHF authors labelled
their data.

The judge is any causal LM (hub id or path, loaded through transformers by :func:`equi.models.load_model`, on the GPU
when there is one). It is asked the authors' classification prompt (``resources/judge_prompt.txt``, copied
unchanged from STS202311/E-RLHF ``prompt/data_classification.txt``, Apache-2.0) for every prompt the built-in heads
call safety-relevant (EHD, IHD or MHD); its "Factual Risk" / "Intentional Risk" / "Mixed Risk" become EHD / IHD / MHD.
BENIGN and OTHER prompts keep the heads' label: the judge's prompt presumes a risky instruction. An answer that names
none of the three (or more than one in its determination) is *unparseable*: the row keeps the heads' group and is
counted, never dropped. Answers are cached by the judge's weights and the prompt's text (``$EQUI_CACHE/judge``), so a
re-run or a resume asks nothing twice. Which labeller made each row's group goes in the staged column
``group_labeller`` and the manifest counts it (``labellers``).
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import polars as pl

from equi.errors import UsageError

#: The judge's answer → group (the authors' mapping).
RISK_GROUPS = {"factual": "EHD", "intentional": "IHD", "mixed": "MHD"}
#: Groups the judge re-decides; the others keep the heads' label.
JUDGED_GROUPS = ("EHD", "IHD", "MHD")
HEADS = "heads"
JUDGE = "judge"
UNPARSEABLE = "heads (judge unparseable)"

_RISK = re.compile(r"\b(factual|intentional|mixed)\s+risk\b", re.IGNORECASE)
_DETERMINATION = re.compile(r"determination", re.IGNORECASE)


class JudgeError(UsageError):
    """The judge model cannot be used (one-line message)."""


def judge_template() -> str:
    return resources.files("curation").joinpath("resources/judge_prompt.txt").read_text(encoding="utf-8")


def judge_prompt(instruction: str, template: str | None = None) -> str:
    """The authors' prompt for one instruction (their file is a ``str.format`` template: ``{{``/``}}`` are braces)."""
    template = template if template is not None else judge_template()
    return template.replace("{instruction}", instruction).replace("{{", "{").replace("}}", "}")


def parse_judgement(answer: str) -> str | None:
    """The group an answer determines, or None when it names no risk type, or several, in its determination.

    The determination is read after the last "Determination" the answer writes (the template asks for one); an
    answer without the word is read whole. Example 1 of the prompt repeats "Factual Risk" in its analysis: only
    the determination decides.
    """
    marks = list(_DETERMINATION.finditer(answer))
    tail = answer[marks[-1].end():] if marks else answer
    found = {m.group(1).lower() for m in _RISK.finditer(tail)}
    if len(found) != 1:
        return None
    return RISK_GROUPS[found.pop()]


class AnswerCache:
    """Judge answers by (judge digest, sha256 of the prompt text), in one SQLite file per judge."""

    def __init__(self, folder: Path, digest: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(folder / f"{digest}.sqlite", timeout=60)
        self.db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answer TEXT NOT NULL)")

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def get(self, texts: Sequence[str]) -> dict[str, str]:
        keys = {self.key(t): t for t in texts}
        found: dict[str, str] = {}
        items = list(keys)
        for start in range(0, len(items), 500):
            chunk = items[start:start + 500]
            rows = self.db.execute(f"SELECT key, answer FROM answers WHERE key IN ({','.join('?' * len(chunk))})",
                                   chunk).fetchall()
            found.update({keys[k]: a for k, a in rows})
        return found

    def put(self, answers: dict[str, str]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?)",
                                [(self.key(t), a) for t, a in answers.items()])


@dataclass
class Judge:
    """A loaded judge: ``ask(instructions) -> answers`` (batched generation), ``name`` and weights ``digest``."""

    name: str
    ask: Callable[[list[str]], list[str]]
    digest: str
    cache: AnswerCache | None = None

    def answers(self, instructions: Sequence[str]) -> list[str]:
        """Answers for ``instructions`` (same order), each distinct text asked once and cached."""
        distinct = list(dict.fromkeys(instructions))
        known = self.cache.get(distinct) if self.cache is not None else {}
        missing = [t for t in distinct if t not in known]
        if missing:
            new = dict(zip(missing, self.ask(missing), strict=True))
            if self.cache is not None:
                self.cache.put(new)
            known.update(new)
        return [known[t] for t in instructions]


def load_judge(model: str, trust_remote_code: bool = False, quiet: bool = False, max_new_tokens: int = 160,
               batch_size: int = 8, use_cache: bool = True, device: str | None = None) -> Judge:
    """A causal LM as a :class:`Judge` (greedy answers to the authors' prompt), on ``device`` (default: CUDA when
    torch sees it, else the CPU)."""
    from curation.embed import answers_digest
    from equi.cache import cache_dir
    from equi.models import ModelError, generate_answers, load_model

    try:
        lm, tokenizer = load_model(model, device=device, trust_remote_code=trust_remote_code, quiet=quiet)
    except ModelError as exc:
        raise JudgeError(f"--judge: {exc}") from None
    digest = answers_digest(lm, tokenizer)
    template = judge_template()

    def ask(instructions: list[str]) -> list[str]:
        prompts = [judge_prompt(t, template) for t in instructions]
        return [g.answer for g in generate_answers(lm, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                   batch_size=batch_size, max_prompt_tokens=8192, quiet=quiet)]

    return Judge(name=model, ask=ask, digest=digest,
                 cache=AnswerCache(cache_dir() / "judge", digest) if use_cache else None)


def apply_judge(frame: pl.DataFrame, judge: Judge | None) -> pl.DataFrame:
    """``group`` re-decided by the judge for the rows the heads call EHD/IHD/MHD, and ``group_labeller`` saying
    which labeller made each row's group (:data:`HEADS`, :data:`JUDGE` or :data:`UNPARSEABLE`)."""
    if judge is None or frame.height == 0:
        return frame.with_columns(pl.lit(HEADS).alias("group_labeller"))
    groups = frame["group"].to_list()
    asked = [i for i, g in enumerate(groups) if g in JUDGED_GROUPS]
    labellers = [HEADS] * frame.height
    if asked:
        prompts = frame["prompt"].to_list()
        answers = judge.answers([prompts[i] for i in asked])
        for i, answer in zip(asked, answers):
            group = parse_judgement(answer)
            if group is None:
                labellers[i] = UNPARSEABLE
            else:
                groups[i], labellers[i] = group, JUDGE
    return frame.with_columns(pl.Series("group", groups, pl.String), pl.Series("group_labeller", labellers, pl.String))
