"""K-fold cross-validation: the folds, one screening pass, out-of-fold predictions that never come from a model that
saw the image, the summary's mean and spread, resume, data.exclude, and compare --folds."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from finetune import cross_validate, predict
from finetune.data import doctor
from finetune.data.folds import assign_folds
from finetune.errors import DataError, RunDirError
from finetune.run_dir import RunDir
from finetune.runs.compare import compare

from conftest import make_folder, tiny_recipe

PROBE = {"epochs": 3, "lr": 0.05, "trainable": ["head"]}  # head-only on cached features: seconds per fold


def _recipe(**extra):
    return tiny_recipe(**{"train": PROBE, "transforms": {"train": "none"}, "eval": {"gradcam": False}, **extra})


def _samples(per_class=6, classes=("a", "b", "c")):
    return pd.DataFrame(
        {
            "path": [f"{c}/patient{i // 2}_{i}.png" for c in classes for i in range(per_class)],
            "label": [c for c in classes for _ in range(per_class)],
            "split": "",
        }
    )


def test_folds_are_stratified_disjoint_and_keep_the_test_split_out():
    table = assign_folds(_samples(10), folds=5, seed=0, test_fraction=0.2, group_pattern=None)
    test = table[table["fold"] == 0]
    assert (test["split"] == "test").all() and len(test) == 6
    pool = table[table["fold"] > 0]
    assert sorted(pool["fold"].unique()) == [1, 2, 3, 4, 5] and len(pool) == 24
    assert (pool.groupby("fold")["label"].nunique() == 3).all()  # every fold holds every class
    again = assign_folds(_samples(10), folds=5, seed=0, test_fraction=0.2, group_pattern=None)
    pd.testing.assert_frame_equal(table, again)  # seeded


def test_groups_stay_in_one_fold():
    table = assign_folds(_samples(12), folds=3, seed=1, test_fraction=0.0, group_pattern=r"^(patient\d+)_")
    table["group"] = table["path"].str.extract(r"(\w)/(patient\d+)").agg("/".join, axis=1)
    assert (table.groupby("group")["fold"].nunique() == 1).all()


@pytest.mark.parametrize(
    ("folds", "kwargs", "message"),
    [
        (1, {}, r"--folds 1: cross-validation needs at least 2 folds"),
        (7, {}, r"--folds 7 is more than the 6 image\(s\) of class 'a' outside the test split; .*use --folds 6 or fewer"),
        (4, {"group_pattern": r"^(patient\d+)_"}, r"data.group_pattern gives 3 group\(s\); --folds 4 needs at least 4"),
    ],
)
def test_bad_fold_settings_are_one_line_errors(folds, kwargs, message):
    with pytest.raises(DataError, match=message):
        assign_folds(_samples(6), folds=folds, seed=0, test_fraction=0.0, group_pattern=kwargs.get("group_pattern"))


def test_a_group_pattern_that_starves_a_fold_of_a_class_is_refused():
    samples = _samples(6)
    samples.loc[samples["label"] == "c", "path"] = [f"c/patient9_{i}.png" for i in range(6)]  # class c: one group
    with pytest.raises(DataError, match=r"data.group_pattern leaves fold \d without class 'c'"):
        assign_folds(samples, folds=3, seed=0, test_fraction=0.0, group_pattern=r"^(patient\d+)_")


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    data = make_folder(root / "data", per_class=8)
    examined = []
    real = doctor.examine_all

    def counting(paths, **kwargs):
        examined.extend(paths)
        return real(paths, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(doctor, "examine_all", counting)
        result = cross_validate(recipe=_recipe(data={"test_fraction": 0.25}), data=data, out=root / "cv", folds=3, progress=False)
    return result, examined, root


def test_one_screening_pass_for_all_folds(cv_run):
    result, examined, _ = cv_run
    assert len(examined) == len(set(examined)) == 24  # every image decoded once, not once per fold


def test_out_of_fold_predictions_come_from_the_model_that_did_not_train_on_the_image(cv_run):
    result, _, root = cv_run
    run = RunDir(result.run_dir)
    folds = pd.read_csv(run.folds)
    assert (folds["fold"] == 0).sum() == 6  # the test quarter stays out of the folds
    held = set(folds.loc[folds["fold"] > 0, "path"])
    assert sorted(result.oof.paths) == sorted(held)  # every image outside the test split, exactly once
    origin = {}
    for k in (1, 2, 3):
        splits = pd.read_csv(run.fold(k).splits)
        for path in splits.loc[splits["split"] == "val", "path"]:
            origin[path] = k
        trained = set(splits.loc[splits["split"] == "train", "path"])
        mine = [p for p in result.oof.paths if origin.get(p) == k]
        assert mine and not trained & set(mine)
        assert set(splits.loc[splits["split"] == "test", "path"]) == set(folds.loc[folds["fold"] == 0, "path"])
    # the probabilities are that fold model's own: predicting the files again with fold k gives the same numbers
    first = [p for p in result.oof.paths if origin[p] == 1][:4]
    again = predict(run=run.fold(1).root, inputs=first, progress=False)
    index = [result.oof.paths.index(p) for p in first]
    np.testing.assert_allclose(again["confidence"], result.oof.probs[index].max(axis=1), atol=1e-5)


def test_summary_mean_and_std_are_those_of_the_folds(cv_run):
    result, _, _ = cv_run
    run = RunDir(result.run_dir)
    per_fold = [json.loads((run.fold(k).report / "metrics.json").read_text()) for k in (1, 2, 3)]
    summary = pd.read_csv(run.cv_summary).set_index("fold")
    for key in ("accuracy", "macro_f1", "balanced_accuracy"):
        values = np.array([m[key] for m in per_fold])
        assert summary.loc["mean", key] == pytest.approx(values.mean(), abs=1e-6)
        assert summary.loc["std", key] == pytest.approx(values.std(ddof=1), abs=1e-6)
        assert [summary.loc[str(k), key] for k in (1, 2, 3)] == pytest.approx(list(values), abs=1e-6)
    assert set(summary["evaluated_on"].dropna()) == {"test"}  # with a test split every fold is scored on it
    oof = json.loads((run.oof / "metrics.json").read_text())
    assert oof["num_images"] == 18 and oof["evaluated_on"]["split"] == "out-of-fold"
    assert (run.oof / "confusion_matrix.png").exists() and (run.oof / "per_class.csv").exists()


def test_the_out_of_fold_report_speaks_for_the_whole_run(cv_run):
    """Not fold 1's manifest and best epoch as the run's; every fold's curves; counts as integers."""
    import re

    result, _, root = cv_run
    run = RunDir(result.run_dir)
    page = (run.oof / "report.html").read_text()
    summary = dict(re.findall(r"<tr><th>([^<]+)</th><td>([^<]*)</td></tr>", page))
    assert summary["data"] == str(root / "data") and "manifests" not in page
    assert re.fullmatch(r"fold 1: \d+, fold 2: \d+, fold 3: \d+", summary["best epoch"]), summary["best epoch"]
    assert "in 3 folds" in summary["training time"]
    assert "Not available" not in page.split('id="curves"')[1].split("<h2")[0]
    assert "Every fold's own training run (3 folds" in page and (run.oof / "training_curves.png").stat().st_size > 10_000
    table = pd.read_csv(run.cv_summary, dtype=str).set_index("fold")
    assert list(table.loc[["1", "2", "3"], "images"]) == ["6", "6", "6"]  # the test split each fold is scored on
    markdown = (run.root / "cv_summary.md").read_text()
    assert re.search(r"\|\s+1 \| test\s+\|\s+6 \|", markdown) and "6.000" not in markdown, markdown


