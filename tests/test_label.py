"""`finetune label`: pseudo-labels at a precision chosen on validation, a diverse queue to label next, its files."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import finetune
from finetune import label, train
from finetune.errors import UsageError
from finetune.evaluation.intervals import wilson_interval
from finetune.evaluation.labeling import Tally
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


def _validation(run):
    trained = load_trained(run)
    logits, targets = trained.validation
    return trained.task.probs(logits, trained.temperature), targets


def _reachable_target(run) -> float:
    """A precision the run's validation split vouches for at the Wilson lower bound (just below its best), or 0."""
    from finetune.evaluation.labeling import best_lower_bound

    probs, targets = _validation(run)
    return 0.999 * best_lower_bound(probs.max(axis=1), probs.argmax(axis=1) == targets)


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
    # by construction: the validation images at or above their class's threshold reach the target at the lower bound
    probs, targets = _validation(run)
    per_class = summary["per_class"]
    names = list(per_class)
    assert names == load_trained(run).class_names and {c["rule"] for c in per_class.values()} <= {"own", "global", "none"}
    thresholds = np.array([c["threshold"] if c["threshold"] is not None else np.inf for c in per_class.values()])
    kept = probs.max(axis=1) >= thresholds[probs.argmax(axis=1)]
    precision = float((probs.argmax(axis=1)[kept] == targets[kept]).mean())
    assert precision == pytest.approx(summary["validation_precision"])
    assert kept.sum() == summary["validation_answered"]
    low, high = summary["validation_precision_ci95"]
    assert low <= precision <= high
    global_kept = probs.max(axis=1) >= summary["threshold"]
    assert wilson_interval(int((probs.argmax(axis=1) == targets)[global_kept].sum()), int(global_kept.sum()))[0] >= target
    shown = predictions.set_index("path")
    mine = thresholds[[names.index(x) for x in shown.loc[result.pseudo_labels["path"], "predicted_label"]]]
    assert (result.pseudo_labels["confidence"].to_numpy() >= mine).all()
    above = predictions[predictions["confidence"] >= thresholds[[names.index(x) for x in predictions["predicted_label"]]]]
    assert len(result.pseudo_labels) == len(above) - above["path"].isin(result.queue["path"]).sum()
    assert not set(result.queue["path"]) & set(result.pseudo_labels["path"])  # a queued image goes to a person
    assert result.pseudo_labels["confidence"].is_monotonic_increasing  # lowest confidence first
    assert summary["expected_wrong_labels"] == pytest.approx(len(result.pseudo_labels) * (1 - precision))
    markdown = (out / "summary.md").read_text()
    assert "Wilson interval" in markdown and "a class's own threshold needs at least" in markdown
    assert all(f"  - {name}: " in markdown for name in names)
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
    # the queue is in k-center order, not by doubt: the page says so rather than "the model is least sure of them"
    assert "the first is the image the model is least sure of" in html and "(up to 20) images it is least sure of" in html
    # the queue as a FiftyOne image classification dataset: data/<uuid>.<ext> + labels.json (unlabelled: null targets)
    fiftyone = out / "fiftyone"
    labels = json.loads((fiftyone / "labels.json").read_text())
    suggestions = json.loads((fiftyone / "suggestions.json").read_text())
    names = load_trained(run).class_names
    assert labels["classes"] == suggestions["classes"] == names
    stems = [p.rsplit("/", 1)[1].rsplit(".", 1)[0] for p in result.queue["path"]]
    assert list(labels["labels"]) == stems and set(labels["labels"].values()) == {None}
    assert [names[i] for i in suggestions["labels"].values()] == list(result.queue["suggested_label"])
    assert sorted(p.stem for p in (fiftyone / "data").iterdir()) == sorted(stems)
    copied = fiftyone / "data" / result.queue["path"].iloc[0].rsplit("/", 1)[1]
    assert copied.read_bytes() == Path(result.queue["path"].iloc[0]).read_bytes()


