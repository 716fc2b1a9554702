"""Built-in recipes (finetune/config/builtin.py): by name from any folder, listed and shown by the CLI, shipped in
the wheel as the very files of recipes/; and train's quick-try options (a default recipe, --model, --epochs)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from finetune.cli import app
from finetune.config.builtin import DEFAULT_RECIPE, RECIPES, builtin_recipes
from finetune.config.loading import load_recipe
from finetune.data.demo import default_paths
from finetune.errors import RecipeError, UsageError
from finetune.runs.prepare import QuickTry, resolve_recipe

from conftest import REPO, tiny_recipe

SHIPPED = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


def test_the_builtin_recipes_are_the_recipes_folder():
    assert RECIPES.resolve() == (REPO / "recipes").resolve()  # one source: finetune/recipes links to recipes/
    assert [r.name for r in builtin_recipes()] == SHIPPED and len(SHIPPED) == 8


def test_names_work_from_any_folder(tmp_path, monkeypatch):
    by_path = load_recipe(REPO / "recipes" / "last_stage.yaml")
    monkeypatch.chdir(tmp_path)  # a folder without recipes/
    for spelling in ("last_stage", "last_stage.yaml", "recipes/last_stage.yaml"):
        assert load_recipe(spelling) == by_path, spelling
    with pytest.raises(RecipeError, match=r"recipe file last_stag not found \(did you mean 'last_stage'\?\); .*linear_probe"):
        load_recipe("last_stag")
    (tmp_path / "last_stage").write_text("train: {epochs: 2}\n")  # a file that exists wins over the built-in name
    assert load_recipe("last_stage").train.epochs == 2


def test_cli_lists_one_line_each_and_shows_the_yaml():
    listing = CliRunner().invoke(app, ["recipes"])
    assert listing.exit_code == 0, listing.output
    lines = listing.output.splitlines()
    rows = lines[: len(SHIPPED)]
    assert [row.split()[0] for row in rows] == SHIPPED
    assert all(len(row) <= 20 + 100 for row in rows)
    assert "layer4 and a new head of an ImageNet-pretrained ResNet-50" in rows[SHIPPED.index("last_stage")]
    assert "recipes show NAME" in lines[-1]
    shown = CliRunner().invoke(app, ["recipes", "show", "gradual_unfreeze"])
    assert shown.exit_code == 0 and shown.output == (REPO / "recipes" / "gradual_unfreeze.yaml").read_text()
    wrong = CliRunner().invoke(app, ["recipes", "show", "gradual"])
    assert wrong.exit_code == 2 and "error: no built-in recipe 'gradual' (did you mean 'gradual_unfreeze'?)" in wrong.output


def test_the_wheel_ships_the_recipes_byte_for_byte(tmp_path):
    """A non-editable install reads the wheel's copies: they must be recipes/ itself (the link is followed)."""
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("finetune-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {n.removeprefix("finetune/recipes/"): archive.read(n) for n in archive.namelist() if "/recipes/" in n}
    assert shipped == {f"{name}.yaml": (REPO / "recipes" / f"{name}.yaml").read_bytes() for name in SHIPPED}


def test_the_demo_needs_no_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe, folder = default_paths()
    assert recipe == RECIPES / "quickstart.yaml" and recipe.is_file()
    assert folder.resolve() == (tmp_path / "data_examples" / "digits").resolve()  # beside runs/, in the working folder


def test_no_recipe_trains_the_default_and_says_so(tmp_path, caplog):
    caplog.set_level("INFO", logger="finetune")
    recipe = resolve_recipe(None, data=tmp_path)
    assert recipe == load_recipe(DEFAULT_RECIPE).with_data(tmp_path)
    assert "no recipe given: training the built-in 'last_stage' (fine-tune layer4" in caplog.text
    with pytest.raises(UsageError, match="train needs a recipe"):
        resolve_recipe(None)


def test_quick_tries_change_the_model_and_the_length():
    unfreeze = load_recipe("gradual_unfreeze")
    assert [p.epochs for p in unfreeze.train.resolved_phases()] == [3, 3, 4]
    three = QuickTry(epochs=3, model="resnet18").apply(unfreeze, "gradual_unfreeze")
    assert [p.epochs for p in three.train.resolved_phases()] == [1, 1, 1] and three.model.name == "resnet18"
    assert three.model.pretrained == unfreeze.model.pretrained  # only the name changes
    assert [p.epochs for p in QuickTry(epochs=20).apply(unfreeze, "g").train.resolved_phases()] == [6, 6, 8]
    assert [p.epochs for p in QuickTry(epochs_scale=0.2).apply(unfreeze, "g").train.resolved_phases()] == [1, 1, 1]
    assert [p.epochs for p in QuickTry(max_epochs=5).apply(unfreeze, "g").train.resolved_phases()] == [2, 1, 2]
    assert QuickTry(epochs=4).apply(load_recipe("last_stage"), "last_stage").train.epochs == 4
    with pytest.raises(UsageError, match=r"gradual_unfreeze: the recipe has 3 phases; 2 epoch\(s\) in all cannot give"):
        QuickTry(epochs=2).apply(unfreeze, "gradual_unfreeze")
    with pytest.raises(UsageError, match=r"--epochs 0: at least 1"):
        QuickTry(epochs=0).apply(unfreeze, "g")
    with pytest.raises(RecipeError, match=r"model\.name.*resnet5"):
        QuickTry(model="resnet5").apply(unfreeze, "g")
    assert QuickTry(model="resnet18", max_epochs=2).given() == ["--model", "--max-epochs"]


def test_one_liner_trains_and_load_says_what_it_is(tmp_path, image_folder, monkeypatch):
    import finetune

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(train={"epochs": 5})))
    monkeypatch.chdir(tmp_path)
    result = finetune.train(data=image_folder, recipe=recipe, epochs=2)  # no out: runs/tiny-TIME here
    assert result.run_dir.parent == Path("runs") and result.run_dir.name.startswith("tiny-")
    assert list(result.history["epoch"]) == [1, 2]
    accuracy = result.report.metrics["accuracy"]
    assert repr(finetune.load(result.run_dir)) == (
        f"Predictor(resnet18, single_label, 3 classes ['cat', 'dog', 'eel'], val accuracy {accuracy:.4f} on 6 images)"
    )
    assert repr(finetune.load(result.run_dir / "checkpoints" / "last.pt")).endswith("on 6 images, the report of best.pt)")
    cli = CliRunner().invoke(
        app,
        ["train", str(recipe), "--data", str(image_folder), "--out", "cli", "--max-epochs", "1", "--model", "resnet10t", "-q"],
    )
    assert cli.exit_code == 0, cli.output
    assert yaml.safe_load(Path("cli/recipe.yaml").read_text())["model"]["name"] == "resnet10t"
    assert len(pd.read_csv("cli/metrics.csv")) == 1
