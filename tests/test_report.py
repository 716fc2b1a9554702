import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import classification_report

from finetune.inference.predictions import Predictions
from finetune.reporting.report import write_report

CLASSES = ["ant", "bee", "wasp", "fly"]


@pytest.fixture
def preds():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, len(CLASSES), 60)
    logits = rng.normal(size=(60, len(CLASSES)))
    logits[np.arange(60), targets] += 1.5  # mostly right, some confusions
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return Predictions(paths=[f"img_{i}.png" for i in range(60)], probs=probs, targets=targets)


def test_report_numbers_match_sklearn(tmp_path, preds):
    report = write_report(preds, CLASSES, tmp_path, top_k=2, title="t")
    per_class = pd.read_csv(tmp_path / "per_class.csv")
    expected = classification_report(preds.targets, preds.predicted, target_names=CLASSES, output_dict=True, zero_division=0)
    for _, row in per_class.iterrows():
        for metric in ("precision", "recall", "f1"):
            assert row[metric] == pytest.approx(expected[row["class"]][metric if metric != "f1" else "f1-score"])
        assert row["support"] == expected[row["class"]]["support"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(expected["accuracy"])
    assert metrics["macro_f1"] == pytest.approx(expected["macro avg"]["f1-score"])
    assert metrics["weighted_recall"] == pytest.approx(expected["weighted avg"]["recall"])
    assert metrics["num_images"] == 60 and 0 <= metrics["top2_accuracy"] <= 1 and metrics["top2_accuracy"] >= metrics["accuracy"]
    assert report.metrics == metrics


def test_confusion_matrices_are_labelled_and_sum_to_support(tmp_path, preds):
    write_report(preds, CLASSES, tmp_path, top_k=2, title="t")
    counts = pd.read_csv(tmp_path / "confusion_matrix.csv", index_col=0)
    normalized = pd.read_csv(tmp_path / "confusion_matrix_normalized.csv", index_col=0)
    per_class = pd.read_csv(tmp_path / "per_class.csv")
    assert list(counts.index) == CLASSES and list(counts.columns) == CLASSES
    assert list(counts.sum(axis=1)) == list(per_class["support"])
    assert np.allclose(normalized.sum(axis=1), 1.0)
    assert np.diag(counts).sum() == (preds.predicted == preds.targets).sum()


def test_predictions_csv_and_summary(tmp_path, preds):
    write_report(preds, CLASSES, tmp_path, top_k=3, title="My run")
    table = pd.read_csv(tmp_path / "predictions.csv")
    assert list(table.columns) == [
        "path",
        "true_label",
        "predicted_label",
        "confidence",
        "top2_label",
        "top2_prob",
        "top3_label",
        "top3_prob",
    ]  # the first choice is said once, as predicted_label / confidence
    assert (table["confidence"] >= table["top2_prob"]).all() and (table["top2_prob"] >= table["top3_prob"]).all()
    assert (table["predicted_label"] != table["top2_label"]).all()
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# My run") and "| class" in summary and "Weakest class" in summary
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    lo, hi = metrics["ci95"]["accuracy"]
    assert lo < metrics["accuracy"] < hi and f"accuracy **{metrics['accuracy']:.1%} (95% CI {lo:.1%}-{hi:.1%})**" in summary
    png = (tmp_path / "confusion_matrix.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_confusion_png_with_many_classes(tmp_path):
    n = 60
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(n), size=300)
    preds = Predictions(paths=[str(i) for i in range(300)], probs=probs, targets=rng.integers(0, n, 300))
    write_report(preds, [f"class_{i:02d}" for i in range(n)], tmp_path, top_k=5, title="many")
    from PIL import Image

    with Image.open(tmp_path / "confusion_matrix.png") as image:
        assert image.width >= 2000  # grows with the class count so labels stay legible


def test_report_names_its_split_and_never_infers_the_val_split_twice(tmp_path, image_folder, monkeypatch):
    from finetune import train
    from finetune.config.loading import recipe_from_dict
    from finetune.inference.checkpoint import load_checkpoint
    from finetune.inference.predictor import Predictor

    from conftest import tiny_recipe

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the validation split was inferred again")

    monkeypatch.setattr(Predictor, "predictions", no_second_pass)
    val_only = train(recipe=recipe_from_dict(tiny_recipe()), data=image_folder, out=tmp_path / "val", progress=False)
    monkeypatch.undo()
    summary = (val_only.report.folder / "summary.md").read_text()
    assert (
        summary.startswith("# resnet18 on the val split") and "> **Optimistic: the val split also chose the best epoch" in summary
    )
    assert "Optimistic: the val split also chose the best epoch" in (val_only.report.folder / "report.html").read_text()
    assert val_only.report.metrics["evaluated_on"] == {"split": "val", "selection_split": True, "tta": []}
    payload = load_checkpoint(val_only.best_checkpoint)
    assert payload["temperature"] > 0 and set(payload["calibration"]) == {"fitted_on", "before", "after"}
    assert payload["calibration"]["after"]["nll"] <= payload["calibration"]["before"]["nll"]

    honest = train(
        recipe=recipe_from_dict(tiny_recipe(data={"test_fraction": 0.25})),
        data=image_folder,
        out=tmp_path / "test",
        progress=False,
    )
    text = (honest.report.folder / "summary.md").read_text()
    assert text.startswith("# resnet18 on the test split") and "which nothing during training saw" in text
    assert honest.report.metrics["evaluated_on"] == {"split": "test", "selection_split": False, "tta": []}


def test_predictions_are_calibrated_with_the_runs_temperature(tmp_path, image_folder):
    from finetune import predict, train
    from finetune.config.loading import recipe_from_dict
    from finetune.inference.checkpoint import load_checkpoint
    from finetune.inference.task import SingleLabel

    from conftest import tiny_recipe

    run = train(recipe=recipe_from_dict(tiny_recipe()), data=image_folder, out=tmp_path / "run", progress=False)
    payload = load_checkpoint(run.best_checkpoint)
    val = pd.read_csv(run.run_dir / "splits.csv").query("split == 'val'")
    table = predict(run=run.run_dir, inputs=list(val["path"]), progress=False)
    expected = SingleLabel().probs(payload["val_logits"].numpy(), payload["temperature"]).max(axis=1)
    assert np.allclose(table["confidence"].to_numpy(), expected, atol=1e-5)  # the same images, the same calibrated numbers


def test_eval_on_images_the_run_has_seen_is_flagged(tmp_path, image_folder, caplog):
    """`eval` on the run's own folder (its train and val images among them) says the figures are optimistic; on
    new images it does not."""
    import shutil

    from finetune import evaluate, train

    from conftest import tiny_recipe

    run = train(recipe=tiny_recipe(), data=image_folder, out=tmp_path / "run", progress=False).run_dir
    seen = evaluate(run=run, data=image_folder, out=tmp_path / "seen", progress=False)
    assert seen.metrics["evaluated_on"]["selection_split"] is True
    assert "images are in the run's training split: the figures overstate" in caplog.text
    assert (
        "Optimistic: 6 of these images chose the run's best epoch (its val split) and 18 trained it"
        in (tmp_path / "seen" / "summary.md").read_text()
    )
    fresh = tmp_path / "fresh"
    shutil.copytree(image_folder, fresh)  # the same pictures under other paths count as new images
    assert evaluate(run=run, data=fresh, out=tmp_path / "new", progress=False).metrics["evaluated_on"]["selection_split"] is False


def test_coverage_sentence_gives_counts_and_flags_tiny_ones():
    from finetune.reporting.summary import coverage_sentence

    text = coverage_sentence({"num_images": 153, "coverage_at_accuracy": {"0.9": 0.15, "0.99": 1 / 153, "0.999": None}})
    assert "90% accuracy: 15% of images (23 of 153)" in text
    assert "99% accuracy: 1% of images (1 of 153, too few to trust)" in text and "no threshold reaches it" in text


def test_a_run_records_absolute_paths_so_eval_elsewhere_still_knows_its_images(tmp_path, image_folder, monkeypatch):
    import os

    from finetune import evaluate, train
    from finetune.files import read_text_table

    from conftest import tiny_recipe

    monkeypatch.chdir(image_folder.parent)
    run = train(recipe=tiny_recipe(), data=image_folder.name, out=tmp_path / "run", progress=False).run_dir  # relative --data
    assert all(os.path.isabs(p) for p in read_text_table(run / "splits.csv")["path"])
    monkeypatch.chdir(tmp_path / "run")  # somewhere else
    report = evaluate(run=run, data=image_folder, out=tmp_path / "seen", progress=False)
    assert report.metrics["evaluated_on"]["selection_split"] is True


def test_the_banner_names_known_leakage(tmp_path, preds):
    from finetune.config.loading import recipe_from_dict
    from finetune.reporting.html import RunContext

    from conftest import tiny_recipe

    meta = {"recipe": recipe_from_dict(tiny_recipe()).to_dict()}
    leaks = pd.DataFrame({"path_a": ["a", "b", "c"], "path_b": ["d", "e", "f"]})
    leaks = leaks.assign(split_a=["train", "train", "val"], split_b=["test", "val", "test"])
    write_report(preds, CLASSES, tmp_path / "r", top_k=2, title="t", context=RunContext(meta=meta, split="test", leaks=leaks))
    said = (
        "Computed on the test split, which nothing during training saw: not early stopping, not the best epoch, not the "
        "temperature. Known leakage: 3 duplicate pair(s) cross the splits (leakage.csv), 2 of them reach the test split, so "
        "these figures may be inflated; remove the copies or set data.group_pattern, and train again."
    )
    assert f"> **{said}**" in (tmp_path / "r" / "summary.md").read_text()
    assert f'<div class="banner warn"><b>{said}</b></div>' in (tmp_path / "r" / "report.html").read_text()
    write_report(
        preds, CLASSES, tmp_path / "s", top_k=2, title="t", context=RunContext(meta=meta, split="test", leaks=leaks[1:2])
    )
    assert (
        "Known leakage: 1 duplicate pair(s) cross the splits (leakage.csv), none reaches the test split, though"
        in (tmp_path / "s" / "summary.md").read_text()
    )
    write_report(preds, CLASSES, tmp_path / "u", top_k=2, title="t", context=RunContext(meta=meta, split="test"))
    page = (tmp_path / "u" / "report.html").read_text()
    assert "Known leakage" not in page and '<div class="banner ok">' in page


def test_a_run_with_leakage_says_so_in_its_report(tmp_path, image_folder):
    from finetune import train

    from conftest import tiny_recipe

    run = train(recipe=tiny_recipe(data={"test_fraction": 0.25}), data=image_folder, out=tmp_path / "run", progress=False)
    leaks = pd.read_csv(tmp_path / "run" / "leakage.csv")  # the tiny folder repeats a pattern under two classes
    reach = int(((leaks["split_a"] == "test") | (leaks["split_b"] == "test")).sum())
    assert (
        len(leaks)
        and f"Known leakage: {len(leaks)} duplicate pair(s) cross the splits (leakage.csv)"
        in (run.report.folder / "summary.md").read_text()
    )
    assert (f"{reach} of them reach the test split" if reach else "none reaches the test split") in (
        run.report.folder / "report.html"
    ).read_text()
