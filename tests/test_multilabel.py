"""Several labels per image: the task's maths against scikit-learn, the manifest's errors, iterative stratification,
and one tiny run end to end (report files, resume, cache == no cache, predict, eval, export parity, the Python API)."""

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score, hamming_loss

from finetune import train
from finetune.config.loading import recipe_from_dict
from finetune.data.split import load_dataset_index, multi_hot
from finetune.errors import DataError, RecipeError
from finetune.evaluation.multilabel import average_precision, score_multilabel
from finetune.evaluation.thresholds import choose_thresholds
from finetune.inference.checkpoint import load_checkpoint
from finetune.inference.predictions import Predictions
from finetune.inference.task import MultiLabel, mean_average_precision, task_named
from finetune.training.loss import class_weights

from conftest import tiny_recipe

CLASSES = ["blue", "green", "red"]
PATCH = {"red": (0, 0, (220, 30, 30)), "green": (0, 1, (30, 220, 30)), "blue": (1, 0, (30, 30, 220))}


def _picture(names: list[str], seed: int, size: int = 32) -> np.ndarray:
    """Noise, with a coloured square in the quadrant of each label the picture carries."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 70, size=(size, size, 3), dtype=np.uint8)
    half = size // 2
    for name in names:
        row, col, colour = PATCH[name]
        image[row * half + 2 : (row + 1) * half - 2, col * half + 2 : (col + 1) * half - 2] = colour
    return image


def write_multilabel_set(root, *, count: int = 60, seed: int = 0) -> pd.DataFrame:
    """`count` pictures with random label sets (the empty set too) and manifest.csv (path,labels) beside them."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(count):
        names = [c for c in CLASSES if rng.random() < 0.45]
        Image.fromarray(_picture(names, seed * 1000 + k)).save(root / "img" / f"p{k:03d}.png")
        rows.append({"path": f"img/p{k:03d}.png", "labels": "|".join(names)})
    frame = pd.DataFrame(rows)
    frame.to_csv(root / "manifest.csv", index=False)
    return frame


def _recipe(**sections) -> dict:
    base = {
        "data": {"val_fraction": 0.2, "test_fraction": 0.2, "batch_size": 8},
        "transforms": {"input_size": 32, "train": "none"},
        "train": {"epochs": 3, "lr": 0.003, "optimizer": "adamw"},
    }
    return tiny_recipe(**{k: {**base.get(k, {}), **v} for k, v in {**base, **sections}.items()})


# --- the maths against scikit-learn ----------------------------------------------------------------------------


def test_average_precision_equals_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(20):
        truth = rng.random(50) < 0.3
        truth[trial % 50] = True
        scores = np.round(rng.random(50), 1)  # many ties
        assert average_precision(truth, scores) == pytest.approx(average_precision_score(truth, scores), abs=1e-12)
    assert np.isnan(average_precision(np.zeros(5, bool), rng.random(5)))


def test_validation_metrics_equal_scikit_learn():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(40, 4)).astype(np.float32)
    targets = (rng.random((40, 4)) < 0.4).astype(np.float32)
    found = MultiLabel().validation_metrics(logits, targets, num_classes=4)
    probs = 1 / (1 + np.exp(-logits))
    expected_loss = -(targets * np.log(probs) + (1 - targets) * np.log(1 - probs)).mean()
    assert found["val_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert found["val_macro_f1"] == pytest.approx(f1_score(targets, probs >= 0.5, average="macro", zero_division=0))
    assert found["val_mean_average_precision"] == pytest.approx(average_precision_score(targets, probs, average="macro"))
    assert found["val_accuracy"] == pytest.approx(((probs >= 0.5) == targets).all(axis=1).mean())


def test_loss_has_pos_weight_and_binary_label_smoothing():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = MultiLabel().criterion([3.0, 0.5], label_smoothing=0.2)(logits, targets)
    smoothed = targets * 0.8 + 0.1
    p = torch.sigmoid(logits)
    weight = torch.tensor([3.0, 0.5])
    manual = -(weight * smoothed * torch.log(p) + (1 - smoothed) * torch.log(1 - p)).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)


