"""The top-level command line: --version and shell completion (issue 17)."""

from __future__ import annotations

from importlib.metadata import version

from typer.testing import CliRunner

from equi.cli import app


def test_version_prints_the_installed_version_and_exits_0():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"equi {version('equi')}"


def test_shell_completion_is_offered(monkeypatch):
    import typer.completion

    # typer finds the user's shell from the process tree; a test run from a non-shell parent (a CI agent, a
    # background job) has none, so the shell is named here.
    monkeypatch.setattr(typer.completion, "_get_shell_name", lambda: "bash")
    result = CliRunner().invoke(app, ["--show-completion"], prog_name="equi")
    assert result.exit_code == 0, result.output
    assert "complete" in result.output and "equi" in result.output


def test_train_and_scale_show_the_training_defaults_of_trainconfig():
    """One definition of the shared training options: both commands' help prints TrainConfig's own defaults, and
    equi scale's config starts from them."""
    import dataclasses

    from equi.ladder import ScaleConfig
    from train.config import TrainConfig

    defaults = TrainConfig.__new__(TrainConfig)  # the class's defaults, without __post_init__'s checks of a mix
    for f in dataclasses.fields(TrainConfig):
        if f.default is not dataclasses.MISSING:
            setattr(defaults, f.name, f.default)
    for command in ("train", "scale"):
        text = " ".join(CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250"}).output.split())
        for name in ("lr", "beta", "batch_size", "epochs", "lora_r", "seed", "algo"):
            assert f"[default: {getattr(defaults, name)}]" in text, (command, name)
    scale = ScaleConfig.__new__(ScaleConfig)
    for f in dataclasses.fields(ScaleConfig):
        if f.default is not dataclasses.MISSING:
            setattr(scale, f.name, f.default)
    assert all(getattr(scale, n) == getattr(defaults, n) for n in ("algo", "lr", "beta", "batch_size", "epochs"))
