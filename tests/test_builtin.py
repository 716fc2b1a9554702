"""Built-in recipes (finetune/config/builtin.py): by name from any folder, listed and shown by the CLI, shipped in
the wheel as the very files of recipes/."""

import subprocess
import sys
import zipfile

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.config.builtin import RECIPES, builtin_recipes
from finetune.config.loading import load_recipe
from finetune.data.demo import default_paths
from finetune.errors import RecipeError

from conftest import REPO

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
