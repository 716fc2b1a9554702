"""The demo: real data (scikit-learn's digits) and the quickstart recipe. It reaches 0.996 test accuracy here (>= 0.99 is
the goal, checked by benchmarks/bench_demo.py); the test allows one more error for other CPUs' arithmetic."""

import json

from typer.testing import CliRunner

from finetune.cli import app
from finetune.data.demo import build_digits_folder


def test_digits_folder_is_real_data(tmp_path):
    folder = build_digits_folder(tmp_path / "digits")
    assert sorted(p.name for p in folder.iterdir()) == [str(d) for d in range(10)]
    assert sum(1 for _ in folder.rglob("*.png")) == 1797
    assert build_digits_folder(folder) == folder  # second call reuses it


def test_demo_reaches_target_accuracy(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    metrics = json.loads((tmp_path / "demo" / "report" / "metrics.json").read_text())
    assert metrics["num_images"] == 270 and metrics["num_classes"] == 10
    assert metrics["accuracy"] >= 0.985


def test_the_demo_split_keeps_look_alikes_together(tmp_path):
    """The digits hold near-identical pictures; the demo's manifest keeps each group in one split, with the sizes a
    split of the folder would have, and training on it finds no leakage."""
    import pandas as pd

    from finetune import train
    from finetune.config.loading import load_recipe
    from finetune.data.demo import digits_manifest
    from finetune.data.doctor import examine_all
    from finetune.data.duplicates import duplicate_pairs
    from finetune.data.split import split_samples

    folder = build_digits_folder(tmp_path / "digits")
    manifest = digits_manifest(folder, seed=0, val_fraction=0.15, test_fraction=0.15)
    assert manifest == tmp_path / "digits.csv"
    table = pd.read_csv(manifest, dtype=str)
    assert len(table) == 1797 and table["path"].str.match(r"^digits/\d/digit_\d{4}\.png$").all()
    samples = table.assign(path=[str(tmp_path / p) for p in table["path"]])
    pairs = duplicate_pairs(samples, examine_all(list(samples["path"]), progress=False))
    assert len(pairs) >= 30 and not pairs["crosses_split"].any()
    plain = split_samples(samples.assign(split=""), val_fraction=0.15, test_fraction=0.15, seed=0)
    assert plain.groupby(["split", "label"]).size().equals(samples.groupby(["split", "label"]).size())  # same sizes
    assert dict(samples["split"].value_counts()) == {"train": 1258, "test": 270, "val": 269}
    run = train(recipe=load_recipe("quickstart"), data=manifest, out=tmp_path / "run", epochs=1, progress=False)
    assert not (run.run_dir / "leakage.csv").exists() and run.report.metrics["num_images"] == 270
    assert "Known leakage" not in (run.report.folder / "summary.md").read_text()
