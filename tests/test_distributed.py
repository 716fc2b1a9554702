"""`torchrun --nproc_per_node=2 -m finetune train` on CPU (gloo) gives the single-process result, and resumes."""

import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from finetune import train
from finetune.cli import app
from finetune.config.loading import recipe_from_dict

from conftest import tiny_recipe

# 18 training images: one batch of 18 in one process = one batch of 9 on each of 2 ranks (gradients averaged).
# No augmentation and no BatchNorm in train mode (each rank would normalise with its own batch statistics),
# so the two runs see the same numbers up to float rounding.
RECIPE = tiny_recipe(
    data={"batch_size": 18},
    transforms={"train": "none"},
    train={
        "epochs": 2,
        "lr": 0.05,
        "optimizer": "sgd",
        "freeze": ["stem", "layer1", "layer2", "layer3", "layer4"],
        "feature_cache": "off",
    },
)
COLUMNS = ["epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1"]


def _torchrun(*args):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "finetune",
        "train",
        *map(str, args),
        "--quiet",
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _weights(run):
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["state_dict"]


class _Interrupt(Exception):
    pass


def _stop_after_first_epoch(state):
    if state.epoch == 1:
        raise _Interrupt


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    from conftest import make_folder

    root = tmp_path_factory.mktemp("ddp")
    data = make_folder(root / "data")
    (root / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    result = train(recipe=recipe_from_dict(RECIPE), data=data, out=root / "single", progress=False)
    return root, data, result.run_dir


def _same_as_single(run, single_run):
    a, b = _weights(single_run), _weights(run)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-4
    history, expected = pd.read_csv(run / "metrics.csv"), pd.read_csv(single_run / "metrics.csv")
    assert list(history["epoch"]) == [1, 2]  # rank 0 alone writes: one row per epoch
    pd.testing.assert_frame_equal(history[COLUMNS], expected[COLUMNS], atol=1e-4)


def test_two_processes_match_one(single):
    root, data, single_run = single
    done = _torchrun(root / "recipe.yaml", "--data", data, "--out", root / "ddp")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("accuracy") == 1  # one summary line, from rank 0
    _same_as_single(root / "ddp", single_run)
    assert (root / "ddp" / "report" / "report.html").exists()


def test_torchrun_resumes_a_run(single):
    root, data, single_run = single
    run = root / "interrupted"
    with pytest.raises(_Interrupt):
        train(recipe=recipe_from_dict(RECIPE), data=data, out=run, progress=False, on_epoch_end=_stop_after_first_epoch)
    done = _torchrun("--resume", run)
    assert done.returncode == 0, done.stderr[-3000:]
    _same_as_single(run, single_run)


def test_torchrun_needs_an_out_folder():
    done = CliRunner().invoke(app, ["train", "recipes/quickstart.yaml"], env={"WORLD_SIZE": "2", "RANK": "0"})
    assert (
        done.exit_code == 2
        and "error: under torchrun every process must write to the same run folder: pass --out RUN" in done.output
    )


def test_unsupported_torchrun_settings_say_so(monkeypatch, image_folder):
    from finetune.data.loader import ImageDataset, make_loader
    from finetune.errors import DataError, RecipeError
    from finetune.training.distributed import setup

    dataset = ImageDataset([str(p) for p in sorted(image_folder.rglob("*.*"))][:4], [0, 1, 0, 1], None)
    with pytest.raises(DataError, match="data.sampler: weighted is not supported under torchrun; use sampler: shuffle"):
        make_loader(dataset, batch_size=2, num_workers=0, shuffle=True, seed=0, balanced=True, rank=0, world=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RecipeError, match="train.device is cuda but no GPU is visible; use train.device: auto"):
        setup("cuda")
