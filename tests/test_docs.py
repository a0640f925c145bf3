"""Every command is documented, and every documented command is real.

--help works and shows an example for each command, and the README has a section for it; every `equi ...` and
`python bench/...` command shown in README.md and bench/README.md exists with the options it uses, the repository
paths they name exist, and the README's headline numbers and bench commands are in bench/README.md.
"""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from equi.cli import app
from tests.conftest import REPO

COMMANDS = ["curate", "verify", "guard", "fit-categoriser", "train", "scale", "eval", "report"]


def test_every_command_is_registered():
    names = {c.name for c in app.registered_commands}
    assert set(COMMANDS) <= names


@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_and_shows_an_example(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    assert "--" in result.output  # options are listed


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_documents_every_command(command):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert re.search(rf"^### equi {command}\b", readme, re.M), f"README has no section for equi {command}"


def test_readme_install_and_test_commands_are_what_ci_runs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    install, test = blocks[0].strip(), blocks[1].strip()
    assert install.startswith("pip install torch==2.13.0")
    assert install in ci and test in ci


def _words(text: str) -> list[str]:
    return re.findall(r"[\w$~.:=,/+-]+", text)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_keeps_bracketed_text(command):
    """Rich reads "[default: x]" in a help string as markup and drops it; every option's help must show whole."""
    import typer.main

    click_command = typer.main.get_command(app).commands[command]
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    shown = " ".join(_words(result.output.replace("│", " ")))
    for param in click_command.params:
        for bracketed in re.findall(r"\\?\[([^\]]*)\]", getattr(param, "help", None) or ""):
            words = " ".join(_words(bracketed))
            assert words in shown, f"equi {command} {param.opts[0]}: the help loses [{bracketed}]"


# --- Every command the docs show is one the code has -------------------------------------------------------------

DOCS = {"README.md": REPO / "README.md", "bench/README.md": REPO / "bench" / "README.md"}
#: Top-level folders whose paths the docs name; such a path must exist (globs must match something).
REPO_DIRS = ("bench/", "data_cards/", "equi/", "examples/", "tests/", ".ci/")


def _spans(text: str) -> list[str]:
    """Fenced code blocks, then inline code spans (which may wrap a line) outside them."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    rest = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return fenced + re.findall(r"`([^`]+)`", rest)


def _segments(span: str) -> list[list[str]]:
    """Each simple command of a span as tokens: lines, then &&, ;, | ; comments and [ ] brackets dropped."""
    out = []
    for line in span.splitlines():
        line = re.sub(r"(^|\s)#.*", "", line)
        for part in re.split(r"&&|;|\|", line):
            tokens = [t.strip("[]") for t in part.split()]
            if tokens := [t for t in tokens if t]:
                out.append(tokens)
    return out


def _cli_options() -> dict[str, set[str]]:
    import typer.main

    commands = typer.main.get_command(app).commands
    return {name: {"--help"} | {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
            for name, cmd in commands.items()}


def _equi_calls(text: str) -> list[tuple[str, list[str], str]]:
    """(command, its --options, the segment) for every `equi COMMAND ...` (or `-m equi.cli COMMAND`) shown."""
    calls = []
    for span in _spans(text):
        for tokens in _segments(span):
            for i, token in enumerate(tokens[:-1]):
                if token == "equi" or (token == "equi.cli" and i and tokens[i - 1] == "-m"):
                    rest = tokens[i + 2:]
                    options = [t.split("=", 1)[0] for t in rest if t.startswith("--")]
                    calls.append((tokens[i + 1], options, " ".join(tokens)))
                    break
    return calls


@pytest.mark.parametrize("doc", DOCS)
def test_every_equi_command_shown_exists_with_its_options(doc):
    text = DOCS[doc].read_text(encoding="utf-8")
    cli = _cli_options()
    calls = _equi_calls(text)
    assert calls, f"{doc} shows no equi command"
    for command, options, shown in calls:
        if command.startswith("-"):  # `equi --help`
            continue
        assert command in cli, f"{doc}: `{shown}`: equi has no command {command!r}"
        unknown = [o for o in options if o not in cli[command]]
        assert not unknown, f"{doc}: `{shown}`: equi {command} has no option {unknown}"


def test_options_named_in_a_command_section_belong_to_that_command():
    """A span like `--size N` under "### equi curate" must be an option of equi curate; elsewhere, of some command."""
    text = DOCS["README.md"].read_text(encoding="utf-8")
    cli = _cli_options()
    every = set().union(*cli.values())
    parts = re.split(r"^(#{2,3} .*)$", text, flags=re.M)
    for heading, body in zip([""] + parts[1::2], parts[0::2]):
        section = re.match(r"### equi (\S+)", heading)
        allowed = cli[section.group(1)] if section else every
        for span in re.findall(r"`(--[^`]+)`", re.sub(r"^```.*?^```", "", body, flags=re.S | re.M)):
            options = [t.split("=", 1)[0] for t in span.split() if t.startswith("--")]
            unknown = [o for o in options if o not in allowed]
            assert not unknown, f"README {heading or 'intro'}: `{span}`: not an option {unknown}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_benchmark_shown_exists_with_its_options(doc):
    text = DOCS[doc].read_text(encoding="utf-8")
    for span in _spans(text):
        for tokens in _segments(span):
            for i, token in enumerate(tokens):
                if re.fullmatch(r"bench/\w+\.py", token) and i and tokens[i - 1] == "python":
                    script = REPO / token
                    assert script.is_file(), f"{doc}: `{' '.join(tokens)}`: no {token}"
                    source = script.read_text(encoding="utf-8")
                    for option in (t.split("=", 1)[0] for t in tokens[i + 1:] if t.startswith("--")):
                        assert re.search(rf"""["']{re.escape(option)}["']""", source), (
                            f"{doc}: `{' '.join(tokens)}`: {token} takes no {option}")


@pytest.mark.parametrize("doc", DOCS)
def test_repository_paths_named_exist(doc):
    text = DOCS[doc].read_text(encoding="utf-8")
    for span in _spans(text):
        for token in span.split():
            token = token.strip("()[],.:;'\"")
            if token.startswith(REPO_DIRS):
                assert any(REPO.glob(token.rstrip("/"))), f"{doc}: names {token}, which does not exist"


def test_readme_headline_numbers_are_in_the_measurement_journal():
    """Every number in the README's Quality and Performance tables, and every bench command, is backed by
    bench/README.md (where each sits with its date, machine and the exact command)."""
    readme = DOCS["README.md"].read_text(encoding="utf-8")
    journal = DOCS["bench/README.md"].read_text(encoding="utf-8")
    for title in ("Quality", "Performance"):
        section = re.search(rf"^## {title}\n(.*?)(?=^## )", readme, re.S | re.M).group(1)
        rows = [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")][1:]
        assert rows, f"README ## {title} has no table"
        for row in rows:
            for number in re.findall(r"\d[\d,.]*\d|\d", row):
                assert number in journal, f"README ## {title}: {number} ({row[:60]}...) is not in bench/README.md"
        for command in re.findall(r"`(python bench/[^`]+)`", section):
            assert command in journal, f"README ## {title}: `{command}` is not in bench/README.md"