def test_pos_weight_from_training_positives():
    cfg = recipe_from_dict(_recipe(loss={"class_weights": "balanced"})).loss
    targets = [np.array([1, 0, 0], np.float32)] * 2 + [np.array([0, 1, 0], np.float32)] * 6
    assert class_weights(cfg, class_names=CLASSES, targets=targets) == [3.0, pytest.approx(1 / 3), 8.0]


def test_thresholds_maximise_f1_or_reach_the_precision_target():
    rng = np.random.default_rng(2)
    truth = rng.random((200, 3)) < 0.4
    probs = np.clip(truth * 0.35 + rng.random((200, 3)) * 0.65, 0, 1)
    table = choose_thresholds(probs, truth, CLASSES, rule="f1")
    for c in range(3):
        best = max(f1_score(truth[:, c], probs[:, c] >= t) for t in np.unique(probs[:, c]))
        assert f1_score(truth[:, c], probs[:, c] >= table["threshold"][c]) == pytest.approx(best)
    strict = choose_thresholds(probs, truth, CLASSES, rule="precision", target=0.9)
    for c in range(3):
        chosen = probs[:, c] >= strict["threshold"][c]
        assert strict["reached"][c] and truth[chosen, c].mean() >= 0.9
    none = choose_thresholds(probs, np.zeros_like(truth), CLASSES)
    assert list(none["threshold"]) == [0.5] * 3 and not none["reached"].any()


def test_report_numbers_equal_scikit_learn():
    rng = np.random.default_rng(3)
    truth = (rng.random((80, 3)) < 0.4).astype(np.float32)
    logits = (truth * 2 - 1) * 1.5 + rng.normal(size=(80, 3))
    task = MultiLabel(thresholds=(0.4, 0.5, 0.6))
    preds = Predictions.from_logits([f"{i}" for i in range(80)], logits.astype(np.float32), truth, task=task)
    card = score_multilabel(preds, CLASSES)
    decided = preds.probs >= np.array([0.4, 0.5, 0.6])
    m = card.metrics
    assert m["mean_average_precision"] == pytest.approx(average_precision_score(truth, preds.probs, average="macro"))
    assert m["micro_f1"] == pytest.approx(f1_score(truth, decided, average="micro"))
    assert m["macro_f1"] == pytest.approx(f1_score(truth, decided, average="macro"))
    assert m["hamming_loss"] == pytest.approx(hamming_loss(truth, decided))
    assert m["subset_accuracy"] == pytest.approx((decided == truth).all(axis=1).mean())
    lo, hi = m["ci95"]["mean_average_precision"]
    assert lo < m["mean_average_precision"] < hi
    assert list(card.per_class["threshold"]) == [0.4, 0.5, 0.6]
    assert card.per_class["support"].tolist() == truth.sum(axis=0).astype(int).tolist()
    assert card.cooccurrence.to_numpy().diagonal().tolist() == (truth.astype(bool) & decided).sum(axis=0).tolist()
    assert mean_average_precision(truth, preds.probs) == pytest.approx(m["mean_average_precision"])


# --- manifests and splits --------------------------------------------------------------------------------------


def _manifest(tmp_path, text: str, images: int = 3):
    (tmp_path / "img").mkdir(exist_ok=True)
    for k in range(images):
        Image.fromarray(_picture([], k)).save(tmp_path / "img" / f"p{k}.png")
    path = tmp_path / "m.csv"
    path.write_text(text)
    return recipe_from_dict(_recipe(data={"path": str(path)})).data


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'path,labels\nimg/p0.png,"red,green"\nimg/p1.png,red\n',
            r"line 2: labels 'red,green' separates names with ','; separate label names with \|",
        ),
        ("path,labels\nimg/p0.png,red;green\nimg/p1.png,red\n", r"separates names with ';'"),
        (
            "path,labels\nimg/p0.png,red||green\nimg/p1.png,red\n",
            r"line 2: labels 'red\|\|green' has an empty name between \| separators",
        ),
        ("path,labels\nimg/p0.png,|red\n", r"has an empty name"),
        ("path,labels\nimg/p0.png,red\nimg/p1.png,green\nimg/p0.png,blue\n", r"img/p0.png is listed 2 times \(lines 2, 4\)"),
        ("path,label,labels\nimg/p0.png,red,red\n", r"has both a 'label' and a 'labels' column"),
    ],
)
def test_manifest_mistakes_are_one_line(tmp_path, text, message):
    cfg = _manifest(tmp_path, text)
    with pytest.raises(DataError, match=message) as info:
        load_dataset_index(cfg, seed=0)
    assert "\n" not in str(info.value)


