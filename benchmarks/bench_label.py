"""The labelling loop, simulated on scikit-learn's digits with most labels hidden.

Per seed: 30 labelled digits per class to train on and 15 per class to validate on (--val-per-class), a fixed test split (the demo
manifest's, no look-alike across splits) and the rest as the unlabelled pool, its labels hidden. A run trained on the
labelled digits (the quickstart recipe) then

- pseudo-labels the pool (`finetune label`) at target precisions 0.95 and 0.90: the precision measured on the hidden
  labels and the coverage (or the refusal, when the validation split cannot vouch for the target);
- queues 50 digits to label; how often the model is wrong on them vs. on the pool overall;
- three rounds of "label the queue's top k" against three rounds of k random picks from the pool (the same k): the
  picked digits get their hidden label, `finetune merge-labels` adds them to train (val and test kept), and the run is
  trained again; test accuracy after each round, paired over seeds (the mean difference with a t interval).

Run: python benchmarks/bench_label.py [--seeds 0,1,2] [--k 50] [--rounds 3] [--epochs 8]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from finetune import label, merge_labels, train
from finetune.config.loading import load_recipe
from finetune.data.demo import build_digits_folder, digits_manifest
from finetune.errors import UsageError
from finetune.evaluation.intervals import wilson_interval

TRAIN_PER_CLASS = 30


def _start(digits: pd.DataFrame, seed: int, root: Path, *, val_per_class: int) -> tuple[Path, pd.DataFrame]:
    """The labelled manifest (train/val/test) and the hidden pool (path, label)."""
    rng = np.random.default_rng(seed)
    test = digits[digits["split"] == "test"]
    rest = digits[digits["split"] != "test"]
    rows, pool = [test.assign(split="test")], []
    for _, group in rest.groupby("label"):
        order = group.iloc[rng.permutation(len(group))]
        rows.append(order.iloc[:TRAIN_PER_CLASS].assign(split="train"))
        rows.append(order.iloc[TRAIN_PER_CLASS : TRAIN_PER_CLASS + val_per_class].assign(split="val"))
        pool.append(order.iloc[TRAIN_PER_CLASS + val_per_class :])
    manifest = root / "start.csv"
    pd.concat(rows)[["path", "label", "split"]].to_csv(manifest, index=False)
    return manifest, pd.concat(pool)[["path", "label"]].reset_index(drop=True)


def _train(recipe, data: Path, out: Path) -> tuple[Path, float, int]:
    result = train(recipe=recipe, data=data, out=out, progress=False)
    assert result.report is not None
    return result.run_dir, float(result.report.metrics["accuracy"]), int(result.report.metrics["num_images"])


def _pool_csv(pool: pd.DataFrame, path: Path) -> Path:
    pool[["path"]].to_csv(path, index=False)
    return path


def _first_round(run: Path, pool: pd.DataFrame, root: Path, k: int) -> dict[str, object]:
    """Pseudo-label precision on the hidden truth at two targets; the queue's error rate against the pool's."""
    truth = dict(zip(pool["path"], pool["label"]))
    found: dict[str, object] = {}
    for target in (0.95, 0.90):
        try:
            result = label(
                run=run,
                unlabeled=_pool_csv(pool, root / "pool.csv"),
                out=root / f"q{target}",
                target_precision=target,
                budget=k,
                progress=False,
            )
        except UsageError as exc:
            found[f"pseudo@{target}"] = f"refused: {str(exc).split(';')[0]}"
            continue
        pseudo = result.pseudo_labels
        right = int(sum(truth[p] == str(lab) for p, lab in zip(pseudo["path"], pseudo["label"])))
        low, high = wilson_interval(right, len(pseudo))
        found[f"pseudo@{target}"] = (
            f"{right}/{len(pseudo)} right = {right / max(1, len(pseudo)):.3f} ({low:.3f}-{high:.3f}), coverage "
            f"{len(pseudo) / len(pool):.3f}, per-class rules {sorted(c['rule'] for c in result.summary['per_class'].values())}"
        )
        table = result.predictions
        wrong = table["predicted_label"].astype(str).to_numpy() != table["path"].map(truth).to_numpy()
        queued = table["path"].isin(result.queue["path"]).to_numpy()
        found["queue_error_rate"] = f"{wrong[queued].mean():.3f} of {queued.sum()} queued vs {wrong.mean():.3f} of the pool"
    return found


def _loop(recipe, run: Path, pool: pd.DataFrame, root: Path, *, arm: str, k: int, rounds: int, seed: int) -> list[float]:
    """Test accuracy after each round of labelling k digits picked by the queue or at random."""
    rng = np.random.default_rng(1000 + seed)
    left = pool.copy()
    accuracies = []
    for r in range(1, rounds + 1):
        if arm == "queue":
            queue = label(
                run=run,
                unlabeled=_pool_csv(left, root / f"{arm}{r}_pool.csv"),
                out=root / f"{arm}{r}_q",
                target_precision=1e-6,
                budget=k,
                progress=False,
            ).queue
            picked = left[left["path"].isin(queue["path"])]
        else:
            picked = left.iloc[rng.choice(len(left), size=k, replace=False)]
        left = left.drop(index=picked.index)
        picked[["path", "label"]].to_csv(root / f"{arm}{r}_new.csv", index=False)
        merged = merge_labels(run=run, out=root / f"{arm}{r}.csv", labelled=[root / f"{arm}{r}_new.csv"], progress=False).manifest
        run, accuracy, _ = _train(recipe, merged, root / f"{arm}{r}_run")
        accuracies.append(accuracy)
    return accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--val-per-class", type=int, default=15, help="labelled validation digits per class")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_digits_folder(Path(tmp) / "digits")
        manifest = digits_manifest(folder, seed=0, val_fraction=0.15, test_fraction=0.15)
        digits = pd.read_csv(manifest, dtype=str)
        digits["path"] = [str(manifest.parent / p) for p in digits["path"]]
        differences = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            started = time.perf_counter()
            root = Path(tmp) / f"seed{seed}"
            root.mkdir()
            recipe = load_recipe("quickstart", overrides=[f"seed={seed}", f"train.epochs={args.epochs}"])
            start, pool = _start(digits, seed, root, val_per_class=args.val_per_class)
            run, accuracy, tested = _train(recipe, start, root / "run0")
            print(f"seed {seed}: start test accuracy {accuracy:.4f} on {tested} digits; pool {len(pool)} hidden", flush=True)
            for key, value in _first_round(run, pool, root, args.k).items():
                print(f"  {key}: {value}", flush=True)
            found = {
                arm: _loop(recipe, run, pool, root, arm=arm, k=args.k, rounds=args.rounds, seed=seed)
                for arm in ("queue", "random")
            }
            for arm, values in found.items():
                shown = ", ".join(
                    f"{a:.4f} ({wilson_interval(round(a * tested), tested)[0]:.3f}-{wilson_interval(round(a * tested), tested)[1]:.3f})"
                    for a in values
                )
                print(f"  {arm:6s} rounds 1-{args.rounds}: {shown}", flush=True)
            differences.append(np.array(found["queue"]) - np.array(found["random"]))
            print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
        table = np.array(differences)
        for r in range(table.shape[1]):
            mean = table[:, r].mean()
            if len(table) > 1:
                half = stats.t.ppf(0.975, len(table) - 1) * table[:, r].std(ddof=1) / np.sqrt(len(table))
                print(
                    f"round {r + 1}: queue - random test accuracy {mean:+.4f} (95% t interval {mean - half:+.4f} to {mean + half:+.4f}, {len(table)} seeds)"
                )
            else:
                print(f"round {r + 1}: queue - random test accuracy {mean:+.4f} (one seed)")


if __name__ == "__main__":
    main()
