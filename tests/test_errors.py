"""The remaining user-facing messages, one test each (the others live beside their module's tests)."""

import pytest
import torch

from finetune import evaluate, predict, train
from finetune.config.loading import recipe_from_dict
from finetune.config.schema import DataConfig
from finetune.data.split import load_dataset_index
from finetune.errors import CheckpointError, DataError, RecipeError
from finetune.inference.checkpoint import load_checkpoint

from conftest import make_folder, tiny_recipe

RECIPE_ERRORS = [
    (
        {"train": {"phases": [{"epochs": 1, "lr": 0.1, "train": []}]}},
        r"phases\.0\.trainable: at least one stage must be trainable",
    ),
    ({"transforms": {"train": [{"HorizontalFlip": {}, "VerticalFlip": {}}]}}, r"each transform is a one-key mapping like"),
    ({"transforms": {"std": [0.2, 0.0, 0.2]}}, r"recipe\.transforms\.std: every std value must be above 0"),
    ({"loss": {"class_weights": {"cat": -1.0}}}, r"recipe\.loss\.class_weights: class weights must be above 0"),
    ({"data": {"group_pattern": "(unclosed"}}, r"recipe\.data\.group_pattern: not a valid regular expression"),
    ({"data": {"bad_images": "ignore"}}, r"recipe\.data\.bad_images: Input should be 'skip' or 'fail'"),
    ({"model": {"small_input": "maybe"}}, r"recipe\.model\.small_input: Input should be a valid boolean"),
]


@pytest.mark.parametrize(("section", "pattern"), RECIPE_ERRORS, ids=[p for _, p in RECIPE_ERRORS])
def test_more_bad_recipes(section, pattern):
    with pytest.raises(RecipeError, match=pattern):
        recipe_from_dict(tiny_recipe(**section))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    data = make_folder(root / "data", per_class=6)
    return train(recipe=recipe_from_dict(tiny_recipe()), data=data, out=root / "run", progress=False).run_dir


def test_eval_on_unknown_classes(run, tmp_path):
    make_folder(tmp_path / "other", per_class=2, classes=("cat", "owl"))
    with pytest.raises(DataError, match=r"class folder\(s\) \['owl'\] are not classes of this model \['cat', 'dog', 'eel'\]"):
        evaluate(run=run, data=tmp_path / "other", progress=False)


