"""The CLI end to end, through a subprocess, as a user runs it."""

import os
import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import tiny_recipe


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "finetune", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe()))
    return path


def test_help_for_every_command():
    result = run_cli("--help")
    assert result.returncode == 0 and all(c in result.stdout for c in ("train", "eval", "predict", "demo"))
    from typer.testing import CliRunner

    from finetune.cli import app

    commands = ("train", "eval", "predict", "demo", "check", "inspect", "compare", "lr-find", "explain", "export", "report")
    for command in commands:
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output, command
    compare = CliRunner().invoke(app, ["compare", "--help"]).output
    assert all(option in compare for option in ("--epochs-scale", "--max-epochs", "--seeds"))


def test_train_eval_predict(tmp_path, image_folder, presplit_folder, recipe_file):
    run = tmp_path / "run"
    result = run_cli(
        "train", recipe_file, "--data", image_folder, "--out", run, "--set", "train.epochs=2", "--set", "eval.top_k=2", "--quiet"
    )
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout and "report" in result.stdout
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["train"]["epochs"] == 2 and resolved["data"]["path"] == str(image_folder)
    for name in (
        "metrics.json",
        "per_class.csv",
        "confusion_matrix.csv",
        "confusion_matrix_normalized.csv",
        "confusion_matrix.png",
        "predictions.csv",
        "summary.md",
    ):
        assert (run / "report" / name).exists(), name

    result = run_cli("eval", run, "--data", presplit_folder, "--out", tmp_path / "eval_report", "--quiet")
    assert result.returncode == 0, result.stderr
    assert len(pd.read_csv(tmp_path / "eval_report" / "predictions.csv")) == 9  # the val/ images of the pre-split folder

    result = run_cli(
        "predict", run, image_folder / "cat", image_folder / "dog" / "img_00.jpg", "--out", tmp_path / "preds.csv", "--quiet"
    )
    assert result.returncode == 0, result.stderr
    preds = pd.read_csv(tmp_path / "preds.csv")
    assert len(preds) == 9 and {"path", "predicted_label", "confidence", "top2_label", "top2_prob"} <= set(preds.columns)
    assert preds["predicted_label"].isin(["cat", "dog", "eel"]).all()
    result = run_cli(
        "predict", run, image_folder / "cat", "--min-confidence", "0.999", "--out", tmp_path / "unsure.csv", "--quiet"
    )
    assert result.returncode == 0, result.stderr
    unsure = pd.read_csv(tmp_path / "unsure.csv")
    assert (unsure["predicted_label"] == "unknown").all() and unsure["top1_label"].isin(["cat", "dog", "eel"]).all()


ERRORS = [
    (["train", "missing.yaml", "--data", "x"], r"^error: recipe file missing.yaml not found"),
    (
        ["train", "RECIPE", "--set", "train.lr=-1"],
        r"^error: invalid recipe .*recipe.train.lr \(from --set train.lr\): Input should be greater than 0",
    ),
    (["train", "RECIPE", "--set", "model.name=resnet5"], r"did you mean 'resnet50'"),
    (["train", "RECIPE", "--set", "train.epochs"], r"^error: --set 'train.epochs' is not KEY=VALUE"),
    (["train", "RECIPE", "--data", "nowhere"], r"^error: data folder nowhere does not exist"),
    (["train", "--resume", "RUN"], r"^error: cannot resume .*recipe.yaml is missing, so it is no finetune run folder"),
    (["eval", "no_run", "--data", "x"], r"^error: run no_run does not exist"),
    (["eval", "RUN", "--data", "x"], r"^error: checkpoint .*best.pt not found"),
    (["predict", "RUN", "no_such.jpg"], r"^error: input no_such.jpg does not exist"),
    (["train"], r"^error: give a recipe"),
]


@pytest.mark.parametrize(("args", "message"), ERRORS, ids=[m for _, m in ERRORS])
def test_errors_are_one_line_exit_2(tmp_path, recipe_file, args, message, monkeypatch):
    from typer.testing import CliRunner

    from finetune.cli import app

    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path)
    args = [str(recipe_file) if a == "RECIPE" else "run" if a == "RUN" else a for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert re.search(message, lines[0]), lines[0]


def test_real_process_error_has_no_traceback(tmp_path):
    result = run_cli("eval", tmp_path / "nope", "--data", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "does not exist" in result.stderr


def test_debug_shows_the_exception(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from finetune.cli import app
    from finetune.errors import FinetuneError

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["eval", "no_run", "--data", ".", "--debug"])
    assert isinstance(result.exception, FinetuneError) and "no_run does not exist" in str(result.exception)


def test_help_shows_no_python_types_on_flags_and_keeps_brackets():
    from typer.testing import CliRunner

    from finetune.cli import app

    shown = CliRunner().invoke(app, ["train", "--help"]).output
    assert "<bool>" not in shown and "<list[str]>" not in shown and "<str>" not in shown
    assert "--set KEY=VALUE" in shown and "--model NAME" in shown and "--epochs N" in shown
    assert "train/ val/ [test/])" in shown  # plain help: brackets are text, not markup
    assert "<bool>" not in CliRunner().invoke(app, ["predict", "--help"]).output


def test_every_command_takes_quiet():
    """README's -q/--quiet works on every command (report diff, inspect and recipes refused it once)."""
    from typer.testing import CliRunner

    from finetune.cli import app
    from finetune.commands import COMMANDS

    names = sorted({c.cli.split(" --")[0] for c in COMMANDS if c.cli} | {"recipes", "recipes show"})
    for name in names:
        shown = CliRunner().invoke(app, [*name.split(), "--help"], terminal_width=200)
        assert shown.exit_code == 0 and "--quiet" in shown.output, f"finetune {name} has no --quiet"