def test_an_interrupted_cross_validation_resumes_and_keeps_finished_folds(cv_run, tmp_path):
    result, _, root = cv_run
    import shutil

    copy = tmp_path / "cv"
    shutil.copytree(result.run_dir, copy)
    shutil.rmtree(copy / "fold_3")  # killed before fold 3 started
    shutil.rmtree(copy / "oof")
    kept = (copy / "fold_1" / "checkpoints" / "best.pt").stat().st_mtime_ns
    again = cross_validate(out=copy, resume=True, progress=False)
    assert (copy / "fold_1" / "checkpoints" / "best.pt").stat().st_mtime_ns == kept
    pd.testing.assert_frame_equal(again.summary, result.summary)
    torch.testing.assert_close(torch.from_numpy(again.oof.probs), torch.from_numpy(result.oof.probs))


def test_a_cross_validation_resumed_after_its_recipe_was_edited_is_refused(cv_run, tmp_path):
    import shutil

    result, _, _ = cv_run
    copy = tmp_path / "cv"
    shutil.copytree(result.run_dir, copy)
    shutil.rmtree(copy / "fold_3")  # killed between folds, then recipe.yaml edited: fold 3 would train another recipe
    recipe = copy / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("lr: 0.05", "lr: 0.02"))
    with pytest.raises(RunDirError, match=r"recipe.yaml was edited after the run started \(train.lr: 0.05 -> 0.02\)"):
        cross_validate(out=copy, resume=True, progress=False)
    assert not (copy / "fold_3").exists()


