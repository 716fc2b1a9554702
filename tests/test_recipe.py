from pathlib import Path

import pytest
import yaml

from finetune.config.loading import load_recipe, recipe_from_dict, save_recipe
from finetune.config.schema import Recipe
from finetune.errors import RecipeError

from conftest import REPO, tiny_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_recipe_library_is_not_empty():
    assert {p.stem for p in RECIPES} >= {"quickstart", "last_stage"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.train.resolved_phases()
    text = path.read_text()
    assert text.startswith("#"), "each recipe is documented in a comment header"


def test_overrides_apply_and_parse_yaml_values():
    recipe = recipe_from_dict(
        tiny_recipe(), overrides=["train.epochs=3", "model.name=resnet50", "train.freeze=[stem, layer1]", "train.lr=1e-4"]
    )
    assert recipe.train.epochs == 3 and recipe.model.name == "resnet50"
    assert recipe.train.freeze == ["stem", "layer1"] and recipe.train.lr == pytest.approx(1e-4)


def test_resolved_recipe_round_trips(tmp_path):
    recipe = recipe_from_dict(tiny_recipe(), overrides=["model.pretrained=/tmp/w.pth"])
    save_recipe(recipe, tmp_path / "recipe.yaml")
    again = load_recipe(tmp_path / "recipe.yaml")
    assert again == recipe
    assert again.model.pretrained == Path("/tmp/w.pth")
    assert yaml.safe_load((tmp_path / "recipe.yaml").read_text())["train"]["optimizer"] == "adamw"  # defaults filled in


def test_single_phase_from_freeze_list():
    recipe = recipe_from_dict(tiny_recipe(train={"freeze": ["stem", "layer1", "layer2", "layer3"], "epochs": 2}))
    (phase,) = recipe.train.resolved_phases()
    assert phase.trainable_stages() == ("layer4", "head") and phase.epochs == 2 and phase.bn == "frozen"


BAD = [
    ({"trian": {}}, r"recipe\.trian: unknown key \(did you mean 'train'\?\)"),
    ({"train": {"lr": -1}}, r"recipe\.train\.lr: Input should be greater than 0"),
    ({"train": {"epochs": "many"}}, r"recipe\.train\.epochs: Input should be a valid integer"),
    ({"train": {"learning_rate": 0.1}}, r"recipe\.train\.learning_rate: unknown key"),
    ({"train": {"epcohs": 2}}, r"did you mean 'epochs'"),
    ({"model": {"name": "resnet5O"}}, r"unknown model 'resnet5O' \(did you mean 'resnet50'\?\)"),
    ({"model": {"name": "vit_base_patch16_224"}}, r"unknown model 'vit_base_patch16_224'"),
    ({"model": {"name": "tv:resnet18x"}}, r"did you mean 'tv:resnet18'"),
    ({"train": {"freeze": ["layer5"]}}, r"recipe\.train\.freeze\.0: Input should be 'stem', 'layer1'"),
    ({"train": {"freeze": ["stem", "layer1", "layer2", "layer3", "layer4", "head"]}}, r"nothing would train"),
    ({"train": {"optimizer": "adam"}}, r"recipe\.train\.optimizer: Input should be 'adamw' or 'sgd'"),
    ({"train": {"bn": "fixed"}}, r"recipe\.train\.bn: Input should be 'frozen' or 'train'"),
    ({"data": {"val_fraction": 1.5}}, r"recipe\.data\.val_fraction: Input should be less than 1"),
    ({"data": {"val_fraction": 0.5, "test_fraction": 0.45}}, r"must be below 0.9"),
    ({"data": {"batch_size": 0}}, r"recipe\.data\.batch_size: Input should be greater than or equal to 1"),
    ({"transforms": {"train": "heavy"}}, r"unknown preset 'heavy'"),
    (
        {"transforms": {"train": [{"HorizontalFlp": {}}]}},
        r"unknown albumentations transform 'HorizontalFlp' \(did you mean 'HorizontalFlip'\?\)",
    ),
    ({"transforms": {"train": [{"HorizontalFlip": {"prob": 0.5}}]}}, r"HorizontalFlip has no argument 'prob'"),
    ({"transforms": {"train": [{"RandomResizedCrop": {"size": 5}}]}}, r"RandomResizedCrop\(.*\) is invalid"),
    ({"transforms": {"input_size": 8}}, r"recipe\.transforms\.input_size: Input should be greater than or equal to 16"),
    ({"train": {"phases": [{"epochs": 1, "train": ["head", "layer9"], "lr": 0.1}]}}, r"recipe\.train\.phases\.0\.train"),
    (
        {"train": {"phases": [{"epochs": 1, "lr": 0.1, "lr_multiplier": {}}]}},
        r"phases\.0\.lr_multiplier: unknown key \(did you mean 'lr_mult'\?\)",
    ),
    ({"train": {"phases": [{"epochs": 1, "lr": 0.1}], "freeze": ["stem"]}}, r"\['freeze'\] conflict with phases"),
    ({"train": {"phases": []}}, r"phases is an empty list"),
    ({"model": {"head": {"dropout": 1.0}}}, r"recipe\.model\.head\.dropout: Input should be less than 1"),
    ({"train": {"early_stopping": {"metric": "accuracy"}}}, r"early_stopping\.metric: Input should be 'val_accuracy'"),
]


@pytest.mark.parametrize(("section", "pattern"), BAD, ids=[p for _, p in BAD])
def test_bad_recipes_give_one_clear_line(section, pattern):
    with pytest.raises(RecipeError, match=pattern) as info:
        recipe_from_dict(tiny_recipe(**section))
    assert "\n" not in str(info.value)


def test_bad_override_syntax():
    with pytest.raises(RecipeError, match=r"--set 'train.epochs' is not KEY=VALUE"):
        recipe_from_dict(tiny_recipe(), overrides=["train.epochs"])
    with pytest.raises(RecipeError, match=r"'lr' is a value, not a section"):
        recipe_from_dict(tiny_recipe(), overrides=["train.lr.x=1"])


def test_missing_and_malformed_recipe_files(tmp_path):
    with pytest.raises(RecipeError, match=r"recipe file .*nope.yaml not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(RecipeError, match=r"bad.yaml line \d+ is not valid YAML"):
        load_recipe(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(RecipeError, match=r"must be a YAML mapping"):
        load_recipe(listy)


def test_defaults_are_validated_and_round_trip():
    from pydantic import Field, ValidationError

    from finetune.config.schema import DataConfig

    recipe = Recipe()
    assert recipe.model.name == "resnet18" and recipe.train.resolved_phases()[0].trainable_stages()[-1] == "head"
    assert recipe_from_dict(recipe.to_dict()) == recipe

    class BrokenDefault(DataConfig):  # the schema validates defaults too: a bad one cannot hide
        batch_size: int = Field(0, ge=1)

    with pytest.raises(ValidationError, match="batch_size"):
        BrokenDefault()


def test_trainable_and_its_aliases():
    """One-phase recipes say trainable: like phases; freeze: (the stages that do not train) and a phase's train: still work."""
    by_trainable = recipe_from_dict(tiny_recipe(train={"trainable": ["layer4", "head"]}))
    by_freeze = recipe_from_dict(tiny_recipe(train={"freeze": ["stem", "layer1", "layer2", "layer3"]}))
    assert by_trainable.train.resolved_phases() == by_freeze.train.resolved_phases()
    assert by_trainable.train.resolved_phases()[0].trainable_stages() == ("layer4", "head")
    assert "freeze" not in by_trainable.to_dict()["train"] and "trainable" not in by_freeze.to_dict()["train"]
    old = recipe_from_dict(tiny_recipe(train={"phases": [{"epochs": 1, "lr": 0.1, "train": ["head"]}]}))
    assert old.train.phases[0].trainable == ["head"] and "train" not in old.to_dict()["train"]["phases"][0]
    with pytest.raises(RecipeError, match="give 'trainable' or 'freeze'"):
        recipe_from_dict(tiny_recipe(train={"trainable": ["head"], "freeze": ["stem"]}))
    with pytest.raises(RecipeError, match=r"give 'trainable' \(or its older name 'train'\), not both"):
        recipe_from_dict(tiny_recipe(train={"phases": [{"epochs": 1, "lr": 0.1, "train": ["head"], "trainable": ["head"]}]}))
