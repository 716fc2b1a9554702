"""`finetune audit`: confident learning on out-of-fold probabilities finds flipped labels; duplicates under two labels,
overlapping classes, outliers; audit.html; one-line errors."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from finetune import audit
from finetune.cli import app

from conftest import tiny_recipe

COLOURS = {"red": (200, 40, 40), "green": (40, 190, 40), "blue": (40, 40, 200)}
PROBE = tiny_recipe(
    train={"epochs": 12, "lr": 0.05, "trainable": ["head"]},
    transforms={"train": "none"},
    data={"batch_size": 16},
    eval={"gradcam": False},
)


def _colour_folder(root, per_class=20, flip_every=10, seed=0):
    """Colour-coded classes; every `flip_every`-th image is filed under the next class (a wrong label)."""
    rng = np.random.default_rng(seed)
    names, flipped = list(COLOURS), []
    for index, (name, rgb) in enumerate(COLOURS.items()):
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            label = names[(index + 1) % 3] if i % flip_every == 0 else name
            (root / label).mkdir(parents=True, exist_ok=True)
            path = root / label / f"{name}_{i:02d}.png"
            Image.fromarray(pixels).save(path)
            if label != name:
                flipped.append(str(path))
    return flipped


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    # 40 per class, 12 flipped: with 6 flipped one image decided a 17% swing in recall (a change of sample order did)
    flipped = _colour_folder(root / "data", per_class=40)
    twin = root / "data" / "blue" / "red_05_copy.png"  # the same picture filed under a second label
    shutil.copy(root / "data" / "red" / "red_05.png", twin)
    result = audit(data=root / "data", recipe=PROBE, out=root / "audit", folds=5, progress=False)
    return result, flipped, twin, root


def test_flipped_labels_rank_first(audited):
    result, flipped, twin, _ = audited
    n = len(flipped)  # 10% of the images
    ranked = list(result.quality["path"])
    top = set(ranked[: n + 2]) - {str(twin), str(twin.parent.parent / "red" / "red_05.png")}
    hits = len(top & set(flipped))
    assert hits / n >= 0.8, f"top-{n} holds {hits} of {n} flipped images"
    flagged = set(result.issues.loc[result.issues["label_issue"], "path"])
    precision = len(flagged & set(flipped)) / max(len(flagged), 1)
    recall = len(flagged & set(flipped)) / n
    assert precision >= 0.8 and recall >= 0.8, (precision, recall)
    row = result.issues.set_index("path").loc[flipped[0]]
    assert row["given_label"] == "green" and row["suggested_label"] == "red"  # red_00 was filed under green
    assert row["reason"].startswith("confident learning: out-of-fold models give 'green'")


def test_audit_files_and_page(audited):
    result, _, twin, root = audited
    out = root / "audit"
    issues = pd.read_csv(out / "label_issues.csv")
    assert list(issues.columns[:7]) == [
        "path",
        "given_label",
        "suggested_label",
        "given_prob",
        "suggested_prob",
        "label_quality",
        "label_issue",
    ]
    assert "reason" in issues.columns and len(pd.read_csv(out / "label_quality.csv")) == 121
    conflicts = pd.read_csv(out / "conflicting_duplicates.csv")
    assert len(conflicts) == 1 and conflicts.iloc[0]["kind"] == "exact duplicate"
    assert {conflicts.iloc[0]["label_a"], conflicts.iloc[0]["label_b"]} == {"red", "blue"}
    assert any("exact duplicate of red_05" in r for r in issues["reason"])
    overlapping = pd.read_csv(out / "overlapping_classes.csv")
    assert list(overlapping.columns) == ["class_a", "class_b", "images", "joint_probability"]
    outliers = pd.read_csv(out / "outliers.csv")
    assert len(outliers) == 121 and outliers["outlier_score"].is_monotonic_increasing
    assert outliers["outlier_score"].between(0, 1).all()
    html = (out / "audit.html").read_text()
    assert "Suspects, most suspect first" in html and html.count("data:image/png;base64,") >= len(issues) + 2
    assert 'src="http' not in html  # self-contained
    assert (out / "cv" / "oof" / "report.html").exists() and (out / "cv" / "cv_summary.csv").exists()
    assert result.health < 1.0


def test_audit_cli_and_its_errors(tmp_path, image_folder):
    recipe = tmp_path / "probe.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump({**PROBE, "train": {**PROBE["train"], "epochs": 1}}))  # the CLI, not the ranking
    args = ["audit", str(image_folder), "--recipe", str(recipe), "--folds", "9", "--out", str(tmp_path / "a"), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "error: --folds 9 is more than the 8 image(s) of class 'cat' outside the test split" in result.output
    lines = result.output.strip().splitlines()  # the error, after the warning that the probe's backbone is random
    assert lines[-1].startswith("error: --folds 9") and sum(line.startswith("error") for line in lines) == 1
    assert not (tmp_path / "a").exists()
    result = CliRunner().invoke(
        app, ["audit", str(image_folder), "--recipe", str(recipe), "--folds", "2", "--out", str(tmp_path / "b")]
    )
    assert result.exit_code == 0, result.output
    assert "suspect image(s) of 24" in result.output and (tmp_path / "b" / "audit.html").exists()


def test_audit_without_cleanlab_names_the_extra(tmp_path, image_folder, monkeypatch):
    """Without cleanlab installed, audit refuses in one line before any fold trains (and leaves no folder)."""
    import builtins

    real_import = builtins.__import__

    def no_cleanlab(name, *args, **kwargs):
        if name == "cleanlab" or name.startswith("cleanlab."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cleanlab)
    result = CliRunner().invoke(
        app, ["audit", str(image_folder), "--recipe", "recipes/linear_probe.yaml", "--out", str(tmp_path / "a")]
    )
    assert result.exit_code == 2
    assert "finetune audit needs cleanlab: pip install '.[audit]'" in result.output
    assert not (tmp_path / "a").exists()


def test_a_weak_out_of_fold_model_is_said_to_be_weak(audited, tmp_path):
    """The colour audit's model is strong (no banner); the same page from a weak model carries the warning."""
    from finetune.reporting.audit_html import AuditPage, render_audit

    result, _, _, root = audited
    assert result.cv.report.metrics["accuracy"] >= 0.85
    assert "The out-of-fold model is weak" not in (root / "audit" / "audit.html").read_text()
    summary = {**json.loads((root / "audit" / "audit.json").read_text()), "oof_accuracy": 0.721}
    page = AuditPage(
        summary=summary,
        issues=result.issues,
        overlapping=result.overlapping,
        conflicts=result.conflicts,
        outliers=result.outliers,
    )
    render_audit(page, tmp_path / "weak.html")
    assert (
        "The out-of-fold model is weak (72.1% accuracy): many suspects will be its own mistakes"
        in (tmp_path / "weak.html").read_text()
    )
