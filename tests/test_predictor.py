"""The notebook API: `finetune.load(run)` once, then `predict` on paths, folders, PIL images and numpy arrays."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import finetune
from finetune import predict, train
from finetune.errors import DataError

from conftest import make_folder, tiny_recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("predictor")
    data = make_folder(root / "data", per_class=6)
    return train(recipe=tiny_recipe(), data=data, out=root / "run", progress=False).run_dir, root


def _picture(seed, shape=(40, 30, 3)):
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def test_pil_images_and_arrays_predict_what_their_saved_files_predict(trained):
    run, root = trained
    rgb, grey, rgba = _picture(1), _picture(2, (36, 36)), _picture(3, (30, 44, 4))
    files = [root / "rgb.png", root / "grey.png", root / "rgba.png"]
    Image.fromarray(rgb).save(files[0])
    Image.fromarray(grey).save(files[1])
    Image.fromarray(rgba, "RGBA").save(files[2])
    from_files = predict(run=run, inputs=files, progress=False)
    with Image.open(files[0]) as a, Image.open(files[1]) as b, Image.open(files[2]) as c:
        from_pil = predict(run=run, inputs=[a, b, c], progress=False)
    from_arrays = finetune.load(run).predict([rgb, grey, rgba])
    assert list(from_pil["path"]) == ["<PIL image 0>", "<PIL image 1>", "<PIL image 2>"]
    assert list(from_arrays["path"]) == ["<array 0>", "<array 1>", "<array 2>"]
    numbers = [c for c in from_files.columns if c != "path"]
    pd.testing.assert_frame_equal(from_pil[numbers], from_files[numbers])
    pd.testing.assert_frame_equal(from_arrays[numbers], from_files[numbers])


def test_a_loaded_predictor_keeps_order_and_answers_repeatedly(trained):
    run, root = trained
    predictor = finetune.load(run)
    assert predictor.class_names == ["cat", "dog", "eel"]
    folder = root / "data" / "dog"
    mixed = predictor.predict([_picture(4), folder, str(root / "data" / "cat" / "img_00.jpg")])
    assert mixed["path"].iloc[0] == "<array 0>" and mixed["path"].iloc[-1].endswith("img_00.jpg")
    assert len(mixed) == 1 + len(list(folder.iterdir())) + 1
    single = predictor.predict(_picture(4))  # one picture need not be in a list
    pd.testing.assert_frame_equal(single.drop(columns="path"), mixed.iloc[:1].drop(columns="path"))


@pytest.mark.parametrize(
    ("picture", "message"),
    [
        (np.zeros((8, 8, 3), dtype=np.float32), r"input 0 \(array\) is a float32 array; pass uint8 RGB pixels from 0 to 255"),
        (np.zeros((8, 8, 5), dtype=np.uint8), r"input 0 \(array\) is an array of shape \(8, 8, 5\); pass height x width x 3"),
        (42, r"input 0 is a int; pass a file path, a folder, a PIL image or a numpy array"),
    ],
)
def test_unusable_pictures_get_one_line_errors(trained, picture, message):
    run, _ = trained
    with pytest.raises(DataError, match=message):
        finetune.load(run).predict([picture])


def test_a_folder_streams_in_one_decoding_pass_leaving_unreadable_files_out(trained, tmp_path, caplog, monkeypatch):
    from finetune.data import loader

    run, _ = trained
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(_picture(10 + i)).save(folder / f"good_{i}.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "cut.png").write_bytes((folder / "good_0.png").read_bytes()[:60])
    decoded = []
    real = loader.load_image
    monkeypatch.setattr(loader, "load_image", lambda path: decoded.append(path) or real(path))
    table = predict(run=run, inputs=[folder], progress=False)
    assert sorted(table["path"].map(lambda p: p.rsplit("/", 1)[-1])) == ["good_0.png", "good_1.png", "good_2.png"]
    assert sorted(decoded) == sorted(str(p) for p in folder.iterdir())  # each file decoded once: no screening pass
    (said,) = [r.getMessage() for r in caplog.records if "skipped 2 unreadable image(s)" in r.getMessage()]
    assert "they get no prediction: replace the files, or leave them out of the input" in said  # predict's advice


def test_reject_auto_says_how_many_images_its_accuracy_rests_on(trained, caplog):
    run, root = trained
    caplog.set_level("INFO", logger="finetune")
    predictor = finetune.load(run)
    logits, targets = predictor.trained.validation
    predictor.predict([_picture(4)], reject="auto", target_accuracy=0.5)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("reject below confidence"))
    share, answered = (float(x) for x in __import__("re").search(r"([\d.]+)% of images \((\d+)\) answered", line).groups())
    assert answered == round(share / 100 * len(targets)) and answered <= len(targets) < 10
    assert line.endswith(", too few to trust")  # a handful of validation images cannot vouch for an accuracy


def test_a_summary_of_perfect_answers_names_no_weakest_class(tmp_path):
    from finetune.inference.predictions import Predictions
    from finetune.reporting.report import write_report

    probs = np.eye(3)[[0, 1, 2, 0, 1, 2]] * 0.9 + 0.1 / 3
    write_report(
        Predictions(paths=list("abcdef"), probs=probs, targets=np.array([0, 1, 2, 0, 1, 2])),
        ["x", "y", "z"],
        tmp_path,
        top_k=1,
        title="t",
    )
    summary = (tmp_path / "summary.md").read_text()
    assert (
        "Weakest class" not in summary
        and "Every class is right on all 6 images (F1 1.000 each): no weakest class here." in summary
    )