def test_no_threshold_reaching_the_target_is_refused(trained, tmp_path):
    run, pool, _ = trained
    payload = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    wrong = (payload["val_logits"].argmax(dim=1) + 1) % 3  # every validation answer wrong
    payload["val_targets"] = wrong
    torch.save(payload, tmp_path / "wrong.pt")
    with pytest.raises(
        UsageError, match=r"no confidence threshold reaches precision 50\.0% on the run's \d+ validation images at the 95% Wilson"
    ):
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

    args = [
        "label",
        str(run),
        "--unlabeled",
        str(manifest),
        "--out",
        str(tmp_path / "c"),
        "--budget",
        "1",
        "--target-precision",
        "0.01",
        "-q",
    ]
    shown = CliRunner().invoke(app, args)
    assert shown.exit_code == 0, shown.output
    assert "of 4 pseudo-labelled" in shown.stdout and (tmp_path / "c" / "label.html").is_file()
    with pytest.raises(UsageError, match=r"--budget -1: how many images"):
        label(run=run, unlabeled=pool, out=tmp_path / "r", budget=-1, progress=False)
    for wrong in (1.5, 1.0):
        with pytest.raises(UsageError, match=rf"--target-precision {wrong}: a precision between 0 and 1 \(not 1 itself\)"):
            label(run=run, unlabeled=pool, out=tmp_path / "r", target_precision=wrong, progress=False)


def test_the_threshold_and_the_queue_on_numbers():
    from finetune.evaluation.labeling import choose_queue, images_to_vouch, k_center_greedy, lower_bound_threshold

    # confidence 0.9, 0.8 (right), 0.7 (wrong), 0.6 (right): lower bounds 0.21, 0.34, 0.21, 0.30 (Wilson, 95%)
    confidence = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, True, False, True])
    assert lower_bound_threshold(confidence, correct, 0.3) == Tally(0.6, 4, 3)  # the lowest threshold reaching it
    assert lower_bound_threshold(confidence, correct, 0.33) == Tally(0.8, 2, 2)  # 3 of 4 right vouches only for 0.30
    assert lower_bound_threshold(confidence, correct, 0.5) is None  # a point estimate of 1.0 on 2 images is not enough
    assert images_to_vouch(0.95) == 73 and wilson_interval(73, 73)[0] >= 0.95 > wilson_interval(72, 72)[0]
    features = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [5.0, 0.0], [0.0, 3.0]])
    assert k_center_greedy(features, 3)[0] == [0, 3, 4]
    uncertain = np.array([[0.5, 0.5]] * 3 + [[0.6, 0.4], [0.7, 0.3]])
    assert choose_queue(uncertain, features, 2).rows == [0, 3]  # one of the three copies, then the farthest


