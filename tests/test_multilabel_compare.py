"""`compare` and `report diff` with several labels per image: runs ranked by test mAP, each tested against the leader
by a paired bootstrap of the mAP difference on the same images; the diff's per-class AP deltas and its one-line
refusal of a one-label report against a multi-label one."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from test_multilabel import CLASSES, _recipe, write_multilabel_set

from finetune import api
from finetune.errors import UsageError
from finetune.evaluation.multilabel import (
    average_precision,
    paired_multilabel_difference,
    paired_multilabel_tables,
    resampled_average_precision,
)
from finetune.inference.task import mean_average_precision

FROZEN = ["stem", "layer1", "layer2", "layer3", "layer4"]


# --- the paired bootstrap by hand ------------------------------------------------------------------------------


def test_resampled_average_precision_is_the_average_precision_of_each_resample():
    rng = np.random.default_rng(0)
    truth, scores = rng.random(40) < 0.3, np.round(rng.random(40), 1)  # many ties: a drawn copy ties with itself
    rows = rng.integers(0, 40, (30, 40))
    counts = np.stack([np.bincount(r, minlength=40) for r in rows]).astype(float)
    expected = np.array([average_precision(truth[r], scores[r]) for r in rows])
    np.testing.assert_allclose(resampled_average_precision(truth, scores, counts), expected, atol=1e-12)
    assert np.isnan(resampled_average_precision(np.zeros(5, bool), scores[:5], np.ones((2, 5)))).all()


def test_paired_bootstrap_of_map_ties_identical_runs_and_finds_a_better_one():
    rng = np.random.default_rng(1)
    truth = rng.random((120, 3)) < 0.4
    weak = np.clip(truth * 0.15 + rng.random((120, 3)) * 0.85, 0, 1)
    strong = np.clip(truth * 0.6 + rng.random((120, 3)) * 0.4, 0, 1)
    same = paired_multilabel_difference(truth, weak, weak, weak >= 0.5, weak >= 0.5)
    assert [d.metric for d in same] == ["mean_average_precision", "macro_f1"]
    assert all((d.observed, d.low, d.high) == (0.0, 0.0, 0.0) and d.verdict == "within noise" for d in same)
    better = paired_multilabel_difference(truth, weak, strong, weak >= 0.5, strong >= 0.5)[0]
    expected = mean_average_precision(truth, strong) - mean_average_precision(truth, weak)
    assert better.observed == pytest.approx(expected) and 0 < better.low < better.observed < better.high
    assert better.verdict == "B better"
    again = paired_multilabel_difference(truth, weak, strong, weak >= 0.5, strong >= 0.5)[0]
    assert again == better  # seeded


def test_paired_tables_need_the_same_images_with_the_same_sets():
    frame = pd.DataFrame(
        {"path": ["a", "b", "c"], "true_labels": ["red", "", "red|blue"], "labels": ["red", "blue", "red"]}
        | {f"prob_{c}": [0.9, 0.2, 0.6] for c in CLASSES}
    )
    assert [d.metric for d in paired_multilabel_tables(frame, frame.iloc[::-1])] == ["mean_average_precision", "macro_f1"]
    assert paired_multilabel_tables(frame, frame.iloc[:2]) == []
    assert paired_multilabel_tables(frame, frame.assign(true_labels=["red", "red", "red"])) == []


# --- compare and report diff on two tiny runs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """A compare of two recipes on a tiny multi-label manifest: full training against a frozen body."""
    root = tmp_path_factory.mktemp("multilabel-compare")
    write_multilabel_set(root, count=80)
    recipes = []
    for name, train in (("full", {"epochs": 2}), ("probe", {"epochs": 1, "freeze": FROZEN})):
        recipes.append(root / f"{name}.yaml")
        recipes[-1].write_text(yaml.safe_dump(_recipe(train=train)))
    result = api.compare(recipes=recipes, data=root / "manifest.csv", out=root / "cmp", progress=False)
    return result


def test_compare_ranks_several_labels_by_map(compared):
    out = compared.folder
    board = pd.read_csv(out / "leaderboard.csv")
    assert sorted(board["recipe"]) == ["full", "probe"] and board["mean_average_precision"].is_monotonic_decreasing
    assert {"mean_average_precision_lo", "mean_average_precision_hi", "worst_class_average_precision"} <= set(board)
    assert "accuracy" not in board and "worst_class_recall" not in board
    assert (board["mean_average_precision_lo"] <= board["mean_average_precision"]).all()
    for name, row in board.set_index("recipe").iterrows():
        metrics = json.loads((out / name / "report" / "metrics.json").read_text())
        per_class = pd.read_csv(out / name / "report" / "per_class.csv")
        assert row["mean_average_precision"] == pytest.approx(metrics["mean_average_precision"], abs=1e-4)
        assert row["worst_class"] == per_class.loc[per_class["average_precision"].idxmin(), "class"]
    assert board["vs_leader"].iloc[0] == "leader"
    assert board["vs_leader"].iloc[1].endswith(("within noise", "worse"))  # the paired mAP test on the same images
    assert "labels" in pd.read_csv(out / "split_manifest.csv").columns  # a manifest of several labels per image
    resolved = lambda frame: dict(zip(frame["path"].map(lambda p: str(Path(p).resolve())), frame["split"]))  # noqa: E731
    assert resolved(pd.read_csv(out / "full" / "splits.csv")) == resolved(pd.read_csv(out / "probe" / "splits.csv"))
    markdown = (out / "leaderboard.md").read_text()
    assert "best mAP first" in markdown and "mAP (95% CI)" in markdown and "mAP vs leader (paired 95% CI)" in markdown
    assert "worst class (AP)" in markdown and "accuracy" not in markdown
    assert "mAP (95% CI)" in (out / "leaderboard.html").read_text()
    assert list(compared.readable().columns[2:5]) == ["mAP (95% CI)", "macro-F1", "mAP vs leader (paired 95% CI)"]
    worst = compared.readable()["worst class (AP)"].iloc[0]
    assert worst == f"{board['worst_class'].iloc[0]}: AP {board['worst_class_average_precision'].iloc[0]:.2f}"


def test_report_diff_of_several_labels(compared, tmp_path):
    a, b = compared.folder / "probe", compared.folder / "full"
    result = api.diff_reports(run_a=a, run_b=b, out=tmp_path / "diff")
    per_class = pd.read_csv(tmp_path / "diff" / "per_class_diff.csv", keep_default_na=False).set_index("class")
    before, after = (pd.read_csv(r / "report" / "per_class.csv").set_index("class") for r in (a, b))
    for column in ("average_precision", "f1", "threshold"):
        delta = (after[column] - before[column]).reindex(per_class.index)
        np.testing.assert_allclose(per_class[f"{column}_delta"], delta, atol=1e-6)
    headline = result.headline.set_index("metric")
    assert headline.loc["mean_average_precision", "verdict"] in ("within noise", "B better", "A better")
    assert headline.loc["mean_average_precision", "delta_lo"] <= headline.loc["mean_average_precision", "delta_hi"]
    text = (tmp_path / "diff" / "diff.md").read_text()
    assert "mean_average_precision" in text and "Fixed (AP up by" in text and "Predicted labels that grew most" in text
    confusion = pd.read_csv(tmp_path / "diff" / "confusion_diff.csv", index_col=0)
    assert sorted(confusion.index) == CLASSES and (tmp_path / "diff" / "diff.html").is_file()


def test_report_diff_refuses_a_one_label_against_a_multi_label_report(compared, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "metrics.json").write_text(json.dumps({"accuracy": 0.5}))
    (one / "per_class.csv").write_text("class,precision,recall,f1,support\ncat,0.5,0.5,0.5,2\n")
    (one / "confusion_matrix.csv").write_text(",cat\ncat,2\n")
    with pytest.raises(
        UsageError,
        match=r"several labels per image but .*one a report of one label per image; report diff compares two reports of the same kind",
    ):
        api.diff_reports(run_a=compared.folder / "full", run_b=one, out=tmp_path / "diff")
    assert not (tmp_path / "diff").exists()


def test_seeds_summary_of_several_labels_is_of_map():
    from finetune.inference.task import MultiLabel
    from finetune.reporting.leaderboard import seeds_table
    from finetune.runs.compare import seed_summary

    board = pd.DataFrame(
        {
            "recipe": ["a-seed0", "a-seed1", "b-seed0", "b-seed1"],
            "mean_average_precision": [0.7, 0.8, 0.9, 0.95],
            "mean_average_precision_lo": 0.5,
            "mean_average_precision_hi": 1.0,
            "macro_f1": [0.9, 0.9, 0.5, 0.5],  # a leads on macro-F1, b on mAP: mAP decides
            "seconds": 10.0,
        }
    )
    means = seed_summary(board, task=MultiLabel())
    assert means["recipe"].tolist() == ["b", "a"] and means["mean_average_precision_mean"].tolist() == [0.925, 0.75]
    shown = seeds_table(means, 2, task=MultiLabel())
    assert shown.columns[1] == "mAP, mean ± sd of 2 seeds" and shown.iloc[0, 1] == "0.925 ± 0.035"
