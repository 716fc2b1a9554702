"""`finetune shard` and `--data SHARDS`: the shards hold the split train would make, training from them reaches the
folder's metrics, resume at an epoch boundary is exact, and a broken shard folder is refused in one line."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import torch
import webdataset as wds
import yaml

from finetune.api import check, evaluate, predict, shard, train
from finetune.data.loader import EpochPlan, batches_per_epoch, make_loader
from finetune.data.members import MANIFEST
from finetune.data.shards import read_shard_set, shard_index
from finetune.data.stream import ShardStream, batch_sizes, tar_samples, worker_quotas
from finetune.errors import DataError, RunDirError, UsageError
from finetune.training.context import FitState

from conftest import make_folder, tiny_recipe

# one batch per epoch, no augmentation: the folder and the shards train on the same images in one step, so only the
# order of the sums inside the batch differs (losses equal to ~1e-4, accuracies equal)
SAME_STEP = tiny_recipe(
    data={"batch_size": 32, "test_fraction": 0.25}, transforms={"train": "none"}, train={"epochs": 2, "lr": 0.01}
)
SHUFFLED = tiny_recipe(data={"batch_size": 5, "test_fraction": 0.25}, train={"epochs": 2, "lr": 0.01})


class _Crash(Exception):
    pass


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = make_folder(tmp_path_factory.mktemp("shard-src") / "flat")
    good = (root / "cat" / "img_00.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    return root


@pytest.fixture(scope="module")
def shards(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "shards"
    shard(data=images, out=out, shard_size=4, recipe=SAME_STEP, progress=False)
    return out


@pytest.fixture(scope="module")
def runs(images, shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("shard-runs")
    from_shards = train(recipe=SAME_STEP, data=shards, out=root / "shards", progress=False)
    from_folder = train(recipe=SAME_STEP, data=images, out=root / "folder", progress=False)
    return from_shards, from_folder


def test_shards_hold_the_split_train_makes(images, shards, runs):
    meta = json.loads((shards / MANIFEST).read_text())
    splits = pd.read_csv(runs[1].run_dir / "splits.csv")  # the folder run's own split
    assert (
        meta["splits"]
        == {s: int((splits["split"] == s).sum()) for s in ("train", "val", "test")}
        == {"train": 12, "val": 6, "test": 6}
    )
    assert meta["classes"] == ["cat", "dog", "eel"] and meta["seed"] == 0 and meta["shard_size"] == 4
    assert [s["name"] for s in meta["shards"]][:4] == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
        "val-000000.tar",
    ]
    for entry in meta["shards"]:
        with tarfile.open(shards / entry["name"]) as archive:
            names = archive.getnames()
        assert len(names) == 3 * entry["count"] and entry["count"] <= 4  # image, cls and json per sample
    samples = pd.read_csv(shards / "samples.csv")
    merged = samples.merge(splits, left_on="source", right_on="path")
    assert len(merged) == len(splits) and (merged["split_x"] == merged["split_y"]).all()
    skipped = pd.read_csv(shards / "skipped.csv")
    assert list(skipped["path"].map(lambda p: Path(p).name)) == ["truncated.jpg"] and meta["skipped"] == 1
    assert read_shard_set(shards).count("val") == 6  # every sha256 checks out


def test_training_from_shards_reaches_the_folder_metrics(runs):
    from_shards, from_folder = runs
    a, b = from_shards.history, from_folder.history
    assert list(a["val_accuracy"]) == list(b["val_accuracy"])
    assert (a["val_loss"] - b["val_loss"]).abs().max() < 1e-3 and (a["train_loss"] - b["train_loss"]).abs().max() < 1e-3
    assert from_shards.report.metrics["evaluated_on"]["split"] == "test"
    for key in ("accuracy", "macro_f1", "balanced_accuracy"):
        assert from_shards.report.metrics[key] == from_folder.report.metrics[key]
    assert pd.read_csv(from_shards.run_dir / "skipped.csv")["path"].str.endswith("truncated.jpg").all()


def test_eval_reads_the_test_shards(runs, shards, tmp_path):
    report = evaluate(run=runs[0].run_dir, data=shards, out=tmp_path / "report", progress=False)
    assert report.metrics["num_images"] == 6 and report.metrics["accuracy"] == runs[0].report.metrics["accuracy"]
    from typer.testing import CliRunner

    from finetune.cli import app

    quiet = CliRunner().invoke(app, ["eval", str(runs[0].run_dir), "--data", str(shards), "--out", str(tmp_path / "q"), "-q"])
    assert quiet.exit_code == 0 and "verify shards" not in quiet.output  # --quiet: no progress bars, shards' included
    assert "accuracy" in quiet.output


def test_resume_at_an_epoch_boundary_equals_an_uninterrupted_run(shards, tmp_path):
    def crash_after_epoch_1(state: FitState) -> None:
        if state.epoch == 1:
            raise _Crash()

    full = train(recipe=SHUFFLED, data=shards, out=tmp_path / "full", progress=False)
    with pytest.raises(_Crash):
        train(recipe=SHUFFLED, data=shards, out=tmp_path / "cut", progress=False, on_epoch_end=crash_after_epoch_1)
    resumed = train(out=tmp_path / "cut", resume=True, progress=False)
    a = torch.load(full.run_dir / "checkpoints" / "last.pt", weights_only=False)["state_dict"]
    b = torch.load(resumed.run_dir / "checkpoints" / "last.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(full.history.drop(columns="seconds"), resumed.history.drop(columns="seconds"))


def _stream(shards: Path) -> ShardStream:
    shard_set = read_shard_set(shards, verify=False)
    index = shard_index(shard_set)
    rows = index.split("train")
    return ShardStream(shard_set.paths("train"), [s.count for s in shard_set.of_split("train")], index.targets(rows), _pixels)


def _pixels(*, image):
    return {"image": torch.from_numpy(image).float().mean()}


def test_an_epoch_reads_every_image_once_in_the_loader_s_batches(shards):
    stream = _stream(shards)
    for workers, size, sizes in ((0, 5, [5, 5, 2]), (2, 4, [4, 4, 4])):  # 2 workers: 8 images in shards for one, 4 the other
        loader = make_loader(stream, batch_size=size, num_workers=workers, shuffle=True, seed=3)
        batches = list(loader)
        assert sorted(len(t) for _, t in batches) == sorted(sizes) and len(batches) == batches_per_epoch(12, size)
        assert sorted(float(x) for b, _ in batches for x in b) == sorted(float(x) for x, _ in _stream(shards))
    first = [x for x, _ in make_loader(stream, batch_size=5, num_workers=0, shuffle=True, seed=3)]
    again = [x for x, _ in make_loader(stream, batch_size=5, num_workers=0, shuffle=True, seed=3)]
    other = [x for x, _ in make_loader(stream, batch_size=5, num_workers=0, shuffle=True, seed=4)]
    assert all(torch.equal(x, y) for x, y in zip(first, again)) and not all(torch.equal(x, y) for x, y in zip(first, other))


def test_ranks_read_their_own_shards_and_as_many_batches(shards, monkeypatch):
    stream = _stream(shards)
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))  # what WebDataset's split_by_node reads under torchrun
        monkeypatch.setenv("WORLD_SIZE", "2")
        plan = EpochPlan(seed=1, batch_size=4, rank=rank, world=2, drop_lone_last=False)
        items = [float(x) for x, _ in stream.for_epoch(plan)]
        assert len(items) == sum(batch_sizes(12, plan)) == 6
        seen.append(items)
    assert not set(seen[0]) & set(seen[1])  # each rank reads its own shards
    # batches of 5, 5, 2 from workers holding 8 and 4 images: one reads an image twice, the other leaves one out
    assert worker_quotas([5, 5, 2], [8, 4]) == [7, 5]
    assert worker_quotas([4, 4, 4, 1], [8, 4, 1]) == [8, 4, 1]


def test_predict_refuses_a_shard_folder_in_one_line(runs, shards):
    with pytest.raises(DataError, match=r"is a shard folder; predict reads image files and folders: evaluate on it with"):
        predict(run=runs[0].run_dir, inputs=[shards], progress=False)


def test_broken_shard_folders_are_refused_in_one_line(shards, images, tmp_path):
    with pytest.raises(DataError, match=r"holds no shards.json: it is no shard folder"):
        read_shard_set(images)
    with pytest.raises(DataError, match=r"is a shard folder \(finetune shard\): train, lr-find and eval read it, this"):
        check(data=shards, progress=False)
    missing = shutil.copytree(shards, tmp_path / "missing")
    (missing / "val-000001.tar").unlink()
    with pytest.raises(DataError, match=r"not a usable shard folder: shard val-000001.tar listed in shards.json is missing"):
        train(recipe=SAME_STEP, data=missing, out=tmp_path / "run1", progress=False)
    changed = shutil.copytree(shards, tmp_path / "changed")
    data = bytearray((changed / "train-000000.tar").read_bytes())
    data[600] ^= 0xFF
    (changed / "train-000000.tar").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard train-000000.tar does not match its sha256 in shards.json"):
        train(recipe=SAME_STEP, data=changed, out=tmp_path / "run2", progress=False)


def test_shard_refuses_a_used_out_folder_and_bad_sizes(images, shards, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"--out .*used exists and is not empty; choose a new folder for the shards"):
        shard(data=images, out=tmp_path / "used", progress=False)
    with pytest.raises(UsageError, match=r"--shard-size 0: at least 1 image per shard"):
        shard(data=images, out=tmp_path / "new", shard_size=0, progress=False)
    with pytest.raises(UsageError, match=r"is already a shard folder; give the image folder"):
        shard(data=shards, out=tmp_path / "new", progress=False)
    several = tmp_path / "several.csv"
    pd.DataFrame({"path": ["a.png", "b.png"], "labels": ["cat|dog", "cat"]}).to_csv(several, index=False)
    with pytest.raises(UsageError, match=r"shard handles one label per image for now, and .*several.csv has a 'labels'"):
        shard(data=several, out=tmp_path / "new", progress=False)


def test_the_cli_writes_byte_identical_shards_again(images, shards, tmp_path):
    from typer.testing import CliRunner

    from finetune.cli import app

    recipe = tmp_path / "same_step.yaml"
    recipe.write_text(yaml.safe_dump(SAME_STEP))
    args = ["shard", str(images), "--out", str(tmp_path / "again"), "--shard-size", "4", "--recipe", str(recipe)]
    result = CliRunner().invoke(app, [*args, "--quiet"])
    assert result.exit_code == 0 and "7 shard(s) (train 12, val 6, test 6; 1 skipped)" in result.output
    first, again = (json.loads((folder / MANIFEST).read_text())["shards"] for folder in (shards, tmp_path / "again"))
    assert [s["sha256"] for s in again] == [s["sha256"] for s in first]  # the same images and seed: the same bytes


def test_the_stream_reads_shards_as_webdataset_does(shards):
    for url in read_shard_set(shards, verify=False).paths("train"):
        ours, theirs = list(tar_samples(url)), list(wds.tarfile_to_samples()(iter([{"url": url}])))
        assert [{k: v for k, v in s.items() if k != "__url__"} for s in ours] == [
            {k: v for k, v in s.items() if k not in ("__url__", "__local_path__")} for s in theirs
        ]


def test_two_processes_on_shards_match_one_on_the_folder(tmp_path):
    """Two train shards of 9 images: each torchrun process streams its own shard as one batch of 9, which averages to
    the single process's one batch of 18 from the folder (test_distributed's head-only recipe, no augmentation)."""
    from test_distributed import COLUMNS, RECIPE, _torchrun, _weights

    data = make_folder(tmp_path / "data")
    shard(data=data, out=tmp_path / "shards", shard_size=9, recipe=RECIPE, progress=False)
    single = train(recipe=RECIPE, data=data, out=tmp_path / "single", progress=False).run_dir
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    shard(data=data, out=tmp_path / "one", shard_size=18, recipe=RECIPE, progress=False)  # one train shard, two processes
    refused = _torchrun(tmp_path / "recipe.yaml", "--data", tmp_path / "one", "--out", tmp_path / "refused")
    assert refused.returncode != 0 and not (tmp_path / "refused").exists()  # refused before the run folder is written
    assert "error: 1 train shard(s) for 2 processes: every process needs one; write the shards again with a smaller " in (
        refused.stderr
    )
    done = _torchrun(tmp_path / "recipe.yaml", "--data", tmp_path / "shards", "--out", tmp_path / "ddp")
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _weights(single), _weights(tmp_path / "ddp")
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-4
    history, expected = pd.read_csv(tmp_path / "ddp" / "metrics.csv"), pd.read_csv(single / "metrics.csv")
    pd.testing.assert_frame_equal(history[COLUMNS], expected[COLUMNS], atol=1e-4)


def test_amp_auto_checks_its_first_batch_on_a_stream(shards, tmp_path, monkeypatch):
    """amp: auto on a CPU with native bf16 takes its first-batch check from the shard stream (read in order)."""
    import torch

    from finetune.inference import device as devices
    from finetune.training.precision import first_batch

    monkeypatch.setattr(devices, "native_bf16", lambda *args: "avx512_bf16")
    recipe = tiny_recipe(data={"batch_size": 32, "test_fraction": 0.25}, train={"epochs": 1, "lr": 0.01, "amp": "auto"})
    train(recipe=recipe, data=shards, out=tmp_path / "auto", progress=False)
    precision = torch.load(tmp_path / "auto" / "checkpoints" / "last.pt", weights_only=False)["precision"]
    assert precision["amp"] == "off" and "32 px images" in precision["reason"]  # tiny images stay fp32 on a CPU
    values, targets = first_batch(_stream(shards), 7)
    assert [float(x) for x in values] == [float(x) for x, _ in _stream(shards)][:7] and len(targets) == 7