def test_per_class_thresholds_own_global_or_none():
    from finetune.evaluation.labeling import precision_rule

    rng = np.random.default_rng(0)
    # class 0: 200 answers, all right above 0.8 and half wrong below; class 1: 200 answers below 0.8, one in three
    # wrong at every confidence (never reaches 0.9 at the lower bound); class 2: 5 answers (too few to vouch alone: the global rule)
    conf0 = rng.uniform(0.5, 1.0, 200)
    right0 = (conf0 >= 0.8) | (rng.random(200) < 0.5)
    conf1 = rng.uniform(0.5, 0.8, 200)
    right1 = np.arange(200) % 3 != 0
    conf2 = np.full(5, 0.99)
    confidence = np.r_[conf0, conf1, conf2]
    predicted = np.r_[np.zeros(200, int), np.ones(200, int), np.full(5, 2)]
    targets = np.where(np.r_[right0, right1, np.ones(5, bool)], predicted, (predicted + 1) % 3)
    probs = np.zeros((405, 3))
    probs[np.arange(405), predicted] = confidence
    probs[np.arange(405), (predicted + 1) % 3] = 1 - confidence
    rule = precision_rule(probs, targets, 0.9, class_names=["a", "b", "c"])
    a, b, c = rule.classes
    assert a.rule == "own" and a.threshold > 0.75 and wilson_interval(a.correct, a.answered)[0] >= 0.9
    assert b.rule == "none" and b.threshold == np.inf and b.answered == 0
    assert c.rule == "global" and c.threshold == rule.threshold and c.predicted == 5
    assert not rule.keep(probs[200:400]).any()  # class b is never pseudo-labelled
    summary = rule.to_dict()
    assert summary["per_class"]["b"]["rule"] == "none" and summary["per_class"]["b"]["threshold"] is None
    assert precision_rule(probs[200:400], targets[200:400], 0.9) is None  # nothing reaches the target: refused


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
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["fiftyone", "mine"]
    assert len(json.loads((out / "fiftyone" / "labels.json").read_text())["labels"]) == 3  # the previous queue, whole
    monkeypatch.undo()
    label(run=run, unlabeled=pool, out=out, target_precision=0.0001, budget=2, progress=False)  # a folder replaced whole
    assert len(list((out / "fiftyone" / "data").iterdir())) == 2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_fiftyone_names_follow_its_exporter_on_clashes(tmp_path):
    from finetune.reporting.fiftyone_format import unique_stem, write_fiftyone_dataset

    taken: set[str] = set()
    assert [unique_stem(s, taken) for s in ("a", "a", "b", "a")] == ["a", "a-2", "b", "a-3"]
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / folder / "same.png")
    queue = pd.DataFrame(
        {"path": [str(tmp_path / "x" / "same.png"), str(tmp_path / "y" / "same.png")], "suggested_label": ["b", "a"]}
    )
    sources = write_fiftyone_dataset(tmp_path / "fo", queue, ["a", "b"])
    assert sources == {"same": str(tmp_path / "x" / "same.png"), "same-2": str(tmp_path / "y" / "same.png")}
    assert json.loads((tmp_path / "fo" / "suggestions.json").read_text())["labels"] == {"same": 1, "same-2": 0}
    assert sorted(p.name for p in (tmp_path / "fo" / "data").iterdir()) == ["same-2.png", "same.png"]


def test_the_queue_round_trips_through_label_studio_and_fiftyone_into_data(trained, tmp_path):
    """label's Label Studio tasks and FiftyOne folder, labelled as the tools would, read back by train, check and eval."""
    run, pool, _ = trained
    out = tmp_path / "q"
    result = label(run=run, unlabeled=pool, out=out, target_precision=0.0001, budget=15, progress=False)
    queued = len(result.queue)
    assert queued >= 12
    names = load_trained(run).class_names
    truth = {str(p): ["cat", "dog", "eel"][int(p.name.split("_")[1])] for p in pool.iterdir()}
    tasks = json.loads((out / "label_studio_tasks.json").read_text())
    for n, task in enumerate(tasks):  # a person labels each task; Label Studio exports task id, data and annotations
        task["id"] = n + 1
        choice = {
            "from_name": "choice",
            "to_name": "image",
            "type": "choices",
            "value": {"choices": [truth[task["data"]["path"]]]},
        }
        task["annotations"] = [{"id": n + 1, "result": [choice], "was_cancelled": False, "ground_truth": False}]
    export = tmp_path / "project-1-at-2026-11-30.json"
    export.write_text(json.dumps(tasks))
    from finetune.config.schema import DataConfig
    from finetune.data.scan import read_samples

    rows = read_samples(DataConfig(path=export))
    assert dict(zip(rows["path"], rows["label"])) == {p: truth[p] for p in result.queue["path"]}
    fiftyone = out / "fiftyone"
    labels = json.loads((fiftyone / "labels.json").read_text())
    sources = dict(zip([p.rsplit("/", 1)[1].rsplit(".", 1)[0] for p in result.queue["path"]], result.queue["path"]))
    labels["labels"] = {uuid: names.index(truth[sources[uuid]]) for uuid in labels["labels"]}  # as FiftyOne exports
    (fiftyone / "labels.json").write_text(json.dumps(labels))
    rows = read_samples(DataConfig(path=fiftyone))
    assert {p.rsplit("/", 1)[1]: label for p, label in zip(rows["path"], rows["label"])} == {
        p.rsplit("/", 1)[1]: truth[p] for p in result.queue["path"]
    }
    checked = finetune.check(data=export, progress=False)
    assert checked.summary["images"] == queued and checked.summary["classes"] == len({truth[p] for p in result.queue["path"]})
    report = finetune.evaluate(run=run, data=fiftyone, out=tmp_path / "report", progress=False)
    assert report.metrics["num_images"] == queued
    from typer.testing import CliRunner

    from finetune.cli import app

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(json.dumps(tiny_recipe(data={"val_fraction": 0.34})))
    shown = CliRunner().invoke(app, ["train", str(recipe), "--data", str(export), "--out", str(tmp_path / "again"), "-q"])
    assert shown.exit_code == 0, shown.output
    splits = pd.read_csv(tmp_path / "again" / "splits.csv")
    assert sorted(splits["path"]) == sorted(result.queue["path"])


