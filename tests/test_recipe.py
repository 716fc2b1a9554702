import copy
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
    ({"model": {"name": "densenet121"}}, r"unknown model 'densenet121'.*; the backbone families are: resnet \(timm resnet\);"),
    ({"model": {"name": "tv:resnet18x"}}, r"did you mean 'tv:resnet18'"),
    (
        {"train": {"freeze": ["layer5"]}},
        r"recipe\.train\.freeze: 'layer5' is not a stage \(did you mean 'layer4'\?\); the stages are stem, layer1, layer2, "
        r"layer3, layer4, head$",
    ),
    ({"train": {"freeze": ["stem", "layer1", "layer2", "layer3", "layer4", "head"]}}, r"nothing would train"),
    ({"train": {"optimizer": "adam"}}, r"recipe\.train\.optimizer: Input should be 'adamw', 'sgd', 'lamb' or 'lion'"),
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
    ({"train": {"early_stopping": {"metric": "accuracy"}}}, r"early_stopping\.metric: Input should be 'auto', 'val_accuracy'"),
]


@pytest.mark.parametrize(
    ("train", "pattern"),
    [
        ({"trainable": ["layer5", "head"]}, r"'layer5' is not a stage \(did you mean 'layer4'\?\)"),
        ({"trainable": "head"}, r"give a list of stages, e.g. \[head\], or 'all'"),
        ({"phases": [{"epochs": 1, "lr": 0.1, "trainable": ["hed"]}]}, r"phases\.0\.trainable: 'hed' is not a stage"),
    ],
)
def test_a_bad_stage_name_is_one_error_naming_the_stages_not_a_union_dump(train, pattern):
    with pytest.raises(RecipeError, match=pattern) as info:
        recipe_from_dict(tiny_recipe(train=train))
    message = str(info.value)
    assert message.count("; ") <= 2 and "Input should be 'all'" not in message  # one error, not one per union branch
    assert "the stages are stem, layer1, layer2, layer3, layer4, head, or 'all' for every one" in message or "[head]" in message


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


def test_recipe_files_that_are_not_recipes(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    with pytest.raises(
        RecipeError, match=r"recipe .*binary.yaml is not UTF-8 text \(byte 0 is b'\\x89'\); save it as UTF-8 YAML"
    ):
        load_recipe(tmp_path / "binary.yaml")
    (tmp_path / "latin1.yaml").write_bytes("seed: 0  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match=r"latin1.yaml is not UTF-8 text"):
        load_recipe(tmp_path / "latin1.yaml")
    (tmp_path / "nul.yaml").write_bytes(b"seed: 0\x00\n")
    with pytest.raises(RecipeError, match=r"nul.yaml position 7 is not valid YAML: character '\\x00' is not allowed"):
        load_recipe(tmp_path / "nul.yaml")
    (tmp_path / "twice.yaml").write_text("train:\n  epochs: 3\ntrain:\n  lr: 0.1\n")
    with pytest.raises(RecipeError, match=r"twice.yaml line 3 is not valid YAML: key 'train' appears twice"):
        load_recipe(tmp_path / "twice.yaml")
    (tmp_path / "evil.yaml").write_text("seed: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(RecipeError, match=r"evil.yaml line 1 is not valid YAML"):
        load_recipe(tmp_path / "evil.yaml")
    with pytest.raises(RecipeError, match=r"recipe .* is a folder; pass a YAML file"):
        load_recipe(tmp_path)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("train.lr=!!float 1e-3", r"--set train.lr=!!float 1e-3: YAML tags are not accepted; write the plain value"),
        ("train.trainable=[head, layer4", r"--set train.trainable=\[head, layer4: not a YAML value \(.*\); quote text"),
        ("seed={a: [1}", r"--set seed=\{a: \[1\}: not a YAML value"),
    ],
)
def test_bad_set_values(override, pattern):
    with pytest.raises(RecipeError, match=pattern) as info:
        recipe_from_dict(tiny_recipe(), overrides=[override])
    assert "\n" not in str(info.value)


def _documented_choices():
    """(key, text as a user types it, expected value) for every choice of every Literal field, and every boolean word."""
    import typing

    from pydantic import BaseModel

    from finetune.config.schema import PhaseConfig

    words = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}
    found = []

    def values(annotation, in_list=False):
        origin = typing.get_origin(annotation)
        if origin is typing.Literal:
            return [(f"[{v}]", [v]) if in_list else (str(v), v) for v in typing.get_args(annotation)]
        if annotation is bool:
            return list(words.items())
        if origin is dict:  # Literal keys (e.g. lr_mult's stages) are not values of the field
            return []
        if origin is list:
            return [item for arg in typing.get_args(annotation) for item in values(arg, in_list=True)]
        return [item for arg in typing.get_args(annotation) for item in values(arg, in_list)]

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
            elif name != "phases":
                found.extend((f"{prefix}{name}", text, value) for text, value in values(annotation))

    walk(Recipe, "")
    walk(PhaseConfig, "train.phases.0.")
    return found


@pytest.mark.parametrize(("key", "text", "expected"), _documented_choices(), ids=lambda v: str(v))
def test_every_documented_value_works_as_typed_in_a_file_and_with_set(tmp_path, key, text, expected):
    base = tiny_recipe(train={"phases": [{"epochs": 1, "lr": 0.1}]}) if key.startswith("train.phases.0.") else tiny_recipe()
    if key == "train.freeze" and expected == ["head"]:
        expected = ["head"]
    by_set = recipe_from_dict(base, overrides=[f"{key}={text}"])
    tree = copy.deepcopy(base)
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[parts[-1]] = "__VALUE__"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tree).replace("__VALUE__", text))  # unquoted, as a user types it
    by_file = load_recipe(tmp_path / "r.yaml")
    assert by_set == by_file
    got = by_file.model_dump()
    for part in parts:
        got = got[int(part)] if isinstance(got, list) else got[part]
    assert got == expected


