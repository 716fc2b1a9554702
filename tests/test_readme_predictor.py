"""README's torch-free predictor on a model exported from a run with test-time views: it applies the views stored in
the file (hflip, vflip, five_crop on the uint8 pixels) and gives `finetune predict model.onnx`'s probabilities."""

import re
import subprocess
import sys

import numpy as np
import pytest

from finetune import export, predict, train
from finetune.config.loading import recipe_from_dict

from conftest import REPO, make_folder, tiny_recipe

MARKER = "<!-- torch-free predictor: tests/test_export.py runs this exact block -->"
VIEWS = ["hflip", "vflip", "five_crop"]  # 2 x 2 x 5 = 20 views per image


def _readme_predictor() -> str:
    block = (REPO / "README.md").read_text().split(MARKER, 1)[1]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)


def _run_readme_predictor(tmp_path, model, images, name: str) -> np.ndarray:
    """The README block as a script, with torch and finetune unimportable; its `probs` (N x C) saved and read back."""
    (tmp_path / "predict_onnx.py").write_text(_readme_predictor())
    wrapper = (
        "import sys; sys.modules['torch'] = None; sys.modules['finetune'] = None\n"  # importing either now fails
        "import numpy as np\n"
        "script, out = sys.argv.pop(1), sys.argv.pop(1)\n"
        "scope = {'__name__': '__main__'}\n"
        "exec(compile(open(script).read(), 'predict_onnx.py', 'exec'), scope)\n"
        "np.save(out, scope['probs'])\n"
    )
    (tmp_path / "run.py").write_text(wrapper)
    out = tmp_path / f"{name}.npy"
    done = subprocess.run(
        [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "predict_onnx.py"), str(out), str(model), *images],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(out)


def _without_views(model, path):
    """The same graph with no test-time views in its metadata: what the README predictor used to compute."""
    import onnx

    graph = onnx.load(str(model))
    for prop in graph.metadata_props:
        if prop.key == "tta":
            prop.value = "[]"
    onnx.save(graph, str(path))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme-tta")
    data = make_folder(root / "data", per_class=8, size=48)  # resized to 37 px, then centre-cropped to the 32 px input
    recipe = recipe_from_dict(tiny_recipe(train={"lr": 0.01}, eval={"tta": VIEWS, "gradcam": False}))
    run = train(recipe=recipe, data=data, out=root / "run", progress=False).run_dir
    return data, export(run=run, out=root / "export", formats="onnx", progress=False).files["onnx"]


def test_the_readme_predictor_applies_the_stored_views_and_matches_finetune_predict(exported, tmp_path):
    data, model = exported
    # every 8-bit mode the README's reader handles (16-bit PNGs need scaling it leaves out)
    images = sorted(str(p) for p in data.rglob("*.*") if p.name != "img_04.png")
    probs = _run_readme_predictor(tmp_path, model, images, "views")

    table = predict(run=model, inputs=images, progress=False)
    assert list(table["path"]) == images
    classes = ["cat", "dog", "eel"]  # top_k 5 >= 3 classes: the table holds every probability
    expected = np.zeros((len(images), len(classes)))
    ranked = [("predicted_label", "confidence"), ("top2_label", "top2_prob"), ("top3_label", "top3_prob")]
    for label_column, prob_column in ranked:
        for row, (label, p) in enumerate(zip(table[label_column], table[prob_column])):
            expected[row, classes.index(label)] = p
    assert probs.shape == (21, 3)
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    # the views matter on this run: ignoring them (as the README's predictor did) is far from finetune's answer
    plain = _run_readme_predictor(tmp_path, _without_views(model, tmp_path / "plain.onnx"), images, "plain")
    assert np.abs(plain - expected).max() > 1e-3