def test_merge_labels_keeps_val_and_test_and_sends_new_and_pseudo_labels_to_train(tmp_path):
    from finetune.config.schema import DataConfig
    from finetune.data.scan import read_samples
    from finetune.data.split import split_samples
    from finetune.errors import DataError

    data = make_folder(tmp_path / "data", per_class=3)
    images = {
        (c, i): str(data / c / f)
        for c in ("cat", "dog", "eel")
        for i, f in enumerate(sorted(p.name for p in (data / c).iterdir()))
    }
    run = tmp_path / "run"
    run.mkdir()
    split = {0: "test", 1: "val", 2: "train"}
    pd.DataFrame([(p, c, split[i]) for (c, i), p in images.items()], columns=["path", "label", "split"]).to_csv(
        run / "splits.csv", index=False
    )
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(3):
        Image.fromarray(_pattern(i, 200 + i)).save(pool / f"p{i}.png")
    queue = tmp_path / "q"
    queue.mkdir()
    pd.DataFrame(
        {
            "path": [str(pool / "p0.png"), str(pool / "p1.png"), images["cat", 2]],
            "label": ["cat", "dog", "dog"],
            "confidence": [0.99, 0.98, 0.97],
        }
    ).to_csv(queue / "pseudo_labels.csv", index=False)
    new = tmp_path / "new.csv"
    new.write_text(f"path,label\n{pool / 'p1.png'},eel\n{pool / 'p2.png'},eel\n{images['dog', 2]},eel\n{images['cat', 0]},cat\n")
    merged = tmp_path / "merged.csv"
    result = finetune.merge_labels(run=run, out=merged, pseudo_labels=queue, labelled=[new], progress=False)
    rows = pd.read_csv(merged, keep_default_na=False).set_index("path")
    assert list(pd.read_csv(merged).columns) == ["path", "label", "split", "source", "confidence"]
    assert rows.loc[str(pool / "p0.png"), ["label", "split", "source"]].tolist() == ["cat", "train", "pseudo"]
    assert rows.loc[str(pool / "p1.png"), ["label", "split", "source"]].tolist() == ["eel", "train", "new"]  # a person wins
    assert rows.loc[images["cat", 2], ["label", "source"]].tolist() == ["cat", "labelled"]  # the pseudo-label dropped
    assert rows.loc[images["dog", 2], ["label", "split", "source"]].tolist() == ["eel", "train", "new"]  # relabelled
    assert rows.loc[images["cat", 0], ["label", "split"]].tolist() == ["cat", "test"]  # agreeing: keeps its test split
    assert {p: s for p, s in rows["split"].items() if p in images.values()} == {p: split[i] for (_, i), p in images.items()}
    assert set(rows.loc[rows["source"] != "labelled", "split"]) == {"train"} and len(rows) == 9 + 3
    assert result.counts == {
        "labelled": 8,
        "new": 3,
        "pseudo": 1,
        "pseudo_dropped_already_labelled": 2,
        "train_labels_replaced": 1,
        "train_images": 6,
        "val_images": 3,
        "test_images": 3,
    }
    samples = read_samples(DataConfig(path=merged))  # the next train reads the splits as they are
    again = split_samples(samples, val_fraction=0.25, test_fraction=0.1, seed=1)
    assert dict(zip(again["path"], again["split"])) == rows["split"].to_dict()
    # a new label contradicting a val or test image, by path or by bytes (FiftyOne's data/ holds copies): refused
    fiftyone = tmp_path / "fo"
    (fiftyone / "data").mkdir(parents=True)
    shutil.copy(images["dog", 0], fiftyone / "data" / "x.png")
    (fiftyone / "labels.json").write_text(json.dumps({"classes": ["cat", "dog"], "labels": {"x": 0}}))
    with pytest.raises(
        DataError, match=r"new label 'cat' for .*x.png, which is the run's test image .*labelled 'dog'; a merge never"
    ):
        finetune.merge_labels(run=run, out=tmp_path / "m2.csv", labelled=[fiftyone], progress=False)
    new.write_text(f"path,label\n{images['eel', 1]},cat\n")
    with pytest.raises(DataError, match=r"which is the run's val image"):
        finetune.merge_labels(run=run, out=tmp_path / "m2.csv", labelled=[new], progress=False)
    assert not (tmp_path / "m2.csv").exists()
    with pytest.raises(UsageError, match=r"has no splits.csv; pass the run folder"):
        finetune.merge_labels(run=tmp_path, out=tmp_path / "m2.csv", progress=False)
    with pytest.raises(UsageError, match=r"--pseudo-labels .*: no pseudo_labels.csv there"):
        finetune.merge_labels(run=run, out=tmp_path / "m2.csv", pseudo_labels=tmp_path, progress=False)
    from typer.testing import CliRunner

    from finetune.cli import app

    args = ["merge-labels", str(run), "--out", str(tmp_path / "m3.csv"), "--pseudo-labels", str(queue), "-q"]
    shown = CliRunner().invoke(app, args)
    assert shown.exit_code == 0, shown.output
    assert "(9 labelled, 0 new, 2 pseudo) | train 5, val 3, test 3" in shown.stdout


