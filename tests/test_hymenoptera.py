"""Integration on real photos: ../shared/datasets/hymenoptera (skipped only where that folder is absent)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from finetune import evaluate, train

from conftest import HYMENOPTERA, REPO

pytestmark = pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"{HYMENOPTERA} absent (fresh clone without ../shared)")


def test_last_stage_recipe_on_real_photos(tmp_path):
    """Every val photo is predicted once, under its own folder's label; the report agrees with itself and with `eval`."""
    weights = tmp_path / "resnet18_local.pth"
    torch.save(timm.create_model("resnet18", num_classes=1000).state_dict(), weights)  # stands in for a download
    result = train(
        recipe=REPO / "recipes" / "last_stage.yaml",
        data=HYMENOPTERA,
        out=tmp_path / "ants",
        overrides=[
            "model.name=resnet18",
            f"model.pretrained={weights}",
            "train.epochs=1",
            "data.num_workers=2",
            "data.batch_size=32",
            "transforms.input_size=112",  # real photos decoded and resized all the same, at a quarter of the pixels
            "train.cache_views=2",  # still more than one cached view per image; the recipe's 4 cost twice as long
            "eval.gradcam=false",  # Grad-CAM: tests/test_explain.py and the tiny runs
        ],
        progress=False,
    )
    report = result.report.folder
    metrics = json.loads((report / "metrics.json").read_text())
    val_files = {str(p) for p in HYMENOPTERA.glob("val/*/*") if p.is_file()}
    preds = pd.read_csv(report / "predictions.csv")
    assert set(preds["path"]) == val_files and len(preds) == len(val_files) == metrics["num_images"] == 153
    assert (preds["true_label"] == [Path(p).parent.name for p in preds["path"]]).all()  # labels follow the folders
    assert metrics["accuracy"] == pytest.approx((preds["true_label"] == preds["predicted_label"]).mean())
    counts = pd.read_csv(report / "confusion_matrix.csv", index_col=0)
    assert counts.sum(axis=1).to_dict() == {"ants": 70, "bees": 83}
    assert list(pd.read_csv(report / "per_class.csv")["class"]) == ["ants", "bees"]
    probs = preds[["confidence", "top2_prob"]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5) and preds["confidence"].nunique() > 10  # real, varied outputs
    history = pd.read_csv(result.run_dir / "metrics.csv")
    assert len(history) == 1 and np.isfinite(history[["train_loss", "val_loss"]].to_numpy()).all()
    splits = pd.read_csv(result.run_dir / "splits.csv")
    train_files = [p for p in HYMENOPTERA.glob("train/*/*") if p.is_file()]
    assert (splits["split"] == "train").sum() == len(train_files) == 245  # the placeholder GIF decodes too
    again = evaluate(run=result.run_dir, data=HYMENOPTERA, out=tmp_path / "again", progress=False)
    assert metrics["evaluated_on"] == {
        "split": "val",
        "selection_split": True,
        "tta": [],
    }  # no test/ folder: said to be optimistic
    assert again.metrics["accuracy"] == metrics["accuracy"]  # the checkpoint reproduces the run's own report
    assert again.metrics["ece"] == pytest.approx(metrics["ece"], abs=1e-6)
