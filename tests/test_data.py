from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from finetune.config.schema import DataConfig
from finetune.data.decode import load_image
from finetune.data.scan import read_manifest, scan_image_folder
from finetune.data.split import load_dataset_index
from finetune.errors import DataError

from conftest import CLASSES, MODES, make_folder, write_mode_image

EXT = DataConfig().extensions


@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_decodes_to_rgb_uint8(tmp_path, mode):
    array = np.zeros((20, 30, 3), np.uint8)
    array[:, :10] = (220, 210, 200)
    write_mode_image(tmp_path / "x", mode, array)
    (path,) = list(tmp_path.iterdir())
    image = load_image(path)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    expected = (30, 20) if mode == "exif_jpeg" else (20, 30)  # EXIF orientation 6 rotates a landscape photo
    assert image.shape[:2] == expected
    assert image.max() > 100, "16-bit and palette images keep their brightness"


def test_exif_rotation_is_applied(tmp_path):
    array = np.zeros((20, 30, 3), np.uint8)
    array[:, :10] = 255  # bright left band
    write_mode_image(tmp_path / "r", "exif_jpeg", array)
    image = load_image(tmp_path / "r.jpg")
    assert image[:10].mean() > 200 and image[-5:].mean() < 50  # rotated 90 CW: the band is now on top


def test_undecodable_file_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cannot decode image .*broken.jpg"):
        load_image(bad)


def test_scan_flat_folder_sorted_classes_and_hidden_files_ignored(image_folder):
    (image_folder / "cat" / ".DS_Store").write_bytes(b"junk")
    (image_folder / "cat" / "notes.txt").write_text("x")
    samples = scan_image_folder(image_folder, extensions=EXT)
    assert sorted(samples["label"].unique()) == list(CLASSES)
    assert len(samples) == 8 * len(CLASSES)
    assert (samples["split"] == "").all()


def test_flat_folder_split_is_stratified_seeded_and_saved_order(image_folder):
    cfg = DataConfig(path=image_folder, val_fraction=0.25, test_fraction=0.25)
    first = load_dataset_index(cfg, seed=3)
    again = load_dataset_index(cfg, seed=3)
    other = load_dataset_index(cfg, seed=4)
    pd.testing.assert_frame_equal(first.samples, again.samples)
    assert not first.samples.equals(other.samples)
    counts = first.samples.groupby(["split", "label"]).size().unstack()
    assert (counts.loc["val"] == 2).all() and (counts.loc["test"] == 2).all() and (counts.loc["train"] == 4).all()
    assert first.class_names == sorted(CLASSES)


def test_presplit_folder_is_respected(presplit_folder):
    index = load_dataset_index(DataConfig(path=presplit_folder), seed=0)
    assert set(index.samples["split"]) == {"train", "val"}
    assert (index.split("val")["path"].str.contains("/val/")).all()


def test_presplit_without_val_gets_a_val_split(tmp_path):
    make_folder(tmp_path / "d" / "train", per_class=8)
    index = load_dataset_index(DataConfig(path=tmp_path / "d", val_fraction=0.25), seed=0)
    assert (index.samples["split"] == "val").sum() == 6


def test_manifest_csv(tmp_path, image_folder):
    rows = [(str(p.relative_to(tmp_path)), p.parent.name) for p in sorted(image_folder.rglob("*.*"))]
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(tmp_path / "m.csv", index=False)
    index = load_dataset_index(DataConfig(path=tmp_path / "m.csv"), seed=0)
    assert len(index.samples) == len(rows) and index.class_names == sorted(CLASSES)


def test_manifest_errors(tmp_path):
    (tmp_path / "m.csv").write_text("file,class\na.jpg,x\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['label', 'path'\]"):
        read_manifest(tmp_path / "m.csv")
    (tmp_path / "n.csv").write_text("path,label\nmissing.jpg,x\n")
    with pytest.raises(DataError, match=r"names 1 missing file\(s\), first: .*missing.jpg"):
        read_manifest(tmp_path / "n.csv")


def test_data_errors_are_explicit(tmp_path, image_folder):
    with pytest.raises(DataError, match=r"no data given; pass --data"):
        load_dataset_index(DataConfig(), seed=0)
    with pytest.raises(DataError, match=r"data folder .*nowhere does not exist"):
        load_dataset_index(DataConfig(path=tmp_path / "nowhere"), seed=0)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images found in .*empty"):
        load_dataset_index(DataConfig(path=tmp_path / "empty"), seed=0)
    make_folder(tmp_path / "one", classes=("only",))
    with pytest.raises(DataError, match=r"at least 2 classes"):
        load_dataset_index(DataConfig(path=tmp_path / "one"), seed=0)
    make_folder(tmp_path / "tiny", per_class=1)
    with pytest.raises(DataError, match=r"cannot make a stratified val split: class '.*' has 1 image"):
        load_dataset_index(DataConfig(path=tmp_path / "tiny"), seed=0)


def test_val_only_class_is_an_error(tmp_path):
    make_folder(tmp_path / "d" / "train", classes=("a", "b"))
    make_folder(tmp_path / "d" / "val", classes=("a", "b", "c"), per_class=2)
    with pytest.raises(DataError, match=r"class\(es\) \['c'\] appear in val/test but have no training images"):
        load_dataset_index(DataConfig(path=tmp_path / "d"), seed=0)