def test_predict_inputs(run, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images found in .*empty"):
        predict(run=run, inputs=[tmp_path / "empty"], progress=False)
    (tmp_path / "bad.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"none of the 1 input image\(s\) could be decoded, e.g. .*bad.jpg"):
        predict(run=run, inputs=[tmp_path / "bad.jpg"], progress=False)


def test_newer_checkpoint_format(run, tmp_path):
    payload = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=r"written by a newer finetune \(format 99\); upgrade finetune"):
        load_checkpoint(tmp_path / "future.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=r"junk.pt is not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_manifest_and_group_errors(tmp_path):
    with pytest.raises(DataError, match=r"manifest .*none.csv does not exist"):
        load_dataset_index(DataConfig(path=tmp_path / "none.csv"), seed=0)
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match=r"manifest .*bin.csv is not a readable CSV"):
        load_dataset_index(DataConfig(path=tmp_path / "bin.csv"), seed=0)
    make_folder(tmp_path / "g", per_class=4)
    with pytest.raises(DataError, match=r"data.group_pattern gives 1 group\(s\); a val fraction of 0.25 needs at least 4"):
        load_dataset_index(DataConfig(path=tmp_path / "g", val_fraction=0.25, group_pattern=r"img"), seed=0)


def test_a_mistyped_command_line_is_one_line():
    """click's usage errors (missing option, unknown option or command) are one line with exit code 2, like ours."""
    import subprocess
    import sys

    for argv, expected in (
        (["eval", "runs/x"], "error: Missing option '--data'. See 'finetune eval --help'."),
        (["train", "--gpus", "3"], "error: No such option: --gpus. See 'finetune train --help'."),  # --epochs is one now
        (["nonsense"], "error: No such command 'nonsense'. See 'finetune --help'."),
    ):
        done = subprocess.run([sys.executable, "-m", "finetune", *argv], capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.strip() == expected and done.stdout == ""


def test_set_values_are_named_as_the_source_of_their_errors():
    with pytest.raises(RecipeError) as caught:
        recipe_from_dict(tiny_recipe(), overrides=["train.epoch=3", "train.lr=-1"])
    message = str(caught.value)
    assert "recipe.train.epoch (from --set train.epoch): unknown key (did you mean 'epochs'?)" in message
    assert "recipe.train.lr (from --set train.lr): Input should be greater than 0" in message


def test_an_empty_weights_file_and_random_frozen_stages(tmp_path, image_folder, caplog):
    empty = tmp_path / "weights.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(Exception, match=r"weights file .*weights.safetensors is empty \(0 bytes\): an interrupted download"):
        train(recipe=tiny_recipe(model={"pretrained": str(empty)}), data=image_folder, out=tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    from finetune.runs.prepare import warn_random_frozen_stages

    warn_random_frozen_stages(recipe_from_dict(tiny_recipe(train={"trainable": ["layer4", "head"]})))
    assert "model.pretrained is false, so stem, layer1, layer2, layer3 never train and keep their random" in caplog.text
    caplog.clear()
    warn_random_frozen_stages(recipe_from_dict(tiny_recipe()))  # every stage trains: nothing to say
    assert "never train" not in caplog.text


class _Pickled:  # any class: a safe load refuses to build it
    pass


def test_a_refused_pickle_is_one_plain_line_without_torchs_unsafe_advice(run, tmp_path):
    from finetune.errors import WeightsError
    from finetune.models.weights import read_state_dict

    payload = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    payload["extra"] = _Pickled()
    torch.save(payload, tmp_path / "pickled.pt")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": _Pickled()}, tmp_path / "weights.pt")
    for error, load, pattern in [
        (CheckpointError, lambda: load_checkpoint(tmp_path / "pickled.pt"), r"pickled.pt is not a readable checkpoint: it holds"),
        (WeightsError, lambda: read_state_dict(tmp_path / "weights.pt"), r"weights.pt cannot be loaded safely .*: it holds"),
    ]:
        with pytest.raises(error, match=pattern) as caught:
            load()
        message = str(caught.value)
        assert "a pickled Python object (test_errors._Pickled), which a safe load refuses to run" in message
        assert "weights_only=False" not in message and "likely succeed" not in message
        assert "\n" not in message and "\x1b" not in message


def test_a_fifo_or_device_given_to_predict_is_refused_not_read(run, tmp_path):
    import os

    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    for item in (fifo, "/dev/zero"):
        with pytest.raises(DataError, match=r"is not a regular file or folder \(a FIFO, socket or device\?\)"):
            predict(run=run, inputs=[item], progress=False)


def test_ctrl_c_talks_about_resuming_only_where_a_command_can_resume(run, monkeypatch):
    from typer.testing import CliRunner

    from finetune import api
    from finetune.cli import app

    def interrupted(**_):
        raise KeyboardInterrupt

    for name in ("export", "predict", "train"):
        monkeypatch.setattr(api, name, interrupted)
    for args, resume in [(["export", str(run)], False), (["predict", str(run), str(run)], False), (["train", "x.yaml"], True)]:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 130, result.output
        assert ("--resume" in result.output) is resume, result.output


def test_train_with_zero_folds_is_refused_like_compare():
    from typer.testing import CliRunner

    from finetune.cli import app

    result = CliRunner().invoke(app, ["train", "last_stage", "--data", ".", "--folds", "0"])
    assert result.exit_code == 2
    assert "--folds 0: cross-validation needs at least 2 folds (5 is usual)" in result.output
