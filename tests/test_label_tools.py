"""Labelling tools' exports read as manifests: Label Studio JSON exports and FiftyOne classification dataset folders."""

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from finetune.config.schema import DataConfig
from finetune.data.scan import read_samples
from finetune.errors import DataError


def _images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(folder / name)
    return [folder / n for n in names]


def _task(task_id, image, *choices, cancelled=False, data=None, ground_truth=False):
    result = [{"from_name": "choice", "to_name": "image", "type": "choices", "value": {"choices": list(choices)}}]
    annotation = {"id": 100 + task_id, "result": result, "was_cancelled": cancelled, "ground_truth": ground_truth}
    return {"id": task_id, "data": data or {"image": image}, "annotations": [annotation] if choices or cancelled else []}


def _read(path):
    return read_samples(DataConfig(path=path))


def test_label_studio_export_resolves_images_and_skips_unlabelled_tasks(tmp_path, caplog):
    a, b, c, d = _images(tmp_path / "pool", ["a.png", "b b.png", "c.png", "d.png"])
    export = tmp_path / "export" / "project-1.json"
    export.parent.mkdir()
    (tmp_path / "export" / "rel").mkdir()
    (tmp_path / "export" / "rel" / "e.png").write_bytes(a.read_bytes())
    tasks = [
        _task(1, "/data/local-files/?d=" + str(b).lstrip("/").replace(" ", "%20"), "dog"),  # local files, root /
        _task(2, "https://example.org/x.png", "cat", data={"image": "https://example.org/x.png", "path": str(a)}),
        _task(3, "/data/local-files/?d=rel/e.png", "cat"),  # local files, root = the JSON's folder
        _task(4, str(c)),  # no annotation: left out
        _task(5, str(d), "dog", cancelled=True),  # skipped in Label Studio: left out
        _task(6, "rel/e.png", "cat"),  # a relative path, the same file as task 3
    ]
    tasks[3]["annotations"] = []
    export.write_text(json.dumps(tasks))
    with caplog.at_level(logging.WARNING):
        rows = _read(export)
    assert dict(zip(rows["path"], rows["label"])) == {
        str(b): "dog",
        str(a): "cat",
        "/" + str(tmp_path / "export" / "rel" / "e.png").lstrip("/"): "cat",
    }
    assert set(rows["split"]) == {""}
    assert "1 task(s) without an annotation and 1 with every annotation cancelled are left out; 4 read" in caplog.text


def test_label_studio_errors_are_one_line(tmp_path):
    (a,) = _images(tmp_path, ["a.png"])
    export = tmp_path / "x.json"
    cases = [
        ([_task(7, str(a), "cat", "dog")], r"task 7 has 2 choices in one annotation \(cat, dog\); finetune reads one label"),
        ([_task(8, "/data/upload/1/a.png", "cat")], r"task 8: image '/data/upload/1/a.png' not found; keep the 'path' field"),
        ([_task(9, str(a))], r"none of its 1 task\(s\) has a label"),
        ({"data": {}}, r"is no Label Studio JSON export \(a list of tasks, each with 'data'\); export the project"),
        ([{"image": str(a), "choice": "cat"}], r"is no Label Studio JSON export"),  # JSON-MIN
    ]
    for payload, message in cases:
        export.write_text(json.dumps(payload))
        with pytest.raises(DataError, match=message):
            _read(export)
    two = _task(10, str(a), "cat")
    two["annotations"].append({"result": _task(0, "", "dog")["annotations"][0]["result"]})
    export.write_text(json.dumps([two]))
    with pytest.raises(DataError, match=r"task 10 has annotations that disagree \(cat, dog\); keep one, or mark one"):
        _read(export)
    two["annotations"][1]["ground_truth"] = True
    export.write_text(json.dumps([two]))
    assert list(_read(export)["label"]) == ["dog"]  # the ground-truth annotation wins
    export.write_text("{not json")
    with pytest.raises(DataError, match=r"x.json is not readable JSON"):
        _read(export)
    with pytest.raises(DataError, match=r"missing.json does not exist; check --data"):
        _read(tmp_path / "missing.json")


def test_fiftyone_dataset_folder(tmp_path, caplog):
    folder = tmp_path / "fo"
    _images(folder / "data", ["a.png", "b.jpg", "c.png"])
    _images(folder / "data" / "sub", ["d.png"])
    labels = {"classes": ["cat", "dog"], "labels": {"a": 0, "b": {"label": 1, "confidence": 0.9}, "c": None, "sub/d": 1}}
    (folder / "labels.json").write_text(json.dumps(labels))
    with caplog.at_level(logging.WARNING):
        rows = _read(folder)
    found = {p.rsplit("/data/", 1)[1]: label for p, label in zip(rows["path"], rows["label"])}
    assert found == {"a.png": "cat", "b.jpg": "dog", "sub/d.png": "dog"}
    assert "1 image(s) without a label (null) are left out; 3 read" in caplog.text
    (folder / "labels.json").write_text(json.dumps({"labels": {"a": "cat", "b": "dog"}}))  # no classes: names
    assert sorted(_read(folder)["label"]) == ["cat", "dog"]
    cases = [
        ({"classes": ["cat"], "labels": {"a": 3}}, r"image 'a' has class index 3 but labels.json has 1 classes"),
        ({"labels": {"zz": "cat"}}, r"image 'zz' of labels.json has no file in .*data \(a file named zz.<ext>\)"),
        ({"labels": {"a": ["cat", "dog"]}}, r"image 'a' has 2 labels \(Classifications\); finetune reads one label"),
        ({"labels": [1, 2]}, r"is no FiftyOne image classification dataset: labels.json must be"),
        ({"labels": {"a": None}}, r"none of its 1 image\(s\) has a label in labels.json"),
    ]
    for payload, message in cases:
        (folder / "labels.json").write_text(json.dumps(payload))
        with pytest.raises(DataError, match=message):
            _read(folder)


def test_exports_given_by_a_relative_path_find_their_images(tmp_path, monkeypatch):
    """README's `finetune eval RUN --data queue/fiftyone` and a Label Studio export saved in another folder (its tasks'
    `data.path` relative to where `finetune label` ran): their images were read from the export's folder, missing."""
    monkeypatch.chdir(tmp_path)
    (a,) = _images(tmp_path / "pool", ["a.png"])
    (tmp_path / "Downloads").mkdir()
    tasks = [_task(1, "/data/local-files/?d=nowhere/a.png", "cat", data={"image": "x", "path": "pool/a.png"})]
    (tmp_path / "Downloads" / "project-1.json").write_text(json.dumps(tasks))
    assert list(_read(Path("Downloads/project-1.json"))["path"]) == [str(a)]
    _images(tmp_path / "queue" / "fiftyone" / "data", ["b.png"])
    (tmp_path / "queue" / "fiftyone" / "labels.json").write_text(json.dumps({"classes": ["cat"], "labels": {"b": 0}}))
    assert list(_read(Path("queue/fiftyone"))["path"]) == [str(tmp_path / "queue" / "fiftyone" / "data" / "b.png")]


def test_a_file_under_two_labels_is_refused_as_in_a_csv_manifest(tmp_path):
    (a,) = _images(tmp_path, ["a.png"])
    export = tmp_path / "x.json"
    export.write_text(json.dumps([_task(1, str(a), "cat"), _task(2, "a.png", "dog")]))
    with pytest.raises(DataError, match=r"manifest .*x.json: .*a.png is listed under 2 labels \(cat, dog\)"):
        _read(export)
