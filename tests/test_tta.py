"""Test-time augmentation: views, averaging of calibrated probabilities, and TTA through eval, predict, export."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import export, predict, train
from finetune.config.loading import recipe_from_dict
from finetune.config.schema import ModelConfig
from finetune.deploy.runtime import load_exported
from finetune.errors import RecipeError
from finetune.inference.forward import ViewStack, run_inference, run_tta, tta_views
from finetune.inference.task import SingleLabel
from finetune.models.build import build_model

from conftest import make_folder, tiny_recipe

softmax = SingleLabel().probs  # the single-label task's probabilities


@pytest.mark.parametrize(("names", "count"), [([], 1), (["hflip"], 2), (["hflip", "vflip"], 4), (["hflip", "five_crop"], 10)])
def test_views_combine_in_order(names, count):
    assert len(tta_views(names)) == count


def test_five_crop_takes_the_corners_and_the_centre():
    x = torch.arange(256, dtype=torch.float32).view(1, 1, 16, 16)  # value = 16 * row + column
    crops = [view(x) for view in tta_views(["five_crop"])]
    assert all(c.shape == x.shape for c in crops)
    top_left, _, _, bottom_right, centre = (c.mean().item() for c in crops)
    assert top_left < centre < bottom_right  # 7x7 crops resized back: the means move with the crop's position
    assert centre == pytest.approx(x.mean().item(), abs=0.01)  # 14x14 crops, the centre one 1 px in from each side


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(name="resnet18"), num_classes=3).model.eval()


def _batches(images):
    return [(images, torch.zeros(len(images), dtype=torch.long))]


def test_hflip_of_a_mirror_symmetric_input_equals_the_single_view(model):
    half = torch.rand(4, 3, 32, 16)
    symmetric = torch.cat([half, half.flip(-1)], dim=-1)
    paths = [f"{i}" for i in range(4)]
    single = run_inference(model, _batches(symmetric), device=torch.device("cpu"), paths=paths, progress=False, temperature=1.7)
    tta = run_tta(
        model, _batches(symmetric), names=["hflip"], device=torch.device("cpu"), paths=paths, temperature=1.7, progress=False
    )
    np.testing.assert_allclose(tta.probs, single.probs, atol=1e-6)


def test_views_average_the_calibrated_probabilities(model):
    images = torch.rand(3, 3, 32, 32)
    temperature = 2.5
    tta = run_tta(
        model,
        _batches(images),
        names=["hflip"],
        device=torch.device("cpu"),
        paths=list("abc"),
        temperature=temperature,
        progress=False,
    )
    with torch.no_grad():
        plain, mirrored = model(images).numpy(), model(images.flip(-1)).numpy()
    assert not np.allclose(plain, mirrored)  # the second view really is the mirror image
    expected = (softmax(plain / temperature) + softmax(mirrored / temperature)) / 2
    np.testing.assert_allclose(tta.probs, expected, atol=1e-6)
    np.testing.assert_allclose(np.exp(tta.logits), (softmax(plain) + softmax(mirrored)) / 2, atol=1e-6)  # "before calibration"
    stacked = ViewStack(model, tta_views(["hflip"]))(images)
    assert stacked.shape == (3, 6)


def test_unknown_or_repeated_views_are_refused():
    with pytest.raises(RecipeError, match=r"recipe.eval.tta.0: Input should be 'hflip', 'vflip' or 'five_crop'"):
        recipe_from_dict(tiny_recipe(eval={"tta": ["hlfip"]}))
    with pytest.raises(RecipeError, match=r"each view once"):
        recipe_from_dict(tiny_recipe(eval={"tta": ["hflip", "hflip"]}))


@pytest.fixture(scope="module")
def tta_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tta")
    data = make_folder(root / "data", per_class=8)
    # crop_pct 1: the eval pipeline keeps a 32 px picture whole, so a mirrored file is the mirrored view
    recipe = tiny_recipe(data={"test_fraction": 0.25}, eval={"tta": ["hflip"]}, transforms={"crop_pct": 1.0})
    return train(recipe=recipe, data=data, out=root / "run", progress=False), root


def test_the_report_says_tta_was_used(tta_run):
    result, _ = tta_run
    metrics = json.loads((result.run_dir / "report" / "metrics.json").read_text())
    assert metrics["evaluated_on"]["tta"] == ["hflip"]
    summary = (result.run_dir / "report" / "summary.md").read_text()
    assert "test-time augmentation" in summary and "hflip: 2 views per image, calibrated probabilities averaged" in summary
    assert "test-time augmentation" in (result.run_dir / "report" / "report.html").read_text()


def test_predict_averages_an_image_and_its_mirror(tta_run):
    result, root = tta_run
    rng = np.random.default_rng(3)
    picture = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(picture).save(root / "a.png")
    Image.fromarray(picture[:, ::-1]).save(root / "mirror.png")
    payload = torch.load(result.run_dir / "checkpoints" / "best.pt", weights_only=True)
    payload["recipe"]["eval"]["tta"] = []
    torch.save(payload, root / "single.pt")
    single = predict(run=root / "single.pt", inputs=[root / "a.png", root / "mirror.png"], progress=False)
    both = predict(run=result.run_dir, inputs=[root / "a.png"], progress=False)
    probs = {row["predicted_label"]: row["confidence"] for _, row in both.iterrows()}
    label = next(iter(probs))

    def prob_of(table, i):
        row = table.iloc[i]
        labels = [row["predicted_label"]] + [row[f"top{k}_label"] for k in range(2, 4)]
        values = [row["confidence"]] + [row[f"top{k}_prob"] for k in range(2, 4)]
        return dict(zip(labels, values))[label]

    assert probs[label] == pytest.approx((prob_of(single, 0) + prob_of(single, 1)) / 2, abs=1e-5)


def test_exported_model_keeps_the_views_in_its_metadata_and_predict_applies_them(tta_run, tmp_path):
    result, root = tta_run
    exported = export(run=result.run_dir, out=tmp_path / "export", formats="onnx", progress=False)
    onnx_file = exported.files["onnx"]
    meta = load_exported(onnx_file).meta
    assert meta["tta"] == ["hflip"] and "one view" in meta["tta_note"]
    images = sorted((root / "data").rglob("*.*"))[:6]
    from_run = predict(run=result.run_dir, inputs=images, progress=False)
    from_onnx = predict(run=onnx_file, inputs=images, progress=False)
    np.testing.assert_allclose(from_onnx["confidence"], from_run["confidence"], atol=1e-4)
    assert list(from_onnx["predicted_label"]) == list(from_run["predicted_label"])
