"""A dirty folder with every kind of bad file: `check` names each, `train` skips exactly the unreadable ones."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from finetune import train
from finetune.cli import app
from finetune.config.loading import recipe_from_dict
from finetune.config.schema import DataConfig
from finetune.data.doctor import check_dataset
from finetune.errors import DataError

from conftest import _pattern, make_folder, tiny_recipe, write_mode_image

EXT = DataConfig().extensions
UNREADABLE = {"empty.jpg": "empty", "truncated.jpg": "truncated", "notes.jpg": "not an image"}


def _dirty(root):
    """train/ and val/ with class folders, plus every bad-file kind of issue 5."""
    make_folder(root / "train", per_class=8)
    make_folder(root / "val", per_class=3)
    cat = root / "train" / "cat"
    (cat / "empty.jpg").write_bytes(b"")
    good = (cat / "img_00.jpg").read_bytes()
    (cat / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (cat / "notes.jpg").write_text("this is a text file with an image name")
    (cat / ".DS_Store").write_bytes(b"\x00\x01")
    (cat / "readme.txt").write_text("not an image")
    Image.fromarray(_pattern(0, 50)).save(cat / "gif_named.jpg", format="GIF")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(cat / "tiny.png")
    Image.fromarray(np.zeros((20, 300, 3), np.uint8) + 90).save(cat / "banner.png")
    (root / "train" / "empty_class").mkdir()
    make_folder(root / "train" / "_one", per_class=1, classes=("lonely",))
    (root / "train" / "_one" / "lonely").rename(root / "train" / "lonely")
    (root / "train" / "_one").rmdir()
    # duplicates: an exact copy within train, an exact copy across splits, a near copy (re-encoded) across splits
    (cat / "copy_of_00.jpg").write_bytes(good)
    (root / "val" / "cat" / "leak_exact.jpg").write_bytes(
        (cat / "img_01.png").read_bytes() if (cat / "img_01.png").exists() else good
    )
    Image.fromarray(_pattern(0, 3)).resize((31, 31)).resize((32, 32)).save(root / "val" / "cat" / "leak_near.png")
    return root


@pytest.fixture
def dirty(tmp_path):
    return _dirty(tmp_path / "dirty")


def _kinds(findings, name):
    return set(findings.loc[findings["path"].str.endswith(name), "kind"])


def test_check_names_every_problem(dirty):
    result = check_dataset(dirty, extensions=EXT, progress=False)
    f = result.findings
    for name, kind in UNREADABLE.items():
        assert kind in _kinds(f, name), name
        assert (f.loc[f["path"].str.endswith(name), "severity"] == "error").all()
    assert "extension mismatch" in _kinds(f, "gif_named.jpg")
    assert "tiny image" in _kinds(f, "tiny.png")
    assert "extreme aspect" in _kinds(f, "banner.png")
    assert "ignored hidden file" in _kinds(f, ".DS_Store") and "ignored non-image file" in _kinds(f, "readme.txt")
    for mode_file, detail in (
        ("img_01.png", "greyscale"),
        ("img_02.png", "palette"),
        ("img_03.png", "alpha"),
        ("img_04.png", "16-bit"),
        ("img_05.jpg", "CMYK"),
    ):
        rows = f[f["path"].str.endswith(f"cat/{mode_file}") & (f["kind"] == "converted mode")]
        assert rows["detail"].str.contains(detail).any(), mode_file
    assert "EXIF rotation" in _kinds(f, "cat/img_06.jpg")
    assert set(f.loc[f["kind"] == "empty class", "label"]) == {"empty_class"}
    assert set(f.loc[f["kind"] == "single-image class", "label"]) == {"lonely"}
    kinds = set(f["kind"])
    assert "exact duplicate" in kinds  # copy_of_00 within train
    assert "exact duplicate across splits (leakage)" in kinds and "near duplicate across splits (leakage)" in kinds
    assert result.summary["leaking_pairs"] >= 2 and result.summary["trainable"]
    assert result.summary["imbalance_ratio"] == pytest.approx(
        result.class_counts["total"].max() / result.class_counts["total"].min()
    )


def test_check_cli_json_and_exit_codes(dirty, tmp_path):
    result = CliRunner().invoke(app, ["check", str(dirty), "--json", str(tmp_path / "c.json"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "trainable" in result.stdout and "truncated" in result.stdout
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["summary"]["errors"] >= 3 and any(r["kind"] == "empty" for r in data["findings"])
    broken = tmp_path / "broken"
    make_folder(broken, per_class=2, classes=("a",))
    (broken / "b").mkdir()
    (broken / "b" / "x.jpg").write_bytes(b"nope")
    result = CliRunner().invoke(app, ["check", str(broken), "--quiet"])
    assert result.exit_code == 1 and "NOT trainable" in result.stdout


def test_train_skips_exactly_the_unreadable_files(dirty, tmp_path):
    recipe = recipe_from_dict(tiny_recipe())
    result = train(recipe=recipe, data=dirty, out=tmp_path / "run", progress=False)
    skipped = pd.read_csv(result.run_dir / "skipped.csv")
    assert sorted(p.split("/")[-1] for p in skipped["path"]) == sorted(UNREADABLE)
    assert skipped["reason"].str.startswith(("empty", "truncated", "not an image")).all()
    leaks = pd.read_csv(result.run_dir / "leakage.csv")
    assert len(leaks) >= 2
    splits = pd.read_csv(result.run_dir / "splits.csv")
    assert not splits["path"].str.endswith(tuple(UNREADABLE)).any()
    assert "unreadable images skipped" in (result.report.folder / "summary.md").read_text()


def test_fail_policy_and_strict_split(dirty, tmp_path):
    with pytest.raises(DataError, match=r"3 unreadable image\(s\) and data.bad_images is 'fail': .*empty.jpg \(empty"):
        train(recipe=recipe_from_dict(tiny_recipe(data={"bad_images": "fail"})), data=dirty, out=tmp_path / "a", progress=False)
    with pytest.raises(
        DataError, match=r"duplicate pair\(s\) across splits .*set data.group_pattern, or data.strict_split: false"
    ):
        train(recipe=recipe_from_dict(tiny_recipe(data={"strict_split": True})), data=dirty, out=tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_class_with_only_bad_files_is_named(tmp_path):
    root = make_folder(tmp_path / "d", per_class=6, classes=("a", "b"))
    (root / "c").mkdir()
    (root / "c" / "1.jpg").write_bytes(b"")
    (root / "c" / "2.jpg").write_text("text")
    with pytest.raises(DataError, match=r"class 'c' has no readable images \(2 skipped\)"):
        train(recipe=recipe_from_dict(tiny_recipe()), data=root, out=tmp_path / "run", progress=False)


def test_group_pattern_keeps_groups_in_one_split(tmp_path):
    root = tmp_path / "g"
    for label in range(2):
        folder = root / f"c{label}"
        folder.mkdir(parents=True)
        for patient in range(8):
            for shot in range(3):
                write_mode_image(folder / f"p{label}{patient}_{shot}", "rgb_jpeg", _pattern(label, patient * 3 + shot))
    recipe = recipe_from_dict(tiny_recipe(data={"group_pattern": r"^(p\d+)_", "val_fraction": 0.25}))
    result = train(recipe=recipe, data=root, out=tmp_path / "run", progress=False)
    splits = pd.read_csv(result.run_dir / "splits.csv")
    splits["group"] = splits["path"].str.extract(r"/(p\d+)_")[0]
    assert (splits.groupby("group")["split"].nunique() == 1).all()
    with pytest.raises(DataError, match=r"group_pattern '\^\(x\\d\+\)_' does not match file name"):
        train(
            recipe=recipe_from_dict(tiny_recipe(data={"group_pattern": r"^(x\d+)_"})),
            data=root,
            out=tmp_path / "r2",
            progress=False,
        )


def _placeholder_picture(path):
    """What image hosts serve for a vanished photo: flat light grey, a few lines of dark grey text."""
    from PIL import ImageDraw

    image = Image.new("RGB", (300, 300), (242, 242, 242))
    draw = ImageDraw.Draw(image)
    for y, text in ((120, "WE'RE SORRY,"), (150, "THIS IMAGE COULD NOT"), (170, "BE FOUND.")):
        draw.text((70, y), text, fill=(90, 90, 90))
    image.save(path)


def test_placeholders_dangling_links_and_conflicting_copies(tmp_path):
    root = make_folder(tmp_path / "d", per_class=6, classes=("ant", "bee"))
    _placeholder_picture(root / "ant" / "photo_17.png")  # an innocent name: found by its look
    (root / "bee" / "photo_18.png").write_bytes((root / "ant" / "photo_17.png").read_bytes())  # the same picture in both classes
    (root / "bee" / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    f = check_dataset(root, extensions=EXT, progress=False).findings
    flagged = f[f["kind"] == "placeholder image"]
    assert sorted(flagged["path"].map(lambda p: p.split("/")[-1])) == ["photo_17.png", "photo_18.png"]
    assert flagged["detail"].str.contains("a flat light-grey picture: one colour fills").all()
    conflict = f[f["kind"] == "exact duplicate in two classes"]
    assert len(conflict) == 1 and "is labelled" in conflict["detail"].iloc[0] and conflict["severity"].iloc[0] == "warning"
    link = f[f["kind"] == "dangling symlink"]
    assert (
        len(link) == 1
        and link["path"].iloc[0].endswith("gone.jpg")
        and "deleted.jpg, which does not exist" in link["detail"].iloc[0]
    )
    assert not f["path"].str.contains("img_0").any() or (f[f["path"].str.contains("img_0")]["kind"] != "placeholder image").all()


def test_one_class_folder_verdict_says_why(tmp_path):
    root = make_folder(tmp_path / "one", per_class=4, classes=("only",))
    result = check_dataset(root, extensions=EXT, progress=False)
    assert not result.trainable and result.summary["errors"] == 1
    assert result.summary["blockers"] == ["1 class (only) with readable images; training needs at least 2"]
    out = CliRunner().invoke(app, ["check", str(root), "--quiet"])
    assert out.exit_code == 1
    assert out.stdout.strip().splitlines()[-1] == (
        "1 error(s), 0 warning(s), 0 duplicate pair(s) across splits: NOT trainable: 1 class (only) with readable images; "
        "training needs at least 2"
    )


@pytest.mark.skipif(not (HYMENOPTERA := __import__("conftest").HYMENOPTERA).is_dir(), reason="../shared absent")
def test_the_placeholder_in_hymenoptera_is_found_and_no_photo_is():
    f = check_dataset(HYMENOPTERA, extensions=EXT, progress=False).findings
    flagged = f[f["kind"] == "placeholder image"]
    assert list(flagged["path"].map(lambda p: p.split("/")[-1])) == ["imageNotFound.gif"]


def test_screening_cache_decodes_each_file_once(tmp_path, monkeypatch, caplog):
    """A second pass over the same files reads them but decodes none; a changed or renamed file is examined afresh;
    a damaged entry is a miss; a cache that cannot be written is switched off with a warning."""
    from finetune.data import doctor, facts
    from finetune.data.facts import FactsCache

    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for i in range(3):
        Image.fromarray(_pattern(i, 0, size=24)).save(folder / f"p{i}.png")
        paths.append(str(folder / f"p{i}.png"))
    (folder / "bad.jpg").write_bytes(b"not a picture")
    paths.append(str(folder / "bad.jpg"))
    cache = FactsCache(tmp_path / "cache")
    first = doctor.examine_all(paths, progress=False, cache=cache)
    assert [f.problem for f in first] == [None, None, None, "not an image"]
    decoded = []
    real = facts._decoded_facts
    monkeypatch.setattr(facts, "_decoded_facts", lambda *a: decoded.append(a[2]) or real(*a))
    assert doctor.examine_all(paths, progress=False, cache=cache) == first
    assert decoded == []
    Image.fromarray(_pattern(7, 1, size=24)).save(folder / "p0.png")  # new content, same name
    (folder / "p1.png").rename(folder / "renamed.png")
    entry = next(iter(sorted((tmp_path / "cache").rglob("*.json"))))
    entry.write_text("{half", encoding="utf-8")  # a damaged entry: a miss, not an error
    again = doctor.examine_all([paths[0], str(folder / "renamed.png")], progress=False, cache=cache)
    assert [f.problem for f in again] == [None, None]
    assert decoded[:2] == [paths[0], str(folder / "renamed.png")]
    assert again[0].sha256 != first[0].sha256
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    unwritable = FactsCache(blocked)
    assert [f.problem for f in doctor.examine_all([paths[0], paths[2]], progress=False, cache=unwritable)] == [None, None]
    assert not unwritable.writable
    assert "screening cache" in caplog.text and "is not writable" in caplog.text


def test_screening_warns_about_placeholder_pictures(tmp_path, caplog):
    """train/eval/predict use a placeholder picture as it is, but say so (check lists it as a finding)."""
    from finetune.data.doctor import screen_samples

    root = make_folder(tmp_path / "d", classes=("ant", "bee"), per_class=4)
    _placeholder_picture(root / "ant" / "photo_17.png")
    samples = pd.DataFrame({"path": sorted(str(p) for p in root.rglob("*.png")), "label": "", "split": ""})
    screened = screen_samples(samples, policy="skip", progress=False)
    assert len(screened.samples) == len(samples)
    assert "1 image(s) look like placeholder pictures rather than photos, e.g." in caplog.text
    assert "photo_17.png" in caplog.text and "data.exclude" in caplog.text


def test_screening_for_prediction_gives_prediction_advice_not_training_advice(tmp_path, caplog):
    """The deployed predictor and explain screen their inputs: no 'data.exclude', which only training reads."""
    from finetune.inference.inputs import Pictures

    root = make_folder(tmp_path / "d", classes=("ant",), per_class=3)
    _placeholder_picture(root / "ant" / "photo_17.png")
    (root / "ant" / "empty.png").write_bytes(b"")
    pictures = Pictures.gather([root], [".png", ".jpg"], policy="skip", progress=False)
    assert len(pictures.names) == 4  # three photos and the placeholder; the empty file left out
    assert "data.exclude" not in caplog.text
    assert "placeholder pictures rather than photos, e.g." in caplog.text and "they are classified as they are" in caplog.text
    assert "skipping 1 unreadable image(s)" in caplog.text and "they get no prediction" in caplog.text


def test_worker_processes_examine_like_one_process(tmp_path, monkeypatch):
    """A large folder is screened by worker processes: the same facts in the same order as one process, cache filled."""
    from finetune.data import doctor, parallel
    from finetune.data.facts import FactsCache

    folder = tmp_path / "many"
    folder.mkdir()
    paths = []
    for i in range(40):
        Image.fromarray(_pattern(i % 9, i % 3, size=20)).save(folder / f"p{i}.png")
        paths.append(str(folder / f"p{i}.png"))
    for i in range(3):
        (folder / f"bad{i}.jpg").write_bytes(b"not a picture %d" % i)
        paths.insert(7 * i, str(folder / f"bad{i}.jpg"))
    serial = doctor.examine_all(paths, progress=False)
    monkeypatch.setattr(parallel, "PARALLEL_FROM", 4)
    monkeypatch.setenv("FINETUNE_WORKERS", "2")
    cache = FactsCache(tmp_path / "cache")
    assert doctor.examine_all(paths, progress=False, cache=cache) == serial
    assert [f.problem for f in serial].count("not an image") == 3
    assert len(list((tmp_path / "cache").rglob("*.json"))) == len(paths)  # the workers wrote the cache entries
    monkeypatch.setenv("FINETUNE_WORKERS", "two")
    with pytest.raises(DataError, match="FINETUNE_WORKERS is 'two'; set it to a whole number >= 1"):
        doctor.examine_all(paths, progress=False)


def test_check_loads_no_torch(tmp_path):
    """`finetune check` imports the doctor, not the API: torch, timm and albumentations would add ~0.9 GiB to every
    check (benchmarks/bench_scale.py measures the peak of a 1M-image check)."""
    import subprocess
    import sys

    make_folder(tmp_path / "data", per_class=3)
    probe = (
        "import sys; from finetune.cli import main; sys.argv = ['finetune', 'check', sys.argv[1], '-q']\n"
        "try:\n    main()\nexcept SystemExit as stop:\n    print(stop.code, sorted({'torch', 'timm', 'albumentations'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "data")], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stdout + done.stderr