def test_exclude_leaves_listed_images_out_and_records_them(tmp_path, image_folder):
    from finetune import train

    listing = tmp_path / "wrong.csv"
    gone = sorted(str(p) for p in (image_folder / "cat").iterdir())[:2]
    pd.DataFrame({"path": gone + [str(tmp_path / "not_there.png")], "note": "x"}).to_csv(listing, index=False)
    run = train(
        recipe=tiny_recipe(data={"exclude": str(listing)}), data=image_folder, out=tmp_path / "run", progress=False
    ).run_dir
    assert sorted(pd.read_csv(run / "excluded.csv")["path"]) == gone
    assert not set(gone) & set(pd.read_csv(run / "splits.csv")["path"])
    with pytest.raises(DataError, match=r"data.exclude: .*nothing.csv does not exist; give a CSV with a 'path' column"):
        train(
            recipe=tiny_recipe(data={"exclude": str(tmp_path / "nothing.csv")}),
            data=image_folder,
            out=tmp_path / "x",
            progress=False,
        )
    bad = tmp_path / "bad.csv"
    bad.write_text("file\na.png\n")
    with pytest.raises(DataError, match=r"data.exclude: .*bad.csv has no 'path' column \(columns: file\)"):
        train(recipe=tiny_recipe(data={"exclude": str(bad)}), data=image_folder, out=tmp_path / "y", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_compare_with_folds_ranks_out_of_fold_on_the_same_folds(tmp_path, image_folder):
    import yaml

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump(_recipe()))
    b.write_text(yaml.safe_dump(_recipe(seed=5, train={**PROBE, "lr": 0.01})))
    result = compare(recipes=[a, b], data=image_folder, out=tmp_path / "cmp", folds=2, progress=False)
    board = result.leaderboard
    assert {"macro_f1_fold_mean", "macro_f1_fold_std"} <= set(board.columns)
    assert set(board["report"]) == {"a/oof/report.html", "b/oof/report.html"}
    folds_a, folds_b = (pd.read_csv(tmp_path / "cmp" / n / "folds.csv") for n in ("a", "b"))
    pd.testing.assert_frame_equal(folds_a, folds_b)  # b's own seed would have drawn other folds
    assert board["vs_leader"].iloc[1].endswith(("within noise", "worse"))
    assert "macro-F1 per fold (mean ± sd)" in (tmp_path / "cmp" / "leaderboard.md").read_text()
