"""Head-only phases train on cached backbone features: same result as uncached, reused, invalidated on change."""

import logging
import re

import pandas as pd
import pytest
import torch

from finetune import train
from finetune.config.loading import recipe_from_dict
from finetune.config.schema import ModelConfig
from finetune.data.decode import load_image
from finetune.data.transforms import ImageConfig, build_eval_pipeline, build_train_pipeline
from finetune.models.build import build_model
from finetune.training.feature_cache import cached_phase, why_not_cached

from conftest import make_folder, tiny_recipe, write_mode_image

PROBE = {"epochs": 2, "lr": 0.01, "freeze": ["stem", "layer1", "layer2", "layer3", "layer4"]}


def _probe(**train_options):
    return recipe_from_dict(tiny_recipe(transforms={"train": "none"}, train={**PROBE, **train_options}))


def _counts(caplog) -> list[tuple[int, int]]:
    found = [re.search(r"(\d+) view\(s\) computed, (\d+) reused", r.getMessage()) for r in caplog.records]
    return [(int(m[1]), int(m[2])) for m in found if m]


def test_cached_probe_matches_uncached_and_second_run_reuses(tmp_path, image_folder, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    cache = tmp_path / "cache"  # its own cache: other tests train on the same tiny pictures
    plain = train(recipe=_probe(feature_cache="off"), data=image_folder, out=tmp_path / "plain", progress=False, cache_dir=cache)
    assert _counts(caplog) == []
    first = train(recipe=_probe(), data=image_folder, out=tmp_path / "first", progress=False, cache_dir=cache)
    assert _counts(caplog) == [(18, 0), (6, 0)]  # train and val images, computed once
    caplog.clear()
    second = train(recipe=_probe(), data=image_folder, out=tmp_path / "second", progress=False, cache_dir=cache)
    assert _counts(caplog) == [(0, 18), (0, 6)]
    a, b, c = (torch.load(r.best_checkpoint, weights_only=True)["state_dict"] for r in (plain, first, second))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) and torch.equal(b[k], c[k]) for k in a)
    columns = ["train_loss", "train_accuracy", "val_loss", "val_accuracy"]
    pd.testing.assert_frame_equal(plain.history[columns], first.history[columns], atol=1e-5)


def _features(tmp_path, bundle, image: ImageConfig, *, paths, views=0, train_tf=None):
    recipe = recipe_from_dict(
        tiny_recipe(transforms={"train": "none" if not views else "strong"}, train={**PROBE, "cache_views": views})
    )
    eval_tf = build_eval_pipeline(image)
    return cached_phase(
        bundle,
        recipe,
        train_paths=paths,
        train_targets=[0] * len(paths),
        val_paths=paths[:1],
        val_targets=[0],
        train_pipeline=train_tf or eval_tf,
        eval_pipeline=eval_tf,
        device=torch.device("cpu"),
        dtype=None,
        progress=False,
        root=tmp_path / "cache",
    )


