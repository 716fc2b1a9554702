"""`finetune label`: pseudo-labels at a precision chosen on validation, a diverse queue to label next, its files."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import finetune
from finetune import label, train
from finetune.errors import UsageError
from finetune.inference.checkpoint import load_trained

from conftest import _pattern, make_folder, tiny_recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run on 3 x 10 tiny pictures, and a folder of 3 x 5 new pictures of the same classes."""
    root = tmp_path_factory.mktemp("label")
    data = make_folder(root / "data", per_class=10)
    run = train(recipe=tiny_recipe(train={"epochs": 3}), data=data, out=root / "run", progress=False).run_dir
    pool = root / "pool"
    pool.mkdir()
    for label_index in range(3):
        for i in range(5):
            Image.fromarray(_pattern(label_index, 100 + i)).save(pool / f"new_{label_index}_{i}.png")
    return run, pool, root


def _reachable_target(run) -> float:
    """A precision the run's validation split reaches (that of its most confident answer), at most 0.95."""
    trained = load_trained(run)
    logits, targets = trained.validation
    probs = trained.task.probs(logits, trained.temperature)
    top = np.argmax(probs.max(axis=1))
    return 0.95 if probs[top].argmax() == targets[top] else 0.0


def test_label_writes_its_files_and_the_pseudo_labels_reach_the_target_on_validation(trained, tmp_path):
    run, pool, _ = trained
    target = _reachable_target(run)
    assert target > 0, "the tiny run's most confident validation answer is wrong; the fixture needs more training"
    result = label(
        run=run,
        unlabeled=pool,
        out=tmp_path / "q",
        target_precision=target,
        budget=4,
        image_root="https://files.example.org/my pool/",
        progress=False,
    )
    out = tmp_path / "q"
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == 15
    assert {"path", "predicted_label", "confidence", "top2_label", "top2_prob"} <= set(predictions.columns)
    finetune.predict(run=run, inputs=[pool], out=tmp_path / "p.csv", progress=False)
    pd.testing.assert_frame_equal(predictions, pd.read_csv(tmp_path / "p.csv"))  # the table `finetune predict` writes
    assert list(pd.read_csv(out / "pseudo_labels.csv").columns) == ["path", "label", "confidence"]
    assert list(pd.read_csv(out / "to_label.csv").columns) == ["path", "suggested_label", "score", "reason"]
    assert list(pd.read_csv(out / "left_out.csv").columns) == ["path", "suggested_label", "score", "reason"]
    summary = json.loads((out / "summary.json").read_text())
    # by construction: the validation images at or above the threshold reach the target precision
    trained_model = load_trained(run)
    logits, targets = trained_model.validation
    probs = trained_model.task.probs(logits, trained_model.temperature)
    kept = probs.max(axis=1) >= summary["threshold"]
    precision = float((probs.argmax(axis=1)[kept] == targets[kept]).mean())
    assert precision >= target and precision == pytest.approx(summary["validation_precision"])
    assert kept.sum() == summary["validation_answered"]
    low, high = summary["validation_precision_ci95"]
    assert low <= precision <= high
    assert (result.pseudo_labels["confidence"] >= summary["threshold"]).all()
    above = predictions[predictions["confidence"] >= summary["threshold"]]
    assert len(result.pseudo_labels) == len(above) - above["path"].isin(result.queue["path"]).sum()
    assert not set(result.queue["path"]) & set(result.pseudo_labels["path"])  # a queued image goes to a person
    assert result.pseudo_labels["confidence"].is_monotonic_increasing  # lowest confidence first
    assert summary["expected_wrong_labels"] == pytest.approx(len(result.pseudo_labels) * (1 - precision))
    assert "Wilson interval" in (out / "summary.md").read_text()
    assert len(result.queue) == 4 == summary["queued"]  # the budget
    tasks = json.loads((out / "label_studio_tasks.json").read_text())
    assert [task["data"]["path"] for task in tasks] == list(result.queue["path"])
    first, row = tasks[0], result.queue.iloc[0]
    assert first["data"]["image"] == "https://files.example.org/my pool/" + row["path"].rsplit("/", 1)[1]
    (prediction,) = first["predictions"]
    assert prediction["result"] == [
        {"from_name": "choice", "to_name": "image", "type": "choices", "value": {"choices": [row["suggested_label"]]}}
    ]
    confidence = predictions.set_index("path").loc[row["path"], "confidence"]
    assert prediction["score"] == pytest.approx(confidence, abs=1e-6)
    html = (out / "label.html").read_text()
    assert "data:image/png;base64," in html and "Label next (4)" in html


