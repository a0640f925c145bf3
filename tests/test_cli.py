"""The top-level command line: --version and shell completion (issue 17)."""

from __future__ import annotations

from importlib.metadata import version

from typer.testing import CliRunner

from equi.cli import app


def test_version_prints_the_installed_version_and_exits_0():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"equi {version('equi')}"


def test_shell_completion_is_offered():
    result = CliRunner().invoke(app, ["--show-completion", "bash"], prog_name="equi")
    assert result.exit_code == 0, result.output
    assert "complete" in result.output and "equi" in result.output
