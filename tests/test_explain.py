"""Grad-CAM: on images whose class is a patch in one corner, the heat lies in that corner; `finetune explain` files."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from finetune import train
from finetune.cli import app
from finetune.config.loading import recipe_from_dict
from finetune.evaluation.explain import Explainer
from finetune.inference.checkpoint import load_trained

SIZE = 64


@pytest.fixture(scope="module")
def corner_run(tmp_path_factory):
    """'marked' images carry a red square in the top-left corner; 'plain' ones do not. Nothing else differs."""
    root = tmp_path_factory.mktemp("corner")
    rng = np.random.default_rng(0)
    for label in ("plain", "marked"):
        (root / "data" / label).mkdir(parents=True)
        for i in range(40):
            image = rng.integers(60, 200, (SIZE, SIZE, 3), dtype=np.uint8)
            if label == "marked":
                image[: SIZE // 4, : SIZE // 4] = (255, 0, 0)
            Image.fromarray(image).save(root / "data" / label / f"{i}.png")
    recipe = recipe_from_dict(
        {
            "seed": 0,
            "data": {"val_fraction": 0.25, "batch_size": 16},
            "model": {"name": "resnet18"},
            "transforms": {"input_size": SIZE, "crop_pct": 1.0, "train": "none"},
            "train": {"epochs": 3, "lr": 0.003},
        }
    )
    result = train(recipe=recipe, data=root / "data", out=root / "run", progress=False)
    assert result.report.metrics["accuracy"] == 1.0  # the patch is easy to learn
    return root, result


def test_gradcam_puts_its_heat_on_the_corner_that_decides_the_class(corner_run):
    root, result = corner_run
    loaded = load_trained(result.best_checkpoint)
    explainer = Explainer(loaded.bundle, loaded.image)
    paths = sorted(str(p) for p in (root / "data" / "marked").glob("*.png"))[:8]
    found = explainer.explain(paths, [loaded.class_names.index("marked")] * len(paths))
    shares = [e.heat[: SIZE // 2, : SIZE // 2].sum() / e.heat.sum() for e in found]
    assert np.median(shares) > 0.5, shares  # the top-left quarter holds most of the heat (a quarter by chance)
    assert found[0].overlay.shape == (SIZE, SIZE, 3) and found[0].overlay.dtype == np.uint8


def test_explain_command_writes_pictures_and_a_table(corner_run, tmp_path):
    root, result = corner_run
    out = tmp_path / "why"
    done = CliRunner().invoke(
        app,
        [
            "explain",
            str(result.run_dir),
            str(root / "data" / "marked" / "0.png"),
            str(root / "data" / "plain" / "1.png"),
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert done.exit_code == 0, done.output
    table = pd.read_csv(out / "explanations.csv")
    assert list(table["class"]) == ["marked", "plain"] and table["border_share"].between(0, 1).all()
    assert all((out / name).stat().st_size > 1000 for name in table["picture"])
    with Image.open(out / table["picture"].iloc[0]) as picture:
        assert picture.width >= 2 * 448 and picture.height >= 448  # two panels of 448 px or more, not 64 or 224 px
    bad = CliRunner().invoke(app, ["explain", str(result.run_dir), str(root / "data"), "--out", str(out), "--class", "markd"])
    assert bad.exit_code == 2 and "--class markd is not a class of this model (did you mean 'marked'?)" in bad.stderr


@pytest.mark.parametrize("side", [32, 64, 224, 384, 600])
def test_explain_pictures_have_panels_of_448_px_or_more(side):
    from finetune.runs.explain import _side_by_side

    seen = np.zeros((side, side, 3), np.uint8)
    picture = _side_by_side(seen, seen, "caption")
    panel = (picture.width - 8) // 2
    assert panel >= 448 and picture.height - panel >= 24  # and a band below for the caption
    assert panel == max(side, 448) or side <= 64  # large inputs keep their size; small ones enlarge by whole pixels
