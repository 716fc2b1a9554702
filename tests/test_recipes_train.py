"""Every recipe in recipes/ trains on tiny images, and an interrupted run resumes to the very same weights.

The guarantees are tested on the shipped recipes as they are (dropout, augmentation, data workers, phases,
class weights, cached features), shrunk only in data and epochs, not on a minimal recipe of our own.
"""

import pandas as pd
import pytest
import timm
import torch

from finetune import train
from finetune.config.loading import load_recipe

from conftest import REPO

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


class _Stop(Exception):
    pass


def _stop_after_first_epoch(state):
    if state.epoch == 1:
        raise _Stop


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("weights")


def _local_weights(folder, name):
    path = folder / f"{name}.pth"
    if not path.exists():  # a stand-in for the hub download: same keys and shapes, random values
        torch.save(timm.create_model(name).state_dict(), path)
    return path


def _overrides(path, weights_dir):
    recipe = load_recipe(path)
    overrides = ["data.batch_size=8", "data.val_fraction=0.25", "data.test_fraction=0.0", "transforms.input_size=32"]
    if recipe.train.phases:
        overrides += [f"train.phases.{i}.epochs=1" for i in range(len(recipe.train.phases))]
    else:
        overrides.append("train.epochs=2")
    if recipe.model.pretrained is True:
        overrides.append(f"model.pretrained={_local_weights(weights_dir, recipe.model.name)}")
    return recipe, overrides


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_and_resumes_exactly(tmp_path, image_folder, weights_dir, path):
    recipe, overrides = _overrides(path, weights_dir)
    epochs = len(recipe.train.phases) if recipe.train.phases else 2
    full = train(recipe=path, data=image_folder, out=tmp_path / "full", overrides=overrides, progress=False)
    assert len(full.history) == epochs and full.report.metrics["num_classes"] == 3
    with pytest.raises(_Stop):
        train(
            recipe=path,
            data=image_folder,
            out=tmp_path / "cut",
            overrides=overrides,
            progress=False,
            on_epoch_end=_stop_after_first_epoch,
        )
    resumed = train(out=tmp_path / "cut", resume=True, progress=False)
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{path.stem}: resumed weights differ in {different[:3]}"
    pd.testing.assert_frame_equal(full.history.drop(columns="seconds"), resumed.history.drop(columns="seconds"))
    assert full.report.metrics == resumed.report.metrics