def test_a_label_only_in_val_or_test_and_the_task_setting(tmp_path):
    text = "path,labels,split\nimg/p0.png,red|green,train\nimg/p1.png,red,train\nimg/p2.png,blue,val\n"
    with pytest.raises(DataError, match=r"label\(s\) \['blue'\] appear only in val/test and have no positive training image"):
        load_dataset_index(_manifest(tmp_path, text), seed=0)
    single = _manifest(tmp_path, "path,label\nimg/p0.png,red\nimg/p1.png,green\n")
    with pytest.raises(DataError, match=r"data.task is multilabel but .*m.csv is no manifest with a 'labels' column"):
        load_dataset_index(single.model_copy(update={"task": "multilabel"}), seed=0)
    multi = _manifest(tmp_path, "path,labels\nimg/p0.png,red\nimg/p1.png,green\n")
    with pytest.raises(DataError, match=r"data.task is single_label but manifest .* has a 'labels' column"):
        load_dataset_index(multi.model_copy(update={"task": "single_label"}), seed=0)


def test_iterative_stratification_keeps_each_label_in_every_split(tmp_path):
    frame = write_multilabel_set(tmp_path, count=120, seed=4)
    cfg = recipe_from_dict(_recipe(data={"path": str(tmp_path / "manifest.csv")})).data
    index = load_dataset_index(cfg, seed=0)
    again = load_dataset_index(cfg, seed=0)
    pd.testing.assert_frame_equal(index.samples, again.samples)
    assert index.multilabel and index.class_names == CLASSES
    assert dict(index.samples["split"].value_counts()) == {"train": 72, "val": 24, "test": 24}
    share = multi_hot(frame["labels"], CLASSES).mean(axis=0)
    for split in ("train", "val", "test"):
        rows = index.split(split)
        np.testing.assert_allclose(np.stack(index.targets(rows)).mean(axis=0), share, atol=0.06)
    assert (index.samples["label"] == "").any()  # a picture with no label is a valid negative for every class


def test_map_metric_needs_several_labels(tmp_path, image_folder):
    recipe = recipe_from_dict(tiny_recipe(train={"early_stopping": {"metric": "val_mean_average_precision"}}))
    with pytest.raises(RecipeError, match=r"val_mean_average_precision needs several labels per image"):
        train(recipe=recipe, data=image_folder, out=tmp_path / "run", progress=False)


# --- one tiny run, end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("multilabel")
    write_multilabel_set(root, count=100)
    return root


@pytest.fixture(scope="module")
def run(dataset):
    return train(recipe=recipe_from_dict(_recipe()), data=dataset / "manifest.csv", out=dataset / "run", progress=False)


def test_a_run_learns_and_reports(run):
    history = run.history
    assert "val_mean_average_precision" in history and history["val_mean_average_precision"].iloc[-1] > 0.9
    folder = run.report.folder
    for name in (
        "metrics.json",
        "per_class.csv",
        "cooccurrence.csv",
        "confusion_per_class.csv",
        "pr_curves.png",
        "cooccurrence.png",
        "reliability.png",
        "worst_errors.csv",
        "predictions.csv",
        "summary.md",
        "report.html",
    ):
        assert (folder / name).is_file(), name
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["task"] == "multilabel" and metrics["evaluated_on"]["split"] == "test" and metrics["num_images"] == 20
    assert metrics["mean_average_precision"] > 0.9 and metrics["thresholds"]["rule"] == "f1"
    per_class = pd.read_csv(folder / "per_class.csv")
    assert {"average_precision", "average_precision_lo", "threshold", "precision_lo", "recall_hi", "f1_lo"} <= set(per_class)
    page = (folder / "report.html").read_text()
    row = re.search(r"<tr><td>blue</td>((?:<td>[^<]*</td>)+)</tr>", page).group(1)  # class blue: AP .. f1 with 3 decimals each
    assert all(re.fullmatch(r"\d\.\d{3}", cell) for cell in re.findall(r"<td>([^<]*)</td>", row)[:5]), row
    predictions = pd.read_csv(folder / "predictions.csv", keep_default_na=False)
    assert list(predictions.columns[:4]) == ["path", "true_labels", "labels", "confidence"]
    assert [f"prob_{c}" for c in CLASSES] == list(predictions.columns[4:])
    payload = load_checkpoint(run.best_checkpoint)
    assert payload["task"] == "multilabel" and len(payload["thresholds"]) == 3
    assert json.loads((run.run_dir / "classes.json").read_text()) == {"task": "multilabel", "classes": CLASSES}
    counts = pd.read_csv(run.run_dir / "label_counts.csv")
    assert counts["train"].sum() + counts["val"].sum() + counts["test"].sum() == sum(
        len(c.split("|")) for c in pd.read_csv(run.run_dir / "splits.csv", keep_default_na=False)["label"] if c
    )


