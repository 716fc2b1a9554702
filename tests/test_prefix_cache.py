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
    # fp32 storage promises bit-exact equality with the uncached path (README): every tensor, every logged number
    assert a.keys() == b.keys() and len(a) == 122
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert differing == [], f"{len(differing)} of {len(a)} tensors differ, e.g. {differing[:3]}"
    columns = ["train_loss", "train_accuracy", "val_loss", "val_accuracy"]
    pd.testing.assert_frame_equal(plain.history[columns], cached.history[columns], check_exact=True)
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


def test_the_chain_check_is_made_in_fp32_before_caching_and_catches_a_forward_that_is_not_a_chain():
    """Under bf16 autocast (CUDA's default) the check still passes: it runs in fp32 on a fresh activation, not on the
    cached fp16 one. A model whose forward adds something outside its stages is refused, with the reason."""
    from finetune.config.loading import recipe_from_dict
    from finetune.training.feature_cache import _prefix_blocker, entry_module
    from finetune.training.feature_store import Tap

    torch.manual_seed(0)
    bundle = build_model(ModelConfig(name="resnet18"), num_classes=50)
    with torch.no_grad():
        bundle.model.fc.weight.mul_(20)  # logits of a realistic size, where bf16 differs by more than 1e-3
    recipe = recipe_from_dict(tiny_recipe(train=LAST_STAGE))
    image = torch.rand(1, 3, 64, 64)
    tap = Tap(bundle.model, entry_module(bundle, "layer4"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _prefix_blocker(bundle, tap, recipe, "layer4", image, rows=10) is None
    plain = bundle.model.forward_features
    bundle.model.forward_features = lambda x: plain(x) + 1.0  # something after layer4 that no stage holds
    assert (
        _prefix_blocker(bundle, tap, recipe, "layer4", image, rows=10) == "resnet18's forward is not a plain chain of its stages"
    )


def test_fp16_overflow_is_an_error_and_a_killed_pass_keeps_its_entries(tmp_path, caplog):
    """Activations beyond float16's range stop with the fix (not a silently infinite cache); meta.json is written
    with the first batch, so entries stored before a kill are reused, not deleted as damaged."""
    import numpy as np
    from PIL import Image

    from finetune.errors import TrainingError
    from finetune.training.feature_store import ComputeOptions, FeatureCache, Tap

    paths = []
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    model = torch.nn.Sequential()
    model.add_module("stem", torch.nn.Identity())
    model.add_module("block", torch.nn.Identity())

    def pipeline(image):
        return {"image": torch.full((3, 2, 2), float(image[0, 0, 0]) * 1e3)}  # 0, 4e4, 8e4, 1.2e5: the last two overflow

    options = ComputeOptions(device=torch.device("cpu"), dtype=None, batch_size=2, num_workers=0, progress=False)
    cache = FeatureCache(tmp_path / "cache", views=0, dtype=np.float16)
    with pytest.raises(TrainingError, match=r"activations exceed the float16 range; set train.cache_precision: fp32"):
        cache.features(Tap(model, "block"), paths, pipeline, options)
    assert (tmp_path / "cache" / "meta.json").exists()
    indexes = list((tmp_path / "cache").glob("rows-*.index.npy"))
    assert len(indexes) == 1 and len(np.load(indexes[0])) == 2  # the open shard, closed on the error
    with caplog.at_level(logging.INFO):
        features, _ = FeatureCache(tmp_path / "cache", views=0, dtype=np.float16).features(
            Tap(model, "block"), paths[:2], pipeline, options
        )
    assert features.shape == (2, 1, 12) and float(features[1].max()) == 40000.0
    assert "0 view(s) computed, 2 reused" in caplog.text  # the first batch, stored before the error
