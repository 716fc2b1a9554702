"""A cache changes speed, never results (README: `train.cache_precision: fp32` is bit-exact with the uncached path),
checked on every shipped recipe that caches, with the recipe's own batch size, workers, head, optimizer, phases and
cached views; only the backbone (a local ResNet-18 weights file), the image size, the epochs and `transforms.train:
none` (cached views of an augmenting pipeline are, by design, not the fresh draws of the uncached path) change."""

import logging

import pandas as pd
import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from finetune import train
from finetune.config.loading import recipe_from_dict
from finetune.data.loader import make_loader

from conftest import REPO, make_folder

RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


def _as_tested(name: str, weights) -> dict:
    tree = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())
    tree["model"] = {**tree["model"], "name": "resnet18", "pretrained": str(weights)}
    tree["transforms"] = {**tree.get("transforms", {}), "train": "none", "input_size": 32}
    tree["train"]["cache_precision"] = "fp32"
    tree["train"]["amp"] = "off"  # the promise is bit-exactness in fp32; amp auto would pick bf16 on some CPUs
    return tree


def _caches(name: str) -> bool:
    tree = _as_tested(name, "w.safetensors")
    if tree["train"].get("mixup"):
        return False  # mixed images are no cached activations: the schema refuses a cached phase with mixup
    recipe = recipe_from_dict(tree)
    return any(recipe.cache_blocker(phase) is None for phase in recipe.train.resolved_phases())


CACHING = [name for name in RECIPES if _caches(name)]


def test_the_recipes_that_cache_are_the_ones_tested():
    assert {"linear_probe", "last_stage", "gradual_unfreeze", "imbalanced"} <= set(CACHING)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model("resnet18").state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("promise") / "data", per_class=30, size=40)


@pytest.mark.parametrize("name", CACHING)
def test_cached_and_uncached_runs_are_bit_identical(name, weights, folder, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    tree = _as_tested(name, weights)
    epochs = max(2, len(recipe_from_dict(tree).train.resolved_phases()))
    cache = tmp_path / "cache"
    plain = train(
        recipe=tree, data=folder, out=tmp_path / "plain", epochs=epochs, progress=False, cache_dir=cache,
        overrides=["train.feature_cache=off"],
    )  # fmt: skip
    cached = train(recipe=tree, data=folder, out=tmp_path / "cached", epochs=epochs, progress=False, cache_dir=cache)
    assert any(r.getMessage().startswith("feature cache /") for r in caplog.records), "the cached run cached nothing"
    a = torch.load(plain.best_checkpoint, weights_only=True)["state_dict"]
    b = torch.load(cached.best_checkpoint, weights_only=True)["state_dict"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    columns = [c for c in plain.history.columns if c not in ("seconds", "lr")]
    pd.testing.assert_frame_equal(plain.history[columns], cached.history[columns], check_exact=True)


class _Numbers(torch.utils.data.Dataset):
    transform = None

    def __len__(self):
        return 45

    def __getitem__(self, index):
        return torch.tensor([index]), index


def test_a_loaders_order_does_not_depend_on_its_workers():
    """The cause of the broken promise: tqdm.auto iterated a DataLoader twice (its constructor calls iter()), and a
    loader with workers draws its shuffle order when its iterator is made, so runs with workers trained on another
    order than runs without (and than the cached path, which reads in-process)."""
    from finetune.bars import progress

    orders = []
    for workers in (0, 2):
        loader = make_loader(_Numbers(), batch_size=8, num_workers=workers, shuffle=True, seed=5)
        orders.append([t.tolist() for _, t in progress(loader, disable=True)])
    assert orders[0] == orders[1]
    assert orders[0] == [t.tolist() for _, t in make_loader(_Numbers(), batch_size=8, num_workers=0, shuffle=True, seed=5)]