def test_resume_gives_the_uninterrupted_run(run, dataset, tmp_path):
    class Crash(Exception):
        pass

    def crash_after_first(state):
        if state.epoch == 1:
            raise Crash

    recipe = recipe_from_dict(_recipe())
    with pytest.raises(Crash):
        train(recipe=recipe, data=dataset / "manifest.csv", out=tmp_path / "cut", progress=False, on_epoch_end=crash_after_first)
    resumed = train(out=tmp_path / "cut", resume=True, progress=False)
    a = load_checkpoint(run.run_dir / "checkpoints" / "last.pt")["state_dict"]
    b = load_checkpoint(resumed.run_dir / "checkpoints" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert run.report.metrics == resumed.report.metrics


def test_cached_head_training_equals_uncached(dataset, tmp_path):
    def run_with(cache: str):
        recipe = _recipe(
            train={
                "epochs": 2,
                "lr": 0.01,
                "freeze": ["stem", "layer1", "layer2", "layer3", "layer4"],
                "feature_cache": cache,
                "cache_precision": "fp32",
            },
            model={"name": "resnet18", "pretrained": False, "head": {"dropout": 0.0}},
        )
        return train(recipe=recipe_from_dict(recipe), data=dataset / "manifest.csv", out=tmp_path / cache, progress=False)

    cached, plain = run_with("auto"), run_with("off")
    a = load_checkpoint(cached.run_dir / "checkpoints" / "last.pt")["state_dict"]
    b = load_checkpoint(plain.run_dir / "checkpoints" / "last.pt")["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    pd.testing.assert_frame_equal(cached.history.drop(columns="seconds"), plain.history.drop(columns="seconds"), atol=1e-6)


def test_mixup_trains_on_multi_hot_targets(dataset, tmp_path, caplog):
    caplog.set_level("INFO", logger="finetune")
    recipe = _recipe(train={"epochs": 1, "lr": 0.003, "mixup": {"mixup_alpha": 0.4, "cutmix_alpha": 0.0, "prob": 1.0}})
    result = train(recipe=recipe_from_dict(recipe), data=dataset / "manifest.csv", out=tmp_path / "mix", progress=False)
    assert np.isnan(result.history["train_accuracy"].iloc[0]) and np.isfinite(result.history["train_loss"].iloc[0])
    # the terminal's epoch tables show the mean average precision that picks best.pt, not only accuracy and F1
    lines = [r.getMessage() for r in caplog.records]
    header = next(line for line in lines if line.split()[:2] == ["epoch", "phase"])
    row = next(line for line in lines if re.match(r"^\s+1\s+1\s+\d\.\d{4}\s+mixed", line))
    assert header.split()[6:8] == ["val_f1", "val_mAP"] and len(row) == len(header)
    assert row.split()[7] == f"{result.history['val_mean_average_precision'].iloc[0]:.4f}"
    assert any("val_mean_average_precision" in line.split("\n")[1] for line in lines if line.startswith("\n epoch"))
    said = next(line for line in lines if line.startswith("per-class thresholds chosen on the validation split (f1): "))
    assert re.fullmatch(r"[^:]*\(f1\): blue: \d\.\d{3}, green: \d\.\d{3}, red: \d\.\d{3}", said), said  # no dict repr


def test_predict_eval_export_and_the_api(run, dataset, tmp_path):
    import finetune
    from finetune import evaluate, export
    from finetune.errors import UsageError

    model = finetune.load(run.run_dir)
    frame = model.predict([str(dataset / "img" / "p000.png"), str(dataset / "img" / "p001.png")])
    assert list(frame.columns[:3]) == ["path", "labels", "confidence"]
    truth = pd.read_csv(dataset / "manifest.csv", keep_default_na=False)["labels"][:2].tolist()
    assert frame["labels"].fillna("").tolist() == truth
    with pytest.raises(UsageError, match=r"--reject auto is for one label per image; with several use --min-confidence P"):
        model.predict(str(dataset / "img" / "p000.png"), reject="auto", target_accuracy=0.9)
    unsure = model.predict(str(dataset / "img" / "p000.png"), min_confidence=0.999999)
    assert unsure["labels"].iloc[0] == "unknown" and "unsure" in unsure
    report = evaluate(run=run.run_dir, data=dataset / "manifest.csv", out=tmp_path / "eval", progress=False)
    assert report.metrics["mean_average_precision"] > 0.9
    with pytest.raises(DataError, match=r"several labels per image: evaluate it on a CSV manifest 'path,labels'"):
        evaluate(run=run.run_dir, data=dataset / "img", out=tmp_path / "eval2", progress=False)
    result = export(run=run.run_dir, formats="onnx", out=tmp_path / "export", progress=False)
    parity = result.parity["onnx"]
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_prob_diff"] <= 1e-4 and parity["agreement_of"] == "label set"
    exported = finetune.load(result.files["onnx"])
    again = exported.predict([str(dataset / "img" / "p000.png"), str(dataset / "img" / "p001.png")])
    assert again["labels"].tolist() == frame["labels"].tolist()
    np.testing.assert_allclose(again[[f"prob_{c}" for c in CLASSES]], frame[[f"prob_{c}" for c in CLASSES]], atol=1e-4)
    from finetune.inference.predictor import Predictor
    from finetune.server.model import ServedModel

    served = ServedModel(predictor=Predictor(run.run_dir), top_k=3)
    picture = np.asarray(Image.open(dataset / "img" / "p000.png").convert("RGB"))
    answer = served.classify([picture], ["p000.png"])[0]
    assert answer["labels"] == [n for n in truth[0].split("|") if n] and answer["label"] == truth[0]
    assert answer["probabilities"]["red"] == pytest.approx(frame["prob_red"].iloc[0], abs=1e-5)
    stored = task_named("multilabel", thresholds=load_checkpoint(run.best_checkpoint)["thresholds"])
    assert isinstance(stored, MultiLabel) and len(stored.thresholds or ()) == 3


def test_label_refuses_several_labels_in_one_line(run, dataset, tmp_path):
    """`compare` and `report diff` take several labels per image (tests/test_multilabel_compare.py); `label` not yet."""
    from finetune import api
    from finetune.errors import UsageError

    with pytest.raises(UsageError, match=r"one label per image for now|several labels per image") as info:
        api.label(run=run.run_dir, unlabeled=dataset / "img", out=tmp_path / "l", progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "l").exists()


def test_cross_validation_and_audit_find_missing_and_wrong_labels(tmp_path):
    """Two folds with iterative stratification; cleanlab's multi-label confident learning on the out-of-fold
    probabilities flags most of the 8 images whose label sets were damaged (a label dropped or one added)."""
    from finetune import api

    frame = write_multilabel_set(tmp_path, count=120, seed=7)
    damaged = frame.copy()
    for k in range(8):
        names = [n for n in damaged.at[k, "labels"].split("|") if n]
        damaged.at[k, "labels"] = "|".join(names[1:]) if names else "red"  # drop the first label, or add one
    damaged.to_csv(tmp_path / "manifest.csv", index=False)
    recipe = recipe_from_dict(_recipe(data={"test_fraction": 0.0}, train={"epochs": 4, "lr": 0.003}))
    result = api.audit(data=tmp_path / "manifest.csv", recipe=recipe, out=tmp_path / "audit", folds=2, progress=False)
    summary = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert summary["oof_mean_average_precision"] > 0.85 and 0 < summary["label_health"] <= 1
    folds = pd.read_csv(tmp_path / "audit" / "cv" / "folds.csv")
    assert sorted(folds["fold"].unique()) == [1, 2] and abs((folds["fold"] == 1).sum() - 60) <= 2
    assert json.loads((tmp_path / "audit" / "cv" / "oof" / "metrics.json").read_text())["task"] == "multilabel"
    cv_summary = pd.read_csv(tmp_path / "audit" / "cv" / "cv_summary.csv")
    assert {"mean_average_precision", "macro_f1", "subset_accuracy"} <= set(cv_summary.columns)
    flagged = {p.split("/")[-1] for p in result.issues.loc[result.issues["label_issue"], "path"]}
    wrong = {f"p{k:03d}.png" for k in range(8)}
    assert len(flagged & wrong) >= 5, (flagged, wrong)
    row = result.quality[result.quality["path"].str.endswith("p000.png")].iloc[0]
    assert {"given_labels", "suggested_labels", "looks_missing", "looks_wrong"} <= set(result.quality.columns)
    assert (row["looks_missing"] or row["looks_wrong"]) and "confident learning" in row["reason"]
    assert (tmp_path / "audit" / "class_quality.csv").is_file() and (tmp_path / "audit" / "audit.html").is_file()


def test_mixup_of_several_labels_names_the_timm_it_needs(monkeypatch):
    from finetune.training import mixup as mixup_module

    class OldMixup:  # timm before 1.0.31: no multi_label argument
        def __init__(
            self,
            mixup_alpha=1.0,
            cutmix_alpha=0.0,
            prob=1.0,
            switch_prob=0.5,
            mode="batch",
            label_smoothing=0.1,
            num_classes=1000,
        ):
            pass

    cfg = recipe_from_dict(_recipe(train={"mixup": {"mixup_alpha": 0.4}})).train.mixup
    monkeypatch.setattr(mixup_module, "Mixup", OldMixup)
    with pytest.raises(RecipeError, match=r"train.mixup with several labels per image needs timm 1.0.31 or newer"):
        mixup_module.Mixer(cfg, label_smoothing=0.0, num_classes=3, multi_label=True)
    mixup_module.Mixer(cfg, label_smoothing=0.0, num_classes=3)  # one label per image: any timm


def test_lr_find_uses_binary_cross_entropy(dataset, tmp_path):
    import yaml

    from finetune import api

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe()))
    result = api.find_lr(recipe=path, data=dataset / "manifest.csv", out=tmp_path / "lr", steps=12, progress=False)
    first = float(result.curve["loss"].iloc[0])
    assert 0.5 < first < 0.9  # BCE of near-zero logits is ln 2 = 0.69; cross-entropy of these targets would be ~1.5
    assert (tmp_path / "lr" / "lr_find.csv").is_file()