def test_no_threshold_reaching_the_target_is_refused(trained, tmp_path):
    run, pool, _ = trained
    payload = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    wrong = (payload["val_logits"].argmax(dim=1) + 1) % 3  # every validation answer wrong
    payload["val_targets"] = wrong
    torch.save(payload, tmp_path / "wrong.pt")
    with pytest.raises(UsageError, match=r"no confidence threshold reaches precision 50\.0% on the run's \d+ validation images"):
        label(run=tmp_path / "wrong.pt", unlabeled=pool, out=tmp_path / "q", target_precision=0.5, progress=False)
    assert not (tmp_path / "q" / "predictions.csv").exists()
    from typer.testing import CliRunner

    from finetune.cli import app

    args = [
        "label",
        str(tmp_path / "wrong.pt"),
        "--unlabeled",
        str(pool),
        "--out",
        str(tmp_path / "q"),
        "--target-precision",
        "0.5",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "lower --target-precision" in result.stderr


def test_the_queue_is_diverse_and_leaves_out_duplicates_of_labelled_images(trained, tmp_path):
    run, pool, root = trained
    folder = tmp_path / "pool"
    shutil.copytree(pool, folder)
    table = finetune.load(run).predict(folder)
    hardest = table.loc[(table["confidence"] - table["top2_prob"]).idxmin(), "path"]
    for i in range(10):
        shutil.copy(hardest, folder / f"copy_{i}.png")
    labelled = root / "data" / "cat" / "img_00.jpg"
    shutil.copy(labelled, folder / "already_labelled.jpg")
    result = label(
        run=run, unlabeled=folder, out=tmp_path / "q", target_precision=_reachable_target(run), budget=5, progress=False
    )
    copies = {str(folder / f"copy_{i}.png") for i in range(10)} | {hardest}
    margin_only = table.assign(margin=table["confidence"] - table["top2_prob"]).nsmallest(5, "margin")
    assert len(result.queue) == 5, result.summary
    assert not set(result.queue["path"]) & set(result.pseudo_labels["path"])
    assert sum(p in copies for p in result.queue["path"]) <= 1  # without diversity they would fill the queue
    assert margin_only["path"].isin([hardest]).any()
    left = result.left_out.set_index("path")
    assert str(folder / "already_labelled.jpg") in left.index
    assert left.loc[str(folder / "already_labelled.jpg"), "reason"].startswith("exact duplicate of labelled ")
    assert str(folder / "already_labelled.jpg") not in set(result.queue["path"])
    assert result.queue["reason"].iloc[0].endswith("the least certain image")
    tasks = json.loads((tmp_path / "q" / "label_studio_tasks.json").read_text())
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=" + result.queue["path"].iloc[0].lstrip("/")


def test_a_manifest_of_unlabelled_paths_and_bad_options(trained, tmp_path):
    run, pool, _ = trained
    manifest = tmp_path / "pool.csv"
    files = sorted(pool.iterdir())[:4]
    manifest.write_text("path\n" + "\n".join(str(p) for p in files) + "\n")
    result = label(run=run, unlabeled=manifest, out=tmp_path / "q", target_precision=0.0001, budget=10, progress=False)
    assert sorted(result.predictions["path"]) == sorted(map(str, files))
    assert len(result.queue) + len(result.pseudo_labels) == 4  # the budget is larger than the rest of the pool
    from typer.testing import CliRunner

    from finetune.cli import app

    args = ["label", str(run), "--unlabeled", str(manifest), "--out", str(tmp_path / "c"), "--budget", "1", "-q"]
    shown = CliRunner().invoke(app, args)
    assert shown.exit_code == 0, shown.output
    assert "of 4 pseudo-labelled" in shown.stdout and (tmp_path / "c" / "label.html").is_file()
    with pytest.raises(UsageError, match=r"--budget -1: how many images"):
        label(run=run, unlabeled=pool, out=tmp_path / "r", budget=-1, progress=False)
    with pytest.raises(UsageError, match=r"--target-precision 1.5: a precision from 0 to 1"):
        label(run=run, unlabeled=pool, out=tmp_path / "r", target_precision=1.5, progress=False)


def test_the_threshold_and_the_queue_on_numbers():
    from finetune.evaluation.labeling import choose_queue, k_center_greedy, precision_rule

    # confidence 0.9, 0.8 (right), 0.7 (wrong), 0.6 (right): precision 1.0 down to 0.8, then 2/3, then 3/4
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    targets = np.array([0, 0, 1, 0])
    rule = precision_rule(probs, targets, 0.75)
    assert (rule.threshold, rule.answered, rule.correct) == (0.6, 4, 3)
    assert precision_rule(probs, targets, 0.8).threshold == 0.8
    assert precision_rule(probs[2:3], targets[2:3], 0.5) is None
    low, high = rule.interval
    assert low < 0.75 < high and rule.expected_wrong(100)[0] == pytest.approx(25)
    features = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [5.0, 0.0], [0.0, 3.0]])
    assert k_center_greedy(features, 3)[0] == [0, 3, 4]
    uncertain = np.array([[0.5, 0.5]] * 3 + [[0.6, 0.4], [0.7, 0.3]])
    assert choose_queue(uncertain, features, 2).rows == [0, 3]  # one of the three copies, then the farthest


def test_a_failed_label_leaves_the_previous_files_whole(trained, tmp_path, monkeypatch):
    """Its files are written aside and renamed in together: a full disk half-way keeps the previous set, a mix never."""
    import errno

    from finetune.runs import label as label_module

    run, pool, _ = trained
    out = tmp_path / "q"
    (out / "mine").mkdir(parents=True)  # the user's own files beside them are never touched
    label(run=run, unlabeled=pool, out=out, target_precision=0.0001, budget=3, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(label_module, "render_label_page", full)
    with pytest.raises(finetune.errors.RunDirError, match=r"cannot write .*: the disk is full"):
        label(run=run, unlabeled=pool, out=out, target_precision=0.0001, budget=5, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["mine"]
