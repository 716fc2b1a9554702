"""Every recipe in recipes/ trains for one tiny epoch (per phase) on tiny images."""

import pytest
import timm
import torch

from finetune import train
from finetune.config.loading import load_recipe

from conftest import REPO

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("weights")


def _local_weights(folder, name):
    path = folder / f"{name}.pth"
    if not path.exists():  # a stand-in for the hub download: same keys and shapes, random values
        torch.save(timm.create_model(name).state_dict(), path)
    return path


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_one_tiny_epoch(tmp_path, image_folder, weights_dir, path):
    recipe = load_recipe(path)
    overrides = [
        "data.batch_size=8",
        "data.num_workers=0",
        "data.val_fraction=0.25",
        "data.test_fraction=0.0",
        "transforms.input_size=32",
    ]
    if recipe.train.phases:
        overrides += [f"train.phases.{i}.epochs=1" for i in range(len(recipe.train.phases))]
    else:
        overrides.append("train.epochs=1")
    if recipe.model.pretrained is True:
        overrides.append(f"model.pretrained={_local_weights(weights_dir, recipe.model.name)}")
    result = train(recipe=path, data=image_folder, out=tmp_path / "run", overrides=overrides, progress=False)
    assert len(result.history) == max(1, len(recipe.train.phases or []))
    assert result.report.metrics["num_classes"] == 3
