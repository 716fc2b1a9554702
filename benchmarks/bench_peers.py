"""finetune against fastai on the same folder, model, image size, batch and epochs, in one process, alternating.

fastai: `ImageDataLoaders.from_folder` (Resize(224), batch 32, 2 workers), `vision_learner(tv resnet18,
pretrained=False)`, `fit_one_cycle(2)`. finetune: recipes/full_finetune.yaml with `tv:resnet18`, no weights,
2 epochs, batch 32, 2 workers, twice: with its default `train.amp: auto` (bf16 autocast on a CPU with native bf16,
after the first-batch check) and with `train.amp: off` (fp32, like for like). All on hymenoptera's train/ and val/
at 224 px. Reports the median epoch time of each (training + validation), auto's speed against off in the same
run, finetune's default against fastai's (goal: >= 1.2x its epoch throughput), the final validation accuracy of
each, and the wall time of finetune's whole call (screening, training, report) against fastai's training alone
(goal: no longer). fastai is optional: without it the peer rows say "not installed" and auto vs off still runs. Also: the seconds of
finetune's call spent outside its epochs (screening, model build, calibration, report) against one epoch.
Run: python benchmarks/bench_peers.py   (needs ../shared/datasets/hymenoptera; fastai importable)
fastai beside this project's torch, without replacing it (fastai 2.8 admits torch < 3): a side venv that sees this one,
  python3.11 -m venv /tmp/favenv && echo "$VIRTUAL_ENV/lib/python3.11/site-packages" > /tmp/favenv/lib/python3.11/site-packages/main.pth
  printf 'torch==2.14.1\ntorchvision==0.29.1\n' > pin.txt && /tmp/favenv/bin/pip install fastai -c pin.txt
  PYTHONPATH=. /tmp/favenv/bin/python benchmarks/bench_peers.py
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

from finetune import train
from finetune.inference.device import native_bf16

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "full_finetune.yaml"
OUTSIDE: list[float] = []  # seconds of each finetune call spent outside its epochs


def run_fastai(epochs: int) -> tuple[list[float], float, float]:
    from fastai.callback.core import Callback
    from fastai.vision.all import ImageDataLoaders, Resize, accuracy, resnet18, vision_learner

    times: list[float] = []

    class EpochTimer(Callback):  # each epoch's wall time, training and validation
        def before_epoch(self) -> None:
            self.begun = time.perf_counter()

        def after_epoch(self) -> None:
            times.append(time.perf_counter() - self.begun)

    started = time.perf_counter()
    dls = ImageDataLoaders.from_folder(DATA, train="train", valid="val", item_tfms=Resize(224), bs=32, num_workers=2)
    learn = vision_learner(dls, resnet18, pretrained=False, metrics=accuracy)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, cbs=[EpochTimer()])
    return times, float(learn.recorder.values[-1][2]), time.perf_counter() - started


def run_finetune(epochs: int, out: Path, extra: tuple[str, ...] = ()) -> tuple[list[float], float, float]:
    overrides = [
        *extra,
        "model.name=tv:resnet18",
        "model.pretrained=false",
        f"train.phases.0.epochs={epochs}",
        "data.batch_size=32",
        "data.num_workers=2",
        "transforms.input_size=224",
    ]
    started = time.perf_counter()
    result = train(recipe=RECIPE, data=DATA, out=out, overrides=overrides, progress=False)
    wall = time.perf_counter() - started
    epochs_s = [float(x) for x in result.history["seconds"]]
    OUTSIDE.append(wall - sum(epochs_s))  # screening, model build, calibration and report: all but the epochs
    return epochs_s, float(result.history["val_accuracy"].iloc[-1]), wall


def _median(runs: list[tuple[float, float, float]], field: int) -> float:
    return statistics.median(r[field] for r in runs)


def _accs(runs: list[tuple[float, float, float]]) -> str:
    return f"{min(r[1] for r in runs):.2f}-{max(r[1] for r in runs):.2f}"


def run(*, epochs: int = 2, repeats: int = 2) -> list[dict]:
    """Alternating in one process: finetune's defaults (amp auto), finetune in fp32 (amp off) and fastai if installed."""
    peers = importlib.util.find_spec("fastai") is not None
    if not peers:
        print("fastai is not installed: the peer comparison is not measured (pip install fastai to run it)")
    print(f"amp auto on this machine: {'bf16 candidate, ' + str(native_bf16()) if native_bf16() else 'fp32 (no native bf16)'}")
    found: dict[str, list[tuple[float, float, float]]] = {"auto": [], "off": [], "fastai": []}
    names = ["auto", "off", "fastai"] if peers else ["auto", "off"]
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                if name == "fastai":
                    times, acc, wall = run_fastai(epochs)
                else:
                    times, acc, wall = run_finetune(epochs, Path(tmp) / f"{name}{repeat}", (f"train.amp={name}",))
                found[name].append((statistics.median(times), acc, wall))
    auto, off = _median(found["auto"], 0), _median(found["off"], 0)
    print(f"finetune epoch: amp auto {auto:.1f} s, amp off {off:.1f} s -> auto {off / auto:.2f}x the fp32 throughput")
    print(f"val accuracy: amp auto {[round(r[1], 3) for r in found['auto']]}, amp off {[round(r[1], 3) for r in found['off']]}")
    outside = statistics.median(OUTSIDE)
    print(f"finetune outside its epochs (screening, build, calibration, report): {outside:.1f} s = {outside / auto:.2f} epoch")
    rows = [
        {
            "figure": "finetune's work outside its epochs (screening, calibration, report) / one epoch",
            "measured": f"{outside:.1f} vs {auto:.1f} s",
            "ratio": outside / auto,
            "target": "<= 1 (cheaper than an epoch)",
            "met": outside <= auto,
        },
        {
            "figure": "epoch throughput, finetune amp auto / amp off (full_finetune, tv resnet18, 224 px, hymenoptera)",
            "measured": f"{auto:.1f} vs {off:.1f} s per epoch; val acc {_accs(found['auto'])} vs {_accs(found['off'])}",
            "ratio": off / auto,
            "target": "> 1 where the CPU has native bf16",
            "met": None,
        },
    ]
    if not peers:
        rows.append(
            {
                "figure": "epoch throughput, finetune / fastai",
                "measured": "fastai not installed",
                "ratio": float("nan"),
                "target": ">= 1.2",
                "met": None,
            }
        )
        return rows
    theirs = _median(found["fastai"], 0)
    ours_wall, theirs_fit = _median(found["auto"], 2), _median(found["fastai"], 2)
    print(f"fastai epoch {theirs:.1f} s: finetune's default {theirs / auto:.2f}x, fp32 {theirs / off:.2f}x its throughput")
    print(f"val accuracy: fastai {[round(r[1], 3) for r in found['fastai']]}")
    print(f"whole call: finetune {ours_wall:.0f} s (screening, training, report) vs fastai's training {theirs_fit:.0f} s")
    rows += [
        {
            "figure": "epoch throughput, finetune's defaults (amp auto) / fastai's defaults",
            "measured": f"{auto:.1f} vs {theirs:.1f} s per epoch; val acc {_accs(found['auto'])} vs {_accs(found['fastai'])}",
            "ratio": theirs / auto,
            "target": ">= 1.2",
            "met": theirs / auto >= 1.2,
        },
        {
            "figure": "epoch throughput, finetune fp32 / fastai (like for like)",
            "measured": f"{off:.1f} vs {theirs:.1f} s per epoch",
            "ratio": theirs / off,
            "target": "-",
            "met": None,
        },
        {
            "figure": "finetune's whole call / fastai's training alone",
            "measured": f"{ours_wall:.0f} vs {theirs_fit:.0f} s",
            "ratio": ours_wall / theirs_fit,
            "target": "<= 1",
            "met": ours_wall <= theirs_fit,
        },
    ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    run(epochs=args.epochs, repeats=args.repeats)


if __name__ == "__main__":
    main()
