"""The frozen prefix's output cached for suffix phases (layer4 + head, ...): the suffix network reproduces the
model, training on it gives the uncached weights, and the cache is skipped (and said why) when it cannot help."""

import logging

import pandas as pd
import pytest
import torch

from finetune import train
from finetune.config.catalog import STAGES
from finetune.config.schema import ModelConfig
from finetune.models.build import build_model
from finetune.models.suffix import SuffixNet, stage_input, suffix_names

from conftest import tiny_recipe


@pytest.mark.parametrize("name", ["resnet18", "tv:resnet18", "resnetv2_18", "resnet26d"])
@pytest.mark.parametrize("first", ["layer1", "layer3", "layer4"])
def test_the_suffix_on_the_prefix_output_is_the_whole_model(name, first):
    torch.manual_seed(0)
    bundle = build_model(ModelConfig(name=name, head={"hidden": 8, "dropout": 0.3}), num_classes=3)
    model = bundle.model.eval()
    images = torch.rand(2, 3, 64, 64)
    names = suffix_names(bundle.stages, first)
    activation = stage_input(model, names[0], images)
    suffix = SuffixNet(model, names, tuple(activation.shape[1:]))
    with torch.no_grad():
        torch.testing.assert_close(suffix(activation.flatten(1)), model(images), rtol=1e-5, atol=1e-5)
    assert set(names) <= {n for stage in STAGES[STAGES.index(first) : -1] for n, _ in bundle.stages.modules[stage]}


LAST_STAGE = {"epochs": 3, "lr": 0.01, "freeze": ["stem", "layer1", "layer2", "layer3"], "bn": "frozen"}


def _counts(caplog):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("feature cache /")]


def test_last_stage_on_cached_activations_trains_the_uncached_weights(tmp_path, image_folder, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    recipe = tiny_recipe(
        transforms={"train": "none"}, train={**LAST_STAGE, "cache_precision": "fp32"}, model={"head": {"dropout": 0.2}}
    )
    cache = tmp_path / "cache"
    plain = train(
        recipe=recipe,
        data=image_folder,
        out=tmp_path / "plain",
        progress=False,
        cache_dir=cache,
        overrides=["train.feature_cache=off"],
    )
    cached = train(recipe=recipe, data=image_folder, out=tmp_path / "cached", progress=False, cache_dir=cache)
    assert any("18 view(s) computed, 0 reused" in m for m in _counts(caplog))
    a = torch.load(plain.best_checkpoint, weights_only=True)["state_dict"]
    b = torch.load(cached.best_checkpoint, weights_only=True)["state_dict"]
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= 1e-6, worst
    columns = ["train_loss", "train_accuracy", "val_loss", "val_accuracy"]
    pd.testing.assert_frame_equal(plain.history[columns], cached.history[columns], atol=1e-5)
    caplog.clear()
    train(recipe=recipe, data=image_folder, out=tmp_path / "again", progress=False, cache_dir=cache)
    assert any("0 view(s) computed, 18 reused" in m for m in _counts(caplog))


def test_half_precision_views_with_ema_resume_bit_exactly(tmp_path, image_folder):
    class Stop(Exception):
        pass

    def stop(state):
        if state.epoch == 1:
            raise Stop

    recipe = tiny_recipe(train={**LAST_STAGE, "cache_views": 2, "ema": {"decay": 0.9}}, model={"head": {"dropout": 0.2}})
    cache = tmp_path / "cache"
    full = train(recipe=recipe, data=image_folder, out=tmp_path / "full", progress=False, cache_dir=cache)
    with pytest.raises(Stop):
        train(recipe=recipe, data=image_folder, out=tmp_path / "cut", progress=False, cache_dir=cache, on_epoch_end=stop)
    resumed = train(out=tmp_path / "cut", resume=True, progress=False, cache_dir=cache)
    a = torch.load(full.best_checkpoint, weights_only=True)["state_dict"]
    b = torch.load(resumed.best_checkpoint, weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.history["ema_val_accuracy"].notna().all()
    pd.testing.assert_frame_equal(full.history.drop(columns="seconds"), resumed.history.drop(columns="seconds"))


def test_the_cache_is_skipped_with_a_reason_when_it_would_not_fit(tmp_path, image_folder, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    recipe = tiny_recipe(transforms={"train": "none"}, train={**LAST_STAGE, "epochs": 1, "cache_budget_gb": 1e-6})
    result = train(recipe=recipe, data=image_folder, out=tmp_path / "run", progress=False, cache_dir=tmp_path / "cache")
    assert len(result.history) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith("feature cache not used: the prefix outputs would take") and "cache_budget_gb: 1e-06" in m for m in messages
    )
    assert not _counts(caplog)
