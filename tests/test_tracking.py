"""TensorBoard (read back with tensorboard's own event reader) and MLflow beside metrics.csv."""

import importlib.util
import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from finetune import train
from finetune.errors import RecipeError, UsageError
from finetune.training.tracking import Trackers, flat_params

from conftest import tiny_recipe


class _Stop(Exception):
    pass


def _stop(state):
    if state.epoch == 1:
        raise _Stop


def _events(folder):
    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def test_tensorboard_gets_every_epoch_the_report_figures_and_the_recipe(tmp_path, image_folder):
    recipe = tiny_recipe(train={"epochs": 2, "ema": {"decay": 0.9}}, log=["csv", "tensorboard"])
    with pytest.raises(_Stop):
        train(recipe=recipe, data=image_folder, out=tmp_path / "run", progress=False, on_epoch_end=_stop)
    result = train(out=tmp_path / "run", resume=True, progress=False)
    events = _events(tmp_path / "run" / "tensorboard")
    tags = events.Tags()
    expected = {
        "train/loss",
        "train/accuracy",
        "val/loss",
        "val/accuracy",
        "val/macro_f1",
        "val_ema/accuracy",
        "lr/head",
        "lr/stem",
    }
    assert expected <= set(tags["scalars"])
    accuracy = events.Scalars("val/accuracy")
    assert [e.step for e in accuracy] == [1, 2]  # the resumed run continued the same curve, no epoch twice
    assert [round(e.value, 5) for e in accuracy] == [round(v, 5) for v in result.history["val_accuracy"]]
    assert {"report/confusion_matrix", "report/augmentation_preview", "report/training_curves"} <= set(tags["images"])
    hparams = _events(tmp_path / "run" / "tensorboard" / "hparams")
    content = hparams.PluginTagToContent("hparams")  # the recipe as hyperparameters, the report's scores as metrics
    assert b"train.ema.decay" in content["_hparams_/session_start_info"]
    final = hparams.Scalars("hparam/val_accuracy")
    assert final[0].value == pytest.approx(result.report.metrics["accuracy"])


def test_missing_tracker_packages_fail_before_any_work(tmp_path, image_folder, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("mlflow", "tensorboard") else real(name, *a)
    )
    for sink, install in (("tensorboard", "finetune\\[tensorboard\\]"), ("mlflow", "mlflow")):
        with pytest.raises(RecipeError, match=rf"log: {sink} needs the {sink} package: pip install '{install}', or remove it"):
            train(recipe=tiny_recipe(log=[sink]), data=image_folder, out=tmp_path / sink, progress=False)
        assert not (tmp_path / sink).exists()


def test_mlflow_gets_params_metrics_and_figures_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("mlflow")
    fake.start_run = lambda run_id=None, run_name=None: (
        calls.append(("start", run_id, run_name)) or types.SimpleNamespace(info=types.SimpleNamespace(run_id="abc123"))
    )
    fake.log_metrics = lambda metrics, step=None: calls.append(("metrics", step, dict(metrics)))
    fake.log_params = lambda params: calls.append(("params", dict(params)))
    fake.log_image = lambda image, name: calls.append(("image", name, image.shape))
    fake.end_run = lambda: calls.append(("end",))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    trackers = Trackers(["csv", "mlflow"], tmp_path, first_epoch=1)
    row = {
        "epoch": 1,
        "phase": 1,
        "phase_epoch": 1,
        "lr": 0.1,
        "train_loss": 0.5,
        "train_accuracy": float("nan"),
        "val_accuracy": 0.75,
        "seconds": 2.0,
    }
    trackers.epoch(1, row, {"head": 0.1})
    trackers.finish({"train": {"lr": 0.1, "trainable": ["head"]}}, {"test_accuracy": 0.7})
    trackers.close()
    Trackers(["mlflow"], tmp_path, first_epoch=2).close()
    assert calls[0] == ("start", None, tmp_path.name) and calls[-2] == ("start", "abc123", None)
    metrics = calls[1]
    assert metrics[1] == 1 and metrics[2]["val/accuracy"] == 0.75 and "train/accuracy" not in metrics[2]  # NaN is left out
    assert ("params", {"train.lr": 0.1, "train.trainable": '["head"]'}) in calls


def test_flat_params_are_scalars():
    assert flat_params({"a": {"b": None, "c": [1, 2]}, "d": 0.5}) == {"a.b": "null", "a.c": "[1, 2]", "d": 0.5}


def test_a_tracker_that_fails_is_one_line_at_start_and_a_warning_mid_run(tmp_path, monkeypatch, caplog):
    """A store MLflow refuses (e.g. its file store in maintenance mode) is a one-line error naming the URI; a
    tracker that breaks during the run is dropped with a warning and the run goes on."""
    fake = types.ModuleType("mlflow")

    def refuse(run_id=None, run_name=None):
        raise RuntimeError("The filesystem tracking backend is in maintenance mode. Please migrate.\nTraceback noise")

    fake.start_run = refuse
    fake.get_tracking_uri = lambda: "file:///somewhere/mlruns"
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    with pytest.raises(UsageError) as refused:
        Trackers(["mlflow"], tmp_path)
    message = str(refused.value)
    assert message.startswith("log: mlflow could not start a run at tracking URI file:///somewhere/mlruns: The filesystem")
    assert "\n" not in message and message.endswith("fix MLFLOW_TRACKING_URI (or the server), or remove mlflow from log")

    fake.start_run = lambda run_id=None, run_name=None: types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1"))
    fake.log_metrics = lambda metrics, step=None: (_ for _ in ()).throw(ConnectionError("server gone"))
    ended = []
    fake.end_run = lambda: ended.append("end")
    trackers = Trackers(["mlflow"], tmp_path)
    trackers.epoch(1, {"epoch": 1, "phase": 1, "val_accuracy": 0.5, "seconds": 1.0}, {"head": 0.1})
    assert trackers.sinks == [] and "MlflowSink stopped logging (ConnectionError: server gone)" in caplog.text
    assert ended == ["end"]  # its MLflow run is ended, so the next run in this process can start one
    trackers.close()