def test_two_processes_match_one_with_several_labels(tmp_path):
    """torchrun with 2 CPU processes (gloo): the same head weights and validation figures as one process (one batch
    of 24 in one process = 12 on each rank; no augmentation, BatchNorm frozen), the validation targets gathered as
    multi-hot rows."""
    import yaml
    from test_distributed import _torchrun

    frame = write_multilabel_set(tmp_path, count=30, seed=5)
    frame.assign(split=["train"] * 24 + ["val"] * 6).to_csv(tmp_path / "manifest.csv", index=False)  # 24: even
    recipe = _recipe(
        data={"val_fraction": 0.2, "test_fraction": 0.0, "batch_size": 24},
        train={
            "epochs": 2,
            "lr": 0.05,
            "optimizer": "sgd",
            "freeze": ["stem", "layer1", "layer2", "layer3", "layer4"],
            "feature_cache": "off",
        },
    )
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    single = train(recipe=recipe_from_dict(recipe), data=tmp_path / "manifest.csv", out=tmp_path / "single", progress=False)
    done = _torchrun(tmp_path / "recipe.yaml", "--data", tmp_path / "manifest.csv", "--out", tmp_path / "ddp")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("mean average precision") == 1  # one summary line, from rank 0
    a = load_checkpoint(single.run_dir / "checkpoints" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")["state_dict"]
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-4
    columns = ["val_loss", "val_mean_average_precision", "val_macro_f1"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "ddp" / "metrics.csv")[columns], single.history[columns], atol=1e-4)
