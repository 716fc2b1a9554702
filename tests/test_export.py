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
from finetune.deploy.metadata import FORMAT, seal
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

    def int8_loses_a_lot(reference, exported, batches, targets, classes, task=None):
        found = real(reference, exported, batches, targets, classes, task)
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


def test_onnx_comes_from_the_maintained_exporter_with_a_dynamic_batch_and_older_opsets_stay_legacy(tmp_path, caplog):
    import onnx
    import timm
    import torch

    from finetune.data.transforms import ImageConfig
    from finetune.deploy.package import PackagedClassifier

    image = ImageConfig(input_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    package = PackagedClassifier(timm.create_model("resnet18", num_classes=5).eval(), image, temperature=1.5)
    onnx_format.export_onnx(package, tmp_path / "new.onnx", size=32)
    graph = onnx.load(str(tmp_path / "new.onnx"))
    assert [o.version for o in graph.opset_import if o.domain == ""] == [onnx_format.DEFAULT_OPSET] == [18]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.onnx"]  # no external weights file beside it
    assert "dynamo=True" in onnx_format.exporter_name(18) and "TorchScript-based" in onnx_format.exporter_name(17)
    images = np.random.default_rng(0).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    with torch.inference_mode():
        reference = package(torch.from_numpy(images))[1].numpy()
    for batch in (images[:1], images):  # exported with batch 2; any batch size runs
        np.testing.assert_allclose(onnx_format.OnnxRunner(tmp_path / "new.onnx")(batch)[1], reference[: len(batch)], atol=1e-5)
    with caplog.at_level("WARNING", logger="finetune.deploy.onnx_format"):
        onnx_format.export_onnx(package, tmp_path / "old.onnx", size=32, opset=17)
    assert "opset 17 is written by torch.onnx's TorchScript-based exporter" in caplog.text
    assert "HINT: pass --opset 18" in caplog.text
    assert [o.version for o in onnx.load(str(tmp_path / "old.onnx")).opset_import if o.domain == ""] == [17]
    np.testing.assert_allclose(onnx_format.OnnxRunner(tmp_path / "old.onnx")(images)[1], reference, atol=1e-5)


def test_missing_onnx_packages_are_named_with_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(UsageError, match=r"ONNX export needs onnx, onnxruntime and onnxscript: pip install '\.\[export\]'"):
        onnx_format.require_onnx()
    onnx_format.require_onnx(exporting=False)  # running an .onnx file needs no onnxscript


def test_an_exported_program_keeps_the_contract_and_predict_reads_it(run, data, tmp_path):
    import torch

    from finetune.deploy.metadata import contract
    from finetune.deploy.package import PackagedClassifier, image_batches
    from finetune.deploy.parity import measure
    from finetune.deploy.runtime import is_exported, load_exported
    from finetune.inference.checkpoint import load_trained

    trained = load_trained(run / "checkpoints" / "best.pt")
    package = PackagedClassifier(trained.bundle.model, trained.image, trained.temperature, trained.task)
    file = tmp_path / "model.pt2"
    meta = contract(trained, exporter="torch.export", weights="float32")
    torchscript_format.export_program(package, file, size=trained.image.input_size, meta=meta)
    torchscript_format.write_metadata(file, {**meta, "parity": {"top1_agreement": 1.0}})
    assert is_exported(file) and torchscript_format.is_program(file) and not torchscript_format.is_torchscript(file)
    assert torchscript_format.read_metadata(file) == json.loads(json.dumps(seal({**meta, "parity": {"top1_agreement": 1.0}})))

    @torch.inference_mode()
    def reference(images):
        return tuple(t.numpy() for t in package(torch.from_numpy(images)))

    paths = sorted(str(p) for p in (data / "cat").glob("*"))[:5]  # 5 images: a batch size it was not exported with
    parity = measure(reference, load_exported(file).run, image_batches(paths, trained.image), np.zeros(5, int), 3)
    assert parity.exact() and parity.images == 5
    inputs = [data / "cat", data / "eel"]
    table, expected = predict(run=file, inputs=inputs, progress=False), predict(run=run, inputs=inputs, progress=False)
    assert (table["predicted_label"] == expected["predicted_label"]).all()
    assert np.allclose(table["confidence"], expected["confidence"], atol=1e-4)


def test_export_writes_an_exported_program_through_the_command_and_the_cli_uses_the_maintained_opset(run, data, tmp_path):
    import inspect as pyinspect

    from finetune.cli.using import export as export_command

    result = export(run=run, formats="pt2", out=tmp_path / "pt2", progress=False)
    assert set(result.files) == {"pt2"} and result.files["pt2"].name == "model.pt2"
    assert result.parity["pt2"]["top1_agreement"] == 1.0 and result.parity["pt2"]["max_abs_prob_diff"] <= 1e-4
    meta = torchscript_format.read_metadata(result.files["pt2"])
    assert meta["exporter"].startswith("torch.export") and meta["task"] == "single_label"
    default_opset = pyinspect.signature(export_command).parameters["opset"].default
    assert default_opset == onnx_format.DEFAULT_OPSET  # the CLI's default is the maintained exporter's
    with pytest.raises(UsageError, match=r"choose onnx, torchscript or both \(onnx and torchscript\), or pt2"):
        export(run=run, formats="tflite", out=tmp_path / "x", progress=False)
