"""Every command is documented: --help works, shows an example, and the README has a section for it."""

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