def test_cache_is_invalidated_by_weights_pipeline_and_image_content(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    folder = make_folder(tmp_path / "data", per_class=3, classes=("a",))
    paths = sorted(str(p) for p in folder.rglob("*.*"))
    torch.manual_seed(0)
    bundle = build_model(ModelConfig(name="resnet18"), num_classes=2)
    image = ImageConfig(input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0, interpolation="bilinear")
    reference = _features(tmp_path, bundle, image, paths=paths).train.features
    assert _counts(caplog)[-2] == (3, 0)  # the train paths; [-1] is the val path

    original = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    with torch.no_grad():  # a changed backbone weight: everything recomputed
        bundle.model.layer4[0].downsample[0].weight.add_(0.01)
    changed = _features(tmp_path, bundle, image, paths=paths).train.features
    assert _counts(caplog)[-2] == (3, 0) and not torch.allclose(changed, reference)
    bundle.model.load_state_dict(original)
    with torch.no_grad():
        bundle.model.fc.weight.mul_(2)  # the head is not part of the key: it is what trains
    assert torch.allclose(_features(tmp_path, bundle, image, paths=paths).train.features, reference)
    assert _counts(caplog)[-2] == (0, 3)

    bigger = ImageConfig(input_size=48, mean=image.mean, std=image.std, crop_pct=1.0, interpolation="bilinear")
    _features(tmp_path, bundle, bigger, paths=paths)  # another pipeline
    assert _counts(caplog)[-2] == (3, 0)

    write_mode_image(folder / "a" / "img_00", "rgb_jpeg", 255 - load_image(paths[0]))  # new content, same path
    features = _features(tmp_path, bundle, image, paths=paths).train.features
    assert _counts(caplog)[-2] == (1, 2)
    assert not torch.allclose(features[0], reference[0]) and torch.equal(features[1:], reference[1:])


def test_cache_views_are_distinct_stable_and_chosen_per_epoch(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    folder = make_folder(tmp_path / "data", per_class=4, classes=("a",))
    paths = sorted(str(p) for p in folder.rglob("*.*"))
    bundle = build_model(ModelConfig(name="resnet18"), num_classes=2)
    image = ImageConfig(input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0, interpolation="bilinear")
    recipe = recipe_from_dict(tiny_recipe(transforms={"train": "strong"}))
    augment = build_train_pipeline(recipe.transforms, image, seed=0)
    cached = _features(tmp_path, bundle, image, paths=paths, views=3, train_tf=augment)
    assert cached.train.features.shape[:2] == (4, 3) and _counts(caplog)[-2] == (12, 0)
    assert not torch.allclose(cached.train.features[:, 0], cached.train.features[:, 1])
    again = _features(tmp_path, bundle, image, paths=paths, views=3, train_tf=augment)
    assert _counts(caplog)[-2] == (0, 12) and torch.equal(again.train.features, cached.train.features)
    chosen = []
    for epoch in range(4):
        cached.train.choose_views(epoch)
        chosen.append(cached.train.views.tolist())
    assert len({tuple(c) for c in chosen}) > 1 and all(0 <= v < 3 for c in chosen for v in c)
    feature, _ = cached.train[0]
    assert torch.equal(feature, cached.train.features[0, cached.train.views[0]])


@pytest.mark.parametrize(
    ("train_options", "transforms", "distributed", "reason"),
    [
        ({"freeze": ["stem", "layer1", "layer2", "layer3"]}, "none", False, None),  # a suffix: layer3's output is cached
        (
            {"freeze": ["stem", "layer1", "layer2", "layer4"]},
            "none",
            False,
            "the phase trains layer3, head: a frozen stage comes",
        ),
        ({"freeze": []}, "none", False, "every stage trains"),
        ({"bn": "train"}, "none", False, "bn: train"),
        ({}, "light", False, "set train.cache_views: K"),
        ({"cache_views": 2}, "light", False, None),
        ({}, "none", True, "single-process"),
        ({"feature_cache": "off"}, "none", False, "feature_cache is off"),
    ],
)
def test_when_the_cache_applies(train_options, transforms, distributed, reason):
    recipe = recipe_from_dict(tiny_recipe(transforms={"train": transforms}, train={**PROBE, **train_options}))
    got = why_not_cached(recipe, recipe.train.resolved_phases()[0], distributed=distributed)
    assert got == reason if reason is None else reason in got


def _probe_setup(tmp_path):
    folder = make_folder(tmp_path / "data", per_class=3, classes=("a",))
    paths = sorted(str(p) for p in folder.rglob("*.*"))
    torch.manual_seed(0)
    bundle = build_model(ModelConfig(name="resnet18"), num_classes=2)
    image = ImageConfig(input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0, interpolation="bilinear")
    return paths, bundle, image


def _shard_files(cache):
    """(rows, index) files of every shard under `cache`."""
    return [(i.with_name(i.name.replace(".index.npy", ".npy")), i) for i in sorted(cache.rglob("rows-*.index.npy"))]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shape", "not_finite", "index", "meta"])
def test_damaged_cache_entries_are_discarded_and_recomputed(tmp_path, caplog, damage):
    import numpy as np

    caplog.set_level(logging.INFO, logger="finetune")
    paths, bundle, image = _probe_setup(tmp_path)
    clean = _features(tmp_path, bundle, image, paths=paths).train.features
    shards = _shard_files(tmp_path / "cache")
    assert len(shards) == 1  # the train pass's three rows (the val image is one of them)
    for data, index in shards:
        rows = len(np.load(index))
        if damage == "garbage":
            data.write_bytes(b"not a numpy file")
        elif damage == "truncated":
            data.write_bytes(data.read_bytes()[:-60])
        elif damage == "wrong_shape":
            np.save(data, np.zeros((rows, 7), np.float32))
        elif damage == "not_finite":
            np.save(data, np.full((rows, 512), np.nan, np.float32))
        elif damage == "index":
            index.write_bytes(b"not an index")
    if damage == "meta":
        for meta in (tmp_path / "cache").rglob("meta.json"):
            meta.write_text("{broken")
    caplog.clear()
    again = _features(tmp_path, bundle, image, paths=paths).train.features
    assert torch.allclose(again, clean, atol=1e-6)  # never poisoned (recomputed in a smaller batch: same up to rounding)
    assert _counts(caplog)[0][0] == 3
    warned = [r.getMessage() for r in caplog.records if "damaged shard(s) discarded" in r.getMessage()]
    assert len(warned) == (0 if damage == "meta" else 1) and all("1 damaged shard(s)" in m for m in warned)
    if damage != "meta":
        assert all(not data.exists() and not index.exists() for data, index in shards)  # deleted
    assert torch.allclose(_features(tmp_path, bundle, image, paths=paths).train.features, clean, atol=1e-6)  # repaired on disk
    assert _counts(caplog)[-2] == (0, 3)


def test_unwritable_cache_falls_back_to_memory(tmp_path, caplog, monkeypatch):
    import os

    caplog.set_level(logging.INFO, logger="finetune")
    paths, bundle, image = _probe_setup(tmp_path)
    clean = _features(tmp_path / "a", bundle, image, paths=paths).train.features
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "cache").write_text("a file where the cache folder should be")
    caplog.clear()
    features = _features(tmp_path / "b", bundle, image, paths=paths).train.features
    assert torch.equal(features, clean)
    assert any(
        "is not writable" in r.getMessage() and "features stay in memory for this run" in r.getMessage() for r in caplog.records
    )
    assert os.path.isfile(tmp_path / "b" / "cache")


def test_damaged_entries_of_a_read_only_cache_are_skipped_in_memory(tmp_path, caplog, monkeypatch):
    """A cache the user may not write (shared, read-only): a damaged entry is recomputed for this run, not unlinked."""
    import errno
    from pathlib import Path

    from finetune.training import feature_store

    caplog.set_level(logging.INFO, logger="finetune")
    paths, bundle, image = _probe_setup(tmp_path)
    clean = _features(tmp_path, bundle, image, paths=paths).train.features
    entries = [data for data, _ in _shard_files(tmp_path / "cache")]
    for entry in entries:
        entry.write_bytes(b"damaged")
    real_unlink = Path.unlink

    def read_only(self, missing_ok=False):
        if str(self).startswith(str(tmp_path / "cache")):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        real_unlink(self, missing_ok=missing_ok)

    def refused(path, write, durable=True):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(Path, "unlink", read_only)
    monkeypatch.setattr(feature_store, "atomic_write", refused)
    caplog.clear()
    again = _features(tmp_path, bundle, image, paths=paths).train.features
    assert torch.allclose(again, clean, atol=1e-6)
    assert _counts(caplog)[0][0] == 3  # the rows of the damaged shards, recomputed in memory
    assert any("features stay in memory for this run" in r.getMessage() for r in caplog.records)
    assert all(entry.read_bytes() == b"damaged" for entry in entries)  # nothing unlinked, nothing written
    assert len(_shard_files(tmp_path / "cache")) == len(entries)


@pytest.mark.parametrize("library", ["pillow", "opencv-python-headless", "albumentations", "numpy", "torch", "timm"])
def test_another_library_version_is_a_miss_and_the_same_versions_a_hit(tmp_path, caplog, monkeypatch, library):
    """The same images, weights and pipeline under an upgraded decoder or framework get a folder of their own (never
    served the old entries); back on the installed versions, the first folder is reused as it was."""
    import json
    from importlib.metadata import version as installed

    import finetune.versions

    caplog.set_level(logging.INFO, logger="finetune")
    paths, bundle, image = _probe_setup(tmp_path)
    reference = _features(tmp_path, bundle, image, paths=paths).train.features
    assert _counts(caplog)[-2] == (3, 0)

    def upgraded(name: str) -> str:
        return "99.0" if name == library else installed(name)

    monkeypatch.setattr(finetune.versions, "version", upgraded)
    caplog.clear()
    features = _features(tmp_path, bundle, image, paths=paths).train.features
    assert _counts(caplog) == [(3, 0), (0, 1)]  # computed again in a new folder (the val image is one of the three)
    assert torch.equal(features, reference)  # same libraries in truth: the recomputed rows are the same
    folders = sorted(p.parent for p in (tmp_path / "cache").rglob("meta.json"))
    assert len(folders) == 2
    stamped = [json.loads((f / "meta.json").read_text())["versions"].get(library) for f in folders]
    assert "99.0" in stamped and len(set(stamped)) == 2

    monkeypatch.undo()
    caplog.clear()
    assert torch.equal(_features(tmp_path, bundle, image, paths=paths).train.features, reference)
    assert _counts(caplog) == [(0, 3), (0, 1)]
