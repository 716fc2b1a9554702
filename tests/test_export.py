"""`finetune export`: parity with PyTorch on real images for timm and tv: models, odd heads and small inputs; the
metadata round trip; the torch-free predictor of README; every refusal."""

import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from finetune import export, predict, train
from finetune.cli import app
from finetune.config.loading import recipe_from_dict
from finetune.deploy import onnx_format, torchscript_format
from finetune.deploy.metadata import FORMAT
from finetune.errors import CheckpointError, ParityError, RunDirError, UsageError

from conftest import REPO, make_folder, tiny_recipe

CASES = {
    "timm-hidden-dropout": {"model": {"name": "resnet18", "head": {"hidden": 16, "dropout": 0.3}}},
    "tv-small-input": {"model": {"name": "tv:resnet18", "small_input": True}},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("export") / "data", per_class=8)


@pytest.fixture(scope="module", params=list(CASES))
def run(request, data, tmp_path_factory):
    recipe = recipe_from_dict(tiny_recipe(data={"test_fraction": 0.25}, **CASES[request.param]))
    return train(recipe=recipe, data=data, out=tmp_path_factory.mktemp(request.param) / "run", progress=False).run_dir


def test_both_formats_agree_with_pytorch_on_the_test_images(run):
    result = export(run=run, formats="both", progress=False)
    parity = json.loads((result.folder / "parity.json").read_text())
    assert parity["split"] == "test"
    for kind in ("onnx", "torchscript"):
        figures = parity[kind]
        assert figures["images"] == 6 and figures["top1_agreement"] == 1.0 and figures["max_abs_prob_diff"] <= 1e-4
        assert figures["accuracy_delta"] == 0.0
    payload = __import__("torch").load(run / "checkpoints" / "best.pt", weights_only=True)
    meta = onnx_format.read_metadata(result.files["onnx"])
    assert (
        meta["format"] == FORMAT and meta["temperature"] == pytest.approx(payload["temperature"]) and meta["temperature"] != 1.0
    )
    assert meta["class_names"] == payload["class_names"] and meta["input"]["height"] == 32
    assert meta["parity"]["top1_agreement"] == 1.0 and meta["recipe_sha256"] and meta["versions"]["torch"]
    assert torchscript_format.read_metadata(result.files["torchscript"])["class_names"] == meta["class_names"]


def test_predict_with_the_exported_files_gives_the_runs_csv(run, data):
    result = export(run=run, formats="both", out=run / "shipped", progress=False)
    inputs = [data / "cat", data / "eel"]
    reference = predict(run=run, inputs=inputs, progress=False)
    for file in result.files.values():
        table = predict(run=file, inputs=inputs, progress=False)
        assert list(table.columns) == list(reference.columns) and list(table["path"]) == list(reference["path"])
        assert (table["predicted_label"] == reference["predicted_label"]).all()
        assert np.allclose(table["confidence"], reference["confidence"], atol=1e-4)


def _readme_predictor():
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- torch-free predictor: tests/test_export.py runs this exact block -->", 1)[1]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)


def test_the_readme_predictor_runs_without_torch_and_matches(run, data, tmp_path):
    model = export(run=run, out=tmp_path / "onnx", progress=False).files["onnx"]
    # RGB, CMYK and EXIF-rotated JPEGs, a GIF named .jpg, grey, palette and alpha PNGs (16-bit PNGs need scaling the
    # README's reader leaves out)
    images = sorted(str(p) for p in (data / "dog").glob("*") if p.name != "img_04.png")
    (tmp_path / "predict_onnx.py").write_text(_readme_predictor())
    guard = "import sys; sys.modules['torch'] = None; sys.modules['finetune'] = None\n"  # importing either now fails
    (tmp_path / "run.py").write_text(guard + "exec(compile(open(sys.argv.pop(1)).read(), 'predict_onnx.py', 'exec'))\n")
    done = subprocess.run(
        [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "predict_onnx.py"), str(model), *images],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    printed = pd.DataFrame([line.rsplit(",", 2) for line in done.stdout.strip().splitlines()], columns=["path", "label", "p"])
    reference = predict(run=run, inputs=images, progress=False)
    assert list(printed["label"]) == list(reference["predicted_label"])
    assert np.allclose(printed["p"].astype(float), reference["confidence"], atol=1e-4)


