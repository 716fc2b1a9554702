import json

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.config.loading import load_recipe
from finetune.errors import RecipeError
from finetune.models.inspect import format_inspection, inspect_model

from conftest import REPO

# The figures: multiply-adds (G) and parameters (M) at 224 px, and He et al. 2016 Table 1.
PUBLISHED = {
    "resnet18": (1.81, 11.69, 1.8),
    "resnet34": (3.66, 21.80, 3.6),
    "resnet50": (4.09, 25.56, 3.8),
    "resnet101": (7.80, 44.55, 7.6),
    "resnet152": (11.51, 60.19, 11.3),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_totals_match_the_published_table(name):
    gmacs, mparams, paper = PUBLISHED[name]
    info = inspect_model(name=name)
    assert info.total_gmacs == pytest.approx(gmacs, rel=0.01)
    assert info.total_params / 1e6 == pytest.approx(mparams, rel=0.01)
    assert info.paper_gflops == paper
    assert sum(s.params for s in info.stages) == info.total_params
    assert sum(s.gmacs for s in info.stages) == pytest.approx(info.total_gmacs, rel=1e-3)
    text = format_inspection(info)
    assert f"He et al. 2016, Table 1: {paper}" in text
    assert ("v1.5" in text) == (name in ("resnet50", "resnet101", "resnet152"))


def test_torchvision_counts_equal_timm():
    assert inspect_model(name="tv:resnet50").total_gmacs == pytest.approx(inspect_model(name="resnet50").total_gmacs)


def test_recipe_phases_and_input_size():
    recipe = load_recipe(REPO / "recipes" / "gradual_unfreeze.yaml")
    info = inspect_model(name="resnet50", recipe=recipe, input_size=448)
    by_stage = {s.stage: s for s in info.stages}
    assert by_stage["head"].trainable == [True, True, True]
    assert by_stage["layer4"].trainable == [False, True, True]
    assert by_stage["stem"].trainable == [False, False, True] and by_stage["stem"].bn[0] == "frozen"
    assert info.total_gmacs == pytest.approx(4.09 * 4, rel=0.01)  # FLOPs scale with pixels


def test_cli_json_and_unknown_model():
    result = CliRunner().invoke(app, ["inspect", "resnet18", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert [s["stage"] for s in data["stages"]] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    result = CliRunner().invoke(app, ["inspect", "resnet5"])
    assert result.exit_code == 2 and "did you mean 'resnet50'" in result.stderr
    with pytest.raises(RecipeError, match="unknown model"):
        inspect_model(name="resnet5")


def test_input_size_must_be_a_size():
    for size in ("0", "-3"):
        result = CliRunner().invoke(app, ["inspect", "resnet18", "--input-size", size])
        assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
            f"error: --input-size {size}: give the image size in pixels, from 16 to 4096"
        ]