def test_norm_policy_and_its_older_spelling_bn(tmp_path):
    """`norm:` is the field; `bn:` (recipes written before) still reads, one at a time, and --set of either wins."""
    old = recipe_from_dict(tiny_recipe(train={"bn": "train"}))
    new = recipe_from_dict(tiny_recipe(train={"norm": "train"}))
    assert old == new and old.train.norm == old.train.bn == "train" and old.train.resolved_phases()[0].norm == "train"
    assert "norm" in old.to_dict()["train"] and "bn" not in old.to_dict()["train"]  # written recipes say norm
    save_recipe(old, tmp_path / "recipe.yaml")
    assert load_recipe(tmp_path / "recipe.yaml") == old
    assert recipe_from_dict(tiny_recipe(train={"bn": "train"}), overrides=["train.norm=frozen"]).train.norm == "frozen"
    assert recipe_from_dict(tiny_recipe(train={"norm": "train"}), overrides=["train.bn=frozen"]).train.norm == "frozen"
    phases = {"phases": [{"epochs": 1, "lr": 0.1, "bn": "train"}, {"epochs": 1, "lr": 0.1, "norm": "train"}]}
    assert [p.norm for p in recipe_from_dict(tiny_recipe(train=phases)).train.resolved_phases()] == ["train", "train"]
    with pytest.raises(RecipeError, match=r"recipe\.train: give 'norm' \(or its older name 'bn'\), not both"):
        recipe_from_dict(tiny_recipe(train={"bn": "train", "norm": "frozen"}))
    with pytest.raises(RecipeError, match=r"recipe\.train\.phases\.0: give 'norm' \(or its older name 'bn'\), not both"):
        recipe_from_dict(tiny_recipe(train={"phases": [{"epochs": 1, "lr": 0.1, "bn": "train", "norm": "train"}]}))
    with pytest.raises(RecipeError, match=r"recipe\.train\.norm: Input should be 'frozen' or 'train'"):
        recipe_from_dict(tiny_recipe(train={"norm": "fixed"}))


NUMERIC_FIELDS = [  # (dotted key, a valid value): each gets inf, -inf, NaN and true below
    ("seed", 3),
    ("train.lr", 0.01),
    ("train.weight_decay", 0.01),
    ("train.warmup_epochs", 1.0),
    ("train.grad_clip", 1.0),
    ("train.epochs", 2),
    ("data.val_fraction", 0.2),
    ("data.batch_size", 8),
    ("transforms.crop_pct", 0.9),
    ("loss.label_smoothing", 0.1),
    ("model.head.dropout", 0.1),
    ("model.head.hidden", 32),
]


def _tree_with(dotted: str, value):
    tree = tiny_recipe()
    node = tree
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return tree


@pytest.mark.parametrize(("dotted", "good"), NUMERIC_FIELDS)
def test_numbers_are_finite_and_never_booleans(dotted, good):
    recipe_from_dict(_tree_with(dotted, good))  # the field itself is fine
    is_int = isinstance(good, int)
    for bad in (True, False) if is_int else (float("inf"), float("-inf"), float("nan"), True):
        with pytest.raises(
            RecipeError, match=rf"recipe\.{dotted}: (Input should be a finite number|true/false is not a number)"
        ) as caught:
            recipe_from_dict(_tree_with(dotted, bad))
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("dotted", "value", "pattern"),
    [
        ("seed", 2**32, r"recipe\.seed: Input should be less than or equal to 4294967295"),
        ("seed", -1, r"recipe\.seed: Input should be greater than or equal to 0"),
        ("model.head.hidden", 10**9, r"recipe\.model\.head\.hidden: Input should be less than or equal to 65536"),
        ("transforms.mean", [0.5, float("nan"), 0.5], r"recipe\.transforms\.mean\.1: Input should be a finite number"),
        ("transforms.std", [0.2, 0.2, float("inf")], r"recipe\.transforms\.std\.2: Input should be a finite number"),
        ("transforms.mean", [True, 0.5, 0.5], r"recipe\.transforms\.mean: true/false is not a number"),
        ("loss.class_weights", {"a": float("nan"), "b": 1.0}, r"recipe\.loss\.class_weights\.a: Input should be a finite number"),
        ("loss.class_weights", {"a": True, "b": 1.0}, r"recipe\.loss\.class_weights: true/false is not a number"),
    ],
)
def test_numbers_are_bounded_where_libraries_stop(dotted, value, pattern):
    with pytest.raises(RecipeError, match=pattern):
        recipe_from_dict(_tree_with(dotted, value))


def test_booleans_stay_booleans_and_phases_check_their_numbers():
    recipe = recipe_from_dict(_tree_with("eval.gradcam", False))
    assert recipe.eval.gradcam is False
    tree = tiny_recipe()
    tree["train"] = {"phases": [{"epochs": True, "lr": 0.01}]}
    with pytest.raises(RecipeError, match=r"recipe\.train\.phases\.0\.epochs: true/false is not a number"):
        recipe_from_dict(tree)


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), 0.0, -1.0])
def test_epochs_scale_must_be_finite_and_positive(scale):
    with pytest.raises(ValueError, match="the epochs scale must be a finite number above 0"):
        recipe_from_dict(tiny_recipe()).with_epochs(scale=scale)