def test_merge_labels_trains_one_picture_labelled_in_two_tools_once(tmp_path):
    """The pool's file labelled in a CSV and its FiftyOne copy labelled too: one training row (the last file wins)."""
    data = make_folder(tmp_path / "data", per_class=2)
    run = tmp_path / "run"
    run.mkdir()
    rows = [(str(p), p.parent.name, "train") for p in sorted(data.rglob("*.png"))]
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(run / "splits.csv", index=False)
    pool = tmp_path / "pool"
    pool.mkdir()
    Image.fromarray(_pattern(1, 300)).save(pool / "p.png")
    fiftyone = tmp_path / "fo"
    (fiftyone / "data").mkdir(parents=True)
    shutil.copy(pool / "p.png", fiftyone / "data" / "p.png")
    (fiftyone / "labels.json").write_text(json.dumps({"classes": ["cat", "dog"], "labels": {"p": 1}}))
    new = tmp_path / "new.csv"
    new.write_text(f"path,label\n{pool / 'p.png'},cat\n")
    result = finetune.merge_labels(run=run, out=tmp_path / "m.csv", labelled=[new, fiftyone], progress=False)
    added = result.rows[result.rows["source"] == "new"]
    assert len(added) == 1 and added["label"].tolist() == ["dog"] and result.counts["new"] == 1
