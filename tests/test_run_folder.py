"""The run folder: one process at a time, resume trusts the checkpoint, destinations are checked before work, and a
failed write keeps what was there."""

import errno
import os
import stat

import pandas as pd
import pytest
import torch
import yaml

from finetune import check, predict, train
from finetune.config.loading import recipe_from_dict
from finetune.errors import RunDirError
from finetune.inference import checkpoint as checkpoint_module
from finetune.run_dir import RunDir, locked

from conftest import tiny_recipe


def _recipe(**sections):
    return recipe_from_dict(tiny_recipe(**sections))


def test_a_run_folder_in_use_is_refused_and_a_stale_lock_is_taken_over(tmp_path, image_folder):
    run = RunDir(tmp_path / "run")
    with locked(run), pytest.raises(RunDirError, match=rf"run is in use by another finetune process \(PID {os.getpid()}\); wait"):
        train(recipe=_recipe(), data=image_folder, out=run.root, progress=False)
    assert [p.name for p in run.root.iterdir()] == [".lock"]  # nothing of the refused run was written
    run.lock.write_text("999999\n")  # a lock file left by a process that died (kill -9): no OS lock is held on it
    result = train(recipe=_recipe(), data=image_folder, out=run.root, progress=False)
    assert result.best_checkpoint.exists()


def test_resume_trusts_the_checkpoint_not_an_edited_recipe_yaml(tmp_path, image_folder):
    run = RunDir(tmp_path / "run")
    train(recipe=_recipe(train={"epochs": 2}), data=image_folder, out=run.root, progress=False)
    text = run.recipe.read_text()
    run.recipe.write_text(text.replace("lr: 0.001", "lr: 0.05"))
    with pytest.raises(
        RunDirError, match=r"recipe.yaml was edited after the last checkpoint \(train.lr: 0.001 -> 0.05\); put it back"
    ):
        train(out=run.root, resume=True, progress=False)
    run.recipe.write_text(text)
    with pytest.raises(RunDirError, match=r"--resume .* --data .*other: the run trains on .*; resume without --data"):
        train(out=run.root, resume=True, data=tmp_path / "other", progress=False)
    assert len(train(out=run.root, resume=True, data=image_folder, progress=False).history) == 2  # its own data is fine


def test_resume_refuses_a_recipe_edited_before_the_first_checkpoint(tmp_path, image_folder):
    import shutil

    run = RunDir(tmp_path / "run")
    train(recipe=_recipe(), data=image_folder, out=run.root, progress=False)
    shutil.rmtree(run.root / "checkpoints")  # killed inside the first epoch: no last.pt holds the recipe
    text = run.recipe.read_text()
    run.recipe.write_text(text.replace("lr: 0.001", "lr: 0.05"))
    with pytest.raises(
        RunDirError, match=r"recipe.yaml was edited after the run started \(train.lr: 0.001 -> 0.05\); put it back"
    ):
        train(out=run.root, resume=True, progress=False)
    run.recipe.write_text(text.replace("num_workers: 0", "num_workers: 1"))  # a setting that changes no result is fine
    assert len(train(out=run.root, resume=True, progress=False).history) == 1


def test_destinations_are_checked_before_any_work(tmp_path, image_folder):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunDirError, match=r"--out .*afile is a file, not a folder; choose a folder path"):
        train(recipe=_recipe(), data=image_folder, out=tmp_path / "afile", progress=False)
    with pytest.raises(RunDirError, match=r"--out .*afile/run: cannot write in .*afile"):
        train(recipe=_recipe(), data=image_folder, out=tmp_path / "afile" / "run", progress=False)
    (tmp_path / "preds").mkdir()
    with pytest.raises(RunDirError, match=r"--out .*preds is a folder; give a file name such as .*predictions.csv"):
        predict(run=tmp_path / "no_run_needed_yet", inputs=[image_folder], out=tmp_path / "preds", progress=False)
    with pytest.raises(RunDirError, match=r"--json .*afile/check.json: its folder .*afile is a file"):
        check(data=image_folder, json_out=tmp_path / "afile" / "check.json", progress=False)


def test_read_only_place_is_refused_before_work(tmp_path, image_folder, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path / "ro") else real(path, mode))
    (tmp_path / "ro").mkdir()
    with pytest.raises(RunDirError, match=r"--out .*ro/run: cannot write in .*ro \(read-only or no permission\)"):
        train(recipe=_recipe(), data=image_folder, out=tmp_path / "ro" / "run", progress=False)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint_and_resumes(tmp_path, image_folder, monkeypatch):
    recipe = _recipe(train={"epochs": 2})
    reference = train(recipe=recipe, data=image_folder, out=tmp_path / "ref", progress=False)
    real_save = checkpoint_module.torch.save
    calls = {"n": 0}

    def full_disk(obj, handle):
        calls["n"] += 1
        if obj.get("epoch") == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, handle)

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    with pytest.raises(
        RunDirError,
        match=r"cannot write .*/checkpoints/(best|last).pt: the disk is full; the previous (best|last).pt is intact; .*--resume",
    ):
        train(recipe=recipe, data=image_folder, out=tmp_path / "run", progress=False)
    monkeypatch.undo()
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert not list((tmp_path / "run" / "checkpoints").glob(".*.tmp"))  # no half-written file left
    resumed = train(out=tmp_path / "run", resume=True, progress=False)
    a = torch.load(reference.best_checkpoint, weights_only=True)["state_dict"]
    b = torch.load(resumed.best_checkpoint, weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_files_get_the_users_umask(tmp_path, image_folder):
    old = os.umask(0o027)
    try:
        run = RunDir(train(recipe=_recipe(), data=image_folder, out=tmp_path / "run", progress=False).run_dir)
    finally:
        os.umask(old)
    for path in (run.recipe, run.best, run.last, run.metrics, run.splits, run.report / "report.html"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path


def test_class_names_that_look_like_values_stay_strings(tmp_path):
    from finetune.reporting.diff import diff_reports

    from conftest import make_folder

    names = ("NA", "null", "None", "1e3")
    data = make_folder(tmp_path / "data", per_class=8, classes=names)
    first = train(recipe=_recipe(), data=data, out=tmp_path / "a", progress=False)
    assert sorted(first.report.per_class["class"]) == sorted(names)
    second = train(recipe=_recipe(seed=1), data=data, out=tmp_path / "b", progress=False)
    diff = diff_reports(run_a=first.run_dir, run_b=second.run_dir, out=tmp_path / "diff")
    assert sorted(diff.per_class["class"]) == sorted(names)
    splits = pd.read_csv(tmp_path / "a" / "splits.csv", dtype=str, keep_default_na=False)
    assert set(splits["label"]) == set(names)
    assert yaml.safe_load((tmp_path / "a" / "recipe.yaml").read_text())["data"]["path"] == str(data)