def test_int8_reports_its_accuracy_change_and_respects_the_budget(run, monkeypatch, tmp_path):
    result = export(run=run, out=tmp_path / "q", quantize="int8", progress=False)
    figures = json.loads((result.folder / "parity.json").read_text())["onnx-int8"]
    assert {"accuracy_delta", "top1_agreement", "max_abs_prob_diff"} <= set(figures) and result.files["onnx-int8"].exists()
    from finetune.deploy.onnx_format import OnnxRunner

    images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    _, probs = OnnxRunner(result.files["onnx-int8"])(images)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)  # the softmax stays float in the int8 graph
    from finetune.runs import export as export_module

    real = export_module.measure
    calls = {"n": 0}

    def int8_loses_a_lot(reference, exported, batches, targets, classes):
        found = real(reference, exported, batches, targets, classes)
        calls["n"] += 1
        return (
            found if calls["n"] == 1 else type(found)(**{**found.__dict__, "accuracy_exported": found.accuracy_reference - 0.5})
        )

    monkeypatch.setattr(export_module, "measure", int8_loses_a_lot)
    with pytest.raises(
        ParityError,
        match=r"int8 model not written: accuracy fell 50.0 points \(\d+ of \d+ test images\) against the allowed 1.0; "
        r"to keep it, run the export again with --max-accuracy-drop 0.51 --overwrite",
    ):
        export(run=run, out=tmp_path / "q2", quantize="int8", progress=False)
    assert not (tmp_path / "q2" / "model.int8.onnx").exists() and (tmp_path / "q2" / "parity.json").exists()


def test_export_refusals(run, data, tmp_path):
    with pytest.raises(UsageError, match=r"--format tflite: choose onnx, torchscript or both"):
        export(run=run, formats="tflite")
    export(run=run, out=tmp_path / "e", progress=False)
    with pytest.raises(RunDirError, match=r"e exists and is not empty; pass --overwrite"):
        export(run=run, out=tmp_path / "e", progress=False)
    assert export(run=run, out=tmp_path / "e", overwrite=True, progress=False).files["onnx"].exists()
    with pytest.raises(RunDirError, match=r"is no finetune run folder"):
        export(run=tmp_path)
    (tmp_path / "half" / "checkpoints").mkdir(parents=True)
    (tmp_path / "half" / "recipe.yaml").write_text((run / "recipe.yaml").read_text())
    with pytest.raises(CheckpointError, match=r"half has no checkpoints/best.pt: it never finished an epoch"):
        export(run=tmp_path / "half")


def test_an_unfinished_run_and_a_foreign_onnx_file_are_refused(data, tmp_path):
    class Stop(Exception):
        pass

    def stop(state):
        raise Stop

    with pytest.raises(Stop):
        train(
            recipe=recipe_from_dict(tiny_recipe(train={"epochs": 3})),
            data=data,
            out=tmp_path / "cut",
            progress=False,
            on_epoch_end=stop,
        )
    done = CliRunner().invoke(app, ["export", str(tmp_path / "cut")])
    assert done.exit_code == 2 and "has not finished training (epoch 1); finish it with 'finetune train --resume" in done.stderr
    import timm
    import torch

    torch.onnx.export(
        timm.create_model("resnet18", num_classes=2).eval(),
        (torch.zeros(1, 3, 32, 32),),
        str(tmp_path / "plain.onnx"),
        dynamo=False,
    )
    done = CliRunner().invoke(app, ["predict", str(tmp_path / "plain.onnx"), str(data / "cat")])
    assert done.exit_code == 2 and "plain.onnx carries no finetune metadata" in done.stderr