def test_split_folders_are_recognised_in_one_place(tmp_path):
    """Data and doctor agree: split names in any case, OS metadata folders ignored, mixed layouts refused."""
    from finetune.data.doctor import check_dataset

    make_folder(tmp_path / "a" / "Train", per_class=4)
    make_folder(tmp_path / "a" / "Valid", per_class=2)
    (tmp_path / "a" / "__MACOSX").mkdir()
    samples = scan_image_folder(tmp_path / "a", extensions=EXT)
    assert set(samples["split"]) == {"train", "val"} and set(samples["label"]) == set(CLASSES)
    assert check_dataset(tmp_path / "a", extensions=EXT, progress=False).summary["classes"] == len(CLASSES)
    make_folder(tmp_path / "b" / "train", per_class=2)
    make_folder(tmp_path / "b" / "val", per_class=2)
    make_folder(tmp_path / "b", per_class=2, classes=("stray",))
    message = r"mixes split folders \(train, val\) with other folders \(stray\); put every class folder inside train/"
    with pytest.raises(DataError, match=message):
        scan_image_folder(tmp_path / "b", extensions=EXT)
    with pytest.raises(DataError, match=message):
        check_dataset(tmp_path / "b", extensions=EXT, progress=False)


def test_evaluate_and_predict_use_the_runs_extensions(tmp_path, image_folder):
    from finetune import evaluate, predict, train
    from finetune.config.loading import recipe_from_dict

    from conftest import tiny_recipe

    run = train(
        recipe=recipe_from_dict(tiny_recipe(data={"extensions": [".png"]})),
        data=image_folder,
        out=tmp_path / "run",
        progress=False,
    ).run_dir
    pngs = sorted(str(p) for p in (image_folder / "cat").glob("*.png"))
    table = predict(run=run, inputs=[image_folder / "cat"], progress=False)
    assert sorted(table["path"]) == pngs  # the .jpg files are not images of this run
    report = evaluate(run=run, data=image_folder, out=tmp_path / "eval", progress=False)
    assert report.metrics["num_images"] == sum(1 for _ in image_folder.rglob("*.png"))


def test_file_names_that_are_not_utf8_train_predict_and_round_trip(tmp_path, image_folder):
    """OpenCV crashes on such paths; finetune decodes bytes and keeps the names losslessly in its CSVs."""
    import os

    from finetune import predict, train
    from finetune.config.loading import recipe_from_dict
    from finetune.files import read_text_table

    from conftest import tiny_recipe

    odd = os.fsdecode(os.fsencode(str(image_folder / "cat")) + b"/caf\xe9_\xff.jpg")
    write_mode_image(Path(odd).with_suffix(""), "rgb_jpeg", np.full((32, 32, 3), 90, np.uint8))
    assert os.path.exists(odd)
    run = train(recipe=recipe_from_dict(tiny_recipe()), data=image_folder, out=tmp_path / "run", progress=False).run_dir
    assert odd in set(read_text_table(run / "splits.csv")["path"])  # the exact bytes come back
    table = predict(run=run, inputs=[odd, image_folder / "dog"], out=tmp_path / "preds.csv", progress=False)
    assert table["path"].iloc[0] == odd and odd in set(read_text_table(tmp_path / "preds.csv")["path"])


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        ("path,label\n", r"m.csv has a header but no rows; add one line per image"),
        (
            "path,label,split\nA,cat,train\nB,dog,training-set\n",
            r"m.csv: unknown split value\(s\) \['training-set'\]; use train, val or test",
        ),
        ("path,label\nA,cat\nB, \n", r"m.csv line 3: empty label for .*\.png; give every image a class"),
        ("path,label\nA,cat\nA,dog\n", r"m.csv: .*\.png is listed under 2 labels \(cat, dog\); keep one line per image"),
    ],
)
def test_manifest_mistakes_are_one_line_errors(tmp_path, image_folder, rows, pattern):
    files = sorted(image_folder.rglob("*.png"))
    (tmp_path / "m.csv").write_text(rows.replace("A", str(files[0])).replace("B", str(files[1])))
    with pytest.raises(DataError, match=pattern) as info:
        read_manifest(tmp_path / "m.csv")
    assert "\n" not in str(info.value)


def test_a_manifest_may_list_an_image_twice_under_one_label(tmp_path, image_folder):
    files = sorted(image_folder.rglob("*.png"))
    (tmp_path / "m.csv").write_text(f"path,label,split\n{files[0]},cat,Train\n{files[0]},cat,Train\n{files[1]},dog,VALID\n")
    frame = read_manifest(tmp_path / "m.csv")
    assert len(frame) == 2 and list(frame["split"]) == ["train", "val"]


def test_kept_decoded_images_give_the_same_items_within_the_budget(tmp_path, monkeypatch):
    """keep_decoded_mb: later reads of an image skip decoding, within the budget, and give the same tensors; a
    transform that writes into its input never changes the kept copy."""
    import finetune.data.loader as loader_module
    from finetune.data.loader import ImageDataset

    paths = []
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    decoded = []
    real = loader_module.load_image
    monkeypatch.setattr(loader_module, "load_image", lambda p: decoded.append(p) or real(p))

    def scribble(image):
        image[0, 0] = 255  # an in-place transform
        return {"image": torch.from_numpy(image.copy())}

    room_for_two = 2 * 20 * 20 * 3 / 2**20
    data = ImageDataset(paths, [0, 1, 2], scribble, keep_decoded_mb=room_for_two)
    first = [data[i][0] for i in range(3)]
    again = [data[i][0] for i in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert decoded == [*paths, paths[2]]  # the third did not fit: decoded both times
    assert int(first[1][1, 1, 0]) == 40 and int(again[0][0, 0, 0]) == 255
    assert int(data._kept[0][0, 0, 0]) == 0  # the kept array is untouched
