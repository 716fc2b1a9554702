"""The feature cache's layout: rows in shard files with an index, a file pair per SHARD_ROWS rows rather than a file
per image; shards read back bit for bit, damaged ones are recomputed, concurrent writers never clash."""

import logging
import math
import re
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.training import feature_store
from finetune.training.feature_store import ComputeOptions, FeatureCache, Tap

ROWS = 10
SHARD = 4
OPTIONS = ComputeOptions(device=torch.device("cpu"), dtype=None, batch_size=3, num_workers=0, progress=False)


def _pipeline(image):
    return {"image": torch.from_numpy(image[:2, :2].astype(np.float32)).permute(2, 0, 1) / 7.0}


def _tap() -> Tap:
    model = torch.nn.Sequential()
    model.add_module("stem", torch.nn.Identity())
    model.add_module("block", torch.nn.Identity())
    return Tap(model, "block")


@pytest.fixture
def paths(tmp_path, monkeypatch):
    monkeypatch.setattr(feature_store, "SHARD_ROWS", SHARD)
    rng = np.random.default_rng(0)
    found = []
    for i in range(ROWS):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        found.append(str(tmp_path / f"{i}.png"))
    return found


def _counts(caplog) -> list[tuple[int, int]]:
    found = [re.search(r"(\d+) view\(s\) computed, (\d+) reused", r.getMessage()) for r in caplog.records]
    return [(int(m[1]), int(m[2])) for m in found if m]


def _shards(folder):
    return [(i.with_name(i.name.replace(".index.npy", ".npy")), i) for i in sorted(folder.glob("rows-*.index.npy"))]


def _features(folder, paths):
    return FeatureCache(folder, views=0).features(_tap(), paths, _pipeline, OPTIONS)[0]


def test_rows_in_several_shards_read_back_equal_in_few_files(tmp_path, paths, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    folder = tmp_path / "cache"
    first = _features(folder, paths)
    uncached = torch.stack([_pipeline(np.asarray(Image.open(p)))["image"].flatten() for p in paths]).unsqueeze(1)
    assert torch.equal(first, uncached)
    shards = _shards(folder)
    assert sorted(len(np.load(index)) for _, index in shards) == sorted([SHARD, SHARD, ROWS - 2 * SHARD])
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert len(files) == 2 * math.ceil(ROWS / SHARD) + 1  # rows and index per shard, meta.json: O(rows / shard size)
    caplog.clear()
    again = _features(folder, list(reversed(paths)))  # any order, from memory-mapped shards
    assert torch.equal(again, first.flip(0)) and _counts(caplog) == [(0, ROWS)]


@pytest.mark.parametrize("killed_after", [0, 1])
def test_a_truncated_shard_and_a_shard_with_a_nan_row_are_recomputed_with_one_warning(tmp_path, paths, caplog, killed_after):
    caplog.set_level(logging.INFO, logger="finetune")
    folder = tmp_path / "cache"
    clean = _features(folder, paths)
    (data_a, index_a), (data_b, index_b) = [s for s in _shards(folder) if len(np.load(s[1])) == SHARD]
    data_a.write_bytes(data_a.read_bytes()[:-10])  # truncated
    rows = np.load(data_b)
    rows[killed_after] = np.nan
    np.save(data_b, rows)
    caplog.clear()
    again = _features(folder, paths)
    assert torch.equal(again, clean) and _counts(caplog) == [(2 * SHARD, ROWS - 2 * SHARD)]
    warned = [r.getMessage() for r in caplog.records if "damaged shard(s) discarded" in r.getMessage()]
    assert len(warned) == 1 and "2 damaged shard(s)" in warned[0]
    assert not any(p.exists() for p in (data_a, index_a, data_b, index_b))
    caplog.clear()
    assert torch.equal(_features(folder, paths), clean) and _counts(caplog) == [(0, ROWS)]


def test_two_caches_writing_one_folder_never_clash(tmp_path, paths, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    folder = tmp_path / "cache"
    reference = _features(tmp_path / "reference", paths)
    _features(folder, paths[:6])  # sequential passes, overlapping rows
    _features(folder, paths[4:])
    results: list[torch.Tensor] = []
    threads = [threading.Thread(target=lambda: results.append(_features(tmp_path / "both", paths))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and all(torch.equal(r, reference) for r in results)
    caplog.clear()
    assert torch.equal(_features(folder, paths), reference) and torch.equal(_features(tmp_path / "both", paths), reference)
    assert _counts(caplog) == [(0, ROWS), (0, ROWS)]
    assert not any("damaged" in r.getMessage() for r in caplog.records)


def test_a_folder_of_the_per_file_layout_is_a_miss(tmp_path, paths, caplog):
    """The layout before shards (a .npy per image and view, meta.json without "layout") is computed again."""
    caplog.set_level(logging.INFO, logger="finetune")
    folder = tmp_path / "cache"
    clean = _features(tmp_path / "fresh", paths)
    key = feature_store.file_key(paths[0])
    (folder / key[:2]).mkdir(parents=True)
    np.save(folder / key[:2] / f"{key}.v0.npy", np.zeros(12, np.float32))
    (folder / "meta.json").write_text('{"shape": [3, 2, 2], "versions": {}}')
    caplog.clear()
    assert torch.equal(_features(folder, paths), clean) and _counts(caplog) == [(ROWS, 0)]
    caplog.clear()
    assert torch.equal(_features(folder, paths), clean) and _counts(caplog) == [(0, ROWS)]


@pytest.mark.parametrize(
    ("limit", "value", "sizes"), [("SHARD_BYTES", 3 * 12 * 4, [1, 3, 3, 3]), ("SHARD_SECONDS", 0.0, [1] * ROWS)]
)
def test_a_shard_also_closes_at_a_size_and_after_a_time(tmp_path, paths, monkeypatch, limit, value, sizes):
    """Large prefix activations close a shard before SHARD_ROWS rows; a slow pass closes one every SHARD_SECONDS."""
    monkeypatch.setattr(feature_store, limit, value)
    first = _features(tmp_path / "cache", paths)
    assert sorted(len(np.load(index)) for _, index in _shards(tmp_path / "cache")) == sizes
    assert torch.equal(_features(tmp_path / "cache", paths), first)


def _big_pipeline(image):  # a 3 x 48 x 48 row per image: 27 KiB, so the output array dwarfs everything else traced
    return {"image": torch.from_numpy(np.resize(image.astype(np.float32), (48, 48, 3))).permute(2, 0, 1).contiguous()}


def test_a_pass_holds_one_output_array_not_a_copy_per_image(tmp_path, paths):
    """Each batch is written into the one output array: the peak of what numpy allocates during a pass stays near that
    array's size (a list of per-image rows stacked at the end took three times it: 9.4 GiB for a 1M-image epoch)."""
    import tracemalloc

    many = paths * 6  # 60 rows; the same file six times is six rows to compute
    cache = FeatureCache(tmp_path / "cache", views=0)
    tracemalloc.start()
    try:
        features, shape = cache.features(_tap(), many, _big_pipeline, OPTIONS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert shape == (3, 48, 48) and features.shape == (60, 1, 3 * 48 * 48)
    assert features.numpy().nbytes <= peak < 1.3 * features.numpy().nbytes
    assert torch.equal(features[10, 0], features[0, 0])  # the same image, the same row
