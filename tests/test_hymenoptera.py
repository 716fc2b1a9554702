"""Integration on real photos: ../shared/datasets/hymenoptera (skipped only where that folder is absent)."""

import json

import pandas as pd
import pytest
import timm
import torch

from finetune import train

from conftest import HYMENOPTERA, REPO

pytestmark = pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"{HYMENOPTERA} absent (fresh clone without ../shared)")


def test_last_stage_recipe_on_real_photos(tmp_path):
    weights = tmp_path / "resnet18_local.pth"
    torch.save(timm.create_model("resnet18", num_classes=1000).state_dict(), weights)  # stands in for a download
    result = train(
        recipe=REPO / "recipes" / "last_stage.yaml",
        data=HYMENOPTERA,
        out=tmp_path / "ants",
        overrides=["model.name=resnet18", f"model.pretrained={weights}", "train.epochs=1", "data.num_workers=2", "data.batch_size=32"],
        progress=False,
    )
    report = result.report.folder
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["num_images"] == len(list((HYMENOPTERA / "val").rglob("*.jpg")))  # the GIF-as-.jpg decodes too
    assert metrics["num_classes"] == 2 and 0.0 <= metrics["accuracy"] <= 1.0
    per_class = pd.read_csv(report / "per_class.csv")
    assert list(per_class["class"]) == ["ants", "bees"]
    for name in ("confusion_matrix.csv", "confusion_matrix_normalized.csv", "confusion_matrix.png", "predictions.csv", "summary.md"):
        assert (report / name).stat().st_size > 0
