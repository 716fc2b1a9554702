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


# GMACs and parameters (M) at 224 px (timm's model cards round them: 0.55, 0.39, 0.06, 0.2, 1.3) and the
# normalisation each family's layers use.
FAMILY_TABLE = {
    "convnext_atto": (0.55, 3.70, "LayerNorm", "stages.3, norm_pre"),
    "efficientnet_b0": (0.39, 5.29, "BatchNorm", "blocks.5, blocks.6, conv_head, bn2"),
    "mobilenetv3_small_100": (0.057, 2.54, "BatchNorm", "blocks.4, blocks.5"),
    "regnety_002": (0.20, 3.16, "BatchNorm", "s4, final_conv"),
    "deit_tiny_patch16_224": (1.25, 5.72, "LayerNorm", "blocks.9, blocks.10, blocks.11, norm"),
}


@pytest.mark.parametrize("name", FAMILY_TABLE)
def test_other_families_print_their_stage_map_and_normalisation(name):
    gmacs, mparams, kind, layer4 = FAMILY_TABLE[name]
    info = inspect_model(name=name, recipe=load_recipe(REPO / "recipes" / "last_stage.yaml"))
    assert info.total_gmacs == pytest.approx(gmacs, rel=0.05) and info.total_params / 1e6 == pytest.approx(mparams, rel=0.01)
    assert sum(s.params for s in info.stages) == info.total_params
    text = format_inspection(info)
    assert f"normalisation: {kind}" in text and f"; {info.family} family" in text
    assert ", ".join(info.stages[4].modules) == layer4 and ("frozen bn:frozen" in text) == (kind == "BatchNorm")
