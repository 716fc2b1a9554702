"""Runs killed with SIGKILL at several points and resumed end with the same weights as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import yaml

from conftest import tiny_recipe

# Head dropout and augmentation draw random numbers inside every step: resume must reproduce them too.
RECIPE = tiny_recipe(
    model={"head": {"dropout": 0.2}},
    train={
        "phases": [{"epochs": 2, "trainable": ["head"], "lr": 0.01}, {"epochs": 2, "trainable": ["layer4", "head"], "lr": 0.003}]
    },
)


def _cli(*args):
    return [sys.executable, "-m", "finetune", *map(str, args), "--quiet"]


def _rows(run):
    path = run / "metrics.csv"
    return len(pd.read_csv(path)) if path.exists() and path.stat().st_size else 0


def _kill_when(run, process, rows, delay):
    deadline = time.time() + 240
    while _rows(run) < rows and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def _weights(run):
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import sys as _sys
    from pathlib import Path

    _sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_folder

    root = tmp_path_factory.mktemp("faults")
    data = make_folder(root / "data", per_class=8)
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    reference = root / "reference"
    done = subprocess.run(_cli("train", recipe, "--data", data, "--out", reference), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return root, data, recipe, reference


@pytest.mark.parametrize(("rows", "delay"), [(1, 0.0), (3, 0.4)], ids=["after-epoch-1", "inside-phase-2"])
def test_sigkill_then_resume_matches_uninterrupted(setup, rows, delay):
    root, data, recipe, reference = setup
    run = root / f"killed-{rows}"
    process = subprocess.Popen(
        _cli("train", recipe, "--data", data, "--out", run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _kill_when(run, process, rows, delay)
    assert process.returncode == -signal.SIGKILL
    resumed = subprocess.run(_cli("train", "--resume", run), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(reference), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = pd.read_csv(run / "metrics.csv")
    assert list(history["epoch"]) == [1, 2, 3, 4]
    expected = pd.read_csv(reference / "metrics.csv")
    pd.testing.assert_frame_equal(history.drop(columns="seconds"), expected.drop(columns="seconds"))
    assert (run / "report" / "metrics.json").read_text() == (reference / "report" / "metrics.json").read_text()


def test_kill_inside_the_first_epoch_resumes_from_the_start(setup):
    root, data, recipe, reference = setup
    run = root / "killed-early"
    process = subprocess.Popen(
        _cli("train", recipe, "--data", data, "--out", run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (run / "recipe.yaml").exists() and time.time() < deadline:  # killed inside epoch 1
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run / "checkpoints" / "last.pt").exists()
    resumed = subprocess.run(_cli("train", "--resume", run), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(reference), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
